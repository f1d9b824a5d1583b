//! The initial write of a map: copies and reconciles the rows both sides
//! already have, then the map goes live without losing or clobbering any
//! change made meanwhile.
//!
//! # Algorithm
//!
//! 1. When the map is run, the pause buffer records the map topic's end
//!    offsets (live sync of this generation starts there) and holds the map
//!    (Initializing: nothing is forwarded; changes queue in Kafka).
//! 2. The copy waits until the appliers have written everything already
//!    released to them (their committed offsets reach the apply topics' end
//!    offsets), so no older write lands after the copy.
//! 3. On each side it opens a consistent snapshot through the side's
//!    [`CopySide`] (PostgreSQL: a `REPEATABLE READ` transaction, its
//!    `pg_current_snapshot()` and the WAL insert position read with it): a
//!    transaction is part of the copy exactly when it is visible in that
//!    snapshot. The snapshot is recorded on the status topic.
//! 4. It finds the changes those snapshots see that the gate has not
//!    forwarded (still in a capturer, the router or the map topic): their
//!    records are left to live sync ([`in_flight`]), so the copy never
//!    undoes a change it cannot tell from an old difference.
//! 5. It reads both tables in key order (byte order of each key value's
//!    text, identical on both sides) through cursors, a chunk at a time, and
//!    merges them by alternate key: a row on one side only is created on the
//!    other; a row on both takes the conflict master's values for fields
//!    that sync both ways and the source's for one-way fields. Rows that
//!    match are not written. Writes use a replication origin of their own,
//!    so the capturers do not send them back.
//! 6. Writes are guarded: a create does nothing if the record appeared on
//!    the target meanwhile; an update happens only if the target still has
//!    the values the snapshot read. A change made after the snapshot is thus
//!    never overwritten: live sync carries it (and the conflict master
//!    settles a record changed on both sides).
//! 7. After each chunk the checkpoint (last key) and the counts go to the
//!    status topic. After a crash the copy continues after the checkpoint
//!    with new snapshots (step 4 again); the keys after it are covered by
//!    those.
//! 8. When the copy ends the map turns Running: the pause buffer forwards
//!    every change queued after its position, in order. None overrides the
//!    copy's result with older values: what it forwarded before it held was
//!    written before the snapshots (step 2), and the records of the changes
//!    after it that the snapshots see were left alone (step 4).
//!
//! # Pipelining
//!
//! Reading runs up to [`AHEAD`] chunks ahead of writing, and a chunk is
//! written to both sides at once, each side in its own transaction on its
//! own connection. Neither changes what is written. The reads come from
//! the snapshots, which no later transaction changes (the copy's writes
//! included), so a chunk read ahead holds what it would hold read after.
//! The two writes of a chunk go to different databases, and each is
//! guarded by the target's own snapshot values only. What the order still
//! decides stays in order: each side commits its chunks in key order;
//! the checkpoint moves past a chunk only once both sides committed it
//! and its failed rows are on the error topic, so after a crash the copy
//! goes on from a key below which every write was made (a chunk that one
//! side committed is written again there, and its guarded creates and
//! updates, already made, do nothing); and the map turns Running (step 8)
//! only after the last chunk is committed on both sides.
//!
//! Before it copies, the map's mapping is checked against both tables
//! (columns, types, a unique index on each alternate key): a map whose
//! mapping does not fit turns Failed with every problem named.
//!
//! A row that cannot be written (missing related record, constraint, bad
//! value) is recorded on `<prefix>.initial-sync-errors` with the run id,
//! side, key and error; the other rows go on.

mod in_flight;
pub mod plan;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualwrite_model::authorise::{
    authorise_columns, authorise_target, Refused, UNAUTHORISED_TARGET,
};
use dualwrite_model::avro;
use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::lifecycle::{CopyPhase, InitialSync, SnapshotSegment};
use dualwrite_model::record::{key_string, Field, InitialSyncError};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::kafka::{self, Outgoing, Producer};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::side::{Class, CopyOutcome, CopySide, CopyWriter, SideError, SnapshotRow};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::plan::{plan_record, Write, WriteKind};

