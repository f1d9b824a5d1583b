//! Topic settings as the broker has them (not as the configuration
//! assumes): the pause buffer warns about a pause nearing the map topic's
//! real `retention.ms`.

use std::collections::BTreeMap;

use dualwrite_model::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::error::KafkaError;

use super::{client_config, DwContext};

/// Every setting of `topic` the broker reports (defaults included), by name.
pub async fn topic_configs(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<BTreeMap<String, String>, KafkaError> {
    let admin: AdminClient<DwContext> =
        client_config(cfg, "dualwrite-admin").create_with_context(DwContext)?;
    let specifier = ResourceSpecifier::Topic(topic);
    let results = admin
        .describe_configs([&specifier], &AdminOptions::new())
        .await?;
    let mut out = BTreeMap::new();
    for r in results {
        let resource = r.map_err(KafkaError::AdminOp)?;
        for e in resource.entries {
            if let Some(v) = e.value {
                out.insert(e.name, v);
            }
        }
    }
    Ok(out)
}

/// A topic's `retention.ms` as the broker has it: `None` if it keeps
/// records forever (`-1`) or reports no value.
pub async fn retention_ms(cfg: &KafkaConfig, topic: &str) -> Result<Option<i64>, KafkaError> {
    let configs = topic_configs(cfg, topic).await?;
    Ok(configs
        .get("retention.ms")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|ms| *ms >= 0))
}
