//! One direction end to end beside the peer a platform team would deploy
//! instead: Debezium's PostgreSQL connector and Debezium's JDBC sink
//! (upsert by key) on one Kafka Connect worker, from one fresh database to
//! another, then dualwrite's whole pipeline on a fresh pair, with the same
//! rows: `live_rows` inserted in transactions of 1,000 (rows/s from the
//! first source insert to the last target write), then a steady `rate`
//! (commit to commit latency, from each row's `made_at` to the
//! `arrived_at` the target gives it). And the same peer in the catch-up
//! scenario: its sink paused while a backlog queues on its topic, then
//! resumed ([`debezium_catch_up`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use dualwrite_model::config::KafkaConfig;
use dualwrite_runtime::kafka;

use crate::cpu::{Procs, Window};
use crate::debezium::{self, Connect};
use crate::env::{new_id, Ctx, DbPair, Deployment};
use crate::measure::{
    count, db_now, insert_rows, inserted, last_arrived, patience, wait_arrived, wait_for, Latencies,
};
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
/// JDBC sink into another, under `d`'s topic prefix; then stops the
/// worker and drops the databases. Returns what `f` gave and the
/// worker's peak RSS.
async fn on_peer<T>(
    ctx: &Ctx,
    d: &Deployment,
    f: impl AsyncFnOnce(&Connect, &Client, &Client) -> Result<T>,
) -> Result<(T, Option<u64>)> {
    let cache = ctx.peer_cache.clone();
    let (libs, plugins) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((debezium::libs(&cache)?, debezium::sink_plugins(&cache)?))
    })
    .await??;
    let kcfg = d.config.kafka.clone();
    let prefix = format!("{}.dbz", kcfg.topic_prefix);
    let topic = debezium::table_topic(&prefix);
    kafka::ensure_topics(&kcfg, &[append_time_topic(&topic, ctx.partitions)]).await?;
    let dbs = DbPair::create(ctx, &new_id()).await?;
    let peer = async {
        let connect = Connect::start_pipeline(
            ctx,
            &libs,
            &plugins,
            &d.dir,
            &dbs.left,
            &dbs.right,
            &prefix,
            &ctx.debezium_extra,
        )
        .await?;
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

/// The scenario: the peer on a database pair of its own, then dualwrite.
pub async fn end_to_end(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let mut d = Deployment::create(ctx, "e2e").await?;
    let r = async {
        let mut out = RunResult::default();
        let (f, rss) = on_peer(ctx, &d, async |connect, left, right| {
            one_way(left, right, p, &|| connect.check_alive()).await
        })
        .await?;
        f.store(&mut out, "dbz");
        if let Some(bytes) = rss {
            out.set("dbz_rss", bytes as f64 / 1024.0 / 1024.0);
        }

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
pub async fn debezium_catch_up(ctx: &Ctx, d: &Deployment, n: u64) -> Result<RunResult> {
    let (mut out, rss) = on_peer(ctx, d, async |connect, left, right| {
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
    if let Some(bytes) = rss {
        out.set("dbz_rss", bytes as f64 / 1024.0 / 1024.0);
    }
    Ok(out)
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
    let mut groups = stack_cpu_groups(right).await?;
    if let Some(pid) = connect.service().pid() {
        groups.push(("connect".into(), Procs::Each(vec![pid])));
    }
    let cpu = Window::start(groups);
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
