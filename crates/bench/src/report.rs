//! Tables: per scenario the median over the runs with min and max, and the
//! ratios to the anchors (computed per run, from figures measured in the
//! same run, then the median of those); then the services' peak memory.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::env::SERVICES;
use crate::scenarios::RunResult;

/// One figure of a scenario.
pub struct Line {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub decimals: usize,
}

/// ours / anchor.
pub struct Ratio {
    pub label: &'static str,
    pub num: &'static str,
    pub den: &'static str,
}

/// How a scenario's results are shown.
pub struct Spec {
    pub title: String,
    pub lines: Vec<Line>,
    pub ratios: Vec<Ratio>,
}

const fn line(key: &'static str, label: &'static str, unit: &'static str, decimals: usize) -> Line {
    Line {
        key,
        label,
        unit,
        decimals,
    }
}

const fn ratio(label: &'static str, num: &'static str, den: &'static str) -> Ratio {
    Ratio { label, num, den }
}

pub fn spec(scenario: &str, rows: u64, live_rows: u64, rate: u64, secs: u64) -> Spec {
    match scenario {
        "initial-sync" => Spec {
            title: format!(
                "Initial sync: {} rows on each side (different keys), every row created on the other side",
                thousands(rows as f64, 0)
            ),
            lines: vec![
                line("ours", "dualwrite initial sync (rows created / time to Running)", "rows/s", 0),
                line("secs", "dualwrite: `ctl run` until Running", "s", 1),
                line("sync_cpu_busy", "machine busy in the initial sync, share of every core", "%", 0),
                line("sync_cpu_per_row", "… CPU per row created, every process of the stack together", "µs", 0),
                line("sync_cpu_allows", "… the rows/s the machine's cores allow at that cost", "rows/s", 0),
                line("sync_cpu_pause-buffer", "… CPU of the pause buffer (the copy runs there)", "s", 1),
                line("sync_cpu_postgres", "… of PostgreSQL (every process of the server)", "s", 1),
                line("copy", "anchor: COPY into a fresh table", "rows/s", 0),
                line("upsert", "anchor: upsert, 500-row batches (json_populate_recordset)", "rows/s", 0),
                line("dbz", "peer: Debezium source (snapshot) + JDBC sink each way, first row to arrive to last", "rows/s", 0),
                line("dbz_cpu_per_row", "… its CPU per row created, from the worker's start", "µs", 0),
                line("dbz_cpu_busy", "… machine busy over it", "%", 0),
                line("dbz_rss", "… Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / COPY", "ours", "copy"),
                ratio("dualwrite / batched upsert", "ours", "upsert"),
                ratio("dualwrite / Debezium snapshot + JDBC sink", "ours", "dbz"),
                ratio("dualwrite / Debezium, CPU per row", "sync_cpu_per_row", "dbz_cpu_per_row"),
            ],
        },
        "live-one" => Spec {
            title: format!(
                "Live sync, one direction: {} rows inserted on fno in transactions of 1,000, then {} rows/s for {secs} s",
                thousands(live_rows as f64, 0),
                thousands(rate as f64, 0)
            ),
            lines: vec![
                line("ours", "dualwrite fno -> dataverse", "rows/s", 0),
                line("native", "anchor: native logical replication", "rows/s", 0),
                line("hop", "anchor: one Kafka produce+consume hop (rdkafka)", "rows/s", 0),
                line("insert", "load generator's insert rate (dualwrite run)", "rows/s", 0),
                line("live_cpu_busy", "machine busy, first insert to last row, share of every core", "%", 0),
                line("live_cpu_per_row", "… CPU per row, every process of the stack together", "µs", 0),
                line("live_cpu_allows", "… the rows/s the machine's cores allow at that cost", "rows/s", 0),
                line("row_bytes", "average row size (pg_column_size)", "bytes", 0),
                line("after_p50", "then a steady load right after: latency p50", "ms", 1),
                line("after_p99", "then a steady load right after: latency p99", "ms", 1),
                line("after_max", "then a steady load right after: latency max", "ms", 1),
                line("after_max_at", "  the slowest row made at (after the load's start)", "s", 1),
                line("dbz", "peer: Debezium source + JDBC sink, the same rows", "rows/s", 0),
                line("dbz_cpu_per_row", "… its CPU per row: Kafka Connect, PostgreSQL, the broker", "µs", 0),
                line("dbz_cpu_busy", "… machine busy over it", "%", 0),
                line("dbz_rss", "… Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / native logical replication", "ours", "native"),
                ratio("dualwrite / Kafka hop", "ours", "hop"),
                ratio("dualwrite / Debezium source + JDBC sink", "ours", "dbz"),
                ratio("dualwrite / Debezium, CPU per row", "live_cpu_per_row", "dbz_cpu_per_row"),
            ],
        },
        "live-both" => Spec {
            title: format!(
                "Live sync, both directions at once: {} rows, half inserted on each side",
                thousands(live_rows as f64, 0)
            ),
            lines: vec![
                line("ours", "dualwrite, both directions (total)", "rows/s", 0),
                line("native", "anchor: native logical replication, both directions", "rows/s", 0),
                line("hop", "anchor: one Kafka produce+consume hop (rdkafka)", "rows/s", 0),
                line("insert", "load generator's insert rate (dualwrite run)", "rows/s", 0),
                line("live_cpu_busy", "machine busy, first insert to last row, share of every core", "%", 0),
                line("live_cpu_per_row", "… CPU per row, every process of the stack together", "µs", 0),
                line("live_cpu_allows", "… the rows/s the machine's cores allow at that cost", "rows/s", 0),
                line("dbz", "peer: Debezium source + JDBC sink each way (each source publishing its side's keys only), total", "rows/s", 0),
                line("dbz_cpu_per_row", "… its CPU per row: Kafka Connect, PostgreSQL, the broker", "µs", 0),
                line("dbz_cpu_busy", "… machine busy over it", "%", 0),
                line("dbz_rss", "… Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / native logical replication", "ours", "native"),
                ratio("dualwrite / Kafka hop", "ours", "hop"),
                ratio("dualwrite / Debezium source + JDBC sink", "ours", "dbz"),
                ratio("dualwrite / Debezium, CPU per row", "live_cpu_per_row", "dbz_cpu_per_row"),
            ],
        },
        "latency" => Spec {
            title: format!(
                "Latency, source commit to target write, at a steady {} rows/s for {secs} s",
                thousands(rate as f64, 0)
            ),
            lines: vec![
                line("p50", "dualwrite p50", "ms", 1),
                line("p99", "dualwrite p99", "ms", 1),
                line("max", "dualwrite max", "ms", 1),
                line("p50_first", "dualwrite p50, first third of the rows", "ms", 1),
                line("p50_last", "dualwrite p50, last third of the rows", "ms", 1),
                line("p50_capture", "median share: capture (commit to capture topic)", "ms", 1),
                line("p50_router", "median share: router (to the map topic)", "ms", 1),
                line("p50_resolver", "median share: resolver (to the apply topic)", "ms", 1),
                line("p50_applier", "median share: applier (to the target row)", "ms", 1),
                line("native_p50", "anchor: native logical replication p50", "ms", 1),
                line("native_p99", "anchor: native logical replication p99", "ms", 1),
                line("native_max", "anchor: native logical replication max", "ms", 1),
                line("hop_p50", "for reference: one Kafka produce+consume hop p50", "ms", 1),
                line("hop_p99", "for reference: one Kafka produce+consume hop p99", "ms", 1),
                line("achieved", "achieved source rate (dualwrite run)", "rows/s", 0),
            ],
            ratios: vec![
                ratio("dualwrite p50 / native p50", "p50", "native_p50"),
                ratio("dualwrite p99 / native p99", "p99", "native_p99"),
                ratio("dualwrite p50 / one Kafka hop p50", "p50", "hop_p50"),
            ],
        },
        "catch-up" => Spec {
            title: format!(
                "Catch-up: pause, queue {} changes (inserts on fno), resume; beside Debezium's source + JDBC sink with the sink paused and resumed",
                thousands(rows as f64, 0)
            ),
            lines: vec![
                line("insert", "load generator's insert rate", "rows/s", 0),
                line("queue", "captured and routed to the map topic while paused", "rows/s", 0),
                line("replay", "replay: resume until every row is on the target", "rows/s", 0),
                line("to_running", "resume until Running (`ctl run` returns)", "s", 1),
                line("to_applied", "resume until every row is on the target", "s", 1),
                line("replay_cpu_busy", "machine busy during the replay, share of every core", "%", 0),
                line("replay_cpu_per_row", "… CPU per row, every process of the stack together", "µs", 0),
                line("replay_cpu_allows", "… the rows/s the machine's cores allow at that cost", "rows/s", 0),
                line("replay_cpu_pause-buffer", "… CPU of the pause buffer", "s", 1),
                line("replay_cpu_apply-dataverse", "… of the target's applier", "s", 1),
                line("replay_cpu_postgres", "… of PostgreSQL (every process of the server)", "s", 1),
                line("replay_cpu_broker", "… of the broker", "s", 1),
                line("replay_cpu_capture-dataverse", "… of the target's capturer (echoes)", "s", 1),
                line("replay_cpu_router", "… of the router", "s", 1),
                line("replay_busy_pause-buffer/fold", "pause buffer's loop in the replay: folding", "s", 1),
                line("replay_busy_pause-buffer/deliver", "… delivering the writes (until acknowledged)", "s", 1),
                line("replay_busy_pause-buffer/save", "… saving the states (encoding, spilling)", "s", 1),
                line("replay_busy_pause-buffer/save-ack", "… until the states saved are acknowledged", "s", 1),
                line("replay_busy_pause-buffer/wait", "… waiting for its next record (fetching the backlog)", "s", 1),
                line("replay_busy_apply-dataverse/write", "target applier's loop: writing (the transaction)", "s", 1),
                line("replay_busy_apply-dataverse/finish", "… storing its offsets", "s", 1),
                line("dbz_queue", "Debezium source + JDBC sink, the sink paused: captured onto its topic", "rows/s", 0),
                line("dbz_replay", "… the sink resumed until every row is on the target", "rows/s", 0),
                line("dbz_replay_cpu_busy", "… machine busy during its replay", "%", 0),
                line("dbz_replay_cpu_per_row", "… CPU per row: Kafka Connect, PostgreSQL, the broker", "µs", 0),
                line("dbz_replay_cpu_connect", "… of the Kafka Connect JVM", "s", 1),
                line("dbz_replay_cpu_postgres", "… of PostgreSQL", "s", 1),
                line("dbz_replay_cpu_broker", "… of the broker", "s", 1),
                line("dbz_rss", "Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / Debezium, replay rows/s", "replay", "dbz_replay"),
                ratio("dualwrite / Debezium, CPU per row in the replay", "replay_cpu_per_row", "dbz_replay_cpu_per_row"),
                ratio("dualwrite / Debezium, queueing rows/s", "queue", "dbz_queue"),
            ],
        },
        "capture-hop" => Spec {
            title: format!(
                "Capture hop, commit to Kafka topic: dualwrite's capturer beside {} (pgoutput), \
                 {} rows inserted in transactions of 1,000, then {} rows/s for {secs} s",
                crate::debezium::describe(),
                thousands(live_rows as f64, 0),
                thousands(rate as f64, 0)
            ),
            lines: vec![
                line("ours", "dualwrite capture: first insert to last record on the topic", "rows/s", 0),
                line("dbz", "Debezium: first insert to last record on the topic", "rows/s", 0),
                line("ours_insert", "load generator's insert rate (dualwrite run)", "rows/s", 0),
                line("dbz_insert", "load generator's insert rate (Debezium run)", "rows/s", 0),
                line("ours_cpu", "dualwrite capture process, CPU during the bulk", "s", 1),
                line("ours_pg_cpu", "… its PostgreSQL backend(s), CPU during the bulk", "s", 1),
                line("dbz_cpu", "Kafka Connect JVM, CPU during the bulk", "s", 1),
                line("dbz_pg_cpu", "… its PostgreSQL backends (walsender), CPU during the bulk", "s", 1),
                line("ours_p50", "dualwrite capture latency, insert to topic, p50", "ms", 1),
                line("ours_p99", "dualwrite capture latency p99", "ms", 1),
                line("ours_max", "dualwrite capture latency max", "ms", 1),
                line("dbz_p50", "Debezium latency, insert to topic, p50", "ms", 1),
                line("dbz_p99", "Debezium latency p99", "ms", 1),
                line("dbz_max", "Debezium latency max", "ms", 1),
                line("ours_achieved", "achieved steady rate (dualwrite run)", "rows/s", 0),
                line("dbz_achieved", "achieved steady rate (Debezium run)", "rows/s", 0),
                line("ours_rss", "dualwrite capture peak RSS", "MiB", 1),
                line("dbz_rss", "Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / Debezium, rows/s", "ours", "dbz"),
                ratio("dualwrite / Debezium, capturer CPU", "ours_cpu", "dbz_cpu"),
                ratio("dualwrite / Debezium, PostgreSQL CPU", "ours_pg_cpu", "dbz_pg_cpu"),
                ratio("dualwrite p50 / Debezium p50", "ours_p50", "dbz_p50"),
                ratio("dualwrite p99 / Debezium p99", "ours_p99", "dbz_p99"),
            ],
        },
        "end-to-end" => Spec {
            title: format!(
                "One direction end to end: dualwrite beside {} + {} (upsert by key) on one worker, \
                 {} rows inserted in transactions of 1,000, then {} rows/s for {secs} s",
                crate::debezium::describe(),
                crate::debezium::describe_sink(),
                thousands(live_rows as f64, 0),
                thousands(rate as f64, 0)
            ),
            lines: vec![
                line("ours", "dualwrite: first source insert to last target write", "rows/s", 0),
                line("dbz", "Debezium source + JDBC sink: the same", "rows/s", 0),
                line("ours_insert", "load generator's insert rate (dualwrite run)", "rows/s", 0),
                line("dbz_insert", "load generator's insert rate (Debezium run)", "rows/s", 0),
                line("ours_p50", "dualwrite latency, source commit to target write, p50", "ms", 1),
                line("ours_p99", "dualwrite latency p99", "ms", 1),
                line("ours_max", "dualwrite latency max", "ms", 1),
                line("dbz_p50", "Debezium pipeline latency p50", "ms", 1),
                line("dbz_p99", "Debezium pipeline latency p99", "ms", 1),
                line("dbz_max", "Debezium pipeline latency max", "ms", 1),
                line("ours_achieved", "achieved steady rate (dualwrite run)", "rows/s", 0),
                line("dbz_achieved", "achieved steady rate (Debezium run)", "rows/s", 0),
                line("dbz_rss", "Kafka Connect JVM peak RSS (-Xmx512m)", "MiB", 1),
            ],
            ratios: vec![
                ratio("dualwrite / Debezium pipeline, rows/s", "ours", "dbz"),
                ratio("dualwrite p50 / Debezium pipeline p50", "ours_p50", "dbz_p50"),
                ratio("dualwrite p99 / Debezium pipeline p99", "ours_p99", "dbz_p99"),
            ],
        },
        "scaling" => Spec {
            title: format!(
                "Scaling: live sync one way, {} rows, by topic partitions and instances of the router and each applier",
                thousands(live_rows as f64, 0)
            ),
            lines: vec![
                line("p1_i1", "1 partition, 1 instance", "rows/s", 0),
                line("p2_i1", "2 partitions, 1 instance", "rows/s", 0),
                line("p4_i1", "4 partitions, 1 instance", "rows/s", 0),
                line("p2_i2", "2 partitions, 2 instances", "rows/s", 0),
                line("p4_i2", "4 partitions, 2 instances", "rows/s", 0),
            ],
            ratios: vec![
                ratio("2 partitions / 1 (1 instance)", "p2_i1", "p1_i1"),
                ratio("4 partitions / 1 (1 instance)", "p4_i1", "p1_i1"),
                ratio("2 instances / 1 (2 partitions)", "p2_i2", "p2_i1"),
                ratio("2 instances / 1 (4 partitions)", "p4_i2", "p4_i1"),
            ],
        },
        other => Spec {
            title: other.to_owned(),
            lines: vec![],
            ratios: vec![],
        },
    }
}