/// Keys merged and written per chunk (one transaction per side).
pub const CHUNK: usize = 500;
/// Chunks read and planned ahead of the one being written.
const AHEAD: usize = 2;
/// Shortest interval between two progress reports.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// What a copy tells the controller.
#[derive(Debug, Clone)]
pub enum Report {
    Progress {
        map: String,
        progress: InitialSync,
    },
    /// The copy ended; `Err` when it could not go on, with the reason.
    Finished {
        map: String,
        result: Result<InitialSync, (InitialSync, String)>,
    },
}

/// One initial write to do.
pub struct Job {
    pub config: Arc<Config>,
    pub map: String,
    /// Where it stands (a new run, or one to continue after a restart).
    pub progress: InitialSync,
    /// The conflict master chosen at run time (a side name), if any.
    pub conflict_master: Option<String>,
    pub producer: Producer,
    /// Whether, and where, the map's gate holds it.
    pub held: tokio::sync::watch::Receiver<Hold>,
}

/// Whether a gate holds its map, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hold {
    /// The `updated_at` of the status by which the gate holds the map (once
    /// it holds, nothing it forwarded is still on its way to the apply
    /// topics); 0 while the map flows.
    pub by: i64,
    /// The gate's position on the map topic (the next offset it reads, per
    /// partition) while it holds.
    pub position: std::collections::BTreeMap<i32, i64>,
}

/// Why a copy stopped, in the services' one classification: a retryable
/// failure (connection lost, broker unavailable) is tried again from the
/// checkpoint, any other (table missing, no permission…) fails the copy.
type Failure = SideError;

/// A failure worth trying again.
fn transient(message: impl Into<String>) -> Failure {
    SideError::new(Class::RetryLater, message)
}

/// A failure no retry mends.
fn fatal(message: impl Into<String>) -> Failure {
    SideError::new(Class::Fatal, message)
}

/// The initial write and its schema check for the sides' kind of
/// database, chosen where the services are put together (`dualwrite`),
/// so that the pause buffer, which runs them, names none.
#[derive(Clone, Copy)]
pub struct Copier {
    run: fn(Job, mpsc::Sender<Report>, CancellationToken) -> BoxFuture<'static, ()>,
    schema: for<'a> fn(&'a Config, &'a MapConfig) -> BoxFuture<'a, SchemaCheck>,
}

pub use dualwrite_runtime::side::{schema_problems, SchemaCheck};

impl Copier {
    /// The copy through `C` on both sides.
    pub fn of<C: CopySide>() -> Copier {
        Copier {
            run: |job, reports, cancel| Box::pin(run::<C>(job, reports, cancel)),
            schema: |config, map| Box::pin(schema_problems::<C>(config, map)),
        }
    }

    /// Runs the copy until it ends, is cancelled, or fails (see [`run`]).
    pub fn run(
        &self,
        job: Job,
        reports: mpsc::Sender<Report>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        (self.run)(job, reports, cancel)
    }

    /// Checks a map's mapping against the tables of both sides.
    pub fn schema_problems<'a>(
        &self,
        config: &'a Config,
        map: &'a MapConfig,
    ) -> BoxFuture<'a, SchemaCheck> {
        (self.schema)(config, map)
    }
}

/// A key and its rows on the left and right (`None`: no row there).
type Pair = (Vec<String>, Option<Vec<Field>>, Option<Vec<Field>>);

