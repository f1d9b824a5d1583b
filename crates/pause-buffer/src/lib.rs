//! Pause buffer: gates each map between its topic `<prefix>.map.<map>` and
//! the appliers' topics `<prefix>.apply.<side>`, and runs the maps'
//! lifecycle controller.
//!
//! - [`controller`]: operator commands from `<prefix>.control` → map states
//!   on the compacted `<prefix>.status` → acknowledgements on `<prefix>.events`.
//! - [`gate`]: one per map; forwards while the map runs, holds the map's
//!   offset while it is paused (changes queue in Kafka), replays the backlog
//!   in order on resume (catch-up), then reports back.
//! - the initial write ([`dualwrite_initial_sync`]) of maps that are
//!   Initializing, one at a time, related maps first.
//!
//! Run one pause buffer per deployment: it is the only writer of the status
//! topic. It keeps nothing on disk; everything it needs is read back from
//! Kafka on start, so it may be killed at any moment.

pub mod controller;
pub mod drift;
mod freshness;
pub mod gate;
pub mod resolving;

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{
    dependencies, parse_command, ControlCommand, ControlEvent, MapState, MapStatus, Outcome,
    PartitionOffset,
};
use dualwrite_model::record::ErrorRecord;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, Outgoing, Producer, TopicSpec};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::now_micros;
use dualwrite_runtime::relay::{deliver, Output};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::controller::{event, Controller, Effects};
use crate::gate::{Gate, Report};
use dualwrite_initial_sync as initial_sync;
use initial_sync::Hold;

#[derive(Debug, thiserror::Error)]
pub enum PauseBufferError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot read {topic}: {message}")]
    Load { topic: String, message: String },
    #[error("{0}")]
    Setup(String),
}

/// The control topic (commands) and the events topic (their
/// acknowledgements and state changes): what a client sending commands
/// needs, made by whichever starts first.
pub fn control_topics(config: &Config) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    vec![
        TopicSpec::new(t.control(), 1),
        TopicSpec::new(t.events(), 1),
    ]
}

/// Topics the pause buffer reads and writes.
pub fn topics(config: &Config) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let p = config.kafka.partitions;
    let mut status = TopicSpec::new(t.status(), 1);
    status
        .config
        .push(("cleanup.policy".into(), "compact".into()));
    let mut v = vec![
        TopicSpec::new(t.apply(&config.sides.left.name), p),
        TopicSpec::new(t.apply(&config.sides.right.name), p),
        TopicSpec::new(t.errors(), p),
        status,
        TopicSpec::new(t.catchup_errors(), p),
        {
            // Every failed row of every initial write is kept.
            let mut s = TopicSpec::new(t.initial_sync_errors(), 1);
            s.config.push(("retention.ms".into(), "-1".into()));
            s
        },
    ];
    v.extend(control_topics(config));
    v.extend(
        config
            .maps
            .iter()
            .map(|m| TopicSpec::new(t.map(&m.name), p)),
    );
    v.extend(
        config
            .maps
            .iter()
            .map(|m| resolving::changelog_topic(config, &m.name)),
    );
    v
}

/// Runs the pause buffer until `shutdown` is cancelled; `copier` makes
/// the initial writes and schema checks for the sides' kind of database.
pub async fn run(
    config: Arc<Config>,
    copier: initial_sync::Copier,
    shutdown: CancellationToken,
) -> Result<(), PauseBufferError> {
    run_inner(config, copier, shutdown)
        .instrument(tracing::info_span!("pause_buffer"))
        .await
}

