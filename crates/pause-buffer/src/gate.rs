//! One gate per map: moves the map's records from `<prefix>.map.<map>` to
//! the appliers' topics while the map's state lets them flow, and holds the
//! map's offset otherwise.
//!
//! - Running: forward.
//! - Paused, Not running, Initializing, Failed: the map's partitions are
//!   paused; nothing is read, the committed offset stays where it is and new
//!   changes queue in Kafka.
//! - Resuming: forward the backlog in order up to the end offsets taken when
//!   the resume began (catch-up), then report; with the skip-to-live policy
//!   the backlog goes to the catch-up errors topic instead, with discard it
//!   is skipped.
//!
//! While records flow, each goes through the map's resolver
//! ([`crate::resolving`]): the gate decides, once per event and in the map
//! topic's order, what each side of the record should hold, and releases
//! those decisions as writes to the appliers' topics.
//!
//! The gate assigns the map topic's partitions itself (no consumer-group
//! rebalances), in a group of its own that only keeps the committed offsets;
//! on every start it takes its state from the status topic, so a pause holds
//! across restarts and a catch-up continues where it stopped. A generation
//! never reads before its start offsets (records older than the run).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::lifecycle::{MapState, MapStatus, PartitionOffset, ResumePolicy};
use dualwrite_model::record::MappedChange;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::kafka::rdkafka::consumer::Consumer;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self, KafkaConsumer, Producer};
use dualwrite_runtime::metrics::{busy, metrics};
use dualwrite_runtime::relay::{deliver, Output};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::resolving::Resolving;
use dualwrite_initial_sync::Hold;

/// The service label of the gates' busy time (gates of several maps add up).
const SERVICE: &str = "pause-buffer";

/// A gate's report to the controller.
#[derive(Debug, Clone)]
pub enum Report {
    /// The catch-up of `map` reached `targets`.
    CaughtUp {
        map: String,
        targets: Vec<PartitionOffset>,
    },
}

pub struct Gate {
    config: Arc<Config>,
    map: String,
    topic: String,
    consumer: Arc<KafkaConsumer>,
    producer: Producer,
    errors: ErrorSink,
    reports: mpsc::Sender<Report>,
    /// While the gate holds the map (everything it released delivered to
    /// the apply topics, nothing more released): the status it holds by and
    /// where it holds (`Hold::default()` while the map flows).
    held: watch::Sender<Hold>,
    /// Next offset to read, per partition.
    position: BTreeMap<i32, i64>,
    /// The map topic's retention as the broker has it (`None`: forever),
    /// and when it was read.
    retention: (Option<i64>, Option<tokio::time::Instant>),
    status: MapStatus,
    reported: Option<Vec<PartitionOffset>>,
    paused: bool,
    /// Producer timestamp (µs) of the last record released.
    last_released: Option<i64>,
    /// When the current resume began, and records replayed since.
    resume_started: Option<(std::time::Instant, i64)>,
    /// Shared with the drift detector, which asks whether a record is settled.
    resolving: Arc<std::sync::Mutex<Resolving>>,
    /// Writes the resolver's states (larger records than the pipeline's).
    changelog: Producer,
    /// The positions last stored to be committed: up to where the saved
    /// states include every event (renewed while the map is idle).
    stored: BTreeMap<i32, i64>,
    /// When the states were last saved (with the positions).
    saved_at: tokio::time::Instant,
    /// The last save, while the broker has not acknowledged its states.
    saving: Option<Saving>,
}

/// A save on its way: its states are acknowledged when `sent` ends, and
/// `position` is stored then.
struct Saving {
    sent: tokio::task::JoinHandle<()>,
    position: BTreeMap<i32, i64>,
}

/// A gate's progress, for the metrics.
pub struct Progress {
    pub topic: String,
    pub position: BTreeMap<i32, i64>,
    pub status: MapStatus,
    pub last_released: Option<i64>,
    /// Records left to replay while resuming.
    pub backlog: i64,
    /// Records replayed per second since the resume began.
    pub catchup_rate: Option<f64>,
}

fn offsets(v: &[PartitionOffset]) -> BTreeMap<i32, i64> {
    v.iter().map(|p| (p.partition, p.offset)).collect()
}

