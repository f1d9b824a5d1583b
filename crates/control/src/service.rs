//! The pause buffer's loop: the controller's state, the gates it drives,
//! and the inputs it decides on, in order of priority (a gate failing,
//! catch-up reports, pauses gone quiet, initial writes, errors for the
//! automatic pause, then commands). Every decision is written (statuses,
//! then events) before it is committed to the controller's state and
//! passed to the gates: a restart finds on the status topic whatever a
//! gate acted on.

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_initial_sync::{self as initial_sync, Copier};
use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{
    dependencies, parse_command, ControlCommand, ControlEvent, MapState, Outcome,
};
use dualwrite_model::record::ErrorRecord;
use dualwrite_model::topics::Topics;
use dualwrite_pause_buffer::gate::{self, Gate, Report};
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, KafkaConsumer, Producer};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::now_micros;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auto_pause::ErrorWindows;
use crate::commands::{gather, unreadable, Signing};
use crate::controller::{Controller, Effects};
use crate::links::MapLinks;
use crate::scheduler::{schedule_copy, CopyStarter, Copying};
use crate::{drift, freshness, quiet, store, ControlError};

/// The controller and what it acts through.
pub struct Service {
    config: Arc<Config>,
    t: Topics,
    producer: Producer,
    errors: ErrorSink,
    backoff: Backoff,
    shutdown: CancellationToken,
    ctl: Controller,
    links: BTreeMap<String, MapLinks>,
    signing: Signing,
    /// How long the events topic keeps the ids of applied commands.
    commands_kept: Option<i64>,
    windows: ErrorWindows,
    starter: CopyStarter,
    copy: Option<Copying>,
    quieting: JoinSet<Option<ControlEvent>>,
}

/// What the loop waits on besides the service's own state.
pub struct Feeds {
    gates: JoinSet<Result<(), KafkaError>>,
    reports: mpsc::Receiver<Report>,
    copies: mpsc::Receiver<initial_sync::Report>,
    errors: KafkaConsumer,
    control: Arc<KafkaConsumer>,
    /// Where the control topic is read (renewed while no command comes,
    /// so the broker never expires the group's offsets).
    control_at: BTreeMap<i32, i64>,
}

/// Reads the maps' states back, recovers what a restart interrupted and
/// writes it; `None` on shutdown first.
pub async fn recover(
    config: Arc<Config>,
    copier: Copier,
    shutdown: CancellationToken,
) -> Result<Option<(Service, mpsc::Receiver<initial_sync::Report>)>, ControlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    // Read now: a key that cannot be read stops the start, never opens the door.
    let signing = Signing::load(&config)?;
    kafka::ensure_topics(&config.kafka, &crate::topics(&config)).await?;
    let producer = kafka::producer(&config.kafka, "dualwrite-pause-buffer")?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "pause-buffer")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);
    let loaded = store::load(&config).await?;
    // How long those ids are known (the broker's default if unreadable).
    let commands_kept = kafka::configs::retention_ms(&config.kafka, &t.events())
        .await
        .unwrap_or(Some(7 * 24 * 3_600_000));
    let ctl = Controller::new(&config, loaded.statuses, loaded.seen, now_micros());
    let (copy_tx, copy_rx) = mpsc::channel(16);
    let starter = CopyStarter {
        copier,
        producer: producer.clone(),
        reports: copy_tx,
    };
    let mut svc = Service {
        config: config.clone(),
        t,
        producer,
        errors,
        backoff: Backoff::new("pause-buffer"),
        shutdown,
        ctl,
        links: BTreeMap::new(),
        signing,
        commands_kept,
        windows: ErrorWindows::default(),
        starter,
        copy: None,
        quieting: JoinSet::new(),
    };
    let mut fx = svc.ctl.recover(now_micros());
    svc.ctl.check_versions(&config, now_micros(), &mut fx);
    let tombstoned = loaded.tombstoned.iter();
    fx.statuses
        .extend(tombstoned.filter_map(|m| svc.ctl.statuses.get(m).cloned()));
    Ok(svc.settle(&fx, None).await.then_some((svc, copy_rx)))
}

