//! The pause buffer's gates: one per map, between its topic
//! `<prefix>.map.<map>` and the appliers' topics `<prefix>.apply.<side>`.
//!
//! - [`gate`]: forwards while the map runs, holds the map's offset while
//!   it is paused (changes queue in Kafka), replays the backlog in order
//!   on resume (catch-up), then reports back;
//! - [`resolving`]: the conflict decision the gate makes once per event,
//!   kept on a compacted changelog;
//! - [`states`]: where the resolver keeps its records' states (a bounded
//!   memory over a spill file).
//!
//! The controller that drives the gates (commands, states, the initial
//! write, the automatic pause) is `dualwrite-control`'s.

pub mod gate;
pub mod resolving;
pub mod states;

use std::sync::Arc;

use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::MapState;
use dualwrite_runtime::kafka;
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::now_micros;

/// Every few seconds per map: lag, backlog, catch-up estimate and pause
/// age as metrics, and a warning when a paused map's queued changes near
/// the map topic's retention (`retention_ms`, as the broker has it; `None`:
/// kept forever).
pub async fn map_gauges(
    config: &Arc<Config>,
    map: &str,
    gate: &gate::Progress,
    retention_ms: Option<i64>,
) {
    let m = metrics();
    m.retention_seconds
        .with_label_values(&[map])
        .set(retention_ms.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0));
    let retention = retention_ms.unwrap_or(i64::MAX);
    let (cfg, top) = (config.clone(), gate.topic.clone());
    let Ok(Ok(marks)) =
        tokio::task::spawn_blocking(move || kafka::watermarks(&cfg.kafka, &top)).await
    else {
        return;
    };
    let lag: i64 = marks
        .iter()
        .map(|(p, _, hi)| (hi - gate.position.get(p).copied().unwrap_or(0)).max(0))
        .sum();
    m.lag_records.with_label_values(&[map]).set(lag);
    let now = now_micros();
    let age = match (gate.status.state, gate.status.paused_at, gate.last_released) {
        (MapState::Paused, Some(at), _) => (now - at) as f64 / 1e6,
        (_, _, Some(ts)) if lag > 0 => (now - ts) as f64 / 1e6,
        _ => 0.0,
    };
    m.lag_seconds.with_label_values(&[map]).set(age.max(0.0));
    let backlog = match gate.status.state {
        MapState::Paused => lag,
        MapState::Resuming => gate.backlog,
        _ => 0,
    };
    m.backlog.with_label_values(&[map]).set(backlog);
    let eta = match (gate.status.state, gate.catchup_rate) {
        (MapState::Resuming, Some(rate)) if rate > 0.0 => gate.backlog as f64 / rate,
        _ => 0.0,
    };
    m.catchup_eta.with_label_values(&[map]).set(eta);
    let paused_ms = match (gate.status.state, gate.status.paused_at) {
        (MapState::Paused, Some(at)) => (now - at) / 1000,
        _ => 0,
    };
    m.paused_seconds
        .with_label_values(&[map])
        .set(paused_ms as f64 / 1000.0);
    if paused_ms > 0
        && paused_ms as f64 >= retention as f64 * config.pause_buffer.backlog_warn_ratio
    {
        tracing::warn!(
            map,
            backlog,
            paused_for_s = paused_ms / 1000,
            retention_s = retention / 1000,
            "map has been paused for {} s, {}% of its topic's retention: its oldest queued changes expire in {} s; run it again (resume) or raise the retention",
            paused_ms / 1000,
            paused_ms * 100 / retention.max(1),
            (retention - paused_ms).max(0) / 1000
        );
    }
}
