//! The Debezium peer of each scenario: Debezium's PostgreSQL connector and
//! Debezium's JDBC sink (upsert by key) on one Kafka Connect worker, on a
//! fresh pair of databases of its own, run before dualwrite in the same
//! run with the same rows ([`on_peer`]).
//!
//! - *end-to-end*: one direction, `live_rows` inserted in transactions of
//!   1,000 (rows/s from the first source insert to the last target write),
//!   then a steady `rate` (commit to commit latency, from each row's
//!   `made_at` to the `arrived_at` the target gives it); then dualwrite's
//!   whole pipeline the same way ([`end_to_end`]).
//! - *live-one*, *live-both*: the bulk only, one way or each way ([`live`]).
//! - *catch-up*: the sink paused while a backlog queues on its topic, then
//!   resumed ([`catch_up`]).
//! - *initial-sync*: each way, a snapshot of the rows each side holds, then
//!   streaming ([`initial_sync`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use dualwrite_model::config::KafkaConfig;
use dualwrite_runtime::kafka;

use crate::cpu::{Procs, Window};
use crate::debezium::{self, Connect, Direction};
use crate::env::{new_id, Ctx, DbPair, Deployment};
use crate::measure::{
    count, db_now, first_arrived, insert_rows, inserted, last_arrived, patience, wait_arrived,
    wait_for, Latencies,
};
use crate::rows;
use crate::scenarios::{
    finish, live_measure, stack_cpu_groups, start_running, steady, warm_up, Params, RunResult,
};
use crate::topic::append_time_topic;

/// What one pipeline did.
struct Figures {
    /// Rows/s of the bulk, first source insert to last target write.
    rate: f64,
    /// The load generator's insert rate during the bulk.
    insert: f64,
    latency: Latencies,
    /// The achieved rate of the steady load.
    achieved: f64,
}

impl Figures {
    fn store(&self, out: &mut RunResult, who: &str) {
        out.set(who, self.rate);
        out.set(&format!("{who}_insert"), self.insert);
        out.set(&format!("{who}_p50"), self.latency.p50);
        out.set(&format!("{who}_p99"), self.latency.p99);
        out.set(&format!("{who}_max"), self.latency.max);
        out.set(&format!("{who}_achieved"), self.achieved);
        eprintln!(
            "bench:   {who}: {:.0} rows/s; latency p50 {:.1} ms, p99 {:.1} ms",
            self.rate, self.latency.p50, self.latency.p99
        );
    }
}

/// Warm-up, bulk, steady load, from `left` to `right`.
async fn one_way(
    left: &Client,
    right: &Client,
    p: &Params,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<Figures> {
    warm_up(left, right, false, alive).await?;
    let (rate, insert) = live_measure(left, right, p.live_rows, false, alive).await?;
    let (latency, achieved) = steady(left, right, p, alive).await?;
    Ok(Figures {
        rate,
        insert,
        latency,
        achieved,
    })
}

/// Runs `f` on the peer: Debezium's source on a fresh database and its
/// JDBC sink into another, under `d`'s topic prefix, and with `both` the
/// other way too (each source publishing the rows made on its side only);
/// then stops the worker and drops the databases. With `load` rows, the
/// databases hold those (`L…` on the left, with `both` `R…` on the right)
/// before the worker starts, and its sources copy them first (a snapshot).
/// Returns what `f` gave and the worker's peak RSS.
pub async fn on_peer<T>(
    ctx: &Ctx,
    d: &Deployment,
    (both, load): (bool, u64),
    f: impl AsyncFnOnce(&Connect, &Client, &Client) -> Result<T>,
) -> Result<(T, Option<u64>)> {
    let cache = ctx.peer_cache.clone();
    let (libs, plugins) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((debezium::libs(&cache)?, debezium::sink_plugins(&cache)?))
    })
    .await??;
    let kcfg = d.config.kafka.clone();
    let dbs = DbPair::create(ctx, &new_id()).await?;
    let mut directions = vec![Direction {
        from: &dbs.left,
        to: &dbs.right,
        topic_prefix: format!("{}.dbz", kcfg.topic_prefix),
        own_keys: both.then_some("L"),
        snapshot: load > 0,
    }];
    if both {
        directions.push(Direction {
            from: &dbs.right,
            to: &dbs.left,
            topic_prefix: format!("{}.dbzr", kcfg.topic_prefix),
            own_keys: Some("R"),
            snapshot: load > 0,
        });
    }
    let peer = async {
        if load > 0 {
            preload(ctx, &dbs, load, both).await?;
        }
        for dir in &directions {
            let topic = debezium::table_topic(&dir.topic_prefix);
            kafka::ensure_topics(&kcfg, &[append_time_topic(&topic, ctx.partitions)]).await?;
        }
        let jars = (libs.as_path(), plugins.as_path());
        let connect =
            Connect::start_pipeline(ctx, jars, &d.dir, &directions, &ctx.debezium_extra).await?;
        let run = async {
            let left = ctx.connect(&dbs.left).await?;
            let right = ctx.connect(&dbs.right).await?;
            f(&connect, &left, &right).await
        }
        .await;
        let rss = connect.service().peak_rss();
        connect.stop();
        anyhow::Ok((run?, rss))
    }
    .await;
    dbs.drop(ctx).await;
    peer.context("Debezium source + JDBC sink")
}

