//! Applier: reads `<prefix>.apply.<side>` and writes each change to that
//! side's database, an upsert or a delete by alternate key, a batch per
//! transaction. Offsets are stored only after the transaction committed.
//!
//! A change the database rejects for its data (constraint, bad value,
//! missing column) goes to the errors topic with its context, and the rest
//! of the batch is still written. Connection loss, deadlocks and the like are
//! retried with backoff, the same batch again.
//!
//! Writes run under the side's replication origin, so that side's capturer
//! leaves them out: a synced change never echoes back.

pub mod sql;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::mapping::map_change;
use dualwrite_model::record::{
    parse_lsn, ApplyOp, ChangeOp, ChangeRecord, ErrorRecord, Field, MappedChange,
};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, KafkaConsumer, Outgoing, Producer, Shard, TopicSpec};
use dualwrite_runtime::metrics::{direction, metrics};
use dualwrite_runtime::pg;
use dualwrite_runtime::relay::{deliver, Output};
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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

/// A connection to the target with its prepared statements.
struct Writer {
    client: Client,
    statements: HashMap<String, Statement>,
    config: Arc<Config>,
    side: SideId,
}

/// A change that the target rejected.
struct Rejected {
    index: usize,
    error: tokio_postgres::Error,
}

enum WriteError {
    /// Worth retrying the whole batch (after reconnecting).
    Transient(tokio_postgres::Error),
    /// The records a conflict sends back could not be produced: retry the batch.
    Emit(KafkaError),
}

/// What writing one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Written,
    /// The target already has a later (or the same) change from this source.
    Stale,
    /// Both sides changed the record; the source is the conflict master:
    /// written, and the master is asked to re-assert its current values.
    ConflictSourceWon,
    /// Both sides changed the record; the target is the conflict master:
    /// not written, and the target's current values are sent back.
    ConflictTargetWon,
    /// A re-assert request answered with the current values.
    Reasserted,
}

impl Writer {
    async fn connect(
        config: &Arc<Config>,
        side: SideId,
        shard: Shard,
    ) -> Result<Writer, pg::ConnectError> {
        let client = pg::connect(&config.side(side).connection, "dualwrite-apply").await?;
        // One session holds an origin at a time: each instance has its own.
        let origins = config.origin_names(side);
        let origin = if shard.count > 1 {
            origins[1 + shard.index as usize].clone()
        } else {
            origins[0].clone()
        };
        pg::ensure_origin(&client, &origin).await?;
        client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await?;
        client.batch_execute(sql::POSITIONS_DDL).await?;
        Ok(Writer {
            client,
            statements: HashMap::new(),
            config: config.clone(),
            side,
        })
    }

    fn side_name(&self) -> &str {
        &self.config.side(self.side).name
    }