/// Runs the copy until it ends, is cancelled (the map left Initializing),
/// or fails; transient failures are retried from the checkpoint.
pub async fn run<C: CopySide>(job: Job, reports: mpsc::Sender<Report>, cancel: CancellationToken) {
    let mut progress = job.progress.clone();
    let mut backoff = Backoff::new("initial-sync");
    loop {
        match attempt::<C>(&job, &mut progress, &reports, &cancel).await {
            Ok(true) => {
                tracing::info!(map = %job.map, run = progress.run, created = progress.created, updated = progress.updated, unchanged = progress.unchanged, failed = progress.failed, "initial sync done");
                let _ = reports
                    .send(Report::Finished {
                        map: job.map.clone(),
                        result: Ok(progress),
                    })
                    .await;
                return;
            }
            Ok(false) => return,
            Err(e) if e.is_retryable() => {
                tracing::warn!(map = %job.map, run = progress.run, "initial sync interrupted, continuing from its checkpoint: {e}");
                if backoff.wait(&cancel).await {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(map = %job.map, run = progress.run, "initial sync failed: {e}");
                let _ = reports
                    .send(Report::Finished {
                        map: job.map.clone(),
                        result: Err((progress, e.message)),
                    })
                    .await;
                return;
            }
        }
    }
}

/// The records whose changes the snapshots see but the gate has not
/// forwarded: the copy leaves them to live sync (see [`in_flight`]).
/// `None`: cancelled.
async fn on_their_way<C: CopySide>(
    job: &Job,
    p: &InitialSync,
    cancel: &CancellationToken,
) -> Result<Option<std::collections::HashSet<in_flight::Key>>, Failure> {
    let position = job.held.borrow().position.clone();
    let keys = in_flight::keys::<C>(&job.config, &job.map, p, position, cancel).await?;
    if let Some(k) = keys.as_ref().filter(|k| !k.is_empty()) {
        tracing::info!(map = %job.map, run = p.run, records = k.len(), "initial sync: records with changes on their way are left to live sync");
    }
    Ok(keys)
}

/// One attempt from the checkpoint. `Ok(false)`: cancelled.
async fn attempt<C: CopySide>(
    job: &Job,
    p: &mut InitialSync,
    reports: &mpsc::Sender<Report>,
    cancel: &CancellationToken,
) -> Result<bool, Failure> {
    let config = &job.config;
    let Some(map) = config.map(&job.map) else {
        return Err(fatal(format!("map `{}` is no longer configured", job.map)));
    };
    // The mapping must fit both tables before anything is written.
    let problems = schema_problems::<C>(config, map).await?;
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        return Err(fatal(format!(
            "the mapping does not fit the tables: {}",
            list.join("; ")
        )));
    }
    if !ready(job, cancel).await? {
        return Ok(false);
    }
    let after = p.checkpoint.clone();
    // Every outcome's series exists from the start (at 0), so a rate or an
    // increase sees the first failure.
    for outcome in ["created", "updated", "unchanged", "failed"] {
        metrics()
            .initial_sync_records
            .with_label_values(&[&map.name, outcome]);
    }
    let (mut left, mut to_left) =
        SideCopy::<C>::open(config, map, SideId::Left, after.as_deref()).await?;
    let (mut right, mut to_right) =
        SideCopy::<C>::open(config, map, SideId::Right, after.as_deref()).await?;
    record_snapshots(p, after, &left.side, &right.side);
    // The snapshots are recorded while it still waits for the changes on their way.
    report(reports, &job.map, p).await;
    let Some(on_their_way) = on_their_way::<C>(job, p, cancel).await? else {
        return Ok(false);
    };
    p.phase = CopyPhase::Copying;
    report(reports, &job.map, p).await;
    tracing::info!(map = %map.name, run = p.run, rows = p.rows_total, resumed_after = ?p.checkpoint, "initial sync: copying");
    let copy = CopyRun {
        config,
        map,
        master: config.run_master(map, job.conflict_master.as_deref()),
        on_their_way,
        producer: &job.producer,
        run: p.run,
    };
    let writers = Writers {
        left: &mut to_left,
        right: &mut to_right,
    };
    if !copy
        .chunks([&mut left, &mut right], writers, p, reports, cancel)
        .await?
    {
        return Ok(false);
    }
    left.side.finish().await?;
    right.side.finish().await?;
    p.rows_total = p.rows_done;
    let m = metrics();
    m.initial_sync_rows
        .with_label_values(&[&map.name])
        .set(p.rows_total);
    m.initial_sync_rows_done
        .with_label_values(&[&map.name])
        .set(p.rows_done);
    Ok(true)
}