async fn run_inner(
    config: Arc<Config>,
    copier: initial_sync::Copier,
    shutdown: CancellationToken,
) -> Result<(), PauseBufferError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    // Read now: a key that cannot be read stops the start, never opens the door.
    let signing = Signing::load(&config)?;
    kafka::ensure_topics(&config.kafka, &topics(&config)).await?;
    let producer = kafka::producer(&config.kafka, "dualwrite-pause-buffer")?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "pause-buffer")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);

    // The states, read back from the status topic; applied command ids from the events.
    let loaded = load(&config).await?;
    // How long those ids are known (the broker's default if unreadable).
    let commands_kept = kafka::configs::retention_ms(&config.kafka, &t.events())
        .await
        .unwrap_or(Some(7 * 24 * 3_600_000));
    let mut ctl = Controller::new(&config, loaded.statuses, loaded.seen, now_micros());
    let mut backoff = Backoff::new("pause-buffer");
    let mut fx = ctl.recover(now_micros());
    ctl.check_versions(&config, now_micros(), &mut fx);
    fx.statuses.extend(
        loaded
            .tombstoned
            .iter()
            .filter_map(|m| ctl.statuses.get(m).cloned()),
    );
    if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
        return Ok(());
    }
    ctl.commit(&fx, None);

    let (report_tx, mut report_rx) = mpsc::channel::<Report>(64);
    let mut senders: BTreeMap<String, watch::Sender<MapStatus>> = BTreeMap::new();
    let mut parents: BTreeMap<String, watch::Sender<bool>> = BTreeMap::new();
    let mut links: BTreeMap<String, GateLinks> = BTreeMap::new();
    let mut gates = JoinSet::new();
    let mut watched = BTreeMap::new();
    for (map, status) in &ctl.statuses {
        let gate = Gate::start(
            config.clone(),
            map.clone(),
            status.clone(),
            producer.clone(),
            errors.clone(),
            report_tx.clone(),
        )
        .await?;
        let (tx, rx) = watch::channel(status.clone());
        watched.insert(
            map.clone(),
            drift::Watched {
                status: tx.subscribe(),
                resolver: gate.resolving(),
            },
        );
        senders.insert(map.clone(), tx);
        let sd = shutdown.clone();
        let span = tracing::info_span!("gate", map = %map);
        let (ptx, prx) = watch::channel(parents_catching_up(&config, &ctl, map));
        parents.insert(map.clone(), ptx);
        let (copies, crx) = watch::channel(0u32);
        links.insert(
            map.clone(),
            GateLinks {
                held: gate.held(),
                copies: Arc::new(copies),
            },
        );
        gates.spawn(gate::run(gate, rx, prx, crx, sd).instrument(span));
        tracing::info!(map = %map, state = %status.state, generation = status.generation, "map loaded");
    }

    // Commands are read in order from assigned partitions (no group
    // rebalance to wait for after a restart); the group keeps the offsets.
    let control = Arc::new(kafka::consumer(
        &config.kafka,
        "dualwrite-controller",
        &t.group("controller"),
    )?);
    let (cfg, c, top) = (config.clone(), control.clone(), t.control());
    let positions =
        tokio::task::spawn_blocking(move || kafka::committed_positions(&cfg.kafka, &c, &top))
            .await
            .map_err(|e| PauseBufferError::Load {
                topic: t.control(),
                message: e.to_string(),
            })??;
    kafka::assign_at(&control, &t.control(), &positions)?;
    // Renewed while no command comes, so the broker never expires them.
    let mut control_at = positions.clone();
    let mut keepalive = tokio::time::interval(kafka::KEEPALIVE);
    tracing::info!(topic = %t.control(), "taking commands");
    if config.pause_buffer.drift.enabled {
        let (cfg, p, sd) = (config.clone(), producer.clone(), shutdown.clone());
        tokio::spawn(drift::run(cfg, watched, p, sd).instrument(tracing::info_span!("drift")));
    }

    // Error records, from now on, counted per map for the automatic pause.
    let error_feed = kafka::consumer(
        &config.kafka,
        "dualwrite-auto-pause",
        &t.group("auto-pause"),
    )?;
    let (cfg, top) = (config.clone(), t.errors());
    let ends = tokio::task::spawn_blocking(move || kafka::watermarks(&cfg.kafka, &top))
        .await
        .map_err(|e| PauseBufferError::Load {
            topic: t.errors(),
            message: e.to_string(),
        })??;
    kafka::assign_at(
        &error_feed,
        &t.errors(),
        &ends.iter().map(|(p, _, hi)| (*p, *hi)).collect(),
    )?;
    let mut windows = ErrorWindows::default();
    let notify =
        |ctl: &Controller, fx: &Effects, senders: &BTreeMap<String, watch::Sender<MapStatus>>| {
            for s in &fx.statuses {
                if let (Some(tx), Some(now)) = (senders.get(&s.map), ctl.statuses.get(&s.map)) {
                    let _ = tx.send(now.clone());
                }
            }
            for (map, tx) in &parents {
                tx.send_if_modified(|busy| {
                    let now = parents_catching_up(&config, ctl, map);
                    std::mem::replace(busy, now) != now
                });
            }
            publish_states(ctl);
        };
    publish_states(&ctl);
    health().set("pause-buffer:state", true);
    let (copy_tx, mut copy_rx) = mpsc::channel::<initial_sync::Report>(16);
    let starter = CopyStarter {
        copier,
        producer: producer.clone(),
        reports: copy_tx,
    };
    let mut copy: Option<Copying> = None;
    let mut quieting: JoinSet<Option<ControlEvent>> = JoinSet::new();
    loop {
        schedule_copy(&ctl, &config, &links, &mut copy, &starter, &shutdown);
        // Priority: shutdown, a gate failing, catch-up reports, initial
        // writes, errors (auto-pause), then commands.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = gates.join_next() => {
                match done {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => { shutdown.cancel(); return Err(e.into()); }
                    Err(e) => { shutdown.cancel(); return Err(PauseBufferError::Load { topic: "gate".into(), message: e.to_string() }); }
                }
            }
            Some(Report::CaughtUp { map, targets }) = report_rx.recv() => {
                let fx = ctl.caught_up(&map, &targets, now_micros());
                if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
                    break;
                }
                ctl.commit(&fx, None);
                notify(&ctl, &fx, &senders);
            }
            Some(Ok(Some(ev))) = quieting.join_next() => {
                let fx = Effects { events: vec![ev], ..Effects::default() };
                if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
                    break;
                }
            }
            Some(report) = copy_rx.recv() => {
                let now = now_micros();
                let fx = match report {
                    initial_sync::Report::Progress { map, progress } => ctl.initial_progress(&map, &progress, now),
                    initial_sync::Report::Finished { map, result } => {
                        if copy.as_ref().is_some_and(|c| c.map == map) {
                            copy = None;
                        }
                        ctl.initial_finished(&map, result, now)
                    }
                };
                if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
                    break;
                }
                ctl.commit(&fx, None);
                notify(&ctl, &fx, &senders);
            }
            m = error_feed.recv() => {
                let Ok(m) = m else { continue };
                let Some(Ok(e)) = m.payload().map(avro::decode::<ErrorRecord>) else { continue };
                let Some(map) = e.map.as_deref().and_then(|n| config.map(n)) else { continue };
                let rule = config.auto_pause(map);
                let flowing = ctl.statuses.get(&map.name).is_some_and(|s| s.state.flows());
                if let Some(reason) = windows.record(&map.name, rule, flowing, e.occurred_at, &e.message) {
                    tracing::warn!(map = %map.name, "{reason}");
                    metrics().auto_pauses.with_label_values(&[&map.name]).inc();
                    let fx = ctl.auto_pause(&map.name, &reason, now_micros());
                    if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
                        break;
                    }
                    ctl.commit(&fx, None);
                    notify(&ctl, &fx, &senders);
                }
            }
            _ = keepalive.tick() => kafka::keep_offsets_alive(&control, &t.control(), &control_at),
            m = control.recv() => {
                let m = match m {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        tracing::warn!("control topic receive failed: {e}");
                        if backoff.brief(&shutdown).await { break; }
                        continue;
                    }
                };
                let now = now_micros();
                let read = match signing.check(&m).and_then(|()| freshness::check(&m, commands_kept, now)) {
                    Ok(()) => m.payload().map(parse_command),
                    Err(reason) => Some(Err(reason)),
                };
                let (fx, id) = match read {
                    Some(Ok(cmd)) => {
                        let span = tracing::info_span!("command", id = %cmd.id, action = %cmd.action, map = %cmd.map);
                        let inputs = gather(&config, &copier, &ctl, &cmd).instrument(span.clone()).await;
                        let _g = span.enter();
                        let fx = ctl.command(&config, &cmd, now, |map| inputs.ends(map), |map| inputs.schema(map));
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
                        metrics()
                            .commands
                            .with_label_values(&[&cmd.action.to_string().to_lowercase(), outcome])
                            .inc();
                        (fx, Some(cmd.id))
                    }
                    Some(Err(reason)) => (unreadable(&m, reason, now), None),
                    None => (unreadable(&m, "empty command (no value)".into(), now), None),
                };
                if !write(&producer, &errors, &t, &fx, &mut backoff, &shutdown).await {
                    break;
                }
                ctl.commit(&fx, id.as_deref());
                notify(&ctl, &fx, &senders);
                for ev in fx.quiet {
                    let Some(map) = ev.map.clone() else { continue };
                    let (Some(h), Some(tx), Some(s)) = (links.get(&map).map(|l| &l.held), senders.get(&map), ctl.statuses.get(&map)) else { continue };
                    let q = quiet(config.clone(), ev, s.updated_at, h.clone(), tx.subscribe(), shutdown.clone());
                    quieting.spawn(q.instrument(tracing::info_span!("quiet", map = %map)));
                }
                backoff.reset();
                kafka::store_offsets(&control, std::slice::from_ref(&m))?;
                control_at.insert(m.partition(), m.offset() + 1);
            }
        }
    }
    kafka::commit_now(&control);
    shutdown.cancel();
    while gates.join_next().await.is_some() {}
    Ok(())
}

