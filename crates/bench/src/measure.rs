//! Load generators, waits and the anchors: native logical replication
//! between the same two databases, one Kafka produce+consume hop with
//! rdkafka, raw COPY and batched upserts.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use dualwrite_model::Config;
use dualwrite_runtime::kafka::rdkafka::consumer::Consumer;
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self, Outgoing, TopicSpec};
use futures::{pin_mut, SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::env::{drop_slots, new_id, Ctx, DbPair};
use crate::rows;

/// Rows per source transaction in the throughput scenarios.
pub const TXN_ROWS: u64 = 1000;

/// Inserts rows `1..=n` with `prefix` in transactions of [`TXN_ROWS`];
/// returns the seconds it took.
pub async fn insert_rows(db: &Client, prefix: &str, n: u64) -> Result<f64> {
    let t = Instant::now();
    let mut lo = 1;
    while lo <= n {
        let hi = (lo + TXN_ROWS - 1).min(n);
        db.batch_execute(&rows::insert(prefix, lo, hi)).await?;
        lo = hi + 1;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Rows with `prefix` in a database.
pub async fn count(db: &Client, prefix: &str) -> Result<i64> {
    Ok(db
        .query_one(
            &format!(
                "SELECT count(*) FROM bench_items WHERE {}",
                rows::like(prefix)
            ),
            &[],
        )
        .await?
        .get(0))
}

/// Rows inserted into `bench_items` so far, by the statistics (cheap; may
/// lag a second or so behind).
pub async fn inserted(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT coalesce(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables WHERE relname = 'bench_items'",
            &[],
        )
        .await?
        .get(0))
}

/// Waits until `db` has `want` rows with `prefix`. Counting a large table
/// often would load the machine being measured, so rows are counted only
/// once the statistics show `gate` inserts into the table (and every ten
/// polls regardless). The figures come from the rows' timestamps, not
/// from when this notices.
pub async fn wait_arrived(
    db: &Client,
    prefix: &str,
    want: u64,
    gate: i64,
    every: Duration,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    let mut polls = 0u64;
    wait_for(
        &format!("{want} rows {prefix}… on the target"),
        patience(want),
        every,
        || {
            polls += 1;
            let force = polls.is_multiple_of(10);
            async move {
                alive()?;
                if !force && inserted(db).await? < gate {
                    return Ok(false);
                }
                Ok(count(db, prefix).await? as u64 == want)
            }
        },
    )
    .await
}

/// Polls `check` every `every` until it returns true; fails after `timeout`.
pub async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// How long to wait for `n` rows to move: generous, so a slow system is
/// measured rather than cut off.
pub fn patience(n: u64) -> Duration {
    Duration::from_secs(180 + n / 200)
}

/// Epoch seconds of `min(made_at)` of rows with `prefix` (database clock).
pub async fn first_made(db: &Client, prefix: &str) -> Result<f64> {
    epoch(db, "min(made_at)", prefix).await
}

/// Epoch seconds of `min(arrived_at)` of rows with `prefix` (database clock).
pub async fn first_arrived(db: &Client, prefix: &str) -> Result<f64> {
    epoch(db, "min(arrived_at)", prefix).await
}

/// Epoch seconds of `max(arrived_at)` of rows with `prefix` (database clock).
pub async fn last_arrived(db: &Client, prefix: &str) -> Result<f64> {
    epoch(db, "max(arrived_at)", prefix).await
}

async fn epoch(db: &Client, agg: &str, prefix: &str) -> Result<f64> {
    let v: Option<f64> = db
        .query_one(
            &format!(
                "SELECT extract(epoch FROM {agg})::float8 FROM bench_items WHERE {}",
                rows::like(prefix)
            ),
            &[],
        )
        .await?
        .get(0);
    v.with_context(|| format!("no rows with prefix {prefix}"))
}

/// The database's clock, in epoch seconds.
pub async fn db_now(db: &Client) -> Result<f64> {
    Ok(db
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .get(0))
}

/// Latencies of rows on a target, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// p50 of the first and of the last third of the rows (by source
    /// time): whether latency drifts during the run.
    pub p50_first: f64,
    pub p50_last: f64,
    /// When the slowest row was made, in seconds after the first.
    pub max_at: f64,
}

/// Latency (`arrived_at - made_at`) of the rows with `prefix` on a target.
pub async fn latencies(target: &Client, prefix: &str) -> Result<Latencies> {
    let r = target
        .query_one(
            &format!(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), \
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY d), \
                        max(d), \
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE third = 1), \
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE third = 3), \
                        (array_agg(at ORDER BY d DESC))[1] \
                 FROM (SELECT extract(epoch FROM arrived_at - made_at)::float8 * 1000 AS d, \
                              ntile(3) OVER (ORDER BY made_at) AS third, \
                              extract(epoch FROM made_at - min(made_at) OVER ())::float8 AS at \
                       FROM bench_items WHERE {}) s",
                rows::like(prefix)
            ),
            &[],
        )
        .await?;
    let get = |i: usize| r.get::<_, Option<f64>>(i).unwrap_or(f64::NAN);
    Ok(Latencies {
        p50: get(0),
        p99: get(1),
        max: get(2),
        p50_first: get(3),
        p50_last: get(4),
        max_at: get(5),
    })
}

