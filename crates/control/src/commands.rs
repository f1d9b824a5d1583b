//! Reading a command before the controller decides it: its signature
//! and age (refused with the reason, never applied), and what deciding it
//! needs from outside (schema checks, end offsets).

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_initial_sync::Copier;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{ControlCommand, Outcome, PartitionOffset};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::now_micros;

use crate::controller::{event, Controller, Effects};
use crate::ControlError;

/// The control commands' signing keys, when configured (see
/// [`dualwrite_model::signing`]).
pub struct Signing {
    keys: Vec<dualwrite_model::config::Secret>,
    max_age_secs: u64,
}

impl Signing {
    pub fn load(config: &Config) -> Result<Signing, ControlError> {
        let keys = config.control.keys().map_err(ControlError::Setup)?;
        if keys.is_empty() {
            tracing::warn!("control commands are not signed (no control.signing_keys): anyone who may write the control topic can run, pause and stop maps");
        }
        Ok(Signing {
            keys,
            max_age_secs: config.control.max_age_secs,
        })
    }

    /// Whether the command may be read; `Err` says why it is refused.
    pub fn check(&self, m: &OwnedMessage) -> Result<(), String> {
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

/// A rejection for a command that could not be read, naming where it was.
pub fn unreadable(m: &OwnedMessage, reason: String, now: i64) -> Effects {
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

/// What deciding a command needs from outside ([`Controller::needs`]),
/// gathered before the controller decides: the decision itself stays a
/// function of the state, the command and these.
#[derive(Default)]
pub struct Inputs {
    schema: BTreeMap<String, Result<Vec<String>, String>>,
    ends: BTreeMap<String, Result<Vec<PartitionOffset>, String>>,
}

impl Inputs {
    pub fn schema(&self, map: &str) -> Result<Vec<String>, String> {
        self.schema
            .get(map)
            .cloned()
            .unwrap_or_else(|| Err(format!("map `{map}` was not checked")))
    }

    pub fn ends(&self, map: &str) -> Result<Vec<PartitionOffset>, String> {
        self.ends
            .get(map)
            .cloned()
            .unwrap_or_else(|| Err(format!("map `{map}`'s end offsets were not read")))
    }
}

/// Checks the maps a command would run against their tables and reads the
/// end offsets it takes (a blocking Kafka read, on a blocking thread).
pub async fn gather(
    config: &Arc<Config>,
    copier: &Copier,
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

/// End offsets of a map's topic (blocking).
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