/// The initial write under way.
struct Copying {
    map: String,
    run: i64,
    cancel: CancellationToken,
}

/// What an initial write is started with.
struct CopyStarter {
    copier: initial_sync::Copier,
    producer: Producer,
    reports: mpsc::Sender<initial_sync::Report>,
}

/// Stops the initial write under way if its map left Initializing (skipped,
/// or another run began), and starts the next one due, if any.
fn schedule_copy(
    ctl: &Controller,
    config: &Arc<Config>,
    links: &BTreeMap<String, GateLinks>,
    copy: &mut Option<Copying>,
    starter: &CopyStarter,
    shutdown: &CancellationToken,
) {
    if let Some(c) = copy.as_ref() {
        let current = ctl.statuses.get(&c.map).is_some_and(|s| {
            s.state == MapState::Initializing
                && s.initial
                    .as_ref()
                    .is_some_and(|i| i.run == c.run && i.phase.is_under_way())
        });
        if current {
            return;
        }
        tracing::info!(map = %c.map, run = c.run, "initial sync no longer wanted: stopped");
        c.cancel.cancel();
        *copy = None;
    }
    let Some((map, progress)) = ctl.next_initial_sync(config) else {
        return;
    };
    let Some(link) = links.get(&map) else {
        return;
    };
    let cancel = shutdown.child_token();
    let run = progress.run;
    let job = initial_sync::Job {
        config: config.clone(),
        map: map.clone(),
        progress,
        conflict_master: ctl
            .statuses
            .get(&map)
            .and_then(|s| s.conflict_master.clone()),
        producer: starter.producer.clone(),
        held: link.held.clone(),
    };
    let span = tracing::info_span!("initial_sync", map = %map, run);
    // The map's gate releases nothing until the copy has returned.
    let copies = link.copies.clone();
    copies.send_modify(|n| *n += 1);
    let copying = starter
        .copier
        .run(job, starter.reports.clone(), cancel.clone());
    tokio::spawn(
        async move {
            copying.await;
            copies.send_modify(|n| *n -= 1);
        }
        .instrument(span),
    );
    *copy = Some(Copying { map, run, cancel });
}

