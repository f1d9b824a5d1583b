//! The pause buffer's control plane: the lifecycle controller and its
//! command loop, the automatic pause, the initial-sync scheduler and the
//! drift check. The gates it drives (one per map, forwarding, holding and
//! replaying the map's changes) are `dualwrite-pause-buffer`'s.
//!
//! - [`controller`]: operator commands from `<prefix>.control` → map states
//!   on the compacted `<prefix>.status` → acknowledgements on
//!   `<prefix>.events`; a function of the state, the command and what
//!   [`commands`] gathers for it (schema checks, end offsets).
//! - [`service`]: the loop that feeds the controller and writes what it
//!   decides ([`store`]) before the gates act on it.
//! - [`auto_pause`], [`scheduler`] (the initial write of maps that are
//!   Initializing, one at a time, related maps first), [`quiet`] (a
//!   pause's acknowledgement once nothing is in flight), [`drift`].
//!
//! Run one pause buffer per deployment: it is the only writer of the status
//! topic. It keeps nothing on disk; everything it needs is read back from
//! Kafka on start, so it may be killed at any moment.

pub mod auto_pause;
pub mod commands;
pub mod controller;
pub mod drift;
mod freshness;
pub mod links;
pub mod quiet;
pub mod scheduler;
pub mod service;
pub mod store;

use std::sync::Arc;

use dualwrite_initial_sync::Copier;
use dualwrite_model::config::Config;
use dualwrite_model::topics::Topics;
use dualwrite_pause_buffer::resolving;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::TopicSpec;
use dualwrite_runtime::side::Inspect;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
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
/// the initial writes and schema checks for the sides' kind of database,
/// and the drift check reads the sides through `I`.
pub async fn run<I: Inspect>(
    config: Arc<Config>,
    copier: Copier,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    run_inner::<I>(config, copier, shutdown)
        .instrument(tracing::info_span!("pause_buffer"))
        .await
}

async fn run_inner<I: Inspect>(
    config: Arc<Config>,
    copier: Copier,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let Some((mut svc, copies)) =
        service::recover(config.clone(), copier, shutdown.clone()).await?
    else {
        return Ok(());
    };
    let mut gates = JoinSet::new();
    let (reports, watched) = svc.start_gates(&mut gates).await?;
    let feeds = service::feeds(&config, gates, reports, copies).await?;
    if config.pause_buffer.drift.enabled {
        let (cfg, p, sd) = (config.clone(), svc.producer(), shutdown.clone());
        tokio::spawn(drift::run::<I>(cfg, watched, p, sd).instrument(tracing::info_span!("drift")));
    }
    health().set("pause-buffer:state", true);
    service::run(svc, feeds).await
}
