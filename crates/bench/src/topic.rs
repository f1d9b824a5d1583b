//! Reading what a capturer wrote to its topic: where each partition ends,
//! waiting until a number of records were appended, and each measured
//! row's key with the broker's append time (the topics of the capture-hop
//! scenario are created with `message.timestamp.type=LogAppendTime`, so
//! the time is when the record became part of the log, whoever produced
//! it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dualwrite_model::config::KafkaConfig;
use dualwrite_runtime::kafka::rdkafka::consumer::Consumer;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::rdkafka::{Offset, Timestamp, TopicPartitionList};
use dualwrite_runtime::kafka::{self, TopicSpec};
use futures::{pin_mut, StreamExt};

use crate::env::new_id;
use crate::measure::wait_for;

/// A topic whose records carry the broker's append time.
pub fn append_time_topic(name: &str, partitions: i32) -> TopicSpec {
    let mut t = TopicSpec::new(name, partitions);
    t.config
        .push(("message.timestamp.type".into(), "LogAppendTime".into()));
    t
}

/// The end (high watermark) of each partition: (partition, offset).
pub async fn ends(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64)>> {
    let (cfg, t) = (cfg.clone(), topic.to_owned());
    let marks = tokio::task::spawn_blocking(move || kafka::watermarks(&cfg, &t))
        .await?
        .with_context(|| format!("watermarks of {topic}"))?;
    Ok(marks.into_iter().map(|(p, _, hi)| (p, hi)).collect())
}

/// Records appended to `topic` since `from`.
async fn appended(cfg: &KafkaConfig, topic: &str, from: &[(i32, i64)]) -> Result<i64> {
    let now = ends(cfg, topic).await?;
    let start: HashMap<i32, i64> = from.iter().copied().collect();
    Ok(now
        .iter()
        .map(|(p, hi)| hi - start.get(p).copied().unwrap_or(0))
        .sum())
}

/// Waits until at least `n` records were appended to `topic` since `from`
/// (watching the partitions' ends only: nothing is read while the
/// capturer is being measured).
pub async fn wait_appended(
    cfg: &KafkaConfig,
    topic: &str,
    from: &[(i32, i64)],
    n: u64,
    timeout: Duration,
    alive: &(dyn Fn() -> Result<()> + Sync),
) -> Result<()> {
    wait_for(
        &format!("{n} records on {topic}"),
        timeout,
        Duration::from_millis(250),
        || async {
            alive()?;
            Ok(appended(cfg, topic, from).await? >= n as i64)
        },
    )
    .await
}

/// The row key of a capture record's Kafka key: dualwrite's is a JSON
/// array `["schema.table", "<key>"]`, Debezium's (JSON converter, no
/// schemas) an object `{"id": "<key>"}`.
pub fn key_id(key: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(key).ok()? {
        serde_json::Value::Array(a) => a.last()?.as_str().map(str::to_owned),
        serde_json::Value::Object(o) => o.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Reads `topic` from `from` until `want` distinct rows whose key starts
/// with `prefix` were seen; returns each row's key and the append time of
/// its first record (epoch ms). Fails after `timeout`, or when a record
/// does not carry the broker's append time.
pub async fn read_stamps(
    cfg: &KafkaConfig,
    topic: &str,
    from: &[(i32, i64)],
    prefix: &str,
    want: u64,
    timeout: Duration,
) -> Result<Vec<(String, f64)>> {
    let consumer = kafka::consumer(
        cfg,
        "dualwrite-bench-reader",
        &format!("dualwrite-bench-reader-{}", new_id()),
    )?;
    let mut tpl = TopicPartitionList::new();
    for (p, off) in from {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*off))?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut seen: HashMap<String, f64> = HashMap::with_capacity(want as usize);
    let stream = consumer.stream();
    pin_mut!(stream);
    while (seen.len() as u64) < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => bail!("read {topic}: {e}"),
            Ok(None) => bail!("read {topic}: the consumer stream ended"),
            Err(_) => bail!(
                "timed out after {timeout:?} reading {topic}: {} of {want} rows {prefix}… seen",
                seen.len()
            ),
        };
        let Some(id) = m.key().and_then(key_id) else {
            continue;
        };
        if !id.starts_with(prefix) {
            continue;
        }
        let at = match m.timestamp() {
            Timestamp::LogAppendTime(ms) => ms as f64,
            other => bail!("{topic}: a record without the broker's append time ({other:?})"),
        };
        seen.entry(id).or_insert(at);
    }
    Ok(seen.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_capturers() {
        assert_eq!(
            key_id(br#"["public.bench_items","L000000001"]"#).as_deref(),
            Some("L000000001")
        );
        assert_eq!(
            key_id(br#"{"id":"L000000001"}"#).as_deref(),
            Some("L000000001")
        );
        assert_eq!(key_id(b"not json"), None);
    }
}