/// What the controller's loop holds of a map's gate.
struct GateLinks {
    /// Whether, and where, the gate holds the map.
    held: watch::Receiver<Hold>,
    /// The map's initial writes still running (the gate waits for none).
    copies: Arc<watch::Sender<u32>>,
}

/// Recent error times per map, for the automatic pause.
#[derive(Default)]
pub struct ErrorWindows {
    seen: BTreeMap<String, std::collections::VecDeque<i64>>,
}

impl ErrorWindows {
    /// Records an error of `map` at `at` (µs); returns the pause reason when
    /// the map's errors within the window reach the rule's count.
    pub fn record(
        &mut self,
        map: &str,
        rule: dualwrite_model::config::AutoPause,
        flowing: bool,
        at: i64,
        message: &str,
    ) -> Option<String> {
        if rule.errors == 0 || !flowing {
            self.seen.remove(map);
            return None;
        }
        let q = self.seen.entry(map.to_owned()).or_default();
        q.push_back(at);
        let since = at - rule.window_secs as i64 * 1_000_000;
        while q.front().is_some_and(|t| *t < since) {
            q.pop_front();
        }
        if q.len() < rule.errors as usize {
            return None;
        }
        let n = q.len();
        self.seen.remove(map);
        Some(format!(
            "auto-paused: {n} errors within {} s (threshold {}); last: {message}. Fix the cause, retry the errors (ctl retry-errors) and run the map again",
            rule.window_secs, rule.errors
        ))
    }
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

/// A rejection for a command that could not be read, naming where it was.
fn unreadable(m: &OwnedMessage, reason: String, now: i64) -> Effects {
    metrics()
        .commands
        .with_label_values(&["unreadable", "rejected"])
        .inc();
    let at = format!("{}:{}", m.partition(), m.offset());
    let id = kafka::key_text(m)
        .filter(|k| !k.is_empty())
        .unwrap_or(at.clone());
    tracing::warn!(at = %at, "rejected command: {reason}");
    Effects {
        statuses: Vec::new(),
        events: vec![event(
            Some(&id),
            Outcome::Rejected,
            None,
            None,
            format!("command at {at} rejected: {reason}"),
            now,
        )],
        quiet: Vec::new(),
    }
}

/// Whether a map `map` depends on (directly or not) is catching up.
fn parents_catching_up(config: &Config, ctl: &Controller, map: &str) -> bool {
    dependencies(config, map).iter().any(|d| {
        ctl.statuses
            .get(d)
            .is_some_and(|s| s.state == MapState::Resuming)
    })
}

/// A pause's COMPLETED, sent once nothing of its map is in flight: the
/// gate holds the map by the paused status (it releases nothing more of
/// it) and the appliers wrote everything it released before. If the map
/// is run or stopped again first, the event says so instead. None on
/// shutdown (the pause stands; only its acknowledgement is not sent).
async fn quiet(
    config: Arc<Config>,
    mut ev: ControlEvent,
    since: i64,
    mut held: watch::Receiver<Hold>,
    mut status: watch::Receiver<MapStatus>,
    shutdown: CancellationToken,
) -> Option<ControlEvent> {
    let quiet = async {
        held.wait_for(|h| h.by >= since).await.ok()?;
        loop {
            match kafka::drain::appliers_drained(&config, &shutdown).await {
                Ok(done) => return done.then_some(()),
                Err(e) => tracing::warn!("waiting for the appliers to drain, retrying: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = status.wait_for(|s| s.updated_at > since && s.state != MapState::Paused) => {
            let state = r.ok()?.state;
            ev.message = format!("paused, then {state} before nothing of the map was in flight");
        }
        r = quiet => r?,
    }
    ev.at = now_micros();
    Some(ev)
}

/// The control commands' signing keys, when configured (see
/// [`dualwrite_model::signing`]).
struct Signing {
    keys: Vec<dualwrite_model::config::Secret>,
    max_age_secs: u64,
}

impl Signing {
    fn load(config: &Config) -> Result<Signing, PauseBufferError> {
        let keys = config.control.keys().map_err(PauseBufferError::Setup)?;
        if keys.is_empty() {
            tracing::warn!("control commands are not signed (no control.signing_keys): anyone who may write the control topic can run, pause and stop maps");
        }
        Ok(Signing {
            keys,
            max_age_secs: config.control.max_age_secs,
        })
    }

    /// Whether the command may be read; `Err` says why it is refused.
    fn check(&self, m: &OwnedMessage) -> Result<(), String> {
        use dualwrite_runtime::kafka::rdkafka::message::Headers;
        if self.keys.is_empty() {
            return Ok(());
        }
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == dualwrite_model::signing::HEADER)
                .and_then(|h| h.value)
        });
        let keys: Vec<&[u8]> = self.keys.iter().map(|k| k.expose().as_bytes()).collect();
        let payload = m.payload().unwrap_or_default();
        let now = now_micros() / 1_000_000;
        dualwrite_model::signing::verify(&keys, header, payload, now, self.max_age_secs)
    }
}