    async fn prepared(&mut self, sql: String) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Writes one change, unless
    /// - the target already has this record from a later (or the same)
    ///   source position of the same side: a redelivered or replayed change
    ///   never regresses a record;
    /// - the record changed on the target too (its fields that sync both
    ///   ways match neither the source's old nor its new values) and the
    ///   target is the conflict master.
    ///
    /// Records to send back because of a conflict are added to `emit`.
    async fn exec(
        &mut self,
        mc: &MappedChange,
        emit: &mut Vec<Outgoing>,
    ) -> Result<Applied, tokio_postgres::Error> {
        let key = mc.kafka_key();
        if mc.op == ApplyOp::Reassert {
            self.reassert(mc, emit).await?;
            return Ok(Applied::Reasserted);
        }
        let guard = self.prepared(sql::ADVANCE_POSITION.to_owned()).await?;
        let advanced = self
            .client
            .query_opt(
                &guard,
                &[
                    &mc.map,
                    &key,
                    &mc.source_side,
                    &mc.source_lsn,
                    &mc.source_seq,
                ],
            )
            .await?;
        if advanced.is_none() {
            tracing::debug!(map = %mc.map, key = %key, lsn = mc.source_lsn, "older than what the target has: skipped");
            return Ok(Applied::Stale);
        }
        let mut applied = Applied::Written;
        if let Some(check) = sql::conflict_check(mc) {
            let stmt = self.prepared(check).await?;
            let (before, after) = sql::conflict_parameters(mc);
            let row = self.client.query_opt(&stmt, &[&before, &after]).await?;
            let state = row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1)));
            if is_conflict(mc, state) {
                if mc.conflict_master.as_deref() == Some(self.side_name()) {
                    tracing::info!(map = %mc.map, key = %key, master = %self.side_name(), "conflict: the target is the master; it keeps its values and sends them back");
                    self.reassert(mc, emit).await?;
                    return Ok(Applied::ConflictTargetWon);
                }
                tracing::info!(map = %mc.map, key = %key, master = %mc.source_side, "conflict: the source is the master; its change is written and it re-asserts its values");
                if let Some(request) = reassert_request(&self.config, mc) {
                    emit.push(request);
                }
                applied = Applied::ConflictSourceWon;
            }
        }
        if let Some(sql) = sql::statement(mc) {
            let stmt = self.prepared(sql).await?;
            self.client.execute(&stmt, &[&sql::parameter(mc)]).await?;
        }
        Ok(applied)
    }

    /// Writes a run of changes of the same shape (see [`runs`]) with one
    /// statement for each step of [`Writer::exec`]: the position guard, the
    /// conflict check and the write, each over the whole run. The outcome
    /// is the same as writing the changes one by one: each record occurs
    /// once, so the steps of different changes do not see each other.
    async fn exec_run(
        &mut self,
        run: &[(usize, MappedChange)],
        emit: &mut Vec<Outgoing>,
    ) -> Result<Vec<Applied>, tokio_postgres::Error> {
        let [(_, first), _, ..] = run else {
            let mut out = Vec::with_capacity(1);
            for (_, mc) in run {
                out.push(self.exec(mc, emit).await?);
            }
            return Ok(out);
        };
        let keys: Vec<String> = run.iter().map(|(_, mc)| mc.kafka_key()).collect();
        let lsns: Vec<i64> = run.iter().map(|(_, mc)| mc.source_lsn).collect();
        let seqs: Vec<i32> = run.iter().map(|(_, mc)| mc.source_seq).collect();
        let guard = self.prepared(sql::ADVANCE_POSITIONS.to_owned()).await?;
        let advanced: HashSet<String> = self
            .client
            .query(
                &guard,
                &[&first.map, &first.source_side, &keys, &lsns, &seqs],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut outcomes: Vec<Applied> = keys
            .iter()
            .map(|k| {
                if advanced.contains(k) {
                    Applied::Written
                } else {
                    Applied::Stale
                }
            })
            .collect();
        for (k, mc) in keys.iter().zip(run).filter(|(k, _)| !advanced.contains(*k)) {
            tracing::debug!(map = %mc.1.map, key = %k, lsn = mc.1.source_lsn, "older than what the target has: skipped");
        }
        let live: Vec<usize> = (0..run.len())
            .filter(|&i| outcomes[i] == Applied::Written)
            .collect();
        if live.is_empty() {
            return Ok(outcomes);
        }
        if let Some(check) = sql::conflict_check_many(first) {
            let stmt = self.prepared(check).await?;
            let param = sql::conflict_parameters_many(live.iter().map(|&i| &run[i].1));
            let mut states: Vec<Option<(bool, bool)>> = vec![None; live.len()];
            for row in self.client.query(&stmt, &[&param]).await? {
                let at = usize::try_from(row.get::<_, i64>(0) - 1).unwrap_or(usize::MAX);
                if let Some(s) = states.get_mut(at) {
                    *s = Some((row.get(1), row.get(2)));
                }
            }
            for (&i, state) in live.iter().zip(states) {
                let mc = &run[i].1;
                if !is_conflict(mc, state) {
                    continue;
                }
                let key = &keys[i];
                if mc.conflict_master.as_deref() == Some(self.side_name()) {
                    tracing::info!(map = %mc.map, key = %key, master = %self.side_name(), "conflict: the target is the master; it keeps its values and sends them back");
                    self.reassert(mc, emit).await?;
                    outcomes[i] = Applied::ConflictTargetWon;
                } else {
                    tracing::info!(map = %mc.map, key = %key, master = %mc.source_side, "conflict: the source is the master; its change is written and it re-asserts its values");
                    if let Some(request) = reassert_request(&self.config, mc) {
                        emit.push(request);
                    }
                    outcomes[i] = Applied::ConflictSourceWon;
                }
            }
        }
        let write: Vec<&MappedChange> = live
            .iter()
            .filter(|&&i| outcomes[i] != Applied::ConflictTargetWon)
            .map(|&i| &run[i].1)
            .collect();
        if let (false, Some(sql)) = (write.is_empty(), sql::statement_many(first)) {
            let stmt = self.prepared(sql).await?;
            self.client
                .execute(&stmt, &[&sql::parameter_many(write.into_iter())])
                .await?;
        }
        Ok(outcomes)
    }

    /// Sends this side's current values of the record (or its absence)
    /// back through the map, stamped with the current WAL position, so the
    /// other side converges to what the master has now.
    async fn reassert(
        &mut self,
        mc: &MappedChange,
        emit: &mut Vec<Outgoing>,
    ) -> Result<(), tokio_postgres::Error> {
        let config = self.config.clone();
        let Some(map) = config.map(&mc.map) else {
            return Ok(());
        };
        let stmt = self.prepared(sql::current_row(mc)).await?;
        let row: Option<String> = self
            .client
            .query_opt(&stmt, &[&sql::key_parameter(mc)])
            .await?
            .and_then(|r| r.get(0));
        // The WAL insert position, not the write position: it moves with
        // every record inserted, this transaction's own uncommitted writes
        // included. Two re-asserts of a record that see different rows (the
        // record written in between, even by this transaction) therefore
        // get different stamps, and the later one is not taken for a replay
        // of the earlier one by the target's position guard.
        let lsn: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?
            .get(0);
        let current: Option<Vec<Field>> = row.and_then(|json| {
            let obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&json).ok()?;
            Some(
                obj.into_iter()
                    .map(|(name, v)| Field {
                        name,
                        value: v.as_str().map(str::to_owned),
                    })
                    .collect(),
            )
        });
        let change = ChangeRecord {
            side: self.side_name().to_owned(),
            entity: map.entity(self.side).qualified(),
            op: if current.is_some() {
                ChangeOp::Update
            } else {
                ChangeOp::Delete
            },
            before: Some(current.clone().unwrap_or_else(|| mc.key.clone())),
            after: current,
            commit_lsn: parse_lsn(&lsn).unwrap_or(0) as i64,
            seq: 0,
            xid: 0,
            commit_time: dualwrite_runtime::now_micros(),
        };
        let topic = Topics::new(&self.config.kafka.topic_prefix).map(&map.name);
        match map_change(&config, map, self.side, &change) {
            Ok(changes) => {
                for c in changes {
                    match avro::encode(&c) {
                        Ok(payload) => emit.push(Outgoing {
                            topic: topic.clone(),
                            key: c.kafka_key(),
                            payload,
                        }),
                        Err(e) => {
                            tracing::error!(map = %map.name, "cannot encode a re-asserted record: {e}")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(map = %map.name, "cannot re-assert the record: {e}"),
        }
        Ok(())
    }

    /// Writes the changes in one transaction; if the target rejects one,
    /// writes them one transaction each so that only the rejected ones fail.
    /// Records a conflict sends back are produced before the commit.
    async fn write(
        &mut self,
        changes: &[(usize, MappedChange)],
        producer: &Producer,
    ) -> Result<Vec<Rejected>, WriteError> {
        let all_at_once = async {
            let mut emit = Vec::new();
            let mut outcomes = Vec::with_capacity(changes.len());
            self.client.batch_execute("BEGIN").await?;
            for run in runs(changes) {
                outcomes.extend(self.exec_run(&changes[run], &mut emit).await?);
            }
            Ok::<_, tokio_postgres::Error>((emit, outcomes))
        }
        .await;
        match all_at_once {
            Ok((emit, outcomes)) => {
                self.commit_with(producer, &emit).await?;
                for ((_, mc), applied) in changes.iter().zip(outcomes) {
                    record_applied(mc, applied);
                }
                return Ok(Vec::new());
            }
            Err(e) if pg::is_transient(&e) => return Err(WriteError::Transient(e)),
            Err(_) => {
                self.client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(WriteError::Transient)?;
            }
        }
        let mut rejected = Vec::new();
        for (index, mc) in changes {
            let one = async {
                let mut emit = Vec::new();
                self.client.batch_execute("BEGIN").await?;
                let applied = self.exec(mc, &mut emit).await?;
                Ok::<_, tokio_postgres::Error>((emit, applied))
            }
            .await;
            match one {
                Ok((emit, applied)) => {
                    self.commit_with(producer, &emit).await?;
                    record_applied(mc, applied);
                }
                Err(e) if pg::is_transient(&e) => return Err(WriteError::Transient(e)),
                Err(error) => {
                    self.client
                        .batch_execute("ROLLBACK")
                        .await
                        .map_err(WriteError::Transient)?;
                    rejected.push(Rejected {
                        index: *index,
                        error,
                    });
                }
            }
        }
        Ok(rejected)
    }

    /// Produces `emit` (acknowledged), then commits; rolls back if producing failed.
    async fn commit_with(
        &mut self,
        producer: &Producer,
        emit: &[Outgoing],
    ) -> Result<(), WriteError> {
        if let Err(e) = kafka::send_all(producer, emit).await {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(WriteError::Transient)?;
            return Err(WriteError::Emit(e));
        }
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(WriteError::Transient)
    }
}

/// Splits changes into runs that [`Writer::exec_run`] writes set-based:
/// consecutive changes of the same map, source side, target table,
/// operation and field names, in which no record occurs twice. Runs keep
/// the changes' order, so a parent written before its child in the batch
/// is still written first.
fn runs(changes: &[(usize, MappedChange)]) -> Vec<std::ops::Range<usize>> {
    fn names(a: &[Field], b: &[Field]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name)
    }
    fn same_shape(a: &MappedChange, b: &MappedChange) -> bool {
        a.op == b.op
            && a.op != ApplyOp::Reassert
            && a.map == b.map
            && a.source_side == b.source_side
            && a.target_entity == b.target_entity
            && names(&a.key, &b.key)
            && names(&a.values, &b.values)
            && match (&a.before, &b.before) {
                (None, None) => true,
                (Some(x), Some(y)) => names(x, y),
                _ => false,
            }
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut seen = HashSet::new();
    for (i, (_, mc)) in changes.iter().enumerate() {
        let key = mc.kafka_key();
        if i > start && (!same_shape(&changes[start].1, mc) || seen.contains(&key)) {
            out.push(start..i);
            start = i;
            seen.clear();
        }
        seen.insert(key);
    }
    if start < changes.len() {
        out.push(start..changes.len());
    }
    out
}

/// Counts a committed change in the metrics, with its latency when written.
fn record_applied(mc: &MappedChange, applied: Applied) {
    let outcome = match applied {
        Applied::Written => "written",
        Applied::Stale => "stale",
        Applied::ConflictSourceWon => "conflict_source_won",
        Applied::ConflictTargetWon => "conflict_target_won",
        Applied::Reasserted => "reasserted",
    };
    let m = metrics();
    let dir = direction(&mc.source_side, &mc.target_side);
    m.applied.with_label_values(&[&mc.map, &dir, outcome]).inc();
    if matches!(applied, Applied::Written | Applied::ConflictSourceWon) && mc.commit_time > 0 {
        let seconds = (dualwrite_runtime::now_micros() - mc.commit_time).max(0) as f64 / 1e6;
        m.latency
            .with_label_values(&[&mc.map, &dir])
            .observe(seconds);
    }
}

/// A request to the master (the source of `mc`) to re-assert its values of the record.
fn reassert_request(config: &Config, mc: &MappedChange) -> Option<Outgoing> {
    let map = config.map(&mc.map)?;
    let master = config.side_id(&mc.source_side)?;
    let key: Vec<Field> = map
        .entity(master)
        .key
        .iter()
        .zip(&mc.key)
        .map(|(name, f)| Field {
            name: name.clone(),
            value: f.value.clone(),
        })
        .collect();
    let request = MappedChange {
        map: mc.map.clone(),
        source_side: mc.target_side.clone(),
        target_side: mc.source_side.clone(),
        source_entity: mc.target_entity.clone(),
        target_entity: mc.source_entity.clone(),
        op: ApplyOp::Reassert,
        key,
        values: Vec::new(),
        source_lsn: 0,
        source_seq: 0,
        source_xid: 0,
        commit_time: dualwrite_runtime::now_micros(),
        before: None,
        existed: true,
        conflict_master: mc.conflict_master.clone(),
    };
    let payload = avro::encode(&request).ok()?;
    Some(Outgoing {
        topic: Topics::new(&config.kafka.topic_prefix).map(&mc.map),
        key: request.kafka_key(),
        payload,
    })
}

/// Whether the target's state (`None`: no row; else whether its fields that
/// sync both ways equal the source's old values, and its new values) shows a
/// change made on the target that the source did not know of.
fn is_conflict(mc: &MappedChange, target: Option<(bool, bool)>) -> bool {
    match (mc.existed, mc.op, target) {
        (_, ApplyOp::Reassert, _) => false,
        // New on the source: a conflict if the target has the record otherwise.
        (false, _, Some((_, same_as_new))) => !same_as_new,
        (false, _, None) => false,
        // Deleted on the source: a conflict if the target changed it meanwhile.
        (true, ApplyOp::Delete, Some((same_as_old, _))) => !same_as_old,
        (true, ApplyOp::Delete, None) => false,
        // Updated on the source: a conflict if the target changed or deleted it.
        (true, ApplyOp::Upsert, Some((same_as_old, same_as_new))) => !same_as_old && !same_as_new,
        (true, ApplyOp::Upsert, None) => true,
    }
}

/// Runs the applier of `side` (this instance's share of the partitions)
/// until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    side: SideId,
    shard: Shard,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let span = tracing::info_span!("apply", side = %config.side(side).name, instance = %shard);
    run_inner(config, side, shard, shutdown)
        .instrument(span)
        .await
}

async fn run_inner(
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
        .with_max_record_bytes(config.kafka.max_record_bytes);
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
    let linger = Duration::from_millis(config.apply.linger_ms);
    let mut a = Applier {
        config: config.clone(),
        side,
        name,
        errors: errors.clone(),
        producer: producer.clone(),
        writer: None,
        backoff: Backoff::new("apply"),
        parked: BTreeMap::new(),
        next: BTreeMap::new(),
        parent_wait: Duration::from_secs(config.apply.parent_wait_secs),
        shard,
    };
    // Connect now, so that readiness reflects the database before the first record.
    if a.write(&[], &shutdown).await?.is_none() {
        return Ok(());
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        // Priority: shutdown, then records, then retries of parked changes.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
            _ = tick.tick(), if !a.parked.is_empty() => {
                let Some(bad) = a.retry_parked(&shutdown).await? else { break };
                if !a.finish(&producer, &consumer, &input, bad, &shutdown).await? {
                    break;
                }
                continue;
            }
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!("receive failed: {e}");
                if a.backoff.brief(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        let batch = kafka::recv_more(&consumer, first, config.apply.max_batch, linger).await;
        let Some(bad) = a.apply_batch(batch, &shutdown).await? else {
            break;
        };
        if !a
            .finish(&producer, &consumer, &input, bad, &shutdown)
            .await?
        {
            break;
        }
    }
    kafka::commit_now(&consumer);
    Ok(())
}

/// A change waiting for its parent record (a foreign key the target has not got yet).
struct Parked {
    message: OwnedMessage,
    change: MappedChange,
    since: tokio::time::Instant,
}

/// The applier's state between batches.
struct Applier {
    config: Arc<Config>,
    side: SideId,
    name: String,
    errors: ErrorSink,
    producer: Producer,
    writer: Option<Writer>,
    backoff: Backoff,
    /// Changes waiting for a parent, per record (map and key), in order.
    parked: BTreeMap<String, VecDeque<Parked>>,
    /// Per partition: the offset after the last message handled.
    next: BTreeMap<i32, i64>,
    parent_wait: Duration,
    shard: Shard,
}

fn is_missing_parent(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "23503")
}

impl Applier {
    /// Writes changes, reconnecting and retrying on transient failures;
    /// None when shutdown came first.
    async fn write(
        &mut self,
        changes: &[(usize, MappedChange)],
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Rejected>>, ApplyError> {
        loop {
            let w = match self.writer.as_mut() {
                Some(w) => w,
                None => match Writer::connect(&self.config, self.side, self.shard).await {
                    Ok(w) => {
                        health().set(&format!("apply.{}:database", self.name), true);
                        self.writer.insert(w)
                    }
                    Err(e) if e.is_transient() => {
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
                            message: format!("cannot connect: {e}"),
                        })
                    }
                },
            };
            let failure = match w.write(changes, &self.producer).await {
                Ok(r) => return Ok(Some(r)),
                Err(WriteError::Transient(e)) => pg::describe(&e),
                Err(WriteError::Emit(e)) => format!("cannot send conflict records: {e}"),
            };
            tracing::warn!("writing to {} failed, retrying: {failure}", self.name);
            health().set(&format!("apply.{}:database", self.name), false);
            self.writer = None;
            if self.backoff.wait(shutdown).await {
                return Ok(None);
            }
        }
    }

    /// Applies a batch; returns the error records to publish (None on shutdown).
    async fn apply_batch(
        &mut self,
        batch: Vec<OwnedMessage>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<ErrorRecord>>, ApplyError> {
        let (changes, mut bad) = decode_batch(&self.errors, &batch);
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
        let Some(result) = self.write(&now, shutdown).await? else {
            return Ok(None);
        };
        let mut rejected: BTreeMap<usize, tokio_postgres::Error> =
            result.into_iter().map(|r| (r.index, r.error)).collect();
        for (i, mc) in now {
            let Some(error) = rejected.remove(&i) else {
                continue;
            };
            if is_missing_parent(&error) && !self.parent_wait.is_zero() {
                tracing::info!(map = %mc.map, key = %mc.kafka_key(), "parent record not there yet: the change waits for it");
                metrics()
                    .applied
                    .with_label_values(&[
                        &mc.map,
                        &direction(&mc.source_side, &mc.target_side),
                        "waiting_for_parent",
                    ])
                    .inc();
                self.parked
                    .entry(record_key(&mc))
                    .or_default()
                    .push_back(Parked {
                        message: batch[i].clone(),
                        change: mc,
                        since: tokio::time::Instant::now(),
                    });
            } else {
                bad.push(rejection(
                    &self.errors,
                    &batch[i],
                    &mc,
                    &pg::describe(&error),
                ));
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

    /// Tries the waiting changes again, oldest first per record; a change
    /// whose parent did not come within the wait becomes an error.
    async fn retry_parked(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<ErrorRecord>>, ApplyError> {
        let mut bad = Vec::new();
        let keys: Vec<String> = self.parked.keys().cloned().collect();
        for rk in keys {
            while let Some(head) = self.parked.get(&rk).and_then(|q| q.front()) {
                let change = vec![(0usize, head.change.clone())];
                let Some(result) = self.write(&change, shutdown).await? else {
                    return Ok(None);
                };
                let q = self.parked.get_mut(&rk).expect("queue exists");
                match result.into_iter().next() {
                    None => {
                        q.pop_front();
                    }
                    Some(r)
                        if is_missing_parent(&r.error)
                            && q.front()
                                .is_some_and(|h| h.since.elapsed() < self.parent_wait) =>
                    {
                        break
                    }
                    Some(r) => {
                        let p = q.pop_front().expect("head exists");
                        let mut message = pg::describe(&r.error);
                        if is_missing_parent(&r.error) {
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
        Ok(true)
    }
}

/// A record's identity across the apply topic: map and alternate key.
fn record_key(mc: &MappedChange) -> String {
    format!("{}/{}", mc.map, mc.kafka_key())
}

/// Decodes a batch: the changes (with their message index) and error records for the rest.
fn decode_batch(
    errors: &ErrorSink,
    batch: &[OwnedMessage],
) -> (Vec<(usize, MappedChange)>, Vec<ErrorRecord>) {
    let mut changes = Vec::with_capacity(batch.len());
    let mut bad = Vec::new();
    for (i, m) in batch.iter().enumerate() {
        match m.payload().map(avro::decode::<MappedChange>) {
            Some(Ok(mc)) => changes.push((i, mc)),
            Some(Err(e)) => {
                bad.push(errors.about(m, "malformed_record", format!("apply record: {e}")))
            }
            None => bad.push(errors.about(m, "malformed_record", "empty apply record (no value)")),
        }
    }
    (changes, bad)
}

fn rejection(
    errors: &ErrorSink,
    m: &OwnedMessage,
    mc: &MappedChange,
    message: &str,
) -> ErrorRecord {
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
                dualwrite_model::record::ApplyOp::Upsert => "upsert",
                dualwrite_model::record::ApplyOp::Delete => "delete",
                dualwrite_model::record::ApplyOp::Reassert => "re-assert",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn change(map: &str, op: ApplyOp, key: &str, before: bool) -> (usize, MappedChange) {
        let mc = MappedChange {
            map: map.into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            source_entity: "public.customers_v3".into(),
            target_entity: format!("public.{map}"),
            op,
            key: vec![Field::new("k", Some(key))],
            values: match op {
                ApplyOp::Upsert => vec![Field::new("k", Some(key)), Field::new("v", Some("1"))],
                _ => vec![],
            },
            source_lsn: 1,
            source_seq: 0,
            source_xid: 1,
            commit_time: 0,
            before: before.then(|| vec![Field::new("v", Some("0"))]),
            existed: true,
            conflict_master: None,
        };
        (0, mc)
    }

    #[test]
    fn runs_group_consecutive_changes_of_one_shape_with_distinct_records() {
        use ApplyOp::*;
        let changes = vec![
            change("a", Upsert, "1", true),
            change("a", Upsert, "2", true),
            change("a", Upsert, "3", true),
            // The same record again: a new run, so the two are written in order.
            change("a", Upsert, "2", true),
            // Another operation, another table, no old values: new runs.
            change("a", Delete, "4", true),
            change("b", Delete, "5", true),
            change("b", Delete, "6", false),
            change("b", Delete, "7", false),
            // Re-asserts run one by one.
            change("b", Reassert, "8", false),
            change("b", Reassert, "9", false),
            change("a", Upsert, "1", true),
        ];
        assert_eq!(
            runs(&changes),
            vec![0..3, 3..4, 4..5, 5..6, 6..8, 8..9, 9..10, 10..11]
        );
        // A change with other value fields (e.g. an older mapping) starts a run.
        let mut other = change("a", Upsert, "9", true);
        other.1.values.pop();
        let changes = vec![change("a", Upsert, "1", true), other];
        assert_eq!(runs(&changes), vec![0..1, 1..2]);
        assert!(runs(&[]).is_empty());
    }
}
