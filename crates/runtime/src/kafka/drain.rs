//! Waiting until the appliers have written what was released to them.
//!
//! The pause buffer releases a map's writes to `<p>.apply.<side>`; an
//! applier commits its group's offsets after it wrote them. Once a gate
//! holds a map (it releases nothing more of it), the apply topics' end
//! offsets taken then bound everything of the map still in flight: when
//! both appliers' committed offsets reach them, nothing of the map is left
//! to be written. The initial write waits on it before it reads its
//! snapshots, a pause before it is acknowledged as completed.
//!
//! The same holds one hop upstream: the router stores a capture record's
//! offset once what it routed was acknowledged, so when its committed
//! offsets reach the capture topics' end offsets taken at some moment,
//! everything the capturers had published by then is on the map topics
//! ([`routed`]).

use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::config::Config;
use dualwrite_model::topics::Topics;
use tokio_util::sync::CancellationToken;

/// How often the committed offsets are read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// Waits until both appliers' committed offsets reach the apply topics'
/// end offsets as they are when this is called. False if `cancel` came
/// first; an error says which topic or group could not be read.
pub async fn appliers_drained(
    config: &Arc<Config>,
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let sides = [&config.sides.left.name, &config.sides.right.name];
    let topics: Vec<(String, String)> = sides
        .iter()
        .map(|s| (t.apply(s), t.group(&format!("apply.{s}"))))
        .collect();
    caught_up(config, &topics, cancel).await
}

/// Waits until the router's committed offsets reach the capture topics'
/// end offsets as they are when this is called: everything the capturers
/// had published by then is on the map topics. A capture topic that does
/// not exist yet holds nothing to route. As [`appliers_drained`].
pub async fn routed(config: &Arc<Config>, cancel: &CancellationToken) -> Result<bool, String> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let sides = [&config.sides.left.name, &config.sides.right.name];
    let topics: Vec<(String, String)> = sides
        .iter()
        .map(|s| (t.capture(s), t.group("router")))
        .collect();
    caught_up(config, &topics, cancel).await
}

/// Waits until each (topic, group)'s committed offsets reach the topic's
/// end offsets taken first, for all of them.
async fn caught_up(
    config: &Arc<Config>,
    topics: &[(String, String)],
    cancel: &CancellationToken,
) -> Result<bool, String> {
    let mut targets = Vec::new();
    for (topic, group) in topics {
        let (cfg, top) = (config.clone(), topic.clone());
        let ends =
            tokio::task::spawn_blocking(move || super::watermarks_if_exists(&cfg.kafka, &top))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("end offsets of {topic}: {e}"))?;
        if let Some(ends) = ends {
            targets.push((topic, group, ends));
        }
    }
    for (topic, group, ends) in targets {
        // One client of the group for the whole wait (it never joins it).
        let consumer = Arc::new(
            super::consumer(&config.kafka, "dualwrite-drain", group)
                .map_err(|e| format!("Kafka consumer of {group}: {e}"))?,
        );
        loop {
            let (cfg, top, c) = (config.clone(), topic.clone(), consumer.clone());
            let committed = tokio::task::spawn_blocking(move || {
                super::committed_positions(&cfg.kafka, &c, &top)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("committed offsets of {group}: {e}"))?;
            if ends
                .iter()
                .all(|(p, _, hi)| committed.get(p).is_some_and(|c| c >= hi))
            {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    Ok(true)
}
