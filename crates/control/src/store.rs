//! What the pause buffer keeps in Kafka: the maps' statuses (compacted
//! `<prefix>.status`, the source of truth) and the events acknowledging
//! commands (`<prefix>.events`), written and read back on start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{ControlEvent, MapStatus, Outcome};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::{self, Outgoing, Producer};
use dualwrite_runtime::relay::{deliver, Output};
use tokio_util::sync::CancellationToken;

use crate::controller::Effects;
use crate::ControlError;

/// Writes statuses, then events, each retried until acknowledged: whoever
/// sees an event finds the status it reports on the status topic (`ctl`
/// checks commands against the statuses it reads). False on shutdown.
pub async fn write(
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

/// What the pause buffer reads back on start: the latest status of each
/// map and the command ids of past events.
pub struct Loaded {
    pub statuses: Vec<MapStatus>,
    pub seen: Vec<String>,
    /// Maps whose latest status record is a tombstone from elsewhere.
    pub tombstoned: Vec<String>,
}

pub async fn load(config: &Arc<Config>) -> Result<Loaded, ControlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let cfg = config.clone();
    let (status, events) = tokio::task::spawn_blocking(move || {
        let s = kafka::read_to_end(&cfg.kafka, &t.status());
        let e = kafka::read_to_end(&cfg.kafka, &t.events());
        (s, e)
    })
    .await
    .map_err(|e| ControlError::Load {
        topic: "status".into(),
        message: e.to_string(),
    })?;
    let t = Topics::new(&config.kafka.topic_prefix);
    let status = status.map_err(|e| ControlError::Load {
        topic: t.status(),
        message: e.to_string(),
    })?;
    let events = events.map_err(|e| ControlError::Load {
        topic: t.events(),
        message: e.to_string(),
    })?;
    let mut latest: BTreeMap<String, MapStatus> = BTreeMap::new();
    let mut tombstoned = BTreeSet::new();
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