/// End offsets of a map's topic (blocking).
/// What deciding a command needs from outside ([`Controller::needs`]),
/// gathered before the controller decides: the decision itself stays a
/// function of the state, the command and these.
#[derive(Default)]
struct Inputs {
    schema: BTreeMap<String, Result<Vec<String>, String>>,
    ends: BTreeMap<String, Result<Vec<PartitionOffset>, String>>,
}

impl Inputs {
    fn schema(&self, map: &str) -> Result<Vec<String>, String> {
        self.schema
            .get(map)
            .cloned()
            .unwrap_or_else(|| Err(format!("map `{map}` was not checked")))
    }

    fn ends(&self, map: &str) -> Result<Vec<PartitionOffset>, String> {
        self.ends
            .get(map)
            .cloned()
            .unwrap_or_else(|| Err(format!("map `{map}`'s end offsets were not read")))
    }
}

/// Checks the maps a command would run against their tables and reads the
/// end offsets it takes (a blocking Kafka read, on a blocking thread).
async fn gather(
    config: &Arc<Config>,
    copier: &initial_sync::Copier,
    ctl: &Controller,
    cmd: &ControlCommand,
) -> Inputs {
    let needs = ctl.needs(config, cmd);
    let mut inputs = Inputs::default();
    for m in needs.schema {
        let Some(mc) = config.map(&m) else { continue };
        let found = copier
            .schema_problems(config, mc)
            .await
            .map(|ps| ps.iter().map(|p| p.to_string()).collect())
            .map_err(|e| e.message);
        inputs.schema.insert(m, found);
    }
    for m in needs.ends {
        let (cfg, map) = (config.clone(), m.clone());
        let ends = tokio::task::spawn_blocking(move || end_offsets(&cfg, &map))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        inputs.ends.insert(m, ends);
    }
    inputs
}