/// Inserts `rate` rows a second for `secs` seconds, in small transactions
/// paced by a timer (10 ms apart); returns (rows, achieved rows/s).
pub async fn paced(db: &Client, prefix: &str, rate: u64, secs: u64) -> Result<(u64, f64)> {
    let per_tick = (rate / 100).max(1);
    let ticks_per_sec = rate as f64 / per_tick as f64;
    let period = Duration::from_secs_f64(1.0 / ticks_per_sec);
    let total = rate * secs;
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let t = Instant::now();
    let mut lo = 1;
    while lo <= total {
        iv.tick().await;
        let hi = (lo + per_tick - 1).min(total);
        db.batch_execute(&rows::insert(prefix, lo, hi)).await?;
        lo = hi + 1;
    }
    Ok((total, total as f64 / t.elapsed().as_secs_f64()))
}

/// Native logical replication between two fresh databases: a publication
/// (with a slot made beforehand: a subscription in the same cluster cannot
/// create its own) and a subscription, in one or both directions. Row
/// filters keep each direction to the rows made on its source, so the two
/// directions do not loop (PostgreSQL 15 has no `origin = none`); column
/// lists leave out `arrived_at`, which the subscriber fills in.
pub struct Native {
    pub dbs: DbPair,
    /// (subscriber database, subscription and slot name, publisher database).
    subs: Vec<(String, String, String)>,
}

impl Native {
    pub async fn create(ctx: &Ctx, both: bool) -> Result<Native> {
        let id = new_id();
        let dbs = DbPair::create(ctx, &id).await?;
        let mut n = Native {
            dbs,
            subs: Vec::new(),
        };
        match n.link(ctx, &id, both).await {
            Ok(()) => Ok(n),
            Err(e) => {
                n.cleanup(ctx).await;
                Err(e)
            }
        }
    }

    async fn link(&mut self, ctx: &Ctx, id: &str, both: bool) -> Result<()> {
        let n = self;
        let cols = rows::COLUMNS.join(", ");
        let mut links = vec![(
            n.dbs.left.clone(),
            n.dbs.right.clone(),
            "id < 'M'",
            format!("bench_{id}_lr"),
        )];
        if both {
            links.push((
                n.dbs.right.clone(),
                n.dbs.left.clone(),
                "id >= 'R' AND id < 'S'",
                format!("bench_{id}_rl"),
            ));
        }
        for (publisher, subscriber, filter, name) in links {
            let p = ctx.connect(&publisher).await?;
            // A filter only when both directions run: the one-way anchor is plain.
            let filter = if both {
                format!(" WHERE ({filter})")
            } else {
                String::new()
            };
            p.batch_execute(&format!(
                "CREATE PUBLICATION {name} FOR TABLE bench_items ({cols}){filter} WITH (publish = 'insert')"
            ))
            .await?;
            p.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&name],
            )
            .await?;
            let s = ctx.connect(&subscriber).await?;
            n.subs
                .push((subscriber.clone(), name.clone(), publisher.clone()));
            s.batch_execute(&format!(
                "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {name} \
                 WITH (create_slot = false, slot_name = '{name}', copy_data = false)",
                ctx.conninfo(&publisher)
            ))
            .await?;
        }
        Ok(())
    }

    /// Drops the subscriptions (detached from their slots first), the
    /// slots and the databases.
    pub async fn cleanup(self, ctx: &Ctx) {
        for (subscriber, sub, _) in &self.subs {
            let Ok(s) = ctx.connect(subscriber).await else {
                continue;
            };
            // One statement at a time: DROP SUBSCRIPTION must not run in a
            // transaction block.
            for sql in [
                format!("ALTER SUBSCRIPTION {sub} DISABLE"),
                format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"),
                format!("DROP SUBSCRIPTION {sub}"),
            ] {
                if let Err(e) = s.batch_execute(&sql).await {
                    eprintln!("bench: {sql}: {e}");
                }
            }
        }
        if let Ok(admin) = ctx.connect("postgres").await {
            for (_, _, publisher) in &self.subs {
                drop_slots(&admin, publisher).await;
            }
        }
        self.dbs.drop(ctx).await;
    }
}

