//! Where a row's latency goes: for each row of a latency run, the time at
//! which each stage produced its record (the Kafka record's timestamp,
//! set by the producing service) beside the row's source and target
//! times, and the median of each stage's share.
//!
//! Stages: **capture** (source commit to the capture record), **router**
//! (capture record to the map topic record), **resolver** (map topic
//! record to the apply topic record: the pause buffer's gate and
//! resolver) and **applier** (apply topic record to the row's arrival on
//! the target). Each includes the broker hop into it.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::{self};
use tokio_postgres::Client;

use crate::rows;
use crate::topic::key_id;

/// The median share of each stage, ms.
#[derive(Debug, Clone, Copy)]
pub struct Hops {
    pub capture: f64,
    pub router: f64,
    pub resolver: f64,
    pub applier: f64,
}

/// The first record's timestamp (epoch ms) of each row on `topic`.
async fn stamps(config: &Config, topic: String) -> Result<HashMap<String, i64>> {
    let cfg = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = HashMap::new();
        kafka::for_each_until_end(&cfg, &topic, &BTreeMap::new(), |m| {
            if let (Some(id), Some(ms)) = (m.key().and_then(key_id), m.timestamp().to_millis()) {
                out.entry(id).or_insert(ms);
            }
        })
        .with_context(|| format!("read {topic}"))?;
        Ok(out)
    })
    .await?
}

/// Each stage's median share for the rows whose id starts with `prefix`,
/// moving from the left side to the right through `map`.
pub async fn hops(config: &Config, map: &str, right: &Client, prefix: &str) -> Result<Hops> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let capture = stamps(config, t.capture(&config.side(SideId::Left).name)).await?;
    let mapped = stamps(config, t.map(map)).await?;
    let apply = stamps(config, t.apply(&config.side(SideId::Right).name)).await?;
    let rows = right
        .query(
            &format!(
                "SELECT id, (extract(epoch FROM made_at) * 1000)::float8, \
                        (extract(epoch FROM arrived_at) * 1000)::float8 \
                 FROM bench_items WHERE {}",
                rows::like(prefix)
            ),
            &[],
        )
        .await?;
    let mut shares: [Vec<f64>; 4] = Default::default();
    for r in &rows {
        let id: String = r.get(0);
        let (made, arrived): (f64, f64) = (r.get(1), r.get(2));
        let (Some(c), Some(m), Some(a)) = (capture.get(&id), mapped.get(&id), apply.get(&id))
        else {
            continue;
        };
        let (c, m, a) = (*c as f64, *m as f64, *a as f64);
        for (i, v) in [c - made, m - c, a - m, arrived - a]
            .into_iter()
            .enumerate()
        {
            shares[i].push(v);
        }
    }
    let [capture, router, resolver, applier] = shares.map(median);
    Ok(Hops {
        capture,
        router,
        resolver,
        applier,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