impl Gate {
    pub async fn start(
        config: Arc<Config>,
        map: String,
        status: MapStatus,
        producer: Producer,
        errors: ErrorSink,
        reports: mpsc::Sender<Report>,
    ) -> Result<Gate, KafkaError> {
        let t = Topics::new(&config.kafka.topic_prefix);
        let topic = t.map(&map);
        let assumed_retention = config.pause_buffer.map_topic_retention_ms;
        let consumer = Arc::new(kafka::consumer_with(
            &config.kafka,
            &format!("dualwrite-pause-buffer-{map}"),
            &t.group(&format!("pause-buffer.{map}")),
            PREFETCH,
        )?);
        let (cfg, top, c) = (config.clone(), topic.clone(), consumer.clone());
        let position =
            tokio::task::spawn_blocking(move || kafka::committed_positions(&cfg.kafka, &c, &top))
                .await
                .map_err(|_| KafkaError::Canceled)??;
        let (cfg, m, generation, run) = (
            config.clone(),
            map.clone(),
            status.generation,
            initial_run(&status),
        );
        let resolving =
            tokio::task::spawn_blocking(move || Resolving::load(&cfg, &m, generation, run))
                .await
                .map_err(|_| KafkaError::Canceled)??;
        let changelog = crate::resolving::changelog_producer(&config)?;
        let mut gate = Gate {
            config,
            map,
            topic,
            consumer,
            producer,
            errors,
            reports,
            position,
            status: status.clone(),
            reported: None,
            held: watch::channel(Hold::default()).0,
            retention: (Some(assumed_retention), None),
            paused: false,
            last_released: None,
            resume_started: None,
            resolving: Arc::new(std::sync::Mutex::new(resolving)),
            changelog,
            stored: BTreeMap::new(),
            saved_at: tokio::time::Instant::now(),
            saving: None,
        };
        gate.reassign()?;
        gate.stored = gate.position.clone();
        gate.apply(status).await?;
        Ok(gate)
    }

    /// (Re)assigns every partition at the current positions.
    fn reassign(&mut self) -> Result<(), KafkaError> {
        kafka::assign_at(&self.consumer, &self.topic, &self.position)?;
        // A partition keeps its paused flag across assignments: set it again.
        let assignment = self.consumer.assignment()?;
        if self.paused {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        }
    }

    fn set_paused(&mut self, paused: bool) -> Result<(), KafkaError> {
        if paused == self.paused {
            return Ok(());
        }
        let assignment = self.consumer.assignment()?;
        if paused {
            self.consumer.pause(&assignment)?;
        } else {
            self.consumer.resume(&assignment)?;
        }
        self.paused = paused;
        Ok(())
    }

    /// Moves positions forward (never back) and commits them.
    fn advance_to(&mut self, to: &BTreeMap<i32, i64>) -> Result<bool, KafkaError> {
        let mut moved = false;
        for (p, o) in to {
            if let Some(cur) = self.position.get_mut(p) {
                if *o > *cur {
                    *cur = *o;
                    moved = true;
                }
            }
        }
        if moved {
            self.reassign()?;
            self.store_positions()?;
            self.stored = self.position.clone();
        }
        Ok(moved)
    }

    fn store_positions(&self) -> Result<(), KafkaError> {
        self.store(&self.position)
    }

