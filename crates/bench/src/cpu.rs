//! Where the CPU of a measured window went: the machine's busy share (from
//! `/proc/stat`) and the CPU seconds of named groups of processes (each
//! service, the PostgreSQL server's processes, the broker), so that a
//! figure says whether it was bound by the machine or by waiting.

use std::collections::BTreeMap;

use crate::env::cpu_secs;
use crate::scenarios::RunResult;

/// The machine's CPU ticks so far: (busy, all), over every core.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let t: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: u64 = t.iter().take(8).sum();
    let idle = t.get(3)? + t.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// CPU use from a start to a finish, per group of processes.
pub struct Window {
    machine: Option<(u64, u64)>,
    groups: Vec<(String, Vec<u32>)>,
    start: BTreeMap<String, f64>,
}

fn group_secs(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_secs(p)).sum()
}

impl Window {
    /// Starts counting for `groups` (name, processes).
    pub fn start(groups: Vec<(String, Vec<u32>)>) -> Window {
        let start = groups
            .iter()
            .map(|(n, p)| (n.clone(), group_secs(p)))
            .collect();
        Window {
            machine: machine_ticks(),
            groups,
            start,
        }
    }

    /// Sets `<prefix>_busy` (the machine's busy share, % of every core)
    /// and `<prefix>_<group>` (CPU seconds) in `out`.
    pub fn finish(&self, prefix: &str, out: &mut RunResult) {
        if let (Some((b0, a0)), Some((b1, a1))) = (self.machine, machine_ticks()) {
            if a1 > a0 {
                out.set(
                    &format!("{prefix}_busy"),
                    100.0 * (b1 - b0) as f64 / (a1 - a0) as f64,
                );
            }
        }
        for (name, pids) in &self.groups {
            let secs = group_secs(pids) - self.start[name];
            out.set(&format!("{prefix}_{name}"), secs);
        }
    }

    /// One line: busy share and each group's CPU seconds, largest first.
    pub fn describe(prefix: &str, out: &RunResult) -> String {
        let busy = out.values.get(&format!("{prefix}_busy"));
        let mut groups: Vec<(&str, f64)> = out
            .values
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(prefix)?.strip_prefix('_')?;
                (name != "busy").then_some((name, *v))
            })
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        let each: Vec<String> = groups
            .iter()
            .map(|(n, s)| format!("{n} {s:.1} s"))
            .collect();
        format!(
            "machine {} busy; {}",
            busy.map_or("?".into(), |b| format!("{b:.0} %")),
            each.join(", ")
        )
    }
}

/// The broker's process, when the harness's script names it
/// (`DUALWRITE_BENCH_BROKER_PID`).
pub fn broker_pid() -> Option<u32> {
    std::env::var("DUALWRITE_BENCH_BROKER_PID")
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_this_process_and_the_machine() {
        let me = std::process::id();
        let w = Window::start(vec![("me".into(), vec![me])]);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let mut out = RunResult::default();
        w.finish("w", &mut out);
        assert!(out.values["w_me"] >= 0.1, "{:?}", out.values);
        assert!(out.values["w_busy"] > 0.0, "{:?}", out.values);
        let line = Window::describe("w", &out);
        assert!(
            line.starts_with("machine ") && line.contains(" me "),
            "{line}"
        );
    }
}