fn end_offsets(config: &Config, map: &str) -> Result<Vec<PartitionOffset>, String> {
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::watermarks(&config.kafka, &t.map(map))
        .map(|v| {
            v.into_iter()
                .map(|(partition, _, hi)| PartitionOffset {
                    partition,
                    offset: hi,
                })
                .collect()
        })
        .map_err(|e| e.to_string())
}

/// Writes statuses, then events, each retried until acknowledged: whoever
/// sees an event finds the status it reports on the status topic (`ctl`
/// checks commands against the statuses it reads). False on shutdown.
async fn write(
    producer: &Producer,
    errors: &ErrorSink,
    t: &Topics,
    fx: &Effects,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> bool {
    let mut states = Output::default();
    for s in &fx.statuses {
        match avro::encode(s) {
            Ok(payload) => states.records.push(Outgoing {
                topic: t.status(),
                key: s.map.clone(),
                payload,
            }),
            Err(e) => tracing::error!(map = %s.map, "cannot encode a status: {e}"),
        }
    }
    if !deliver(producer, errors, &states, backoff, shutdown).await {
        return false;
    }
    let mut out = Output::default();
    for e in &fx.events {
        match avro::encode::<ControlEvent>(e) {
            Ok(payload) => out.records.push(Outgoing {
                topic: t.events(),
                key: e
                    .command_id
                    .clone()
                    .or_else(|| e.map.clone())
                    .unwrap_or_default(),
                payload,
            }),
            Err(err) => tracing::error!("cannot encode an event: {err}"),
        }
    }
    deliver(producer, errors, &out, backoff, shutdown).await
}

/// Reads the status topic (latest record per map) and the command ids of past events.
/// What the pause buffer reads back on start.
struct Loaded {
    statuses: Vec<MapStatus>,
    seen: Vec<String>,
    /// Maps whose latest status record is a tombstone from elsewhere.
    tombstoned: Vec<String>,
}

async fn load(config: &Arc<Config>) -> Result<Loaded, PauseBufferError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let cfg = config.clone();
    let (status, events) = tokio::task::spawn_blocking(move || {
        let s = kafka::read_to_end(&cfg.kafka, &t.status());
        let e = kafka::read_to_end(&cfg.kafka, &t.events());
        (s, e)
    })
    .await
    .map_err(|e| PauseBufferError::Load {
        topic: "status".into(),
        message: e.to_string(),
    })?;
    let t = Topics::new(&config.kafka.topic_prefix);
    let status = status.map_err(|e| PauseBufferError::Load {
        topic: t.status(),
        message: e.to_string(),
    })?;
    let events = events.map_err(|e| PauseBufferError::Load {
        topic: t.events(),
        message: e.to_string(),
    })?;
    let mut latest: BTreeMap<String, MapStatus> = BTreeMap::new();
    let mut tombstoned = std::collections::BTreeSet::new();
    for m in &status {
        match m.payload().map(avro::decode::<MapStatus>) {
            Some(Ok(s)) => {
                tombstoned.remove(&s.map);
                latest.insert(s.map.clone(), s);
            }
            Some(Err(e)) => {
                tracing::warn!(offset = m.offset(), "unreadable status record skipped: {e}")
            }
            None => {
                // The pause buffer never deletes a status: a tombstone comes
                // from elsewhere. The map keeps its state, written again
                // below so that compaction does not lose it.
                if let Some(k) = kafka::key_text(m) {
                    tracing::warn!(offset = m.offset(), map = %k, "a tombstone on the status topic (not written by the pause buffer): the map keeps its state");
                    if latest.contains_key(&k) {
                        tombstoned.insert(k);
                    }
                }
            }
        }
    }
    let seen = events
        .iter()
        .filter_map(|m| {
            m.payload()
                .and_then(|p| avro::decode::<ControlEvent>(p).ok())
        })
        .filter(|e| matches!(e.outcome, Outcome::Accepted | Outcome::Rejected))
        .filter_map(|e| e.command_id)
        .collect();
    Ok(Loaded {
        statuses: latest.into_values().collect(),
        seen,
        tombstoned: tombstoned.into_iter().collect(),
    })
}

