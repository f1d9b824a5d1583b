//! dualwrite-bench: measures dualwrite against the real broker and
//! PostgreSQL, beside anchors measured in the same run on the same machine
//! (native logical replication, one Kafka hop, raw COPY and upserts), and
//! prints medians over several runs. Run it through `scripts/bench.sh`,
//! which starts the local stack and builds the release binaries.
//!
//! This is a separate binary on purpose: timings never become assertions
//! in the test suite.

mod cpu;
mod debezium;
mod env;
mod hops;
mod measure;
mod peer;
mod report;
mod rows;
mod scaling;
mod scenarios;
mod topic;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::env::Ctx;
use crate::scenarios::{Params, RunResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Every scenario below.
    All,
    /// Initial sync of --rows rows per side, beside COPY and batched upserts.
    InitialSync,
    /// Live sync, one direction, beside native logical replication and one Kafka hop.
    LiveOne,
    /// Live sync, both directions at once, beside the same anchors.
    LiveBoth,
    /// Latency at a steady --rate, beside native logical replication.
    Latency,
    /// Pause, queue --rows changes, resume.
    CatchUp,
    /// The capture hop alone (commit to Kafka topic, --live-rows rows and a
    /// steady --rate), dualwrite's capturer beside Debezium's PostgreSQL
    /// connector on Kafka Connect (fetched with Maven on first use).
    CaptureHop,
    /// One direction end to end (--live-rows rows, then a steady --rate),
    /// dualwrite beside Debezium's PostgreSQL connector and JDBC sink on
    /// one Kafka Connect worker (fetched with Maven on first use).
    EndToEnd,
    /// Live sync one way (--live-rows rows) with 1, 2 and 4 partitions and
    /// 1 or 2 instances of the router and of each applier.
    Scaling,
}

impl Scenario {
    const ORDER: [Scenario; 8] = [
        Scenario::EndToEnd,
        Scenario::LiveOne,
        Scenario::LiveBoth,
        Scenario::Latency,
        Scenario::CaptureHop,
        Scenario::Scaling,
        Scenario::CatchUp,
        Scenario::InitialSync,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::InitialSync => "initial-sync",
            Scenario::LiveOne => "live-one",
            Scenario::LiveBoth => "live-both",
            Scenario::Latency => "latency",
            Scenario::CatchUp => "catch-up",
            Scenario::CaptureHop => "capture-hop",
            Scenario::EndToEnd => "end-to-end",
            Scenario::Scaling => "scaling",
        }
    }

    /// Whether it moves --rows rows (and may run fewer times).
    fn big(self) -> bool {
        matches!(self, Scenario::InitialSync | Scenario::CatchUp)
    }
}

/// Benchmarks dualwrite on the local stack (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "dualwrite-bench")]
struct Args {
    /// The dualwrite binary to run the services with (default: `dualwrite`
    /// next to this binary, i.e. the same build profile).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// PostgreSQL, without a database: postgres://user@host:port.
    #[arg(
        long,
        env = "DUALWRITE_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:55432"
    )]
    pg_url: String,
    /// The Kafka broker (scripts/bench.sh starts an Apache Kafka of its own).
    #[arg(
        long,
        env = "DUALWRITE_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    bootstrap: String,
    /// Scenarios to run (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    scenario: Vec<Scenario>,
    /// Runs of each scenario (medians are over these).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs of the --rows scenarios (initial-sync, catch-up); default --runs.
    #[arg(long)]
    big_runs: Option<usize>,
    /// Rows per side of the initial sync, and changes queued for the catch-up.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Rows of each live sync measurement.
    #[arg(long, default_value_t = 50_000)]
    live_rows: u64,
    /// Seconds of the steady-rate latency measurement.
    #[arg(long, default_value_t = 30)]
    latency_secs: u64,
    /// Rows per second of the latency measurement.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Partitions of the deployments' topics (kafka.partitions).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Where configurations and service logs go.
    #[arg(long, default_value = "/tmp/dualwrite-bench")]
    work_dir: PathBuf,
    /// TOML appended to every deployment's configuration, to measure other
    /// settings, e.g. `[capture]\npoll_interval_ms = 10` or
    /// `[kafka.properties]\n"consumer.fetch.wait.max.ms" = "10"`.
    #[arg(long)]
    config_extra: Option<String>,
    /// Where the peers' jars (Debezium, Kafka Connect) are cached (default
    /// `$DUALWRITE_CACHE/peers`, `~/.cache/dualwrite/peers`).
    #[arg(long)]
    peer_cache: Option<PathBuf>,
    /// Properties appended to the Debezium connector's configuration
    /// (capture-hop, end-to-end), e.g. `poll.interval.ms=50`; lines separated by `\n`
    /// or newlines.
    #[arg(long)]
    debezium_extra: Option<String>,
    /// Properties appended to the JDBC sink's configuration (end-to-end),
    /// e.g. `batch.size=2000`; `{db}` stands for the target database, e.g.
    /// `connection.url=jdbc:postgresql://127.0.0.1:55434/{db}?reWriteBatchedInserts=true`.
    #[arg(long)]
    debezium_sink_extra: Option<String>,
    /// Leave the Debezium peer out of the live, catch-up and initial-sync
    /// scenarios (for A/B runs of dualwrite variants: the peer's figures do
    /// not change between them, and it takes half of each run's time).
    #[arg(long)]
    no_peer: bool,
    /// Keep every run's service logs (a failed run's are always kept).
    #[arg(long)]
    keep_logs: bool,
    /// Also write every run's raw figures to this file, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Interrupted, the run is dropped, and with it every service and peer
    // it started (each is killed when dropped): none is left running to
    // join the next run's stack on the same ports.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}; the services it started are stopped")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Waits for SIGINT or SIGTERM; the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Runs the scenarios; false when a run failed.
