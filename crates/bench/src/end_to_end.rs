//! One direction end to end beside the peer a platform team would deploy
//! instead: Debezium's PostgreSQL connector and Debezium's JDBC sink
//! (upsert by key) on one Kafka Connect worker, from one fresh database to
//! another, then dualwrite's whole pipeline on a fresh pair, with the same
//! rows: `live_rows` inserted in transactions of 1,000 (rows/s from the
//! first source insert to the last target write), then a steady `rate`
//! (commit to commit latency, from each row's `made_at` to the
//! `arrived_at` the target gives it).

use anyhow::{Context, Result};
use tokio_postgres::Client;

use dualwrite_runtime::kafka;

use crate::debezium::{self, Connect};
use crate::env::{new_id, Ctx, DbPair, Deployment};
use crate::measure::Latencies;
use crate::scenarios::{finish, live_measure, start_running, steady, warm_up, Params, RunResult};
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

/// The scenario: the peer on a database pair of its own, then dualwrite.
pub async fn end_to_end(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let cache = ctx.peer_cache.clone();
    let (libs, plugins) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((debezium::libs(&cache)?, debezium::sink_plugins(&cache)?))
    })
    .await??;
    let mut d = Deployment::create(ctx, "e2e").await?;
    let r = async {
        let mut out = RunResult::default();
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
            let left = ctx.connect(&dbs.left).await?;
            let right = ctx.connect(&dbs.right).await?;
            let alive = || connect.check_alive();
            let f = one_way(&left, &right, p, &alive).await;
            let rss = connect.service().peak_rss();
            connect.stop();
            anyhow::Ok((f?, rss))
        }
        .await;
        dbs.drop(ctx).await;
        let (f, rss) = peer.context("Debezium source + JDBC sink")?;
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