    fn store(&self, position: &BTreeMap<i32, i64>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in position {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))?;
        }
        self.consumer.store_offsets(&tpl)
    }

    /// Takes a new status from the controller.
    async fn apply(&mut self, status: MapStatus) -> Result<(), KafkaError> {
        // What was decided is saved first: a state change may move positions.
        if self.position != self.stored || self.saving.is_some() {
            self.save().await?;
            self.settle().await?;
        }
        // A report is per resume: the next one (even to the same targets,
        // when nothing was queued in between) reports again.
        if status.state != MapState::Resuming {
            self.reported = None;
        }
        self.status = status;
        self.resolver()
            .align(self.status.generation, initial_run(&self.status));
        // A generation never reads records from before its run.
        let start = offsets(&self.status.start_offsets);
        self.advance_to(&start)?;
        match self.status.state {
            MapState::Running => {
                self.resume_started = None;
                self.set_paused(false)?
            }
            MapState::Resuming => {
                if self.resume_started.is_none() {
                    self.resume_started = Some((std::time::Instant::now(), 0));
                }
                let policy = self.status.resume_policy.unwrap_or_default();
                if policy == ResumePolicy::Discard {
                    let skipped = self.backlog();
                    self.advance_to(&offsets(&self.status.resume_targets))?;
                    tracing::info!(map = %self.map, skipped, "resume: queued changes discarded");
                }
                self.set_paused(false)?;
                self.report_if_caught_up().await;
            }
            _ => self.set_paused(true)?,
        }
        // Status changes are taken between batches: when the map is held,
        // everything the gate forwarded was delivered.
        let held = if self.status.state.flows() {
            Hold::default()
        } else {
            Hold {
                by: self.status.updated_at.max(1),
                position: self.position.clone(),
            }
        };
        self.held.send_replace(held);
        Ok(())
    }

    /// The map's resolver (poisoning is not possible: no code panics while holding it).
    fn resolver(&self) -> std::sync::MutexGuard<'_, Resolving> {
        self.resolving.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the states changed since the last save to the changelog,
    /// then stores the positions read so far: a restart reads the states
    /// back and the events after those positions again, and decides again
    /// exactly what it decided.
    ///
    /// The states are sent, and retried until the broker acknowledges them,
    /// without waiting here: the next save (or [`Gate::settle`]) waits for
    /// that first, and only then stores these positions. So one save at a
    /// time is on its way, saves land in order, and positions are never
    /// stored before the states that cover them.
    async fn save(&mut self) -> Result<(), KafkaError> {
        self.settle().await?;
        let t = std::time::Instant::now();
        let states = self.resolver().changelog();
        busy(SERVICE, "save", t);
        self.saved_at = tokio::time::Instant::now();
        if states.is_empty() && self.position == self.stored {
            return Ok(());
        }
        let (producer, map) = (self.changelog.clone(), self.map.clone());
        let sent = tokio::spawn(async move {
            let mut backoff = Backoff::new("pause-buffer");
            let never = CancellationToken::new();
            while let Err(e) = kafka::send_all(&producer, &states).await {
                tracing::warn!(%map, "saving resolver states failed, retrying: {e}");
                backoff.wait(&never).await;
            }
        });
        self.saving = Some(Saving {
            sent,
            position: self.position.clone(),
        });
        Ok(())
    }

    /// Waits until the save on its way is acknowledged, then stores its
    /// positions.
    async fn settle(&mut self) -> Result<(), KafkaError> {
        let Some(saving) = self.saving.take() else {
            return Ok(());
        };
        let t = std::time::Instant::now();
        // The task ends only when acknowledged: an error is a panic or the
        // runtime ending, and nothing is stored then.
        saving.sent.await.map_err(|_| KafkaError::Canceled)?;
        busy(SERVICE, "save-ack", t);
        if saving.position != self.stored {
            self.store(&saving.position)?;
            self.stored = saving.position;
        }
        Ok(())
    }

    /// Whether states are due to be saved: every `SAVE_EVERY`, and at once
    /// when many records changed.
    fn save_due(&self) -> bool {
        (self.position != self.stored || self.saving.is_some())
            && (self.saved_at.elapsed() >= SAVE_EVERY
                || self.resolver().changed() >= SAVE_AT_CHANGED)
    }

    /// Folds a batch and releases its writes (acknowledged before the
    /// states that sent them are saved); false on shutdown.
    async fn release(
        &mut self,
        batch: &[OwnedMessage],
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaError> {
        let t = std::time::Instant::now();
        let output = self.route(batch);
        busy(SERVICE, "fold", t);
        let t = std::time::Instant::now();
        if !deliver(&self.producer, &self.errors, &output, backoff, shutdown).await {
            return Ok(false);
        }
        busy(SERVICE, "deliver", t);
        backoff.reset();
        metrics()
            .forwarded
            .with_label_values(&[&self.map])
            .inc_by(output.records.len() as u64);
        if let Some((_, n)) = self.resume_started.as_mut() {
            *n += batch.len() as i64;
        }
        self.last_released = batch
            .last()
            .and_then(|m| m.timestamp().to_millis())
            .map(|ms| ms * 1000);
        for m in batch {
            let e = self.position.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        if self.save_due() {
            self.save().await?;
        }
        self.report_if_caught_up().await;
        Ok(true)
    }

    /// The map topic's `retention.ms` as the broker has it (`None`:
    /// forever), read again every [`RETENTION_READ_EVERY`]; until it could
    /// be read, `pause_buffer.map_topic_retention_ms`.
    async fn retention(&mut self) -> Option<i64> {
        if self
            .retention
            .1
            .is_some_and(|at| at.elapsed() < RETENTION_READ_EVERY)
        {
            return self.retention.0;
        }
        match kafka::configs::retention_ms(&self.config.kafka, &self.topic).await {
            Ok(ms) => self.retention = (ms, Some(tokio::time::Instant::now())),
            Err(e) => {
                tracing::debug!(map = %self.map, "cannot read the map topic's retention: {e}")
            }
        }
        self.retention.0
    }

    /// The map's resolver, to share.
    pub fn resolving(&self) -> Arc<std::sync::Mutex<Resolving>> {
        self.resolving.clone()
    }

    /// Whether, and by which status, the gate holds the map (see [`Gate::apply`]).
    pub fn held(&self) -> watch::Receiver<Hold> {
        self.held.subscribe()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            topic: self.topic.clone(),
            position: self.position.clone(),
            status: self.status.clone(),
            last_released: self.last_released,
            backlog: self.backlog(),
            catchup_rate: self.resume_started.and_then(|(at, n)| {
                let secs = at.elapsed().as_secs_f64();
                (secs > 0.0).then_some(n as f64 / secs)
            }),
        }
    }

    /// Records between the positions and the resume targets.
    fn backlog(&self) -> i64 {
        self.status
            .resume_targets
            .iter()
            .map(|t| (t.offset - self.position.get(&t.partition).copied().unwrap_or(0)).max(0))
            .sum()
    }

    async fn report_if_caught_up(&mut self) {
        if self.status.state != MapState::Resuming || self.backlog() > 0 {
            return;
        }
        let targets = self.status.resume_targets.clone();
        if self.reported.as_ref() == Some(&targets) {
            return;
        }
        self.reported = Some(targets.clone());
        let _ = self
            .reports
            .send(Report::CaughtUp {
                map: self.map.clone(),
                targets,
            })
            .await;
    }

    /// What a batch releases: the resolver's writes for the appliers'
    /// topics, or, for records queued before a skip-to-live resume, the
    /// records themselves on the catch-up errors topic.
    fn route(&mut self, batch: &[OwnedMessage]) -> Output {
        let aside_before = (self.status.state == MapState::Resuming
            && self.status.resume_policy == Some(ResumePolicy::SkipToLive))
        .then(|| offsets(&self.status.resume_targets));
        let catchup = Topics::new(&self.config.kafka.topic_prefix).catchup_errors();
        let mut out = Output::default();
        for m in batch {
            let aside = aside_before
                .as_ref()
                .is_some_and(|t| t.get(&m.partition()).is_some_and(|t| m.offset() < *t));
            match self.decode(m) {
                Ok(None) => {}
                // Changes are set aside; the appliers' reports are not changes.
                Ok(Some(mc)) if aside && !is_report(&mc) => out.records.push(kafka::Outgoing {
                    topic: catchup.clone(),
                    key: kafka::key_text(m).unwrap_or_default(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                }),
                Ok(Some(mc)) => self.resolve(m, &mc, &mut out),
                Err(e) => out.errors.push(*e),
            }
        }
        out
    }

    /// A map topic record, unless it is a report of a write of an earlier
    /// generation. Every change after the gate's position is forwarded, also
    /// one an initial write's snapshot sees: the copy left its record alone
    /// (see the initial sync's `in_flight` module).
    fn decode(
        &self,
        m: &OwnedMessage,
    ) -> Result<Option<MappedChange>, Box<dualwrite_model::record::ErrorRecord>> {
        let payload = m.payload().ok_or_else(|| {
            Box::new(
                self.errors
                    .about(m, "malformed_record", "empty map record (no value)"),
            )
        })?;
        let mc = avro::decode::<MappedChange>(payload).map_err(|e| {
            Box::new(
                self.errors
                    .about(m, "malformed_record", format!("map record: {e}")),
            )
        })?;
        let first = dualwrite_resolve::records::version(self.status.generation, 0);
        if is_report(&mc) && (mc.version as u64) < first {
            return Ok(None);
        }
        Ok(Some(mc))
    }

    /// Folds a record into the resolver; its writes go to `out`.
    fn resolve(&mut self, m: &OwnedMessage, mc: &MappedChange, out: &mut Output) {
        let key = kafka::key_text(m).unwrap_or_else(|| mc.kafka_key());
        let master = self.master();
        let folded = self
            .resolver()
            .fold(&self.config, master, m.offset(), &key, mc);
        match folded {
            Ok(writes) => out.records.extend(writes),
            Err(message) => {
                let mut e = self.errors.about(m, "resolve", message);
                e.map = Some(self.map.clone());
                out.errors.push(e);
            }
        }
    }

    /// The side whose writes win concurrent writes: the run's choice, else the configured one.
    fn master(&self) -> SideId {
        let chosen = self.status.conflict_master.as_deref();
        self.config
            .map(&self.map)
            .map_or(SideId::Right, |m| self.config.run_master(m, chosen))
    }
}

/// Whether a map record is an applier's report (of a write made or not).
fn is_report(mc: &MappedChange) -> bool {
    use dualwrite_model::record::ApplyOp;
    matches!(mc.op, ApplyOp::Applied | ApplyOp::Superseded)
}

/// What a gate's consumer fetches ahead: 8 MiB, a batch or two
/// ([`RELEASE_BATCH`]), instead of librdkafka's 64 MiB per consumer, which
/// every map resuming at once would hold (one pause buffer runs a gate per
/// map). A catch-up drains that in a fraction of a second: the consumers'
/// `fetch.queue.backoff.ms` ([`kafka::consumer_with`]) has the next fetch
/// follow at once, where librdkafka's default waited a second.
const PREFETCH: &[(&str, &str)] = &[("queued.max.messages.kbytes", "8192")];

/// Most records a gate folds and releases at once. A batch's writes are
/// acknowledged before the next batch is read, so larger batches spend
/// less of a catch-up waiting: 4,000 replayed a 200,000-change backlog at
/// 1.10× the rate of 1,000 (BENCHMARKS.md, 2026-12-03), for about 12 MiB
/// more in the pause buffer.
const RELEASE_BATCH: usize = 4000;

/// How often the resolver's states are saved (with the positions that
/// go with them) while records flow.
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// Records changed that make a save due at once.
const SAVE_AT_CHANGED: usize = 10_000;

/// The initial-sync run a status is at (0: none yet).
fn initial_run(status: &MapStatus) -> i64 {
    status.initial.as_ref().map_or(0, |i| i.run)
}

/// How often the map topic's retention is read from the broker.
const RETENTION_READ_EVERY: Duration = Duration::from_secs(60);

/// Why a map whose state flows is held for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    No,
    /// An initial write of the map is still running: skipped, or done and
    /// not yet returned. A write of its last chunk could otherwise land
    /// after a live one (and, say, create a row live sync just deleted).
    Copy,
    /// A map this one depends on is catching up.
    Parents,
}

