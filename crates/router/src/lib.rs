//! Per-map router: reads the capture topics of both sides, applies each
//! map's field mappings and key translation, drops what no map syncs, and
//! writes each map's topic `<prefix>.map.<map>`, keyed by the alternate key.
//!
//! Offsets of the capture topics are stored only after every routed record
//! (and error record) of a batch was acknowledged by Kafka.

use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::mapping::{map_applied, map_change, maps_for};
use dualwrite_model::record::{ChangeOp, ChangeRecord, MappedChange};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, Outgoing, Shard, TopicSpec};
use dualwrite_runtime::metrics::{direction, metrics};
use dualwrite_runtime::relay::{relay, Output};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Topics the router reads and writes.
pub fn topics(config: &Config) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let p = config.kafka.partitions;
    let mut v = vec![
        TopicSpec::new(t.capture(&config.sides.left.name), p),
        TopicSpec::new(t.capture(&config.sides.right.name), p),
        TopicSpec::new(t.errors(), p),
    ];
    v.extend(
        config
            .maps
            .iter()
            .map(|m| TopicSpec::new(t.map(&m.name), p)),
    );
    v
}

/// Routes a batch of capture-topic messages (pure: no IO).
pub fn route(config: &Config, errors: &ErrorSink, batch: &[OwnedMessage]) -> Output {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut r = Output::default();
    let mut skipped = 0usize;
    for m in batch {
        let Some((side, change)) = read(config, errors, m, &mut r) else {
            continue;
        };
        let mut any = false;
        for map in maps_for(config, side, &change.entity) {
            any = true;
            let to = Routed {
                t: &t,
                errors,
                m,
                map,
            };
            if change.op == ChangeOp::Applied {
                // An applier's report goes to its map, keyed like the record.
                if let Some(mc) = map_applied(config, map, side, &change) {
                    to.push(&mc, &mut r);
                }
                continue;
            }
            match map_change(config, map, side, &change) {
                Ok(mapped) => {
                    if mapped.is_empty() {
                        // Outside the map's scope (filter, companies).
                        metrics()
                            .skipped
                            .with_label_values(&["router", "out_of_scope"])
                            .inc();
                    }
                    for mc in mapped {
                        let dir = direction(&mc.source_side, &mc.target_side);
                        metrics().routed.with_label_values(&[&mc.map, &dir]).inc();
                        to.push(&mc, &mut r);
                    }
                }
                Err(e) => {
                    let mut er = errors.about(m, "mapping", e.to_string());
                    er.map = Some(map.name.clone());
                    er.source_side = Some(change.side.clone());
                    er.target_side = Some(config.side(side.other()).name.clone());
                    er.source_lsn = Some(change.commit_lsn);
                    r.errors.push(er);
                }
            }
        }
        if !any {
            skipped += 1;
        }
    }
    if skipped > 0 {
        metrics()
            .skipped
            .with_label_values(&["router", "no_map"])
            .inc_by(skipped as u64);
        tracing::debug!(skipped, "changes of entities no map syncs");
    }
    r
}

/// A capture record and its side; `None` (with an error record in `r`)
/// when it cannot be read or comes from a side not configured.
fn read(
    config: &Config,
    errors: &ErrorSink,
    m: &OwnedMessage,
    r: &mut Output,
) -> Option<(SideId, ChangeRecord)> {
    let Some(payload) = m.payload() else {
        let why = "empty capture record (no value)";
        r.errors.push(errors.about(m, "malformed_record", why));
        return None;
    };
    let change: ChangeRecord = match avro::decode(payload) {
        Ok(c) => c,
        Err(e) => {
            let why = format!("capture record: {e}");
            r.errors.push(errors.about(m, "malformed_record", why));
            return None;
        }
    };
    let Some(side) = config.side_id(&change.side) else {
        let why = format!(
            "capture record from side `{}`, which is not configured",
            change.side
        );
        let mut e = errors.about(m, "unknown_side", why);
        e.source_lsn = Some(change.commit_lsn);
        r.errors.push(e);
        return None;
    };
    Some((side, change))
}

/// Where a capture record's mapped changes go: its map's topic.
struct Routed<'a> {
    t: &'a Topics,
    errors: &'a ErrorSink,
    m: &'a OwnedMessage,
    map: &'a MapConfig,
}

impl Routed<'_> {
    /// Encodes `mc` into the map's topic, or records why it could not be.
    fn push(&self, mc: &MappedChange, r: &mut Output) {
        match avro::encode::<MappedChange>(mc) {
            Ok(payload) => r.records.push(Outgoing {
                topic: self.t.map(&self.map.name),
                key: mc.kafka_key(),
                payload,
            }),
            Err(e) => {
                let mut er = self.errors.about(self.m, "encode", e.to_string());
                er.map = Some(self.map.name.clone());
                r.errors.push(er);
            }
        }
    }
}

/// Runs the router (this instance's share of the capture partitions) until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    shard: Shard,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    run_inner(config, shard, shutdown)
        .instrument(tracing::info_span!("router"))
        .await
}

async fn run_inner(
    config: Arc<Config>,
    shard: Shard,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics(&config)).await?;
    let producer = kafka::producer(&config.kafka, "dualwrite-router")?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "router")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);
    let inputs = vec![
        t.capture(&config.sides.left.name),
        t.capture(&config.sides.right.name),
    ];
    let consumer = kafka::assigned_consumer(
        &config.kafka,
        "dualwrite-router",
        &t.group("router"),
        &inputs,
        shard,
    )
    .await?;
    tracing::info!(?inputs, maps = config.maps.len(), "routing");
    health().set("router:kafka", true);
    relay(&consumer, &producer, &errors, &shutdown, |batch| {
        route(&config, &errors, batch)
    })
    .await?;
    Ok(())
}
