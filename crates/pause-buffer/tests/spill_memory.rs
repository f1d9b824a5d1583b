//! The spill file's memory does not grow with the number of saves: a
//! pause buffer saves states many times a second for as long as it runs.
//! (redb keeps about 40 bytes in memory for each non-durable commit until
//! a durable one; `States` commits durably, without syncing.) Alone in
//! its test binary, so that its process's resident memory is its own.

use dualwrite_pause_buffer::states::States;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_stays_flat_over_many_saves() {
    let mut states = States::new(None, 100).unwrap();
    let value = vec![7u8; 600];
    let keys: Vec<String> = (0..1000).map(|k| format!("key-{k}")).collect();
    let mut save = |n: usize| {
        for i in 0..n {
            let key = keys[i % keys.len()].as_str();
            states.spill(std::iter::once((key, value.as_slice())), true);
        }
    };
    save(5_000); // the file and its page cache reach their size
    let before = rss_kib();
    save(40_000);
    let grew = rss_kib().saturating_sub(before);
    // Non-durable commits: about 1,500 KiB over these saves.
    assert!(grew < 500, "memory grew by {grew} KiB over 40,000 saves");
}