impl Wait {
    fn says(self) -> &'static str {
        match self {
            Wait::No => "records flow",
            Wait::Copy => "live sync waits for the initial write's last chunk to end",
            Wait::Parents => "catch-up waits for its parent maps to catch up",
        }
    }
}

/// Runs a gate until shutdown, taking status changes from `status_rx`.
///
/// `copies` counts the map's initial writes still running: the gate
/// releases nothing while one is (see [`Wait::Copy`]).
/// `parents` says whether a map this one depends on is catching up: a
/// catch-up of this map then waits, so that its replay never overtakes
/// the backlog of the records it refers to.
pub async fn run(
    mut gate: Gate,
    mut status_rx: watch::Receiver<MapStatus>,
    mut parents: watch::Receiver<bool>,
    mut copies: watch::Receiver<u32>,
    shutdown: CancellationToken,
) -> Result<(), KafkaError> {
    let mut backoff = Backoff::new("pause-buffer");
    let consumer = gate.consumer.clone();
    let mut guard = tokio::time::interval(Duration::from_secs(5));
    let mut saving = tokio::time::interval(SAVE_EVERY);
    let mut waited = Wait::No;
    loop {
        let waits = if *copies.borrow_and_update() > 0 {
            Wait::Copy
        } else if gate.status.state == MapState::Resuming && *parents.borrow_and_update() {
            Wait::Parents
        } else {
            Wait::No
        };
        if waits != waited && gate.status.state.flows() {
            tracing::info!(map = %gate.map, "{}", waits.says());
            waited = waits;
        }
        let flowing = gate.status.state.flows() && waits == Wait::No;
        let waiting = std::time::Instant::now();
        // Priority: shutdown, then state changes, then records.
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = status_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let st = status_rx.borrow_and_update().clone();
                gate.apply(st).await?;
                continue;
            }
            Ok(()) = parents.changed() => continue,
            Ok(()) = copies.changed() => continue,
            _ = saving.tick(), if gate.save_due() => {
                gate.save().await?;
                continue;
            }
            m = consumer.recv(), if flowing => m,
            _ = guard.tick() => {
                kafka::keep_offsets_alive(&consumer, &gate.topic, &gate.stored);
                let retention = gate.retention().await;
                crate::map_gauges(&gate.config, &gate.map, &gate.progress(), retention).await;
                continue;
            }
        };
        // Waiting for the next record while the map flows: in a catch-up
        // the backlog is on the broker, so this is the fetching's.
        busy(SERVICE, "wait", waiting);
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!(map = %gate.map, "receive failed: {e}");
                if backoff.brief(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        let t = std::time::Instant::now();
        let batch =
            kafka::recv_more(&consumer, first, RELEASE_BATCH, Duration::from_millis(5)).await;
        busy(SERVICE, "read", t);
        if !gate.release(&batch, &mut backoff, &shutdown).await? {
            break;
        }
    }
    if gate.position != gate.stored || gate.saving.is_some() {
        gate.save().await?;
        gate.settle().await?;
    }
    kafka::commit_now(&consumer);
    Ok(())
}