async fn run(args: Args) -> Result<bool> {
    let bin = match args.bin.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("dualwrite"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it (cargo build --release -p dualwrite) or pass --bin",
        bin.display()
    );
    let mut ctx = Ctx::new(
        bin,
        args.pg_url.clone(),
        args.bootstrap.clone(),
        args.work_dir.clone(),
        args.partitions,
        args.keep_logs,
        args.config_extra.clone().unwrap_or_default(),
    )?;
    ctx.peer_cache = match args.peer_cache.clone() {
        Some(p) => p,
        None => peer_cache()?,
    };
    ctx.debezium_extra = args
        .debezium_extra
        .clone()
        .unwrap_or_default()
        .replace("\\n", "\n");
    ctx.debezium_sink_extra = args
        .debezium_sink_extra
        .clone()
        .unwrap_or_default()
        .replace("\\n", "\n");
    ctx.peer = !args.no_peer;
    let params = Params {
        rows: args.rows,
        live_rows: args.live_rows,
        latency_secs: args.latency_secs,
        rate: args.rate,
        record_bytes: 300,
    };
    let selected: Vec<Scenario> = if args.scenario.contains(&Scenario::All) {
        Scenario::ORDER.to_vec()
    } else {
        Scenario::ORDER
            .iter()
            .copied()
            .filter(|s| args.scenario.contains(s))
            .collect()
    };
    let big_runs = args.big_runs.unwrap_or(args.runs);

    let header = machine(&ctx).await?;
    eprintln!("{header}");
    let started = Instant::now();
    let mut results: BTreeMap<String, Vec<RunResult>> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for s in &selected {
        let runs = if s.big() { big_runs } else { args.runs };
        for i in 1..=runs {
            eprintln!("bench: {} run {i}/{runs}", s.name());
            let t = Instant::now();
            let r = match s {
                Scenario::LiveOne => scenarios::live(&ctx, &params, false).await,
                Scenario::LiveBoth => scenarios::live(&ctx, &params, true).await,
                Scenario::Latency => scenarios::latency(&ctx, &params).await,
                Scenario::CatchUp => scenarios::catch_up(&ctx, &params).await,
                Scenario::InitialSync => scenarios::initial_sync(&ctx, &params).await,
                Scenario::CaptureHop => scenarios::capture_hop(&ctx, &params).await,
                Scenario::EndToEnd => peer::end_to_end(&ctx, &params).await,
                Scenario::Scaling => scaling::scaling(&ctx, &params).await,
                Scenario::All => unreachable!("expanded above"),
            };
            match r {
                Ok(r) => {
                    eprintln!(
                        "bench: {} run {i} done in {:.0} s",
                        s.name(),
                        t.elapsed().as_secs_f64()
                    );
                    results.entry(s.name().to_owned()).or_default().push(r);
                }
                Err(e) => {
                    eprintln!("bench: {} run {i} FAILED: {e:#}", s.name());
                    *failures.entry(s.name().to_owned()).or_default() += 1;
                }
            }
        }
    }

    let mut out = String::new();
    out.push_str(&header);
    out.push_str(&format!(
        "load average at the end: {}\nwall time: {:.0} s\n\n",
        loadavg(),
        started.elapsed().as_secs_f64()
    ));
    let order: Vec<String> = selected.iter().map(|s| s.name().to_owned()).collect();
    for name in &order {
        let spec = report::spec(
            name,
            params.rows,
            params.live_rows,
            params.rate,
            params.latency_secs,
        );
        let runs = results.get(name).map(Vec::as_slice).unwrap_or(&[]);
        out.push_str(&report::scenario_table(
            &spec,
            runs,
            failures.get(name).copied().unwrap_or(0),
        ));
        out.push('\n');
    }
    out.push_str(&report::two_way_table(&results));
    out.push_str(&report::memory_table(&results, &order));
    println!("{out}");
    if let Some(path) = &args.json {
        let doc = serde_json::json!({ "header": header, "results": results, "failures": failures });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(failures.is_empty())
}

/// The command line and the machine, for the top of the report.
async fn machine(ctx: &Ctx) -> Result<String> {
    let cmd: Vec<String> = std::env::args().collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let pg = ctx.connect("postgres").await?;
    let version: String = pg.query_one("SELECT version()", &[]).await?.get(0);
    let mut settings = Vec::new();
    for name in ["fsync", "synchronous_commit", "shared_buffers", "wal_level"] {
        let v: String = pg
            .query_one("SELECT current_setting($1)", &[&name])
            .await?
            .get(0);
        settings.push(format!("{name}={v}"));
    }
    let commit = std::env::var("DUALWRITE_BENCH_COMMIT")
        .map(|c| format!(" (source {c})"))
        .unwrap_or_default();
    Ok(format!(
        "command: {}\ndualwrite binary: {}{commit}\nmachine: {cpus} CPUs ({model}), {mem_gib:.1} GiB RAM\n\
         PostgreSQL: {version} ({})\nbroker: {}\nload average at the start: {}\n",
        cmd.join(" "),
        ctx.bin.display(),
        settings.join(", "),
        ctx.bootstrap,
        loadavg()
    ))
}

/// `$DUALWRITE_CACHE/peers`, or `~/.cache/dualwrite/peers`.
fn peer_cache() -> Result<PathBuf> {
    let cache = match std::env::var_os("DUALWRITE_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/dualwrite"),
    };
    Ok(cache.join("peers"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
