//! Changes still on their way when the copy reads its snapshots.
//!
//! A change committed before a snapshot is part of what the copy reads.
//! If it has not yet reached the other side (it is in a capturer, the
//! router, or the map topic after the gate's position), the copy alone
//! cannot tell it from an old difference: a row deleted on one side looks
//! like a row the other side has alone (the copy would create it again),
//! an edit on the side that is not the conflict master looks like a
//! difference the master settles (the copy would overwrite it). So before
//! it writes, the copy finds every such change and leaves its record to
//! live sync, which forwards the change after the copy like any other:
//!
//! 1. On each side, the side's change source has passed every commit made
//!    before it is asked (`CopySide::wait_captured`; PostgreSQL: a
//!    transactional logical message committed after the snapshot, passed
//!    by the capturer's slot): every transaction the snapshot sees is on
//!    the capture topic.
//! 2. Once the router's committed offsets reach the capture topics' end
//!    offsets (taken after 1), all of it is on the map topic.
//! 3. The map topic from the gate's position (it holds the map while it
//!    initializes) to its end now holds every change the snapshots see
//!    that the gate has not forwarded: their keys are the records the copy
//!    leaves alone.
//!
//! The gate forwards every change after its position once the copy is done,
//! so a change is either reflected on both sides before the copy reads
//! (forwarded and applied: the copy waits for the appliers first) or
//! carried by live sync after it, never undone by the copy.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::lifecycle::InitialSync;
use dualwrite_model::record::{ApplyOp, MappedChange};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::{self, rdkafka::Message};
use dualwrite_runtime::side::CopySide;
use tokio_util::sync::CancellationToken;

use crate::{transient, Failure};

/// A record's alternate key values, in key order.
pub(crate) type Key = Vec<String>;

/// The keys of the changes the snapshots of `p` see that the gate (at
/// `position` on the map topic) has not forwarded. `None`: cancelled.
pub(crate) async fn keys<C: CopySide>(
    config: &Arc<Config>,
    map: &str,
    p: &InitialSync,
    position: BTreeMap<i32, i64>,
    cancel: &CancellationToken,
) -> Result<Option<HashSet<Key>>, Failure> {
    for side in [SideId::Left, SideId::Right] {
        if !C::wait_captured(config, side, cancel).await? {
            return Ok(None);
        }
    }
    if !kafka::drain::routed(config, cancel)
        .await
        .map_err(transient)?
    {
        return Ok(None);
    }
    let (cfg, p, left) = (config.clone(), p.clone(), config.sides.left.name.clone());
    let topic = Topics::new(&config.kafka.topic_prefix).map(map);
    tokio::task::spawn_blocking(move || {
        let mut keys = HashSet::new();
        kafka::for_each_until_end(&cfg.kafka, &topic, &position, |m| {
            if let Some(key) = m.payload().and_then(|b| seen(&p, &left, b)) {
                keys.insert(key);
            }
        })
        .map(|()| Some(keys))
        .map_err(|e| transient(format!("reading {topic}: {e}")))
    })
    .await
    .map_err(|e| transient(e.to_string()))?
}

/// The key of a change of a side that the snapshot covering it sees.
/// Reports and undecodable records are no changes (the gate reports the
/// latter when it reaches them).
fn seen(p: &InitialSync, left: &str, payload: &[u8]) -> Option<Key> {
    let mc = avro::decode::<MappedChange>(payload).ok()?;
    if matches!(mc.op, ApplyOp::Applied | ApplyOp::Superseded) {
        return None;
    }
    let key: Vec<Option<&str>> = mc.key.iter().map(|f| f.value.as_deref()).collect();
    let is_left = mc.source_side == left;
    p.covers(&key, is_left, mc.source_lsn, mc.source_xid)
        .then(|| key.iter().map(|v| v.unwrap_or("").to_owned()).collect())
}
