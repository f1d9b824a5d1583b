//! Applier: reads `<prefix>.apply.<side>`, the resolver's decisions for
//! that side, and writes each to the side's database through its
//! [`Target`], an upsert or a delete by alternate key, a batch per
//! transaction, only where the target is still in the state the resolver
//! expected (see [`writer`]). Offsets are stored only after the
//! transaction committed.
//!
//! A write the database rejects for its data (constraint, bad value,
//! missing column) goes to the errors topic with its context, and the rest
//! of the batch is still written. Connection loss, deadlocks and the like are
//! retried with backoff, the same batch again.
//!
//! Writes are made as the side's applier (for PostgreSQL: under its
//! replication origin), so that side's capturer leaves their rows out (a
//! synced change never echoes back) and passes on only the reports of what
//! was written.

mod prune;
pub mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::authorise::{authorise_write, Refused, UNAUTHORISED_TARGET};
use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ApplyWrite, ErrorRecord, WriteOp};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, KafkaConsumer, Producer, Shard, TopicSpec};
use dualwrite_runtime::metrics::{busy, direction, metrics};
use dualwrite_runtime::relay::{deliver, Output};
use dualwrite_runtime::side::{Class, SideError, Target};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::writer::{Done, Writer};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("side `{side}`: {message}")]
    Setup { side: String, message: String },
}

/// Topics the applier of `side` reads and writes.
pub fn topics(config: &Config, side: SideId) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    vec![
        TopicSpec::new(t.apply(&config.side(side).name), config.kafka.partitions),
        TopicSpec::new(t.errors(), config.kafka.partitions),
    ]
}

/// Runs the applier of `side` (this instance's share of the partitions),
/// writing through `T`, until `shutdown` is cancelled.
pub async fn run<T: Target>(
    config: Arc<Config>,
    side: SideId,
    shard: Shard,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let span = tracing::info_span!("apply", side = %config.side(side).name, instance = %shard);
    run_inner::<T>(config, side, shard, shutdown)
        .instrument(span)
        .await
}

async fn run_inner<T: Target>(
    config: Arc<Config>,
    side: SideId,
    shard: Shard,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    if shard.count as usize > dualwrite_model::config::MAX_INSTANCES {
        return Err(ApplyError::Setup {
            side: config.side(side).name.clone(),
            message: format!(
                "at most {} applier instances per side",
                dualwrite_model::config::MAX_INSTANCES
            ),
        });
    }
    let name = config.side(side).name.clone();
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics(&config, side)).await?;
    let producer = kafka::producer(&config.kafka, &format!("dualwrite-apply-{name}"))?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "apply")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);
    let input = t.apply(&name);
    let consumer = kafka::assigned_consumer(
        &config.kafka,
        &format!("dualwrite-apply-{name}"),
        &t.group(&format!("apply.{name}")),
        std::slice::from_ref(&input),
        shard,
    )
    .await?;
    tracing::info!(%input, "applying");
    health().set(&format!("apply.{name}:database"), false);
    let mut a = Applier::<T> {
        config: config.clone(),
        side,
        name,
        errors: errors.clone(),
        writer: None,
        backoff: Backoff::new("apply"),
        parked: BTreeMap::new(),
        next: BTreeMap::new(),
        stored: kafka::assigned_positions(&consumer)?
            .remove(&input)
            .unwrap_or_default(),
        parent_wait: Duration::from_secs(config.apply.parent_wait_secs),
        shard,
    };
    // Connect now, so that readiness reflects the database before the first record.
    if a.write(&[], &shutdown).await?.is_none() {
        return Ok(());
    }
    if shard.index == 0 {
        let (cfg, sd) = (config.clone(), shutdown.clone());
        tokio::spawn(prune::run::<T>(cfg, side, sd).in_current_span());
    }
    let io = Io {
        producer,
        consumer,
        input,
    };
    a.serve(&io, &shutdown).await
}

/// What the applier reads from and writes to.
struct Io {
    producer: Producer,
    consumer: Arc<KafkaConsumer>,
    /// The side's apply topic.
    input: String,
}

