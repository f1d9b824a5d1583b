//! The scenarios. Each run builds its own world (fresh databases, topic
//! prefix, services), measures dualwrite and the anchors one after the
//! other on the same machine, and removes everything again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use dualwrite_model::config::KafkaConfig;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka;

use crate::cpu::Procs;
use crate::debezium::{self, Connect};
use crate::env::{cpu_secs, new_id, Ctx, Deployment, Service};
use crate::measure::{
    self, count, first_made, insert_rows, inserted, last_arrived, latencies, paced, wait_arrived,
    wait_for, Latencies, Native,
};
use crate::rows;
use crate::topic::{self, append_time_topic};

/// Sizes of the scenarios.
#[derive(Debug, Clone)]
pub struct Params {
    /// Rows per side of the initial sync, and changes queued for the catch-up.
    pub rows: u64,
    /// Rows of a live sync measurement.
    pub live_rows: u64,
    /// Seconds of the steady-rate latency measurement.
    pub latency_secs: u64,
    /// Rows per second of the latency measurement.
    pub rate: u64,
    /// Size of a Kafka anchor record, bytes.
    pub record_bytes: usize,
}

/// The peer's figures, or none with `--no-peer` (its lines print `-`).
async fn if_peer(
    ctx: &Ctx,
    peer: impl std::future::Future<Output = Result<RunResult>>,
) -> Result<RunResult> {
    if ctx.peer {
        peer.await
    } else {
        Ok(RunResult::default())
    }
}

/// What one run of a scenario measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RunResult {
    /// Named figures (see `report` for their labels and units).
    pub values: BTreeMap<String, f64>,
    /// Peak resident memory of each service, MiB.
    pub rss: Vec<(String, f64)>,
}

impl RunResult {
    pub(crate) fn set(&mut self, key: &str, v: f64) {
        self.values.insert(key.to_owned(), v);
    }
}

/// Stops the deployment (reading its services' peak memory first) and
/// removes it, whatever the outcome of the measurement.
pub(crate) async fn finish(
    ctx: &Ctx,
    mut d: Deployment,
    r: Result<RunResult>,
) -> Result<RunResult> {
    if r.is_err() {
        d.mark_failed();
    }
    let rss = d.stop();
    d.cleanup(ctx).await;
    let mut r = r?;
    r.rss = rss;
    Ok(r)
}

/// Starts the services and runs the map without initial sync.
pub(crate) async fn start_running(ctx: &Ctx, d: &mut Deployment) -> Result<()> {
    d.start(ctx).await?;
    run_map(ctx, d).await
}

/// Runs the map of a started deployment without initial sync.
pub(crate) async fn run_map(ctx: &Ctx, d: &Deployment) -> Result<()> {
    d.ctl(
        ctx,
        &[
            "run",
            "items",
            "--initial-sync",
            "false",
            "--timeout-secs",
            "120",
        ],
    )
    .await?;
    Ok(())
}

/// A few rows each way through the pipeline before measuring, so that
/// connections, consumers and subscription workers are up.
pub(crate) async fn warm_up(
    left: &Client,
    right: &Client,
    both: bool,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    left.batch_execute(&rows::insert("Lw", 1, 10)).await?;
    if both {
        right.batch_execute(&rows::insert("Rw", 1, 10)).await?;
    }
    wait_for(
        "warm-up rows",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || async {
            alive()?;
            Ok(count(right, "Lw").await? == 10 && (!both || count(left, "Rw").await? == 10))
        },
    )
    .await
}

