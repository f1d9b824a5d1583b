//! The changes a skip-to-live resume set aside (`<prefix>.catchup-errors`):
//! listed on the errors page, and sent back through their map's topic when
//! selected, as `ctl retry-catchup` does (the resolver skips any a later
//! write has overtaken, so a retry never regresses a record).

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::record::MappedChange;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka;
use dualwrite_runtime::kafka::rdkafka::message::Message;

/// One change set aside.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    pub map: String,
    /// The record's key (as on the map's topic).
    pub key: String,
    pub op: String,
    pub source_side: String,
    pub commit_time: i64,
}

impl SetAside {
    /// What a checkbox sends for it: `[map, key]` as JSON.
    pub fn selector(&self) -> String {
        serde_json::to_string(&[&self.map, &self.key]).unwrap_or_default()
    }
}

/// Every change set aside, oldest first (a blocking read of the topic).
pub fn read(config: &Config) -> Result<Vec<SetAside>, String> {
    let topic = Topics::new(&config.kafka.topic_prefix).catchup_errors();
    let records = kafka::read_to_end(&config.kafka, &topic).map_err(|e| e.to_string())?;
    Ok(records
        .iter()
        .filter_map(|m| avro::decode::<MappedChange>(m.payload()?).ok())
        .map(|mc| SetAside {
            key: mc.kafka_key(),
            op: format!("{:?}", mc.op).to_lowercase(),
            map: mc.map,
            source_side: mc.source_side,
            commit_time: mc.commit_time,
        })
        .collect())
}

/// Sends the selected changes (`[map, key]` each) back through their
/// maps' topics; what was done.
pub async fn retry(config: &Arc<Config>, selected: Vec<&str>) -> Result<String, String> {
    let mut by_map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in selected {
        let [map, key]: [String; 2] = serde_json::from_str(s)
            .map_err(|e| format!("a selection `{s}` is not [map, key]: {e}"))?;
        by_map.entry(map).or_default().push(key);
    }
    if by_map.is_empty() {
        return Err("no change selected".into());
    }
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (map, keys) in &by_map {
            dualwrite_ctl::retry_catchup(&cfg, map, keys, &mut out).map_err(|e| e.to_string())?;
        }
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    })
    .await
    .map_err(|e| e.to_string())?
}