/// Inserts `n` rows `L…` on the left and with `both` `R…` on the right.
async fn preload(ctx: &Ctx, dbs: &DbPair, n: u64, both: bool) -> Result<()> {
    let left = ctx.connect(&dbs.left).await?;
    left.batch_execute(&rows::insert("L", 1, n)).await?;
    if both {
        let right = ctx.connect(&dbs.right).await?;
        right.batch_execute(&rows::insert("R", 1, n)).await?;
    }
    Ok(())
}

/// The scenario: the peer on a database pair of its own, then dualwrite.
pub async fn end_to_end(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let mut d = Deployment::create(ctx, "e2e").await?;
    let r = async {
        let (f, rss) = on_peer(ctx, &d, (false, 0), async |connect, left, right| {
            one_way(left, right, p, &|| connect.check_alive()).await
        })
        .await?;
        let mut out = with_rss(RunResult::default(), rss);
        f.store(&mut out, "dbz");

        start_running(ctx, &mut d).await?;
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        let alive = || d.check_alive();
        one_way(&left, &right, p, &alive)
            .await?
            .store(&mut out, "ours");
        Ok(out)
    }
    .await;
    finish(ctx, d, r).await
}

/// The catch-up scenario's peer, before dualwrite's run on `d`: the JDBC
/// sink paused through Kafka Connect's REST API (an operator's pause: what
/// the source captures waits on the topic, as a paused map's changes wait
/// on its topic), `n` rows inserted and captured, then the sink resumed:
/// `dbz_queue` (first insert to all on the topic), `dbz_replay` (resume to
/// the last row on the target, as dualwrite's `replay`) and the replay's
/// CPU (`dbz_replay_cpu_*`).
pub async fn catch_up(ctx: &Ctx, d: &Deployment, n: u64) -> Result<RunResult> {
    let (out, rss) = on_peer(ctx, d, (false, 0), async |connect, left, right| {
        let alive = || connect.check_alive();
        warm_up(left, right, false, &alive).await?;
        connect.set_sink_paused(true).await?;
        let mut out = RunResult::default();
        let queued = queue(&d.config.kafka, &connect.topic, left, n, &alive).await?;
        out.set("dbz_queue", n as f64 / queued);
        let early = count(right, "L").await?;
        if early != 0 {
            bail!("{early} rows reached the target while the sink was paused");
        }
        eprintln!("bench:   Debezium: {n} changes on its topic in {queued:.1} s");
        replay(connect, right, n, &mut out).await?;
        Ok(out)
    })
    .await?;
    Ok(with_rss(out, rss))
}