/// `1,234,567` or `12.3`.
pub fn thousands(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    let s = format!("{v:.decimals$}");
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), format!(".{f}")),
        None => (s.clone(), String::new()),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", int),
    };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}{frac}")
}

/// Median, min and max (None without values).
pub fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    Some((median, v[0], v[v.len() - 1]))
}

/// The table of one scenario.
pub fn scenario_table(spec: &Spec, runs: &[RunResult], failed: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== {} ==", spec.title);
    let _ = writeln!(
        out,
        "{} run(s){}",
        runs.len(),
        if failed > 0 {
            format!(", {failed} failed (see the log above)")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "{:<62} {:>12} {:>12} {:>12}  unit",
        "", "median", "min", "max"
    );
    for l in &spec.lines {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.values.get(l.key).copied())
            .collect();
        if let Some((med, min, max)) = stats(&values) {
            let _ = writeln!(
                out,
                "{:<62} {:>12} {:>12} {:>12}  {}",
                l.label,
                thousands(med, l.decimals),
                thousands(min, l.decimals),
                thousands(max, l.decimals),
                l.unit
            );
        }
    }
    for r in &spec.ratios {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|run| Some(run.values.get(r.num)? / run.values.get(r.den)?))
            .collect();
        if let Some((med, min, max)) = stats(&values) {
            let _ = writeln!(
                out,
                "{:<62} {:>12} {:>12} {:>12}  x (same run)",
                format!("ratio {}", r.label),
                format!("{med:.3}"),
                format!("{min:.3}"),
                format!("{max:.3}"),
            );
        }
    }
    out
}

