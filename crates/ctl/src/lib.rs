//! Operator CLI (`dualwrite ctl …`). It talks only to Kafka.

use std::io::Write;
use std::time::Duration;

use dualwrite_model::avro::{self, AvroRecord};
use dualwrite_model::config::Config;
use dualwrite_model::record::{ChangeRecord, ErrorRecord, MappedChange};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{client_config, DwContext};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Usage(String),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

/// Prints the maps of the configuration.
pub fn describe_maps(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    let (l, r) = (&config.sides.left.name, &config.sides.right.name);
    writeln!(out, "sides: left = {l}, right = {r}")?;
    for m in &config.maps {
        writeln!(
            out,
            "map {}: {l}:{} ({}) <-> {r}:{} ({}); {} fields; conflict master {}; initial sync default {}{}",
            m.name,
            m.left.qualified(),
            m.left.key.join(", "),
            m.right.qualified(),
            m.right.key.join(", "),
            m.fields.len(),
            config.side(config.conflict_master(m)).name,
            if m.initial_sync { "on" } else { "off" },
            if m.depends_on.is_empty() {
                String::new()
            } else {
                format!("; depends on {}", m.depends_on.join(", "))
            }
        )?;
    }
    Ok(())
}

/// Prints every topic of the deployment and what flows on it.
pub fn describe_topics(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    let t = Topics::new(&config.kafka.topic_prefix);
    for side in [&config.sides.left.name, &config.sides.right.name] {
        writeln!(
            out,
            "{}\tChangeRecord: committed changes captured on {side}",
            t.capture(side)
        )?;
    }
    for m in &config.maps {
        writeln!(
            out,
            "{}\tMappedChange: map {}, both directions, keyed by alternate key",
            t.map(&m.name),
            m.name
        )?;
    }
    for side in [&config.sides.left.name, &config.sides.right.name] {
        writeln!(
            out,
            "{}\tMappedChange: released by the pause buffer, applied to {side}",
            t.apply(side)
        )?;
    }
    writeln!(
        out,
        "{}\tErrorRecord: records that could not be processed, with context",
        t.errors()
    )
}

/// Prints the records of a topic as JSON lines, from the beginning, up to
/// `max` records or until nothing arrives for `idle`.
/// `which` is `errors`, `capture:<side>`, `map:<map>` or `apply:<side>`.
pub fn tail(
    config: &Config,
    which: &str,
    max: usize,
    idle: Duration,
    out: &mut impl Write,
) -> Result<usize, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let (topic, printer): (String, fn(&[u8]) -> String) = match which.split_once(':') {
        None if which == "errors" => (t.errors(), render::<ErrorRecord>),
        Some(("capture", side)) => (t.capture(side), render::<ChangeRecord>),
        Some(("map", map)) => (t.map(map), render::<MappedChange>),
        Some(("apply", side)) => (t.apply(side), render::<MappedChange>),
        _ => {
            return Err(CtlError::Usage(format!(
                "unknown topic `{which}`: use errors, capture:<side>, map:<map> or apply:<side>"
            )))
        }
    };
    let consumer: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-ctl")
        .set("group.id", "dualwrite-ctl")
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for tm in md.topics() {
        for p in tm.partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
        }
    }
    if tpl.count() == 0 {
        return Err(CtlError::Usage(format!("topic {topic} does not exist")));
    }
    consumer.assign(&tpl)?;
    let mut n = 0;
    while n < max {
        match consumer.poll(idle) {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                let body = m.payload().map(printer).unwrap_or_else(|| "null".into());
                writeln!(
                    out,
                    "{{\"partition\":{},\"offset\":{},\"key\":{},\"value\":{body}}}",
                    m.partition(),
                    m.offset(),
                    serde_json::to_string(&m.key().map(|k| String::from_utf8_lossy(k)))
                        .unwrap_or_default()
                )?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn render<T: AvroRecord>(bytes: &[u8]) -> String {
    match avro::decode::<T>(bytes) {
        Ok(r) => serde_json::to_string(&r)
            .unwrap_or_else(|e| format!("{{\"render_error\":{:?}}}", e.to_string())),
        Err(e) => format!("{{\"decode_error\":{:?}}}", e.to_string()),
    }
}
