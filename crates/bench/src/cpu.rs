//! Where the CPU of a measured window went: the machine's busy share (from
//! `/proc/stat`) and the CPU seconds of named groups of processes (each
//! service, the PostgreSQL server's processes, the broker), so that a
//! figure says whether it was bound by the machine or by waiting.

use std::collections::BTreeMap;

use crate::env::cpu_secs;
use crate::scenarios::RunResult;
use dualwrite_process::{stat, Stat};

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

/// The processes a group counts.
pub enum Procs {
    /// These processes.
    Each(Vec<u32>),
    /// A server process and every process it started, also those started
    /// or ended during the window (a database server's connections).
    Server(u32),
}

/// CPU use from a start to a finish, per group of processes.
pub struct Window {
    machine: Option<(u64, u64)>,
    groups: Vec<(String, Procs)>,
    start: BTreeMap<String, f64>,
}

fn group_secs(procs: &Procs) -> f64 {
    match procs {
        Procs::Each(pids) => pids.iter().filter_map(|&p| cpu_secs(p)).sum(),
        Procs::Server(pid) => server_secs(*pid).unwrap_or(f64::NAN),
    }
}

/// The CPU seconds of `server` and of every process it started: those
/// running now and those that ended (a process's time moves into its
/// parent's waited-for children's time when the parent reaps it, so the
/// sum goes on without a jump; one that ends between the two reads below
/// is missed for that reading).
pub fn server_secs(server: u32) -> Option<f64> {
    let all = |s: Stat| s.ticks.iter().chain(&s.children_ticks).sum::<u64>();
    let mut ticks = all(stat(server)?);
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(s) = stat(pid).filter(|s| s.ppid == server) {
            ticks += all(s);
        }
    }
    Some(ticks as f64 / 100.0)
}

/// The parent of a process.
pub fn parent(pid: u32) -> Option<u32> {
    stat(pid).map(|s| s.ppid)
}

impl Window {
    /// Starts counting for `groups` (name, processes).
    pub fn start(groups: Vec<(String, Procs)>) -> Window {
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
        for (name, procs) in &self.groups {
            let secs = group_secs(procs) - self.start[name];
            out.set(&format!("{prefix}_{name}"), secs);
        }
    }

    /// Sets `<prefix>_per_row` (µs of CPU per row, every group together)
    /// and `<prefix>_allows` (the rows/s this machine's cores give at that
    /// cost with all of them busy): a rate near it was bound by the CPU
    /// each row costs, one far below it by something else.
    pub fn per_row(prefix: &str, rows: u64, out: &mut RunResult) {
        let total: f64 = groups(prefix, out).iter().map(|(_, s)| s).sum();
        if total <= 0.0 || rows == 0 {
            return;
        }
        let us = total * 1e6 / rows as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        out.set(&format!("{prefix}_per_row"), us);
        out.set(&format!("{prefix}_allows"), cores as f64 * 1e6 / us);
    }

    /// One line: busy share, CPU per row, and each group's CPU seconds,
    /// largest first.
    pub fn describe(prefix: &str, out: &RunResult) -> String {
        let value = |k: &str| out.values.get(&format!("{prefix}_{k}")).copied();
        let mut groups = groups(prefix, out);
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        let each: Vec<String> = groups
            .iter()
            .map(|(n, s)| format!("{n} {s:.1} s"))
            .collect();
        let per_row = match (value("per_row"), value("allows")) {
            (Some(us), Some(rate)) => {
                format!("; {us:.0} µs of CPU per row (at most {rate:.0} rows/s on these cores)")
            }
            _ => String::new(),
        };
        format!(
            "machine {} busy{per_row}; {}",
            value("busy").map_or("?".into(), |b| format!("{b:.0} %")),
            each.join(", ")
        )
    }
}

/// Each group's CPU seconds under `prefix` (not the figures made from them).
fn groups<'a>(prefix: &str, out: &'a RunResult) -> Vec<(&'a str, f64)> {
    out.values
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(prefix)?.strip_prefix('_')?;
            (!matches!(name, "busy" | "per_row" | "allows")).then_some((name, *v))
        })
        .collect()
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

    /// A child that ran and ended inside the window still counts.
    #[test]
    fn a_server_counts_the_processes_it_started_and_reaped() {
        let me = std::process::id();
        let w = Window::start(vec![("tree".into(), Procs::Server(me))]);
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let mut out = RunResult::default();
        w.finish("w", &mut out);
        assert!(out.values["w_tree"] >= 0.05, "{:?}", out.values);
        assert_eq!(parent(me), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn a_window_counts_this_process_and_the_machine() {
        let me = std::process::id();
        let w = Window::start(vec![("me".into(), Procs::Each(vec![me]))]);
        // Spin until this process has used 0.15 s of CPU (on a busy
        // machine that takes longer than 0.15 s of wall time).
        let start = cpu_secs(me).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut x = 0u64;
        while cpu_secs(me).unwrap() < start + 0.15 {
            assert!(std::time::Instant::now() < deadline, "no CPU in 60 s");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let mut out = RunResult::default();
        w.finish("w", &mut out);
        assert!(out.values["w_me"] >= 0.1, "{:?}", out.values);
        assert!(out.values["w_busy"] > 0.0, "{:?}", out.values);
        let me = out.values["w_me"];
        Window::per_row("w", 1000, &mut out);
        let us = out.values["w_per_row"];
        assert!((us - me * 1000.0).abs() < 1e-6, "{:?}", out.values);
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        assert!((out.values["w_allows"] - cores * 1e6 / us).abs() < 1e-6);
        let line = Window::describe("w", &out);
        assert!(
            line.starts_with("machine ")
                && line.contains(" me ")
                && line.contains("µs of CPU per row"),
            "{line}"
        );
        assert!(
            !line.contains("per_row") && !line.contains("allows "),
            "{line}"
        );
    }
}