impl<T: Target> Applier<T> {
    /// Applies batches from the apply topic until shutdown; parked changes
    /// are retried every half second.
    async fn serve(&mut self, io: &Io, shutdown: &CancellationToken) -> Result<(), ApplyError> {
        let Io {
            producer,
            consumer,
            input,
        } = io;
        let linger = Duration::from_millis(self.config.apply.linger_ms);
        let max_batch = self.config.apply.max_batch;
        let service = format!("apply-{}", self.name);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Renewed while nothing comes, so the broker never expires them.
        let mut keepalive = tokio::time::interval(kafka::KEEPALIVE);
        loop {
            // Priority: shutdown, then records, then retries of parked changes.
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = keepalive.tick() => {
                    kafka::keep_offsets_alive(consumer, input, &self.stored);
                    continue;
                }
                m = consumer.recv() => m,
                _ = tick.tick(), if !self.parked.is_empty() => {
                    let Some(bad) = self.retry_parked(shutdown).await? else { break };
                    if !self.finish(producer, consumer, input, bad, shutdown).await? {
                        break;
                    }
                    continue;
                }
            };
            let first = match first {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!("receive failed: {e}");
                    if self.backoff.brief(shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let t = std::time::Instant::now();
            let batch = kafka::recv_more(consumer, first, max_batch, linger).await;
            busy(&service, "read", t);
            let t = std::time::Instant::now();
            let Some(bad) = self.apply_batch(batch, shutdown).await? else {
                break;
            };
            busy(&service, "write", t);
            let t = std::time::Instant::now();
            if !self
                .finish(producer, consumer, input, bad, shutdown)
                .await?
            {
                break;
            }
            busy(&service, "finish", t);
        }
        kafka::commit_now(consumer);
        Ok(())
    }
}

/// A change waiting for its parent record (a foreign key the target has not got yet).
struct Parked {
    message: OwnedMessage,
    change: ApplyWrite,
    since: tokio::time::Instant,
}

/// The applier's state between batches.
struct Applier<T> {
    config: Arc<Config>,
    side: SideId,
    name: String,
    errors: ErrorSink,
    writer: Option<Writer<T>>,
    backoff: Backoff,
    /// Changes waiting for a parent, per record (map and key), in order.
    parked: BTreeMap<String, VecDeque<Parked>>,
    /// Per partition: the offset after the last message handled.
    next: BTreeMap<i32, i64>,
    /// Per partition: the offsets stored to be committed (renewed while idle).
    stored: BTreeMap<i32, i64>,
    parent_wait: Duration,
    shard: Shard,
}

impl<T: Target> Applier<T> {
    /// Writes changes, reconnecting and retrying on transient failures;
    /// None when shutdown came first.
    async fn write(
        &mut self,
        changes: &[(usize, ApplyWrite)],
        shutdown: &CancellationToken,
    ) -> Result<Option<Done>, ApplyError> {
        loop {
            let w = match self.writer.as_mut() {
                Some(w) => w,
                None => match T::connect(&self.config, self.side, self.shard).await {
                    Ok(t) => {
                        health().set(&format!("apply.{}:database", self.name), true);
                        self.writer.insert(Writer::new(t))
                    }
                    Err(e) if e.is_retryable() => {
                        health().set(&format!("apply.{}:database", self.name), false);
                        tracing::warn!("cannot connect to {}'s database, retrying: {e}", self.name);
                        if self.backoff.wait(shutdown).await {
                            return Ok(None);
                        }
                        continue;
                    }
                    Err(e) => {
                        return Err(ApplyError::Setup {
                            side: self.name.clone(),
                            message: e.message,
                        })
                    }
                },
            };
            let failure = match w.write(changes).await {
                Ok(r) => return Ok(Some(r)),
                Err(e) => e,
            };
            tracing::warn!("writing to {} failed, retrying: {failure}", self.name);
            self.writer = None;
            if self.retry_after(&failure, shutdown).await {
                return Ok(None);
            }
        }
    }

    /// Waits before a retry on a new connection: briefly after a clash of
    /// the moment, with the backoff (and the database marked not ready)
    /// otherwise. True when shutdown came first.
    async fn retry_after(&mut self, failure: &SideError, shutdown: &CancellationToken) -> bool {
        if failure.class == Class::RetryNow {
            return self.backoff.brief(shutdown).await;
        }
        health().set(&format!("apply.{}:database", self.name), false);
        self.backoff.wait(shutdown).await
    }

