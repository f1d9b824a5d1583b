//! The drift detector: a safety net behind the resolver. Every
//! `[pause_buffer.drift] interval_secs` it compares the two sides of each
//! running map ([`dualwrite_drift::Pass`]), reads again, after
//! `confirm_secs`, the records found different, and reports those that
//! still differ in the same way and have no write of the resolver on its
//! way: `dualwrite_drift_records{map}`, a DRIFT event on `<prefix>.events`
//! and a warning naming the keys (never the values). `ctl repair` mends them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualwrite_drift::{compare, key_json, read_rows, Key, Pass, Row};
use dualwrite_model::avro;
use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::lifecycle::{ControlEvent, MapState, MapStatus, Outcome};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::{self, Outgoing, Producer};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::now_micros;
use dualwrite_runtime::side::Inspect;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::resolving::Resolving;

/// Most candidate records one pass follows up (the rest wait for the next).
const MAX_CANDIDATES: usize = 10_000;

/// What the detector watches of one map.
pub struct Watched {
    pub status: watch::Receiver<MapStatus>,
    pub resolver: Arc<Mutex<Resolving>>,
}

/// Both records' rows as read at one time.
type Seen = BTreeMap<Key, (Option<Row>, Option<Row>)>;

/// Runs the detector until shutdown.
pub async fn run<I: Inspect>(
    config: Arc<Config>,
    maps: BTreeMap<String, Watched>,
    producer: Producer,
    shutdown: CancellationToken,
) {
    let every = Duration::from_secs(config.pause_buffer.drift.interval_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (name, watched) in &maps {
            if !running(watched) {
                continue;
            }
            let Some(map) = config.map(name) else {
                continue;
            };
            match check::<I>(&config, map, watched, &shutdown).await {
                Ok(Some(found)) => report(&config, &producer, name, &found).await,
                Ok(None) => return,
                Err(e) => tracing::warn!(map = %name, "drift check failed: {e}"),
            }
        }
    }
}

fn running(w: &Watched) -> bool {
    w.status.borrow().state == MapState::Running
}

/// One check of a map: the confirmed differences (`None` on shutdown).
async fn check<I: Inspect>(
    config: &Config,
    map: &MapConfig,
    watched: &Watched,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<(Key, dualwrite_drift::Finding)>>, String> {
    let mut left: I = connect(config, SideId::Left).await?;
    let mut right: I = connect(config, SideId::Right).await?;
    let Some(candidates) = pass(config, map, &mut left, &mut right, shutdown).await? else {
        return Ok(None);
    };
    let first = read(map, &mut left, &mut right, &candidates).await?;
    let differing: Vec<Key> = first
        .iter()
        .filter(|(_, (l, r))| compare(map, l.as_ref(), r.as_ref()).is_some())
        .map(|(k, _)| k.clone())
        .collect();
    if differing.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let confirm = Duration::from_secs(config.pause_buffer.drift.confirm_secs);
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        _ = tokio::time::sleep(confirm) => {}
    }
    let second = read(map, &mut left, &mut right, &differing).await?;
    let chosen = watched.status.borrow().conflict_master.clone();
    let master = config.run_master(map, chosen.as_deref());
    let resolver = watched.resolver.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Some(
        differing
            .into_iter()
            .filter(|k| first.get(k) == second.get(k) && running(watched))
            .filter(|k| resolver.settled(config, master, &key_json(k)))
            .filter_map(|k| {
                let (l, r) = second.get(&k)?;
                compare(map, l.as_ref(), r.as_ref()).map(|f| (k, f))
            })
            .collect(),
    ))
}

async fn connect<I: Inspect>(config: &Config, side: SideId) -> Result<I, String> {
    I::connect(config, side, "dualwrite-drift")
        .await
        .map_err(|e| e.message)
}

/// Reads both sides in key order, at most `rows_per_second` rows a
/// second per side; the keys whose rows differ (`None` on shutdown).
async fn pass<I: Inspect>(
    config: &Config,
    map: &MapConfig,
    left: &mut I,
    right: &mut I,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Key>>, String> {
    let d = &config.pause_buffer.drift;
    let chunk = d.chunk_rows as usize;
    let mut p = Pass::open(left, right, map, chunk)
        .await
        .map_err(|e| e.message)?;
    let started = tokio::time::Instant::now();
    let mut candidates = Vec::new();
    let mut seen = 0u64;
    while let Some(keys) = p.next(chunk).await.map_err(|e| e.message)? {
        seen += chunk as u64;
        candidates.extend(keys);
        candidates.truncate(MAX_CANDIDATES);
        if d.rows_per_second > 0 {
            let due = started + Duration::from_secs_f64(seen as f64 / d.rows_per_second as f64);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep_until(due) => {}
            }
        }
    }
    for (s, n) in [("left", p.rows[0]), ("right", p.rows[1])] {
        metrics()
            .drift_checked
            .with_label_values(&[&map.name, s])
            .inc_by(n);
    }
    p.close().await.map_err(|e| e.message)?;
    Ok(Some(candidates))
}

/// Both sides' rows of `keys`.
async fn read<I: Inspect>(
    map: &MapConfig,
    left: &mut I,
    right: &mut I,
    keys: &[Key],
) -> Result<Seen, String> {
    let l = read_rows(left, map, SideId::Left, keys)
        .await
        .map_err(|e| e.message)?;
    let r = read_rows(right, map, SideId::Right, keys)
        .await
        .map_err(|e| e.message)?;
    Ok(keys
        .iter()
        .map(|k| (k.clone(), (l.get(k).cloned(), r.get(k).cloned())))
        .collect())
}

/// Sets the metric and, when records differ, warns and publishes a DRIFT event.
async fn report(
    config: &Config,
    producer: &Producer,
    map: &str,
    found: &[(Key, dualwrite_drift::Finding)],
) {
    metrics()
        .drift_records
        .with_label_values(&[map])
        .set(found.len() as i64);
    if found.is_empty() {
        return;
    }
    let keys: Vec<String> = found.iter().take(20).map(|(k, _)| key_json(k)).collect();
    let message = format!(
        "{} record(s) of map {map} differ between the sides (first: {}); `dualwrite ctl repair {map}` re-asserts the conflict master's values",
        found.len(),
        keys.join(", ")
    );
    tracing::warn!(%map, records = found.len(), "{message}");
    let event = ControlEvent {
        command_id: None,
        outcome: Outcome::Drift,
        map: Some(map.to_owned()),
        state: None,
        maps: vec![map.to_owned()],
        message,
        at: now_micros(),
        sent_by: None,
    };
    let Ok(payload) = avro::encode(&event) else {
        return;
    };
    let out = Outgoing {
        topic: Topics::new(&config.kafka.topic_prefix).events(),
        key: map.to_owned(),
        payload,
    };
    if let Err(e) = kafka::send_all(producer, &[out]).await {
        tracing::warn!(%map, "cannot publish the drift event: {e}");
    }
}