impl Service {
    pub fn producer(&self) -> Producer {
        self.producer.clone()
    }

    /// Starts a gate per map; what the drift check watches of them.
    pub async fn start_gates(
        &mut self,
        gates: &mut JoinSet<Result<(), KafkaError>>,
    ) -> Result<(mpsc::Receiver<Report>, BTreeMap<String, drift::Watched>), ControlError> {
        let (report_tx, report_rx) = mpsc::channel::<Report>(64);
        let mut watched = BTreeMap::new();
        for (map, status) in &self.ctl.statuses {
            let (c, p, e) = (&self.config, &self.producer, &self.errors);
            let gate = Gate::start(
                c.clone(),
                map.clone(),
                status.clone(),
                p.clone(),
                e.clone(),
                report_tx.clone(),
            )
            .await?;
            let (tx, rx) = watch::channel(status.clone());
            let resolver = gate.resolving();
            watched.insert(
                map.clone(),
                drift::Watched {
                    status: tx.subscribe(),
                    resolver,
                },
            );
            let (ptx, prx) = watch::channel(parents_catching_up(c, &self.ctl, map));
            let (copies, crx) = watch::channel(0u32);
            let held = gate.held();
            let links = MapLinks {
                status: tx,
                parents: ptx,
                held,
                copies: Arc::new(copies),
            };
            self.links.insert(map.clone(), links);
            let span = tracing::info_span!("gate", map = %map);
            gates.spawn(gate::run(gate, rx, prx, crx, self.shutdown.clone()).instrument(span));
            tracing::info!(map = %map, state = %status.state, generation = status.generation, "map loaded");
        }
        Ok((report_rx, watched))
    }

    /// Writes a decision, then commits it and tells the gates; false on
    /// shutdown (nothing committed).
    async fn settle(&mut self, fx: &Effects, command_id: Option<&str>) -> bool {
        let (p, e, t) = (&self.producer, &self.errors, &self.t);
        if !store::write(p, e, t, fx, &mut self.backoff, &self.shutdown).await {
            return false;
        }
        self.ctl.commit(fx, command_id);
        for s in &fx.statuses {
            if let (Some(l), Some(now)) = (self.links.get(&s.map), self.ctl.statuses.get(&s.map)) {
                let _ = l.status.send(now.clone());
            }
        }
        for (map, l) in &self.links {
            let now = parents_catching_up(&self.config, &self.ctl, map);
            l.parents
                .send_if_modified(|busy| std::mem::replace(busy, now) != now);
        }
        publish_states(&self.ctl);
        true
    }

    async fn on_copy(&mut self, report: initial_sync::Report) -> bool {
        let now = now_micros();
        let fx = match report {
            initial_sync::Report::Progress { map, progress } => {
                self.ctl.initial_progress(&map, &progress, now)
            }
            initial_sync::Report::Finished { map, result } => {
                if self.copy.as_ref().is_some_and(|c| c.map == map) {
                    self.copy = None;
                }
                self.ctl.initial_finished(&map, result, now)
            }
        };
        self.settle(&fx, None).await
    }

    /// Counts an error record for its map's automatic pause; pauses the
    /// map when its rule is reached.
    async fn on_error(&mut self, m: &impl Message) -> bool {
        let Some(Ok(e)) = m.payload().map(avro::decode::<ErrorRecord>) else {
            return true;
        };
        let Some(map) = e.map.as_deref().and_then(|n| self.config.map(n)) else {
            return true;
        };
        let rule = self.config.auto_pause(map);
        let flowing = self
            .ctl
            .statuses
            .get(&map.name)
            .is_some_and(|s| s.state.flows());
        let Some(reason) = self
            .windows
            .record(&map.name, rule, flowing, e.occurred_at, &e.message)
        else {
            return true;
        };
        tracing::warn!(map = %map.name, "{reason}");
        metrics().auto_pauses.with_label_values(&[&map.name]).inc();
        let fx = self.ctl.auto_pause(&map.name, &reason, now_micros());
        self.settle(&fx, None).await
    }