    /// Applies a batch; returns the error records to publish (None on shutdown).
    async fn apply_batch(
        &mut self,
        batch: Vec<OwnedMessage>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<ErrorRecord>>, ApplyError> {
        let (changes, mut bad) = decode_batch(&self.config, self.side, &self.errors, &batch);
        // A record with a parked change waits behind it, in order.
        let mut now = Vec::with_capacity(changes.len());
        for (i, mc) in changes {
            let rk = record_key(&mc);
            if let Some(q) = self.parked.get_mut(&rk) {
                q.push_back(Parked {
                    message: batch[i].clone(),
                    change: mc,
                    since: tokio::time::Instant::now(),
                });
            } else {
                now.push((i, mc));
            }
        }
        if self.parent_wait.is_zero() {
            // No waiting: a key change's new key is written at once.
            now.iter_mut().for_each(|(_, w)| no_wait(w));
        }
        let Some(done) = self.write(&now, shutdown).await? else {
            return Ok(None);
        };
        let mut rejected: BTreeMap<usize, SideError> = done
            .rejected
            .into_iter()
            .map(|r| (r.index, r.error))
            .collect();
        for (i, mc) in now {
            if done.waiting.contains(&i) {
                tracing::info!(map = %mc.map, key = %mc.kafka_key(), "key change: the new key waits for the old key's row to move");
                self.park(&batch[i], mc);
                continue;
            }
            let Some(error) = rejected.remove(&i) else {
                continue;
            };
            if error.missing_parent && !self.parent_wait.is_zero() {
                tracing::info!(map = %mc.map, key = %mc.kafka_key(), "parent record not there yet: the change waits for it");
                metrics()
                    .applied
                    .with_label_values(&[
                        &mc.map,
                        &direction(&mc.source_side, &mc.target_side),
                        "waiting_for_parent",
                    ])
                    .inc();
                self.park(&batch[i], mc);
            } else {
                let message = row_error(&self.config, &mc, &error);
                bad.push(rejection(&self.errors, &batch[i], &mc, &message));
            }
        }
        for m in &batch {
            let e = self.next.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        if !self.parked.is_empty() {
            match self.retry_parked(shutdown).await? {
                Some(more) => bad.extend(more),
                None => return Ok(None),
            }
        }
        Ok(Some(bad))
    }

    /// Holds a change back until what it waits for is there.
    fn park(&mut self, message: &OwnedMessage, change: ApplyWrite) {
        self.parked
            .entry(record_key(&change))
            .or_default()
            .push_back(Parked {
                message: message.clone(),
                change,
                since: tokio::time::Instant::now(),
            });
    }

    /// Tries the waiting changes again, oldest first per record; a change
    /// whose parent did not come within the wait becomes an error, and a key
    /// change's new key whose old row stayed is written as a new row.
    async fn retry_parked(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<ErrorRecord>>, ApplyError> {
        let mut bad = Vec::new();
        let keys: Vec<String> = self.parked.keys().cloned().collect();
        for rk in keys {
            while let Some(head) = self.parked.get_mut(&rk).and_then(|q| q.front_mut()) {
                if head.since.elapsed() >= self.parent_wait {
                    no_wait(&mut head.change);
                }
                let change = vec![(0usize, head.change.clone())];
                let Some(done) = self.write(&change, shutdown).await? else {
                    return Ok(None);
                };
                let q = self.parked.get_mut(&rk).expect("queue exists");
                if !done.waiting.is_empty() {
                    break;
                }
                match done.rejected.into_iter().next() {
                    None => {
                        q.pop_front();
                    }
                    Some(r)
                        if r.error.missing_parent
                            && q.front()
                                .is_some_and(|h| h.since.elapsed() < self.parent_wait) =>
                    {
                        break
                    }
                    Some(r) => {
                        let p = q.pop_front().expect("head exists");
                        let mut message = row_error(&self.config, &p.change, &r.error);
                        if r.error.missing_parent {
                            message = format!(
                                "missing related record after waiting {} s: {message}",
                                self.parent_wait.as_secs()
                            );
                        }
                        bad.push(rejection(&self.errors, &p.message, &p.change, &message));
                    }
                }
            }
            if self.parked.get(&rk).is_some_and(|q| q.is_empty()) {
                self.parked.remove(&rk);
            }
        }
        Ok(Some(bad))
    }

    /// Publishes error records, then stores the offsets that are safe: up
    /// to the oldest waiting change of each partition. False on shutdown.
    async fn finish(
        &mut self,
        producer: &Producer,
        consumer: &KafkaConsumer,
        topic: &str,
        bad: Vec<ErrorRecord>,
        shutdown: &CancellationToken,
    ) -> Result<bool, ApplyError> {
        let output = Output {
            records: Vec::new(),
            errors: bad,
        };
        if !deliver(producer, &self.errors, &output, &mut self.backoff, shutdown).await {
            return Ok(false);
        }
        self.backoff.reset();
        let mut safe = self.next.clone();
        for q in self.parked.values() {
            for p in q {
                let e = safe
                    .entry(p.message.partition())
                    .or_insert(p.message.offset());
                *e = (*e).min(p.message.offset());
            }
        }
        kafka::store_positions(consumer, topic, &safe)?;
        self.stored.extend(safe);
        Ok(true)
    }
}

/// Why the target rejected a write, without the row's values (logs and
/// the errors topic carry keys and names only); the database's full text,
/// with values, is logged at DEBUG when `errors.log_values` is set.
fn row_error(config: &Config, w: &ApplyWrite, e: &SideError) -> String {
    if config.errors.log_values {
        tracing::debug!(map = %w.map, key = %w.kafka_key(), "rejected row: {}", e.message);
    }
    e.redacted.clone()
}

/// A key change's new key is written without waiting for the old key's
/// row to go (the other half is then a plain delete).
fn no_wait(w: &mut ApplyWrite) {
    if w.op == WriteOp::Upsert {
        w.moved.clear();
    }
}

/// A record's identity across the apply topic: map and alternate key.
fn record_key(mc: &ApplyWrite) -> String {
    format!("{}/{}", mc.map, mc.kafka_key())
}

/// Decodes a batch: the changes (with their message index) that the
/// configuration lets this side's applier write, and error records for
/// the rest.
fn decode_batch(
    config: &Config,
    side: SideId,
    errors: &ErrorSink,
    batch: &[OwnedMessage],
) -> (Vec<(usize, ApplyWrite)>, Vec<ErrorRecord>) {
    let mut changes = Vec::with_capacity(batch.len());
    let mut bad = Vec::new();
    for (i, m) in batch.iter().enumerate() {
        match m.payload().map(avro::decode::<ApplyWrite>) {
            Some(Ok(mc)) => match authorise_write(config, side, &mc) {
                Ok(_) => changes.push((i, mc)),
                Err(r) => bad.push(unauthorised(config, errors, m, &mc, &r)),
            },
            Some(Err(e)) => {
                bad.push(errors.about(m, "malformed_record", format!("apply record: {e}")))
            }
            None => bad.push(errors.about(m, "malformed_record", "empty apply record (no value)")),
        }
    }
    (changes, bad)
}

/// The error record of a write the configuration does not allow (nothing is written).
fn unauthorised(
    config: &Config,
    errors: &ErrorSink,
    m: &OwnedMessage,
    w: &ApplyWrite,
    r: &Refused,
) -> ErrorRecord {
    let mut e = errors.about(
        m,
        UNAUTHORISED_TARGET,
        format!(
            "apply record for map `{}` at {}:{}:{}: {r}; nothing was written",
            w.map,
            m.topic(),
            m.partition(),
            m.offset()
        ),
    );
    // Named only when configured, so that a forged name counts nowhere.
    e.map = config.map(&w.map).map(|c| c.name.clone());
    e.target_side = Some(w.target_side.clone());
    e
}

fn rejection(errors: &ErrorSink, m: &OwnedMessage, mc: &ApplyWrite, message: &str) -> ErrorRecord {
    metrics()
        .applied
        .with_label_values(&[
            &mc.map,
            &direction(&mc.source_side, &mc.target_side),
            "rejected",
        ])
        .inc();
    let mut e = errors.about(
        m,
        "rejected_by_target",
        format!(
            "map `{}`: {} of {} {} on {} rejected: {message}",
            mc.map,
            match mc.op {
                WriteOp::Upsert => "upsert",
                WriteOp::Delete => "delete",
            },
            mc.target_entity,
            mc.kafka_key(),
            mc.target_side,
        ),
    );
    e.map = Some(mc.map.clone());
    e.source_side = Some(mc.source_side.clone());
    e.target_side = Some(mc.target_side.clone());
    e.source_lsn = Some(mc.source_lsn);
    e
}