/// Waits until the map's gate holds it and the appliers wrote everything
/// released before (`false`: cancelled).
async fn ready(job: &Job, cancel: &CancellationToken) -> Result<bool, Failure> {
    let mut held = job.held.clone();
    tokio::select! {
        _ = cancel.cancelled() => return Ok(false),
        r = held.wait_for(|h| h.by != 0) => {
            if r.is_err() {
                return Ok(false);
            }
        }
    }
    kafka::drain::appliers_drained(&job.config, cancel)
        .await
        .map_err(transient)
}

/// Records the new snapshots, which cover every key after the checkpoint
/// `after`, and the rows they hold.
fn record_snapshots(
    p: &mut InitialSync,
    after: Option<Vec<String>>,
    left: &impl CopySide,
    right: &impl CopySide,
) {
    if p.segments.is_empty() && p.rows_done == 0 {
        p.started_at = dualwrite_runtime::now_micros();
    }
    p.segments.retain(|s| match (&s.after_key, &after) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a < b,
    });
    p.segments.push(SnapshotSegment {
        after_key: after,
        left: left.snapshot().clone(),
        right: right.snapshot().clone(),
    });
    p.phase = CopyPhase::Waiting;
    p.rows_total = p.rows_done + left.rows() + right.rows();
}

/// What the copy of one attempt goes by.
struct CopyRun<'a> {
    config: &'a Config,
    map: &'a MapConfig,
    master: SideId,
    /// The records with changes on their way: left to live sync.
    on_their_way: std::collections::HashSet<in_flight::Key>,
    producer: &'a Producer,
    run: i64,
}

/// A chunk of keys merged from both sides and planned, ready to write.
#[derive(Default)]
struct Chunk {
    /// Rows it took from the snapshots.
    read: i64,
    /// Its last key (the checkpoint once it is written).
    last: Option<Vec<String>>,
    /// Records with nothing to write.
    unchanged: i64,
    /// Its failed rows, for the error topic.
    errors: Vec<InitialSyncError>,
    /// Its writes, by target side (left, right).
    to: [Vec<Write>; 2],
}

/// The writers of both sides.
struct Writers<'w, W> {
    left: &'w mut W,
    right: &'w mut W,
}

