//! Pause buffer: gates each map between its topic `<prefix>.map.<map>` and
//! the appliers' topics `<prefix>.apply.<side>`. Records pass through
//! unchanged, keyed as they came; offsets are stored only after the
//! forwarded records were acknowledged.
//!
//! Pausing a map (hold its consumer offset so its changes queue in Kafka)
//! and resuming it (catch-up replay) build on this loop: the consumer is
//! per map topic, so a map's partitions can be paused on their own.

use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::record::MappedChange;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::kafka::rdkafka::consumer::Consumer;
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};
use dualwrite_runtime::kafka::{self, Outgoing, TopicSpec};
use dualwrite_runtime::relay::{relay, Output};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum PauseBufferError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Topics the pause buffer reads and writes.
pub fn topics(config: &Config) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let p = config.kafka.partitions;
    let mut v = vec![
        TopicSpec::new(t.apply(&config.sides.left.name), p),
        TopicSpec::new(t.apply(&config.sides.right.name), p),
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

/// Decides where each record of a batch goes (pure: no IO).
pub fn forward(config: &Config, errors: &ErrorSink, batch: &[OwnedMessage]) -> Output {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut out = Vec::with_capacity(batch.len());
    let mut bad = Vec::new();
    for m in batch {
        let Some(payload) = m.payload() else {
            bad.push(errors.about(m, "malformed_record", "empty map record (no value)"));
            continue;
        };
        match avro::decode::<MappedChange>(payload) {
            Ok(mc) if config.side_id(&mc.target_side).is_some() => out.push(Outgoing {
                topic: t.apply(&mc.target_side),
                key: kafka::key_text(m).unwrap_or_else(|| mc.kafka_key()),
                payload: payload.to_vec(),
            }),
            Ok(mc) => {
                let mut e = errors.about(
                    m,
                    "unknown_side",
                    format!(
                        "map record for side `{}`, which is not configured",
                        mc.target_side
                    ),
                );
                e.map = Some(mc.map);
                bad.push(e);
            }
            Err(e) => bad.push(errors.about(m, "malformed_record", format!("map record: {e}"))),
        }
    }
    Output {
        records: out,
        errors: bad,
    }
}

/// Runs the pause buffer until `shutdown` is cancelled.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), PauseBufferError> {
    run_inner(config, shutdown)
        .instrument(tracing::info_span!("pause_buffer"))
        .await
}

async fn run_inner(
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), PauseBufferError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics(&config)).await?;
    let producer = kafka::producer(&config.kafka, "dualwrite-pause-buffer")?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "pause-buffer");
    let consumer = kafka::consumer(
        &config.kafka,
        "dualwrite-pause-buffer",
        &t.group("pause-buffer"),
    )?;
    let inputs: Vec<String> = config.maps.iter().map(|m| t.map(&m.name)).collect();
    if inputs.is_empty() {
        tracing::warn!("no maps configured: nothing to do");
        shutdown.cancelled().await;
        return Ok(());
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    tracing::info!(inputs = ?refs, "forwarding");
    relay(&consumer, &producer, &errors, &shutdown, |batch| {
        forward(&config, &errors, batch)
    })
    .await?;
    Ok(())
}