/// Inserts `n` rows on `left` and waits until `topic` holds them all;
/// the seconds that took.
async fn queue(
    kcfg: &KafkaConfig,
    topic: &str,
    left: &Client,
    n: u64,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<f64> {
    let base = topic_records(kcfg, topic).await?;
    let t = Instant::now();
    insert_rows(left, "L", n).await?;
    wait_for(
        "the changes on Debezium's topic",
        patience(n),
        Duration::from_millis(500),
        || async {
            alive()?;
            Ok(topic_records(kcfg, topic).await? >= base + n as i64)
        },
    )
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// The records `topic` holds (the sum of its partitions' high watermarks).
async fn topic_records(kcfg: &KafkaConfig, topic: &str) -> Result<i64> {
    let (k, t) = (kcfg.clone(), topic.to_owned());
    let marks = tokio::task::spawn_blocking(move || kafka::watermarks(&k, &t)).await??;
    Ok(marks.iter().map(|&(_, _, high)| high).sum())
}

/// Resumes the sink and waits until the `n` rows queued are on `right`.
async fn replay(connect: &Connect, right: &Client, n: u64, out: &mut RunResult) -> Result<()> {
    let base = inserted(right).await?;
    let cpu = Window::start(peer_cpu_groups(connect, right).await?);
    let resumed_at = db_now(right).await?;
    connect.set_sink_paused(false).await?;
    let alive = || connect.check_alive();
    let every = Duration::from_millis(500);
    wait_arrived(right, "L", n, base + n as i64, every, &alive).await?;
    let secs = last_arrived(right, "L").await? - resumed_at;
    cpu.finish("dbz_replay_cpu", out);
    Window::per_row("dbz_replay_cpu", n, out);
    out.set("dbz_replay", n as f64 / secs);
    eprintln!(
        "bench:   Debezium: replay {:.0} rows/s; CPU in it: {}",
        n as f64 / secs,
        Window::describe("dbz_replay_cpu", out)
    );
    Ok(())
}

/// The live scenarios' peer, before dualwrite's run on `d`: Debezium's
/// source + JDBC sink one way (each way with `both`), the same warm-up and
/// rows as dualwrite's (`n`, half from each side with `both`): `dbz`
/// (rows/s, as dualwrite's `ours`), the CPU over it (`dbz_cpu_*`) and the
/// worker's peak RSS (`dbz_rss`).
pub async fn live(ctx: &Ctx, d: &Deployment, n: u64, both: bool) -> Result<RunResult> {
    let (out, rss) = on_peer(ctx, d, (both, 0), async |connect, left, right| {
        let alive = || connect.check_alive();
        warm_up(left, right, both, &alive).await?;
        jvm_warm_up(left, right, both, &alive).await?;
        let cpu = Window::start(peer_cpu_groups(connect, right).await?);
        let (rate, _) = live_measure(left, right, n, both, &alive).await?;
        Ok(peer_figures(&cpu, n, rate, "Debezium source + JDBC sink"))
    })
    .await?;
    Ok(with_rss(out, rss))
}

/// Rows sent each way through the peer before a live measurement.
const JVM_WARM_ROWS: u64 = 20_000;

/// Sends [`JVM_WARM_ROWS`] rows (`Lj…`, and with `both` `Rj…` the other
/// way) through the peer and waits until they are on the other side:
/// a Connect worker runs for long, so its rate is measured with its JVM's
/// code compiled (right after its start, compiling took most of its CPU
/// and the rate measured a third of the warm one). dualwrite's services
/// are native code: the ten warm-up rows that both get are all they need.
async fn jvm_warm_up(
    left: &Client,
    right: &Client,
    both: bool,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    let n = JVM_WARM_ROWS;
    let (a, b) = tokio::join!(insert_rows(left, "Lj", n), async {
        if both {
            insert_rows(right, "Rj", n).await.map(|_| ())
        } else {
            Ok(())
        }
    });
    a?;
    b?;
    wait_for(
        "the peer's warm-up rows",
        patience(2 * n),
        Duration::from_millis(500),
        || async {
            alive()?;
            Ok(count(right, "Lj").await? as u64 == n
                && (!both || count(left, "Rj").await? as u64 == n))
        },
    )
    .await
}

/// `dbz` (`rate`, rows/s) and the CPU over `rows` (`dbz_cpu_*`), printed
/// as `what`'s.
fn peer_figures(cpu: &Window, rows: u64, rate: f64, what: &str) -> RunResult {
    let mut out = RunResult::default();
    cpu.finish("dbz_cpu", &mut out);
    Window::per_row("dbz_cpu", rows, &mut out);
    out.set("dbz", rate);
    eprintln!(
        "bench:   {what}: {rate:.0} rows/s; CPU: {}",
        Window::describe("dbz_cpu", &out)
    );
    out
}

/// `out` with the worker's peak RSS (`dbz_rss`, MiB), when known.
fn with_rss(mut out: RunResult, rss: Option<u64>) -> RunResult {
    if let Some(bytes) = rss {
        out.set("dbz_rss", bytes as f64 / 1024.0 / 1024.0);
    }
    out
}

/// The stack's processes and the peer's worker.
async fn peer_cpu_groups(connect: &Connect, db: &Client) -> Result<Vec<(String, Procs)>> {
    let mut groups = stack_cpu_groups(db).await?;
    if let Some(pid) = connect.service().pid() {
        groups.push(("connect".into(), Procs::Each(vec![pid])));
    }
    Ok(groups)
}

/// The initial sync's peer, before dualwrite's run on `d`: `n` rows on
/// each side (`L…` on the left, `R…` on the right, as for dualwrite),
/// then one worker with Debezium's source + JDBC sink each way, each
/// source copying its side's keys first (a snapshot) and then streaming:
/// `dbz` (rows created on the other sides per second, from the first row
/// to arrive to the last: the worker's start is left out), the CPU from
/// the worker's start (`dbz_cpu_*`) and its peak RSS.
pub async fn initial_sync(ctx: &Ctx, d: &Deployment, n: u64) -> Result<RunResult> {
    let (out, rss) = on_peer(ctx, d, (true, n), async |connect, left, right| {
        let cpu = Window::start(peer_cpu_groups(connect, right).await?);
        let alive = || connect.check_alive();
        let every = Duration::from_secs(1);
        let gate = 2 * n as i64;
        wait_arrived(right, "L", n, gate, every, &alive).await?;
        wait_arrived(left, "R", n, gate, every, &alive).await?;
        let start = first_arrived(right, "L")
            .await?
            .min(first_arrived(left, "R").await?);
        let end = last_arrived(right, "L")
            .await?
            .max(last_arrived(left, "R").await?);
        let rate = 2.0 * n as f64 / (end - start);
        Ok(peer_figures(
            &cpu,
            2 * n,
            rate,
            "Debezium snapshot each way",
        ))
    })
    .await?;
    Ok(with_rss(out, rss))
}