impl CopyRun<'_> {
    /// Copies chunk after chunk until both snapshots are read (`false`:
    /// cancelled). Reading runs up to [`AHEAD`] chunks ahead of writing,
    /// and a chunk is written to both sides at once (see the module's
    /// "Pipelining").
    async fn chunks<C: CopySide>(
        &self,
        sides: [&mut SideCopy<C>; 2],
        writers: Writers<'_, C::Writer>,
        p: &mut InitialSync,
        reports: &mpsc::Sender<Report>,
        cancel: &CancellationToken,
    ) -> Result<bool, Failure> {
        let (tx, rx) = mpsc::channel(AHEAD);
        let (read, written) = tokio::join!(
            self.read(sides, tx),
            self.write(writers, rx, p, reports, cancel)
        );
        // The writer ends when the reader has sent its last chunk, or stops
        // early; either failure is the copy's.
        read?;
        written
    }

    /// Reads, merges and plans chunk after chunk into `chunks` until both
    /// snapshots are read or the writer takes no more.
    async fn read<C: CopySide>(
        &self,
        [left, right]: [&mut SideCopy<C>; 2],
        chunks: mpsc::Sender<Chunk>,
    ) -> Result<(), Failure> {
        loop {
            let mut chunk = Chunk::default();
            let pairs = self.merge(left, right, &mut chunk).await?;
            if chunk.read == 0 {
                return Ok(());
            }
            self.plan(&pairs, &mut chunk);
            chunk.last = pairs.last().map(|(key, _, _)| key.clone());
            if chunks.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Writes chunk after chunk to both sides, then records its outcome
    /// and checkpoint, reporting progress now and then. `true` when the
    /// reader sent its last; `false`: cancelled.
    async fn write<W: CopyWriter>(
        &self,
        w: Writers<'_, W>,
        mut chunks: mpsc::Receiver<Chunk>,
        p: &mut InitialSync,
        reports: &mpsc::Sender<Report>,
        cancel: &CancellationToken,
    ) -> Result<bool, Failure> {
        let mut last_report = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Ok(false);
            }
            let mut chunk = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                c = chunks.recv() => match c {
                    Some(c) => c,
                    None => return Ok(true),
                },
            };
            let [to_left, to_right] = std::mem::take(&mut chunk.to);
            let (on_left, on_right) = tokio::try_join!(
                write_all(&mut *w.left, &to_left),
                write_all(&mut *w.right, &to_right)
            )?;
            self.tally(&to_left, on_left, p, &mut chunk.errors);
            self.tally(&to_right, on_right, p, &mut chunk.errors);
            self.done(chunk, p).await?;
            if last_report.elapsed() >= REPORT_EVERY {
                report(reports, &self.map.name, p).await;
                last_report = Instant::now();
            }
        }
    }

    /// Counts a written chunk: its failed rows go to the error topic, then
    /// the checkpoint moves past it.
    async fn done(&self, chunk: Chunk, p: &mut InitialSync) -> Result<(), Failure> {
        self.record(&chunk.errors).await?;
        p.unchanged += chunk.unchanged;
        p.failed += chunk.errors.len() as i64;
        metrics()
            .initial_sync_records
            .with_label_values(&[&self.map.name, "failed"])
            .inc_by(chunk.errors.len() as u64);
        p.rows_done += chunk.read;
        if chunk.last.is_some() {
            p.checkpoint = chunk.last;
        }
        Ok(())
    }

    /// Merges the next chunk of keys of both sides; a row without a key is
    /// an error, a record with a change on its way is left alone.
    async fn merge<C: CopySide>(
        &self,
        left: &mut SideCopy<C>,
        right: &mut SideCopy<C>,
        chunk: &mut Chunk,
    ) -> Result<Vec<Pair>, Failure> {
        let mut pairs = Vec::new();
        while pairs.len() < CHUNK {
            tokio::try_join!(left.fill(), right.fill())?;
            let order = match (left.buf.front(), right.buf.front()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(l), Some(r)) => cmp_keys(&l.0, &r.0),
            };
            let (l, r) = match order {
                std::cmp::Ordering::Less => (left.buf.pop_front(), None),
                std::cmp::Ordering::Greater => (None, right.buf.pop_front()),
                std::cmp::Ordering::Equal => (left.buf.pop_front(), right.buf.pop_front()),
            };
            chunk.read += l.is_some() as i64 + r.is_some() as i64;
            let key = l
                .as_ref()
                .or(r.as_ref())
                .map(|x| x.0.clone())
                .unwrap_or_default();
            if key.iter().any(Option::is_none) {
                // No key: it cannot be linked to a record on the other side.
                let source = if l.is_some() {
                    SideId::Left
                } else {
                    SideId::Right
                };
                let message = "the row's alternate key is NULL: it cannot be linked to a record on the other side";
                let at = self.at(source, WriteKind::Create, &key);
                chunk.errors.push(self.failed(at, None, message.to_owned()));
                continue;
            }
            let key: Vec<String> = key.into_iter().map(Option::unwrap_or_default).collect();
            if self.on_their_way.contains(&key) {
                // Live sync carries its change after the copy.
                chunk.unchanged += 1;
                continue;
            }
            pairs.push((key, l.map(|x| x.1), r.map(|x| x.1)));
        }
        Ok(pairs)
    }

    /// The writes of a chunk, by target side; a write the map does not
    /// allow, or a record that cannot be mapped, is an error.
    fn plan(&self, pairs: &[Pair], chunk: &mut Chunk) {
        for (key, l, r) in pairs {
            let writes = match plan_record(
                self.config,
                self.map,
                self.master,
                l.as_deref(),
                r.as_deref(),
            ) {
                Ok(writes) => writes,
                Err(e) => {
                    let source = if l.is_some() {
                        SideId::Left
                    } else {
                        SideId::Right
                    };
                    let key: Vec<Option<String>> = key.iter().cloned().map(Some).collect();
                    let at = self.at(source, WriteKind::Create, &key);
                    chunk.errors.push(self.failed(at, None, e.to_string()));
                    continue;
                }
            };
            if writes.is_empty() {
                chunk.unchanged += 1;
            }
            for w in writes {
                match authorised(self.map, &w) {
                    Ok(()) => chunk.to[usize::from(w.target == SideId::Right)].push(w),
                    Err(r) => {
                        let message = format!("{UNAUTHORISED_TARGET}: {r}; nothing was written");
                        let key: Vec<Option<String>> =
                            w.key.iter().map(|f| f.value.clone()).collect();
                        let at = self.at(w.target.other(), w.kind, &key);
                        chunk.errors.push(self.failed(at, None, message));
                    }
                }
            }
        }
    }

    /// Counts the outcome of each write to one side; a row the side
    /// rejected is an error.
    fn tally(
        &self,
        writes: &[Write],
        outcomes: Vec<Outcome>,
        p: &mut InitialSync,
        errors: &mut Vec<InitialSyncError>,
    ) {
        for (w, outcome) in writes.iter().zip(outcomes) {
            let counter = match (outcome, w.kind) {
                (Outcome::Written, WriteKind::Create) => {
                    p.created += 1;
                    "created"
                }
                (Outcome::Written, WriteKind::Update) => {
                    p.updated += 1;
                    "updated"
                }
                (Outcome::Unchanged, _) => {
                    p.unchanged += 1;
                    "unchanged"
                }
                (Outcome::Rejected(e), _) => {
                    let key: Vec<Option<String>> = w.key.iter().map(|f| f.value.clone()).collect();
                    let at = self.at(w.target.other(), w.kind, &key);
                    errors.push(self.failed(at, e.code, e.redacted));
                    continue;
                }
            };
            metrics()
                .initial_sync_records
                .with_label_values(&[&self.map.name, counter])
                .inc();
        }
    }

    /// Where a row of this run failed.
    fn at<'k>(&self, source: SideId, kind: WriteKind, key: &'k [Option<String>]) -> Failed<'k> {
        Failed {
            run: self.run,
            source,
            kind,
            key,
        }
    }

    /// A failed row as its error record (counted when its chunk is done).
    fn failed(
        &self,
        at: Failed<'_>,
        sqlstate: Option<String>,
        message: String,
    ) -> InitialSyncError {
        sync_error(self.config, self.map, at, sqlstate, message)
    }

    /// Publishes the chunk's failed rows to the initial sync errors topic.
    async fn record(&self, errors: &[InitialSyncError]) -> Result<(), Failure> {
        if errors.is_empty() {
            return Ok(());
        }
        let topic = Topics::new(&self.config.kafka.topic_prefix).initial_sync_errors();
        let records: Vec<Outgoing> = errors
            .iter()
            .filter_map(|e| {
                Some(Outgoing {
                    topic: topic.clone(),
                    key: e.map.clone(),
                    payload: avro::encode(e).ok()?,
                })
            })
            .collect();
        kafka::send_all(self.producer, &records)
            .await
            .map_err(|e| transient(format!("cannot record the failed rows on {topic}: {e}")))
    }
}