/// Inserts `n` rows (one direction: on the left; both: half on each side
/// at once) and waits until all are on the other side. Returns (rows/s
/// from the first source insert to the last target write, source insert
/// rows/s).
pub(crate) async fn live_measure(
    left: &Client,
    right: &Client,
    n: u64,
    both: bool,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<(f64, f64)> {
    let (lr, rl) = if both { (n / 2, n - n / 2) } else { (n, 0) };
    let (base_l, base_r) = (inserted(left).await?, inserted(right).await?);
    let t = Instant::now();
    let (a, b) = tokio::join!(insert_rows(left, "L", lr), async {
        if rl > 0 {
            insert_rows(right, "R", rl).await
        } else {
            Ok(0.0)
        }
    });
    a?;
    b?;
    let insert_rate = n as f64 / t.elapsed().as_secs_f64();
    let every = Duration::from_millis(250);
    wait_arrived(right, "L", lr, base_r + (lr + rl) as i64, every, alive).await?;
    if rl > 0 {
        wait_arrived(left, "R", rl, base_l + (lr + rl) as i64, every, alive).await?;
    }
    let mut start = first_made(left, "L").await?;
    let mut end = last_arrived(right, "L").await?;
    if rl > 0 {
        start = start.min(first_made(right, "R").await?);
        end = end.max(last_arrived(left, "R").await?);
    }
    Ok((n as f64 / (end - start), insert_rate))
}

/// Live sync: sustained rows/s of dualwrite, native logical replication
/// and one Kafka hop, with the same rows.
pub async fn live(ctx: &Ctx, p: &Params, both: bool) -> Result<RunResult> {
    let n = p.live_rows;
    let mut out = RunResult::default();

    // Anchor: native logical replication between two fresh databases.
    let native = Native::create(ctx, both).await?;
    let r = async {
        let left = ctx.connect(&native.dbs.left).await?;
        let right = ctx.connect(&native.dbs.right).await?;
        let ok = || Ok(());
        warm_up(&left, &right, both, &ok).await?;
        live_measure(&left, &right, n, both, &ok).await
    }
    .await;
    native.cleanup(ctx).await;
    let (native_rate, _) = r.context("native logical replication")?;
    out.set("native", native_rate);
    eprintln!("bench:   native logical replication: {native_rate:.0} rows/s");

    // Anchor: one produce+consume hop.
    let hop = measure::kafka_hop(ctx, n, p.record_bytes)
        .await
        .context("kafka hop")?;
    out.set("hop", hop);
    eprintln!("bench:   kafka produce+consume hop: {hop:.0} rows/s");

    // dualwrite.
    let mut d = Deployment::create(ctx, if both { "live2" } else { "live1" }).await?;
    let r = async {
        // Peer: Debezium's source + JDBC sink (each way with `both`).
        let mut o = if_peer(ctx, crate::peer::live(ctx, &d, n, both)).await?;
        o.values.extend(out.values.clone());

        start_running(ctx, &mut d).await?;
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        let alive = || d.check_alive();
        warm_up(&left, &right, both, &alive).await?;
        let cpu = crate::cpu::Window::start(cpu_groups(&d, &right).await?);
        let busy = d.busy().await;
        let t = Instant::now();
        let (rate, insert_rate) = live_measure(&left, &right, n, both, &alive).await?;
        let secs = t.elapsed().as_secs_f64();
        cpu.finish("live_cpu", &mut o);
        crate::cpu::Window::per_row("live_cpu", n, &mut o);
        let each = crate::cpu::Window::describe("live_cpu", &o);
        eprintln!("bench:   CPU from the first insert to the last row: {each}");
        let phases = busy_since("live_busy", &busy, &d.busy().await, secs, &mut o);
        eprintln!("bench:   busy over the same: {phases}");
        o.set("ours", rate);
        o.set("insert", insert_rate);
        if !both {
            // Right after the bulk (the pipeline still settles its echoes).
            let (l, _) = steady(&left, &right, p, &alive).await?;
            o.set("after_p50", l.p50);
            o.set("after_p99", l.p99);
            o.set("after_max", l.max);
            o.set("after_max_at", l.max_at);
            let bytes: f64 = left
                .query_one(
                    "SELECT avg(pg_column_size(t.*))::float8 FROM bench_items t",
                    &[],
                )
                .await?
                .get(0);
            o.set("row_bytes", bytes);
        }
        eprintln!("bench:   dualwrite: {rate:.0} rows/s");
        Ok(o)
    }
    .await;
    finish(ctx, d, r).await
}

/// Source-commit-to-target-commit latency at a steady rate: dualwrite and
/// native logical replication.
pub async fn latency(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let mut out = RunResult::default();
    let native = Native::create(ctx, false).await?;
    let r = async {
        let left = ctx.connect(&native.dbs.left).await?;
        let right = ctx.connect(&native.dbs.right).await?;
        let ok = || Ok(());
        warm_up(&left, &right, false, &ok).await?;
        steady(&left, &right, p, &ok).await
    }
    .await;
    native.cleanup(ctx).await;
    let (l, _) = r.context("native logical replication")?;
    let (p50, p99) = (l.p50, l.p99);
    out.set("native_p50", p50);
    out.set("native_p99", p99);
    out.set("native_max", l.max);
    eprintln!("bench:   native logical replication: p50 {p50:.1} ms, p99 {p99:.1} ms");

    let (hop50, hop99) = measure::kafka_hop_latency(ctx, p.rate, p.latency_secs, p.record_bytes)
        .await
        .context("kafka hop latency")?;
    out.set("hop_p50", hop50);
    out.set("hop_p99", hop99);
    eprintln!("bench:   one Kafka hop: p50 {hop50:.1} ms, p99 {hop99:.1} ms");

    let mut d = Deployment::create(ctx, "latency").await?;
    let r = async {
        start_running(ctx, &mut d).await?;
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        let alive = || d.check_alive();
        warm_up(&left, &right, false, &alive).await?;
        let (l, achieved) = steady(&left, &right, p, &alive).await?;
        let (p50, p99) = (l.p50, l.p99);
        let mut o = out.clone();
        o.set("p50", p50);
        o.set("p99", p99);
        o.set("max", l.max);
        o.set("p50_first", l.p50_first);
        o.set("p50_last", l.p50_last);
        o.set("achieved", achieved);
        eprintln!("bench:   dualwrite: p50 {p50:.1} ms, p99 {p99:.1} ms");
        let h = crate::hops::hops(&d.config, "items", &right, "T").await?;
        for (name, v) in [
            ("capture", h.capture),
            ("router", h.router),
            ("resolver", h.resolver),
            ("applier", h.applier),
        ] {
            o.set(&format!("p50_{name}"), v);
        }
        eprintln!(
            "bench:   median share: capture {:.1} ms, router {:.1} ms, resolver {:.1} ms, applier {:.1} ms",
            h.capture, h.router, h.resolver, h.applier
        );
        Ok(o)
    }
    .await;
    finish(ctx, d, r).await
}

/// Steady inserts on the left, then the latencies of those rows on the
/// right, and the achieved source rate (rows/s).
pub(crate) async fn steady(
    left: &Client,
    right: &Client,
    p: &Params,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<(Latencies, f64)> {
    let base = inserted(right).await?;
    let (total, achieved) = paced(left, "T", p.rate, p.latency_secs).await?;
    wait_arrived(
        right,
        "T",
        total,
        base + total as i64,
        Duration::from_millis(250),
        alive,
    )
    .await?;
    Ok((latencies(right, "T").await?, achieved))
}

/// Catch-up: pause, queue `rows` changes, resume; how fast they queue,
/// how fast they replay, and when the map is Running again.
pub async fn catch_up(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let n = p.rows;
    let mut d = Deployment::create(ctx, "catchup").await?;
    let r = async {
        let peer = if_peer(ctx, crate::peer::catch_up(ctx, &d, n)).await?;
        start_running(ctx, &mut d).await?;
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        let alive = || d.check_alive();
        warm_up(&left, &right, false, &alive).await?;
        d.ctl(ctx, &["pause", "items", "--timeout-secs", "120"])
            .await?;

        let t = Instant::now();
        let insert_secs = insert_rows(&left, "L", n).await?;
        let d_ref = &d;
        wait_for(
            "changes queued on the map topic",
            measure::patience(n),
            Duration::from_millis(500),
            || async move {
                d_ref.check_alive()?;
                let (state, backlog) = d_ref.map_row().await?;
                if state != "Paused" {
                    bail!("map is {state} while it should be paused");
                }
                Ok(backlog as u64 >= n)
            },
        )
        .await?;
        let queued_secs = t.elapsed().as_secs_f64();
        let early = count(&right, "L").await?;
        if early != 0 {
            bail!("{early} rows reached the target while the map was paused");
        }
        eprintln!("bench:   {n} changes queued in {queued_secs:.1} s (inserted in {insert_secs:.1} s)");

        let base = inserted(&right).await?;
        let cpu = crate::cpu::Window::start(cpu_groups(&d, &right).await?);
        let busy = d.busy().await;
        let resumed_at = measure::db_now(&right).await?;
        let t = Instant::now();
        d.ctl(ctx, &["run", "items", "--timeout-secs", "14400"])
            .await?;
        let running_secs = t.elapsed().as_secs_f64();
        wait_arrived(
            &right,
            "L",
            n,
            base + n as i64,
            Duration::from_millis(500),
            &alive,
        )
        .await?;
        let applied_secs = last_arrived(&right, "L").await? - resumed_at;
        let mut o = peer;
        cpu.finish("replay_cpu", &mut o);
        crate::cpu::Window::per_row("replay_cpu", n, &mut o);
        eprintln!("bench:   CPU in the replay: {}", crate::cpu::Window::describe("replay_cpu", &o));
        let phases = busy_since("replay_busy", &busy, &d.busy().await, applied_secs, &mut o);
        eprintln!("bench:   busy in the replay: {phases}");
        let (state, backlog) = d.map_row().await?;
        if state != "Running" {
            bail!("map is {state} after the catch-up (backlog {backlog})");
        }
        o.set("queue", n as f64 / queued_secs);
        o.set("insert", n as f64 / insert_secs);
        o.set("replay", n as f64 / applied_secs);
        o.set("to_running", running_secs);
        o.set("to_applied", applied_secs);
        eprintln!(
            "bench:   replay {:.0} rows/s; Running after {running_secs:.1} s, all rows on the target after {applied_secs:.1} s",
            n as f64 / applied_secs
        );
        Ok(o)
    }
    .await;
    finish(ctx, d, r).await
}

/// Sets `<prefix>_<service/phase>` to the busy seconds each phase added
/// since `before`; one line with each as a share of `secs`.
fn busy_since(
    prefix: &str,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    secs: f64,
    out: &mut RunResult,
) -> String {
    let mut line = Vec::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        out.set(&format!("{prefix}_{k}"), d);
        line.push(format!("{k} {d:.1} s ({:.0} %)", 100.0 * d / secs));
    }
    line.join(", ")
}

/// The groups of processes whose CPU a window counts: each service, the
/// PostgreSQL server (every process it runs, also connections opened or
/// closed during the window) and the broker when the harness names it.
async fn cpu_groups(d: &Deployment, db: &Client) -> Result<Vec<(String, Procs)>> {
    let mut groups: Vec<(String, Procs)> = d
        .pids()
        .into_iter()
        .map(|(n, p)| (n, Procs::Each(vec![p])))
        .collect();
    groups.extend(stack_cpu_groups(db).await?);
    Ok(groups)
}

/// The stack's processes: PostgreSQL's server (that of `db`) and the
/// broker's, when known.
pub(crate) async fn stack_cpu_groups(db: &Client) -> Result<Vec<(String, Procs)>> {
    let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let server = crate::cpu::parent(backend as u32)
        .ok_or_else(|| anyhow::anyhow!("cannot read the PostgreSQL server's process"))?;
    let mut groups = vec![("postgres".to_owned(), Procs::Server(server))];
    if let Some(b) = crate::cpu::broker_pid() {
        groups.push(("broker".into(), Procs::Each(vec![b])));
    }
    Ok(groups)
}

/// Initial sync of `rows` rows on each side (different keys: every row is
/// created on the other side), beside raw COPY and batched upserts of the
/// same rows into fresh tables of the same database server.
pub async fn initial_sync(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let n = p.rows;
    let mut out = RunResult::default();
    let mut d = Deployment::create(ctx, "initial").await?;
    let r = async {
        // Anchors, in a database of their own, before any service runs.
        let anchor_db = format!("dwb_{}_anchor", new_id());
        let admin = ctx.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {anchor_db}"))
            .await?;
        let anchors = async {
            let a = ctx.connect(&anchor_db).await?;
            a.batch_execute(&format!(
                "{}\n{}",
                rows::ddl("bench_copy"),
                rows::ddl("bench_upsert")
            ))
            .await?;
            let text = measure::copy_text(&a, "L", n).await?;
            let copy_secs = measure::copy_in(&a, "bench_copy", &text).await?;
            let batches = measure::json_batches(&a, "L", n, 500).await?;
            let upsert_secs = measure::upsert(&a, "bench_upsert", &batches).await?;
            Ok::<_, anyhow::Error>((text, copy_secs, upsert_secs))
        }
        .await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {anchor_db} WITH (FORCE)"))
            .await?;
        let (text, copy_secs, upsert_secs) = anchors?;
        out.set("copy", n as f64 / copy_secs);
        out.set("upsert", n as f64 / upsert_secs);
        eprintln!(
            "bench:   COPY {:.0} rows/s, upsert {:.0} rows/s",
            n as f64 / copy_secs,
            n as f64 / upsert_secs
        );

        // Peer: Debezium's snapshot and stream each way, the same rows.
        let peer = if_peer(ctx, crate::peer::initial_sync(ctx, &d, n)).await?;
        out.values.extend(peer.values);

        // The rows dualwrite finds: L… on the left, R… on the right.
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        measure::copy_in(&left, "bench_items", &text).await?;
        drop(text);
        right.batch_execute(&rows::insert("R", 1, n)).await?;
        left.batch_execute("ANALYZE bench_items").await?;
        right.batch_execute("ANALYZE bench_items").await?;

        d.start(ctx).await?;
        let cpu = crate::cpu::Window::start(cpu_groups(&d, &right).await?);
        let t = Instant::now();
        d.ctl(ctx, &["run", "items", "--timeout-secs", "14400"])
            .await?;
        let secs = t.elapsed().as_secs_f64();
        cpu.finish("sync_cpu", &mut out);
        let details: serde_json::Value =
            serde_json::from_str(&d.ctl(ctx, &["initial-sync", "items", "--json"]).await?)?;
        let progress = &details["progress"];
        let created = progress["created"].as_f64().unwrap_or(f64::NAN);
        let failed = progress["failed"].as_f64().unwrap_or(f64::NAN);
        let total_left: i64 = left
            .query_one("SELECT count(*) FROM bench_items", &[])
            .await?
            .get(0);
        let total_right: i64 = right
            .query_one("SELECT count(*) FROM bench_items", &[])
            .await?
            .get(0);
        if total_left as u64 != 2 * n || total_right as u64 != 2 * n || failed != 0.0 {
            bail!(
                "initial sync incomplete: left {total_left}, right {total_right} rows (want {} each), {failed} failed; progress {progress}",
                2 * n
            );
        }
        out.set("ours", created / secs);
        out.set("secs", secs);
        crate::cpu::Window::per_row("sync_cpu", created as u64, &mut out);
        eprintln!(
            "bench:   dualwrite: {created} rows created in {secs:.1} s: {:.0} rows/s",
            created / secs
        );
        eprintln!(
            "bench:   CPU in the initial sync: {}",
            crate::cpu::Window::describe("sync_cpu", &out)
        );
        Ok(out.clone())
    }
    .await;
    finish(ctx, d, r).await
}

/// The capture hop, dualwrite's capturer beside Debezium's PostgreSQL
/// connector (Kafka Connect standalone) as a peer, one after the other in
/// the same run, each alone on a fresh database with the benchmark table
/// and on a topic of its own (created with the broker's append time):
/// rows/s from the first insert of `live_rows` rows (transactions of
/// 1,000) to the last of their records on the topic, the CPU time that
/// took, and the latency from insert to topic at a steady `rate`.
pub async fn capture_hop(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let cache = ctx.peer_cache.clone();
    let libs = tokio::task::spawn_blocking(move || debezium::libs(&cache)).await??;
    let mut d = Deployment::create(ctx, "caphop").await?;
    let r = async {
        let mut out = RunResult::default();
        let kcfg = d.config.kafka.clone();

        // Debezium, on the right database (nothing of dualwrite runs there).
        let dbz_prefix = format!("{}.dbz", kcfg.topic_prefix);
        let dbz_topic = debezium::table_topic(&dbz_prefix);
        kafka::ensure_topics(&kcfg, &[append_time_topic(&dbz_topic, ctx.partitions)]).await?;
        let connect = Connect::start(
            ctx,
            &libs,
            &d.dir,
            &d.dbs.right,
            &dbz_prefix,
            &ctx.debezium_extra,
        )
        .await
        .context("start Debezium")?;
        let r = async {
            let db = d.right(ctx).await?;
            let alive = || connect.check_alive();
            hop_peer(p, &db, &kcfg, &connect.topic, connect.service(), &alive).await
        }
        .await;
        let rss = connect.service().peak_rss().map(|b| b / 1024);
        connect.stop();
        r.context("Debezium")?.store(&mut out, "dbz", rss);

        // dualwrite's capturer alone, on the left database.
        let topic = Topics::new(&kcfg.topic_prefix).capture("fno");
        kafka::ensure_topics(&kcfg, &[append_time_topic(&topic, ctx.partitions)]).await?;
        let capture: &[&[&str]] = &[&["capture", "--side", "fno"]];
        d.start_some(ctx, capture).await?;
        let db = d.left(ctx).await?;
        let alive = || d.check_alive();
        let svc = d
            .service("capture-fno")
            .context("capture-fno not started")?;
        let f = hop_peer(p, &db, &kcfg, &topic, svc, &alive).await?;
        f.store(&mut out, "ours", svc.peak_rss().map(|b| b / 1024));
        Ok(out)
    }
    .await;
    finish(ctx, d, r).await
}

/// What one capturer did in the capture hop.
struct HopFigures {
    /// Rows/s from the first insert to the last record on the topic.
    rate: f64,
    /// The load generator's insert rate.
    insert: f64,
    /// CPU seconds of the capturer's process and of its PostgreSQL
    /// backends (every backend of the database but the load generator's)
    /// while the rows were captured.
    cpu: f64,
    pg_cpu: f64,
    latency: Latencies,
    /// The achieved rate of the steady load.
    achieved: f64,
}

impl HopFigures {
    fn store(&self, out: &mut RunResult, who: &str, rss_kib: Option<u64>) {
        out.set(who, self.rate);
        out.set(&format!("{who}_insert"), self.insert);
        out.set(&format!("{who}_cpu"), self.cpu);
        out.set(&format!("{who}_pg_cpu"), self.pg_cpu);
        out.set(&format!("{who}_p50"), self.latency.p50);
        out.set(&format!("{who}_p99"), self.latency.p99);
        out.set(&format!("{who}_max"), self.latency.max);
        out.set(&format!("{who}_achieved"), self.achieved);
        if let Some(kib) = rss_kib {
            out.set(&format!("{who}_rss"), kib as f64 / 1024.0);
        }
        eprintln!(
            "bench:   {who}: {:.0} rows/s (CPU {:.1} s + PostgreSQL {:.1} s); latency p50 {:.1} ms, p99 {:.1} ms",
            self.rate, self.cpu, self.pg_cpu, self.latency.p50, self.latency.p99
        );
    }
}

/// Measures one capturer of `db` writing to `topic`: a warm-up, the bulk
/// of `live_rows` rows, then the steady load.
async fn hop_peer(
    p: &Params,
    db: &Client,
    cfg: &KafkaConfig,
    topic: &str,
    capturer: &Service,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<HopFigures> {
    let read_patience = Duration::from_secs(120);
    let from = topic::ends(cfg, topic).await?;
    db.batch_execute(&rows::insert("Lw", 1, 10)).await?;
    topic::read_stamps(cfg, topic, &from, "Lw", 10, read_patience)
        .await
        .context("warm-up rows")?;
    alive()?;

    let n = p.live_rows;
    let from = topic::ends(cfg, topic).await?;
    let backends = backend_pids(db).await?;
    let pg_cpu = || backends.iter().filter_map(|&b| cpu_secs(b)).sum::<f64>();
    let (cpu0, pg0) = (capturer.cpu_secs().unwrap_or(f64::NAN), pg_cpu());
    let insert_secs = insert_rows(db, "L", n).await?;
    topic::wait_appended(cfg, topic, &from, n, measure::patience(n), alive).await?;
    let (cpu1, pg1) = (capturer.cpu_secs().unwrap_or(f64::NAN), pg_cpu());
    let stamps = topic::read_stamps(cfg, topic, &from, "L0", n, read_patience).await?;
    let last = stamps.iter().map(|s| s.1).fold(f64::MIN, f64::max) / 1000.0;
    let rate = n as f64 / (last - first_made(db, "L").await?);

    let from = topic::ends(cfg, topic).await?;
    let (total, achieved) = paced(db, "T", p.rate, p.latency_secs).await?;
    topic::wait_appended(cfg, topic, &from, total, measure::patience(total), alive).await?;
    let stamps = topic::read_stamps(cfg, topic, &from, "T0", total, read_patience).await?;
    let latency = stamp_latencies(db, &stamps).await?;
    Ok(HopFigures {
        rate,
        insert: n as f64 / insert_secs,
        cpu: cpu1 - cpu0,
        pg_cpu: pg1 - pg0,
        latency,
        achieved,
    })
}

/// The PostgreSQL backends of this connection's database other than its
/// own: the capturer's (for Debezium, its walsender and its SQL session).
async fn backend_pids(db: &Client) -> Result<Vec<u32>> {
    let rows = db
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
}

/// Latencies (ms) from each row's `made_at` to the append time of its
/// record (`stamps`: key, epoch ms); every row must be found.
async fn stamp_latencies(db: &Client, stamps: &[(String, f64)]) -> Result<Latencies> {
    let ids: Vec<&str> = stamps.iter().map(|s| s.0.as_str()).collect();
    let at: Vec<f64> = stamps.iter().map(|s| s.1).collect();
    let r = db
        .query_one(
            "SELECT count(*), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY d), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY d), \
                    max(d), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE third = 1), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE third = 3) \
             FROM (SELECT s.at - extract(epoch FROM b.made_at)::float8 * 1000 AS d, \
                          ntile(3) OVER (ORDER BY b.made_at) AS third \
                   FROM unnest($1::text[], $2::float8[]) AS s(id, at) \
                   JOIN bench_items b ON b.id = s.id) x",
            &[&ids, &at],
        )
        .await?;
    let found: i64 = r.get(0);
    if found as usize != stamps.len() {
        bail!(
            "{} records on the topic, {found} of their rows in the table",
            stamps.len()
        );
    }
    let get = |i: usize| r.get::<_, Option<f64>>(i).unwrap_or(f64::NAN);
    Ok(Latencies {
        p50: get(1),
        p99: get(2),
        max: get(3),
        p50_first: get(4),
        p50_last: get(5),
        max_at: f64::NAN,
    })
}