/// Peak resident memory (VmHWM) of each service per scenario: the median
/// over the runs, and the largest in brackets.
/// Both ways against one way, per direction (half the both-ways total
/// over the one-way rate, medians of each scenario's runs), for dualwrite
/// and the peer, when both live scenarios ran.
pub fn two_way_table(results: &BTreeMap<String, Vec<RunResult>>) -> String {
    let median = |scenario: &str, key: &str| -> Option<f64> {
        let runs = results.get(scenario)?;
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.values.get(key).copied())
            .collect();
        stats(&v).map(|(m, _, _)| m)
    };
    let mut out = String::new();
    for (who, key) in [
        ("dualwrite", "ours"),
        ("Debezium source + JDBC sink", "dbz"),
    ] {
        if let (Some(both), Some(one)) = (median("live-both", key), median("live-one", key)) {
            out.push_str(&format!(
                "{who:<30} both ways {:>8} rows/s in total, one way {:>8} rows/s: {:.2}x per direction\n",
                thousands(both, 0),
                thousands(one, 0),
                both / 2.0 / one
            ));
        }
    }
    if out.is_empty() {
        return out;
    }
    format!("== Both ways against one way, per direction (medians; the goal: 0.8x) ==\n{out}\n")
}

pub fn memory_table(results: &BTreeMap<String, Vec<RunResult>>, order: &[String]) -> String {
    let names: Vec<String> = SERVICES
        .iter()
        .map(|a| a.join("-").replace("--side-", ""))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== Peak resident memory of each service (VmHWM, MiB: median over runs, max in brackets) =="
    );
    let _ = write!(out, "{:<14}", "scenario");
    for n in &names {
        let _ = write!(out, " {n:>18}");
    }
    let _ = writeln!(out);
    for scenario in order {
        let Some(runs) = results.get(scenario) else {
            continue;
        };
        if runs.iter().all(|r| r.rss.is_empty()) {
            continue;
        }
        let _ = write!(out, "{scenario:<14}");
        for n in &names {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.rss.iter().find(|(s, _)| s == n).map(|(_, v)| *v))
                .collect();
            let cell = match stats(&values) {
                Some((med, _, max)) => format!("{med:.1} ({max:.1})"),
                None => "-".to_owned(),
            };
            let _ = write!(out, " {cell:>18}");
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn two_ways_are_compared_per_direction_with_medians() {
        let run = |ours: f64, dbz: Option<f64>| {
            let mut r = RunResult::default();
            r.set("ours", ours);
            if let Some(d) = dbz {
                r.set("dbz", d);
            }
            r
        };
        let mut results = BTreeMap::new();
        assert_eq!(two_way_table(&results), "");
        results.insert(
            "live-one".to_owned(),
            vec![
                run(10_000.0, Some(4_000.0)),
                run(9_000.0, Some(5_000.0)),
                run(11_000.0, None),
            ],
        );
        assert_eq!(two_way_table(&results), "", "one scenario only");
        results.insert(
            "live-both".to_owned(),
            vec![
                run(8_000.0, Some(6_000.0)),
                run(9_000.0, Some(7_000.0)),
                run(7_000.0, Some(5_000.0)),
            ],
        );
        let t = two_way_table(&results);
        // dualwrite: 8,000 / 2 / 10,000; the peer: 6,000 / 2 / 4,500.
        assert!(
            t.contains("both ways    8,000 rows/s in total, one way   10,000 rows/s: 0.40x"),
            "{t}"
        );
        assert!(
            t.contains("both ways    6,000 rows/s in total, one way    4,500 rows/s: 0.67x"),
            "{t}"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.0, 0), "1,234,567");
        assert_eq!(thousands(999.0, 0), "999");
        assert_eq!(thousands(1234.56, 1), "1,234.6");
        assert_eq!(thousands(-1234.0, 0), "-1,234");
    }

    #[test]
    fn ratios_use_the_same_run() {
        let mut a = RunResult::default();
        a.values.insert("ours".into(), 10.0);
        a.values.insert("native".into(), 100.0);
        let mut b = RunResult::default();
        b.values.insert("ours".into(), 30.0);
        b.values.insert("native".into(), 100.0);
        let t = scenario_table(&spec("live-one", 1, 1, 1, 1), &[a, b], 0);
        assert!(
            t.contains("ratio dualwrite / native logical replication"),
            "{t}"
        );
        assert!(t.contains("0.200"), "{t}");
    }
}
