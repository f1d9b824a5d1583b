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
//! The gate assigns the map topic's partitions itself (no consumer-group
//! rebalances), in a group of its own that only keeps the committed offsets;
//! on every start it takes its state from the status topic, so a pause holds
//! across restarts and a catch-up continues where it stopped. A generation
//! never reads before its start offsets (records older than the run).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{MapState, MapStatus, PartitionOffset, ResumePolicy};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::kafka::rdkafka::consumer::Consumer;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self, KafkaConsumer, Producer};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::relay::{deliver, Output};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

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
    /// True while the gate holds the map (nothing in flight to the appliers).
    held: watch::Sender<bool>,
    /// Next offset to read, per partition.
    position: BTreeMap<i32, i64>,
    status: MapStatus,
    reported: Option<Vec<PartitionOffset>>,
    paused: bool,
    /// Producer timestamp (µs) of the last record released.
    last_released: Option<i64>,
    /// When the current resume began, and records replayed since.
    resume_started: Option<(std::time::Instant, i64)>,
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
        let consumer = Arc::new(kafka::consumer(
            &config.kafka,
            &format!("dualwrite-pause-buffer-{map}"),
            &t.group(&format!("pause-buffer.{map}")),
        )?);
        let (cfg, top, c) = (config.clone(), topic.clone(), consumer.clone());
        let position =
            tokio::task::spawn_blocking(move || kafka::committed_positions(&cfg.kafka, &c, &top))
                .await
                .map_err(|_| KafkaError::Canceled)??;
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
            held: watch::channel(false).0,
            paused: false,
            last_released: None,
            resume_started: None,
        };
        gate.reassign()?;
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
        }
        Ok(moved)
    }

    fn store_positions(&self) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.position {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))?;
        }
        self.consumer.store_offsets(&tpl)
    }

    /// Takes a new status from the controller.
    async fn apply(&mut self, status: MapStatus) -> Result<(), KafkaError> {
        self.status = status;
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
                let policy = match self.status.resume_policy.as_deref() {
                    Some("discard") => ResumePolicy::Discard,
                    Some("skip_to_live") => ResumePolicy::SkipToLive,
                    _ => ResumePolicy::CatchUp,
                };
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
        self.held.send_replace(!self.status.state.flows());
        Ok(())
    }

    /// Says whether the gate holds the map (see [`Gate::apply`]).
    pub fn held(&self) -> watch::Receiver<bool> {
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

    /// Where each record of a batch goes: the target side's apply topic,
    /// or, for records queued before a skip-to-live resume, the catch-up
    /// errors topic.
    fn route(&self, batch: &[OwnedMessage]) -> Output {
        let aside_before = (self.status.state == MapState::Resuming
            && self.status.resume_policy.as_deref() == Some("skip_to_live"))
        .then(|| offsets(&self.status.resume_targets));
        let catchup = Topics::new(&self.config.kafka.topic_prefix).catchup_errors();
        let mut out = Output::default();
        let initial = self
            .status
            .initial
            .as_ref()
            .filter(|i| !i.segments.is_empty());
        for m in batch {
            match crate::forward_one(
                &self.config,
                &self.errors,
                m,
                self.status.conflict_master.as_deref(),
                initial,
            ) {
                Ok(None) => {
                    metrics()
                        .skipped
                        .with_label_values(&["pause-buffer", "in_initial_sync_snapshot"])
                        .inc();
                }
                Ok(Some(mut rec)) => {
                    if aside_before
                        .as_ref()
                        .is_some_and(|t| t.get(&m.partition()).is_some_and(|t| m.offset() < *t))
                    {
                        rec.topic = catchup.clone();
                    }
                    out.records.push(rec);
                }
                Err(e) => out.errors.push(*e),
            }
        }
        out
    }
}

/// Runs a gate until shutdown, taking status changes from `status_rx`.
pub async fn run(
    mut gate: Gate,
    mut status_rx: watch::Receiver<MapStatus>,
    shutdown: CancellationToken,
) -> Result<(), KafkaError> {
    let mut backoff = Backoff::new("pause-buffer");
    let consumer = gate.consumer.clone();
    let mut guard = tokio::time::interval(Duration::from_secs(5));
    loop {
        let flowing = gate.status.state.flows();
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
            m = consumer.recv(), if flowing => m,
            _ = guard.tick() => {
                crate::map_gauges(&gate.config, &gate.map, &gate.progress()).await;
                continue;
            }
        };
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
        let batch = kafka::recv_more(&consumer, first, 1000, Duration::from_millis(5)).await;
        let output = gate.route(&batch);
        if !deliver(
            &gate.producer,
            &gate.errors,
            &output,
            &mut backoff,
            &shutdown,
        )
        .await
        {
            break;
        }
        backoff.reset();
        kafka::store_offsets(&consumer, &batch)?;
        let released = output.records.len() as u64;
        metrics()
            .forwarded
            .with_label_values(&[&gate.map])
            .inc_by(released);
        if let Some((_, n)) = gate.resume_started.as_mut() {
            *n += batch.len() as i64;
        }
        gate.last_released = batch
            .last()
            .and_then(|m| m.timestamp().to_millis())
            .map(|ms| ms * 1000);
        for m in &batch {
            let e = gate.position.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        gate.report_if_caught_up().await;
    }
    kafka::commit_now(&consumer);
    Ok(())
}