/// Writes to one side in one transaction (nothing when there is nothing
/// to write); only the writes it rejects fail.
async fn write_all<W: CopyWriter>(
    writer: &mut W,
    writes: &[Write],
) -> Result<Vec<Outcome>, Failure> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let writes: Vec<&Write> = writes.iter().collect();
    writer.write(&writes).await
}

async fn report(reports: &mpsc::Sender<Report>, map: &str, p: &InitialSync) {
    let m = metrics();
    m.initial_sync_rows
        .with_label_values(&[map])
        .set(p.rows_total);
    m.initial_sync_rows_done
        .with_label_values(&[map])
        .set(p.rows_done);
    let _ = reports
        .send(Report::Progress {
            map: map.to_owned(),
            progress: p.clone(),
        })
        .await;
}

/// A planned write targets only the map's entity and the columns the map
/// writes into that side (it is planned from the configuration: this
/// guards against a planning bug ever writing anything else).
fn authorised(map: &MapConfig, w: &Write) -> Result<(), Refused> {
    authorise_target(map, w.target, &map.entity(w.target).qualified())?;
    for (how, fields) in [("key", &w.key), ("written", &w.new), ("compared", &w.old)] {
        authorise_columns(map, w.target, how, fields)?;
    }
    Ok(())
}

/// Key order of the copy: byte order of each value (NULLs, never linked, last).
fn cmp_keys(a: &[Option<String>], b: &[Option<String>]) -> std::cmp::Ordering {
    let bytes = |k: &[Option<String>]| -> Vec<(bool, Vec<u8>)> {
        k.iter()
            .map(|v| (v.is_none(), v.as_deref().unwrap_or("").as_bytes().to_vec()))
            .collect()
    };
    bytes(a).cmp(&bytes(b))
}