/// Every few seconds per map: lag, backlog, catch-up estimate and pause
/// age as metrics, and a warning when a paused map's queued changes near
/// the map topic's retention (`retention_ms`, as the broker has it; `None`:
/// kept forever).
pub async fn map_gauges(
    config: &Arc<Config>,
    map: &str,
    gate: &gate::Progress,
    retention_ms: Option<i64>,
) {
    let m = metrics();
    m.retention_seconds
        .with_label_values(&[map])
        .set(retention_ms.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0));
    let retention = retention_ms.unwrap_or(i64::MAX);
    let (cfg, top) = (config.clone(), gate.topic.clone());
    let Ok(Ok(marks)) =
        tokio::task::spawn_blocking(move || kafka::watermarks(&cfg.kafka, &top)).await
    else {
        return;
    };
    let lag: i64 = marks
        .iter()
        .map(|(p, _, hi)| (hi - gate.position.get(p).copied().unwrap_or(0)).max(0))
        .sum();
    m.lag_records.with_label_values(&[map]).set(lag);
    let now = now_micros();
    let age = match (gate.status.state, gate.status.paused_at, gate.last_released) {
        (MapState::Paused, Some(at), _) => (now - at) as f64 / 1e6,
        (_, _, Some(ts)) if lag > 0 => (now - ts) as f64 / 1e6,
        _ => 0.0,
    };
    m.lag_seconds.with_label_values(&[map]).set(age.max(0.0));
    let backlog = match gate.status.state {
        MapState::Paused => lag,
        MapState::Resuming => gate.backlog,
        _ => 0,
    };
    m.backlog.with_label_values(&[map]).set(backlog);
    let eta = match (gate.status.state, gate.catchup_rate) {
        (MapState::Resuming, Some(rate)) if rate > 0.0 => gate.backlog as f64 / rate,
        _ => 0.0,
    };
    m.catchup_eta.with_label_values(&[map]).set(eta);
    let paused_ms = match (gate.status.state, gate.status.paused_at) {
        (MapState::Paused, Some(at)) => (now - at) / 1000,
        _ => 0,
    };
    m.paused_seconds
        .with_label_values(&[map])
        .set(paused_ms as f64 / 1000.0);
    if paused_ms > 0
        && paused_ms as f64 >= retention as f64 * config.pause_buffer.backlog_warn_ratio
    {
        tracing::warn!(
            map,
            backlog,
            paused_for_s = paused_ms / 1000,
            retention_s = retention / 1000,
            "map has been paused for {} s, {}% of its topic's retention: its oldest queued changes expire in {} s; run it again (resume) or raise the retention",
            paused_ms / 1000,
            paused_ms * 100 / retention.max(1),
            (retention - paused_ms).max(0) / 1000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::AutoPause;

    #[test]
    fn errors_within_the_window_trigger_once() {
        let rule = AutoPause {
            errors: 3,
            window_secs: 10,
        };
        let mut w = ErrorWindows::default();
        let s = 1_000_000;
        assert!(w.record("m", rule, true, 0, "a").is_none());
        assert!(w.record("m", rule, true, 20 * s, "b").is_none()); // the first fell out of the window
        assert!(w.record("m", rule, true, 21 * s, "c").is_none());
        let reason = w.record("m", rule, true, 22 * s, "d").unwrap();
        assert!(
            reason.starts_with("auto-paused: 3 errors within 10 s") && reason.contains("last: d"),
            "{reason}"
        );
        assert!(w.record("m", rule, true, 23 * s, "e").is_none()); // counting starts over
        assert!(w
            .record(
                "m",
                AutoPause {
                    errors: 0,
                    window_secs: 10
                },
                true,
                0,
                "x"
            )
            .is_none());
        assert!(w.record("other", rule, false, 0, "x").is_none());
    }
}