/// The broker's own rate for one hop: `n` records of `size` bytes produced
/// to a fresh one-partition topic and consumed back at once, with the
/// services' producer and consumer settings. Returns rows/s.
pub async fn kafka_hop(ctx: &Ctx, n: u64, size: usize) -> Result<f64> {
    let prefix = format!("bench-hop-{}", new_id());
    let config = Config::parse(&ctx.config_text(&prefix, "unused", "unused", ctx.partitions))
        .map_err(anyhow::Error::msg)?;
    let topic = format!("{prefix}.hop");
    let result = async {
        kafka::ensure_topics(&config.kafka, &[TopicSpec::new(&topic, 1)]).await?;
        let producer = kafka::producer(&config.kafka, "dualwrite-bench-producer")?;
        let consumer = kafka::consumer(
            &config.kafka,
            "dualwrite-bench-consumer",
            &format!("{prefix}.reader"),
        )?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let records: Vec<Outgoing> = (0..n)
            .map(|i| {
                let mut payload = format!("{i:012}").into_bytes();
                payload.resize(size, b'x');
                Outgoing {
                    topic: topic.clone(),
                    key: format!("k{i}"),
                    payload,
                }
            })
            .collect();
        let t = Instant::now();
        let reader = tokio::spawn(async move {
            let mut got = 0u64;
            let stream = consumer.stream();
            pin_mut!(stream);
            while got < n {
                match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                    Ok(Some(Ok(_))) => got += 1,
                    Ok(Some(Err(e))) => return Err(anyhow::anyhow!("consume: {e}")),
                    Ok(None) => bail!("consumer stream ended"),
                    Err(_) => bail!("no record for 60 s after {got} of {n}"),
                }
            }
            Ok(Instant::now())
        });
        for chunk in records.chunks(10_000) {
            kafka::send_all(&producer, chunk).await?;
        }
        let done = reader.await??;
        Ok::<f64, anyhow::Error>(n as f64 / done.duration_since(t).as_secs_f64())
    }
    .await;
    result
}