    /// Decides a command read from the control topic (or refuses one that
    /// cannot be read); false on shutdown.
    async fn on_command(&mut self, m: &OwnedMessage) -> bool {
        let now = now_micros();
        let checked = self
            .signing
            .check(m)
            .and_then(|()| freshness::check(m, self.commands_kept, now));
        let (fx, id) = match checked.map(|()| m.payload().map(parse_command)) {
            Ok(Some(Ok(cmd))) => (self.decide(&cmd, now).await, Some(cmd.id)),
            Ok(Some(Err(reason))) | Err(reason) => (unreadable(m, reason, now), None),
            Ok(None) => (unreadable(m, "empty command (no value)".into(), now), None),
        };
        if !self.settle(&fx, id.as_deref()).await {
            return false;
        }
        for ev in fx.quiet {
            self.when_quiet(ev);
        }
        self.backoff.reset();
        true
    }

    async fn decide(&mut self, cmd: &ControlCommand, now: i64) -> Effects {
        let span =
            tracing::info_span!("command", id = %cmd.id, action = %cmd.action, map = %cmd.map);
        let copier = &self.starter.copier;
        let inputs = gather(&self.config, copier, &self.ctl, cmd)
            .instrument(span.clone())
            .await;
        let _g = span.enter();
        let fx = self.ctl.command(
            &self.config,
            cmd,
            now,
            |m| inputs.ends(m),
            |m| inputs.schema(m),
        );
        for e in &fx.events {
            tracing::info!(outcome = ?e.outcome, "{}", e.message);
        }
        let outcome = fx.events.first().map_or("none", |e| match e.outcome {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
            Outcome::Completed => "duplicate",
            Outcome::Failed => "failed",
            Outcome::StateChanged | Outcome::Drift => "changed",
        });
        let action = cmd.action.to_string().to_lowercase();
        metrics()
            .commands
            .with_label_values(&[&action, outcome])
            .inc();
        fx
    }

    /// Sends `ev` (a pause's COMPLETED) once its map is quiet.
    fn when_quiet(&mut self, ev: ControlEvent) {
        let Some(map) = ev.map.clone() else { return };
        let (Some(l), Some(s)) = (self.links.get(&map), self.ctl.statuses.get(&map)) else {
            return;
        };
        let (c, sd) = (self.config.clone(), self.shutdown.clone());
        let q = quiet::quiet(
            c,
            ev,
            s.updated_at,
            l.held.clone(),
            l.status.subscribe(),
            sd,
        );
        self.quieting
            .spawn(q.instrument(tracing::info_span!("quiet", map = %map)));
    }

    fn schedule(&mut self) {
        let (c, l, s) = (&self.config, &self.links, &self.starter);
        schedule_copy(&self.ctl, c, l, &mut self.copy, s, &self.shutdown);
    }
}