/// Where a row failed: the run, the side it came from, the write and key.
struct Failed<'a> {
    run: i64,
    source: SideId,
    kind: WriteKind,
    key: &'a [Option<String>],
}

fn sync_error(
    config: &Config,
    map: &MapConfig,
    at: Failed<'_>,
    sqlstate: Option<String>,
    message: String,
) -> InitialSyncError {
    let Failed {
        run,
        source,
        kind,
        key,
    } = at;
    let target = source.other();
    let message = if config.errors.include_payload {
        message
    } else {
        dualwrite_model::transform::redact_values(&message)
    };
    InitialSyncError {
        map: map.name.clone(),
        run,
        source_side: config.side(source).name.clone(),
        target_side: config.side(target).name.clone(),
        target_entity: map.entity(target).qualified(),
        key: key_string(key.iter().map(|v| v.as_deref())),
        operation: kind.as_str().to_owned(),
        sqlstate,
        message,
        occurred_at: dualwrite_runtime::now_micros(),
    }
}

use CopyOutcome as Outcome;

/// One side's snapshot reader, with the rows fetched and not merged yet.
struct SideCopy<C> {
    side: C,
    buf: VecDeque<SnapshotRow>,
}

impl<C: CopySide> SideCopy<C> {
    /// The side's reader and its writer.
    async fn open(
        config: &Config,
        map: &MapConfig,
        side: SideId,
        after: Option<&[String]>,
    ) -> Result<(SideCopy<C>, C::Writer), Failure> {
        let (side, writer) = C::open(config, map, side, after).await?;
        let copy = SideCopy {
            side,
            buf: VecDeque::new(),
        };
        Ok((copy, writer))
    }

    /// Fetches the next rows when the buffer is empty.
    async fn fill(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            self.buf.extend(self.side.fetch().await?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_writes_are_authorised_and_others_are_not() {
        let config = crate::pipeline_tests::config_with(
            r#"  { left = "credit", right = "credit", direction = "left_to_right" },"#,
        );
        let map = &config.maps[0];
        let row = |kv: &[(&str, &str)]| -> Vec<Field> {
            kv.iter().map(|(k, v)| Field::new(*k, Some(*v))).collect()
        };
        let left = row(&[("account", "A"), ("name", "n"), ("credit", "5")]);
        let right = row(&[("number", "A"), ("name", "m"), ("credit", "1")]);
        let writes = plan_record(&config, map, SideId::Right, Some(&left), Some(&right)).unwrap();
        assert!(!writes.is_empty());
        assert!(writes.iter().all(|w| authorised(map, w).is_ok()));
        let mut w = writes[0].clone();
        w.new.push(Field::new("is_admin", Some("t")));
        let e = authorised(map, &w).unwrap_err().to_string();
        assert!(e.contains("column `is_admin`"), "{e}");
    }
}

#[cfg(test)]
mod pipeline_tests;