/// One Kafka hop's latency at a steady rate: records stamped with the
/// time they were handed to the producer, `rate` a second for `secs`
/// seconds (10 ms apart), consumed back at once, with the services'
/// producer and consumer settings, once the consumer has read a first
/// record (else the first records wait for its start, about 300 ms: the
/// p99 of 20,000). Returns (p50, p99) in ms.
pub async fn kafka_hop_latency(ctx: &Ctx, rate: u64, secs: u64, size: usize) -> Result<(f64, f64)> {
    let prefix = format!("bench-hoplat-{}", new_id());
    let config = Config::parse(&ctx.config_text(&prefix, "unused", "unused", ctx.partitions))
        .map_err(anyhow::Error::msg)?;
    let topic = format!("{prefix}.hop");
    kafka::ensure_topics(&config.kafka, &[TopicSpec::new(&topic, 1)]).await?;
    let producer = kafka::producer(&config.kafka, "dualwrite-bench-producer")?;
    let consumer = kafka::consumer(
        &config.kafka,
        "dualwrite-bench-consumer",
        &format!("{prefix}.reader"),
    )?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let total = rate * secs;
    let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(async move {
        use dualwrite_runtime::kafka::rdkafka::Message;
        let mut lat = Vec::with_capacity(total as usize);
        let stream = consumer.stream();
        pin_mut!(stream);
        while (lat.len() as u64) < total {
            match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                Ok(Some(Ok(m))) if m.payload().is_some_and(|p| p.starts_with(PRIMER)) => {
                    ready_tx.send_replace(true);
                }
                Ok(Some(Ok(m))) => {
                    let sent: i64 = m
                        .payload()
                        .and_then(|p| std::str::from_utf8(&p[..20.min(p.len())]).ok())
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    lat.push((dualwrite_runtime::now_micros() - sent) as f64 / 1000.0);
                }
                Ok(Some(Err(e))) => bail!("consume: {e}"),
                Ok(None) => bail!("consumer stream ended"),
                Err(_) => bail!("no record for 60 s"),
            }
        }
        Ok(lat)
    });
    prime(&producer, &topic, &mut ready).await?;
    let per_tick = (rate / 100).max(1);
    let period = Duration::from_secs_f64(per_tick as f64 / rate as f64);
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::with_capacity(total as usize);
    let mut i = 0;
    while i < total {
        iv.tick().await;
        for _ in 0..per_tick.min(total - i) {
            let mut payload = format!("{:020}", dualwrite_runtime::now_micros()).into_bytes();
            payload.resize(size, b'x');
            let key = format!("k{i}");
            let rec = kafka::rdkafka::producer::FutureRecord::to(&topic)
                .key(&key)
                .payload(&payload);
            match producer.send_result(rec) {
                Ok(f) => pending.push(f),
                Err((e, _)) => bail!("produce: {e}"),
            }
            i += 1;
        }
    }
    for f in pending {
        f.await
            .map_err(|_| anyhow::anyhow!("delivery canceled"))?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    let mut lat = reader.await??;
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat[((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok((at(0.5), at(0.99)))
}

/// The payload of the records [`prime`] sends, which the reader does not time.
const PRIMER: &[u8] = b"primer";

/// Sends a [`PRIMER`] record every 50 ms until the reader has read one.
async fn prime(
    producer: &kafka::Producer,
    topic: &str,
    ready: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !*ready.borrow() {
        if tokio::time::Instant::now() > deadline {
            bail!("the hop's consumer read nothing for 60 s");
        }
        let rec = kafka::rdkafka::producer::FutureRecord::to(topic)
            .key("primer")
            .payload(PRIMER);
        if let Err((e, _)) = producer.send_result(rec) {
            bail!("produce: {e}");
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(50), ready.changed()).await {
            bail!("the hop's reader ended before reading a record");
        }
    }
    Ok(())
}

/// The rows `1..=n` with `prefix` in COPY text format, as PostgreSQL
/// writes them.
pub async fn copy_text(db: &Client, prefix: &str, n: u64) -> Result<Vec<Bytes>> {
    let stream = db
        .copy_out(&format!("COPY ({}) TO STDOUT", rows::select(prefix, 1, n)))
        .await?;
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.push(chunk?);
    }
    Ok(out)
}

/// `COPY table (columns) FROM STDIN` of `data`; returns the seconds it took.
pub async fn copy_in(db: &Client, table: &str, data: &[Bytes]) -> Result<f64> {
    let t = Instant::now();
    let sink = db
        .copy_in(&format!(
            "COPY {table} ({}) FROM STDIN",
            rows::INSERT_COLUMNS
        ))
        .await?;
    pin_mut!(sink);
    for c in data {
        sink.feed(c.clone()).await?;
    }
    sink.as_mut().finish().await?;
    Ok(t.elapsed().as_secs_f64())
}

/// The rows `1..=n` with `prefix` as JSON arrays of `batch` rows.
pub async fn json_batches(db: &Client, prefix: &str, n: u64, batch: u64) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut lo = 1;
    while lo <= n {
        let hi = (lo + batch - 1).min(n);
        let r = db
            .query_one(
                &format!(
                    "SELECT json_agg(r)::text FROM ({}) r",
                    rows::select(prefix, lo, hi)
                ),
                &[],
            )
            .await?;
        out.push(r.get(0));
        lo = hi + 1;
    }
    Ok(out)
}

/// Upserts each batch (`INSERT … SELECT … FROM json_populate_recordset …
/// ON CONFLICT (id) DO UPDATE`, one transaction each); returns the seconds.
pub async fn upsert(db: &Client, table: &str, batches: &[String]) -> Result<f64> {
    let cols = rows::INSERT_COLUMNS;
    let updates: Vec<String> = cols
        .split(", ")
        .filter(|c| *c != "id")
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let stmt = db
        .prepare(&format!(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_recordset(NULL::{table}, $1::text::json) \
             ON CONFLICT (id) DO UPDATE SET {}",
            updates.join(", ")
        ))
        .await?;
    let t = Instant::now();
    for b in batches {
        db.execute(&stmt, &[b]).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}