/// Opens the control topic where the controller left off, and the errors
/// topic at its end (errors from now on count for the automatic pause).
pub async fn feeds(
    config: &Arc<Config>,
    gates: JoinSet<Result<(), KafkaError>>,
    reports: mpsc::Receiver<Report>,
    copies: mpsc::Receiver<initial_sync::Report>,
) -> Result<Feeds, ControlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    // Commands are read in order from assigned partitions (no group
    // rebalance to wait for after a restart); the group keeps the offsets.
    let group = t.group("controller");
    let control = Arc::new(kafka::consumer(
        &config.kafka,
        "dualwrite-controller",
        &group,
    )?);
    let control_at = blocking(&t.control(), {
        let (cfg, c, top) = (config.clone(), control.clone(), t.control());
        move || kafka::committed_positions(&cfg.kafka, &c, &top)
    })
    .await?;
    kafka::assign_at(&control, &t.control(), &control_at)?;
    let errors = kafka::consumer(
        &config.kafka,
        "dualwrite-auto-pause",
        &t.group("auto-pause"),
    )?;
    let ends = blocking(&t.errors(), {
        let (cfg, top) = (config.clone(), t.errors());
        move || kafka::watermarks(&cfg.kafka, &top)
    })
    .await?;
    let at_end = ends.iter().map(|(p, _, hi)| (*p, *hi)).collect();
    kafka::assign_at(&errors, &t.errors(), &at_end)?;
    tracing::info!(topic = %t.control(), "taking commands");
    Ok(Feeds {
        gates,
        reports,
        copies,
        errors,
        control,
        control_at,
    })
}

/// A blocking Kafka read of `topic`, on a blocking thread.
async fn blocking<T: Send + 'static>(
    topic: &str,
    read: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, ControlError> {
    let load = |message: String| ControlError::Load {
        topic: topic.to_owned(),
        message,
    };
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| load(e.to_string()))?
        .map_err(Into::into)
}

/// Runs the loop until shutdown or a gate fails.
pub async fn run(mut svc: Service, mut f: Feeds) -> Result<(), ControlError> {
    let mut keepalive = tokio::time::interval(kafka::KEEPALIVE);
    let t = svc.t.clone();
    loop {
        svc.schedule();
        let going = tokio::select! {
            biased;
            _ = svc.shutdown.cancelled() => false,
            Some(done) = f.gates.join_next() => {
                let failed = match done {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.into(),
                    Err(e) => ControlError::Load { topic: "gate".into(), message: e.to_string() },
                };
                svc.shutdown.cancel();
                return Err(failed);
            }
            Some(Report::CaughtUp { map, targets }) = f.reports.recv() => {
                let fx = svc.ctl.caught_up(&map, &targets, now_micros());
                svc.settle(&fx, None).await
            }
            Some(Ok(Some(ev))) = svc.quieting.join_next() => {
                let fx = Effects { events: vec![ev], ..Effects::default() };
                svc.settle(&fx, None).await
            }
            Some(report) = f.copies.recv() => svc.on_copy(report).await,
            m = f.errors.recv() => match m {
                Ok(m) => svc.on_error(&m).await,
                Err(_) => true,
            },
            _ = keepalive.tick() => {
                kafka::keep_offsets_alive(&f.control, &t.control(), &f.control_at);
                true
            }
            m = f.control.recv() => match m {
                Ok(m) => {
                    let m = m.detach();
                    if !svc.on_command(&m).await {
                        break;
                    }
                    kafka::store_offsets(&f.control, std::slice::from_ref(&m))?;
                    f.control_at.insert(m.partition(), m.offset() + 1);
                    true
                }
                Err(e) => {
                    tracing::warn!("control topic receive failed: {e}");
                    !svc.backoff.brief(&svc.shutdown).await
                }
            },
        };
        if !going {
            break;
        }
    }
    kafka::commit_now(&f.control);
    svc.shutdown.cancel();
    while f.gates.join_next().await.is_some() {}
    Ok(())
}

/// Whether a map `map` depends on (directly or not) is catching up.
fn parents_catching_up(config: &Config, ctl: &Controller, map: &str) -> bool {
    dependencies(config, map).iter().any(|d| {
        ctl.statuses
            .get(d)
            .is_some_and(|s| s.state == MapState::Resuming)
    })
}

/// Sets each map's state gauge: 1 for its state, 0 for the others.
fn publish_states(ctl: &Controller) {
    let m = metrics();
    for (map, s) in &ctl.statuses {
        for state in MapState::ALL {
            m.map_state
                .with_label_values(&[map, state.label()])
                .set(i64::from(state == s.state));
        }
    }
}
