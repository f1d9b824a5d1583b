//! `dualwrite ctl repair MAP [--key K]…`: re-asserts the conflict master's
//! values of records that differ between the sides, through the pipeline.
//!
//! For each record it reads the position of each side's WAL, then both
//! rows, and sends a REPAIR event to the map's topic: the resolver makes
//! the master's row the record's agreed content and writes it to the other
//! side only if that side still has the row the repair read (so a newer
//! change is never overwritten), and only when no write of the record is on
//! its way and neither side wrote it after the read (the repair is then
//! left out: run it again once the record is settled). Without keys, every
//! record found different by a full comparison is repaired.

use std::time::Duration;

use dualwrite_drift::{compare, key_json, read_rows, Key, Pass, Row};
use dualwrite_model::avro;
use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::mapping::{into_columns, map_change};
use dualwrite_model::record::{
    ApplyOp, ChangeOp, ChangeRecord, Field, MappedChange, Observed, Repair,
};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::{self as kafka_rt, Outgoing};
use dualwrite_runtime::side::Inspect;
use serde::Serialize;

/// What a repair did.
#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub map: String,
    /// The side whose values were re-asserted: the conflict master the
    /// map runs with.
    pub master: String,
    /// Records that differed when read, for which a repair was sent.
    pub sent: Vec<String>,
    /// Records found equal (nothing to repair).
    pub equal: usize,
    /// Of those sent, records equal on both sides when the wait ended.
    pub repaired: Vec<String>,
}

const SIDES: [SideId; 2] = [SideId::Left, SideId::Right];

/// Prints what a repair did, as JSON or as lines.
pub fn print(r: &RepairReport, json: bool, out: &mut impl std::io::Write) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string_pretty(r)?);
    }
    writeln!(
        out,
        "map {}: {} record(s) repaired of {} sent, to {}'s values (the conflict master it runs with); {} already equal",
        r.map,
        r.repaired.len(),
        r.sent.len(),
        r.master,
        r.equal
    )?;
    for k in r.sent.iter().filter(|k| !r.repaired.contains(k)) {
        writeln!(
            out,
            "  still differs: {k} (a write of it may be on its way: run again once settled)"
        )?;
    }
    Ok(())
}

/// Repairs `keys` (JSON arrays, as `ctl verify` prints them), or every
/// differing record, to the values of `master` (the side the map runs
/// with as conflict master: the resolver makes a repair for it only), and
/// waits up to `wait` for the sides to agree.
pub async fn repair<I: Inspect>(
    config: &Config,
    map: &MapConfig,
    master: SideId,
    keys: &[String],
    wait: Duration,
) -> Result<RepairReport, String> {
    let mut sides: [I; 2] = [
        connect(config, SideId::Left).await?,
        connect(config, SideId::Right).await?,
    ];
    let keys: Vec<Key> = if keys.is_empty() {
        differing(map, &mut sides).await?
    } else {
        keys.iter()
            .map(|k| {
                serde_json::from_str(k)
                    .map_err(|e| format!("key {k}: not a JSON array of strings: {e}"))
            })
            .collect::<Result<_, _>>()?
    };
    let mut report = RepairReport {
        map: map.name.clone(),
        master: config.side(master).name.clone(),
        ..RepairReport::default()
    };
    let mut events = Vec::new();
    for key in keys {
        let (lsns, rows) = observe(map, &mut sides, &key).await?;
        if compare(map, rows[0].as_ref(), rows[1].as_ref()).is_none() {
            report.equal += 1;
            continue;
        }
        let event = repair_event(config, map, master, &key, lsns, &rows)?;
        events.push(event);
        report.sent.push(key_json(&key));
    }
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        kafka_rt::produce_blocking(&kafka, "dualwrite-ctl", &events, Duration::from_secs(60))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    report.repaired = wait_equal(map, &mut sides, &report.sent, wait).await?;
    Ok(report)
}

async fn connect<I: Inspect>(config: &Config, side: SideId) -> Result<I, String> {
    I::connect(config, side, "dualwrite-repair")
        .await
        .map_err(|e| e.message)
}

/// Every record that differs, by a full comparison.
async fn differing<I: Inspect>(map: &MapConfig, sides: &mut [I; 2]) -> Result<Vec<Key>, String> {
    let [left, right] = sides;
    let mut pass = Pass::open(left, right, map, 1000)
        .await
        .map_err(|e| e.message)?;
    let mut keys = Vec::new();
    while let Some(k) = pass.next(1000).await.map_err(|e| e.message)? {
        keys.extend(k);
    }
    pass.close().await.map_err(|e| e.message)?;
    Ok(keys)
}

/// Each side's change stream position, then its row of `key` (read after
/// the position: a write not seen by the read is after it).
async fn observe<I: Inspect>(
    map: &MapConfig,
    sides: &mut [I; 2],
    key: &Key,
) -> Result<([i64; 2], [Option<Row>; 2]), String> {
    let mut lsns = [0i64; 2];
    let mut rows: [Option<Row>; 2] = [None, None];
    for (i, s) in SIDES.into_iter().enumerate() {
        lsns[i] = sides[i].position().await.map_err(|e| e.message)? as i64;
        rows[i] = read_rows(&mut sides[i], map, s, std::slice::from_ref(key))
            .await
            .map_err(|e| e.message)?
            .remove(key);
    }
    Ok((lsns, rows))
}

/// `side`'s values of the columns the other side writes into it.
fn own(map: &MapConfig, side: SideId, row: &Row) -> Vec<Field> {
    let mut names: Vec<&str> = map.entity(side).key.iter().map(String::as_str).collect();
    names.extend(into_columns(map, side).filter(|n| !map.entity(side).key.iter().any(|k| k == n)));
    names
        .into_iter()
        .filter_map(|n| row.get(n).map(|v| Field::new(n, v.clone())))
        .collect()
}

/// The REPAIR event of one record, for the map's topic.
fn repair_event(
    config: &Config,
    map: &MapConfig,
    master: SideId,
    key: &Key,
    lsns: [i64; 2],
    rows: &[Option<Row>; 2],
) -> Result<Outgoing, String> {
    let other = master.other();
    let mi = if master == SideId::Left { 0 } else { 1 };
    let master_values = match &rows[mi] {
        Some(row) => {
            let change = ChangeRecord {
                side: config.side(master).name.clone(),
                entity: map.entity(master).qualified(),
                op: ChangeOp::Insert,
                before: None,
                after: Some(
                    row.iter()
                        .map(|(n, v)| Field::new(n.clone(), v.clone()))
                        .collect(),
                ),
                commit_lsn: lsns[mi],
                seq: 0,
                xid: 0,
                applied: None,
                moved: None,
                commit_time: 0,
            };
            map_change(config, map, master, &change)
                .map_err(|e| e.to_string())?
                .pop()
                .map(|mc| mc.values)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let observed = SIDES
        .iter()
        .enumerate()
        .map(|(i, &s)| Observed {
            side: config.side(s).name.clone(),
            lsn: lsns[i],
            present: rows[i].is_some(),
            own: rows[i].as_ref().map(|r| own(map, s, r)).unwrap_or_default(),
        })
        .collect();
    let mc = MappedChange {
        map: map.name.clone(),
        source_side: config.side(master).name.clone(),
        target_side: config.side(other).name.clone(),
        source_entity: map.entity(master).qualified(),
        target_entity: map.entity(other).qualified(),
        op: ApplyOp::Repair,
        key: map
            .entity(other)
            .key
            .iter()
            .zip(key)
            .map(|(n, v)| Field::new(n.clone(), Some(v.clone())))
            .collect(),
        values: Vec::new(),
        source_lsn: lsns[mi],
        source_seq: i32::MAX,
        source_xid: 0,
        commit_time: dualwrite_runtime::now_micros(),
        before: None,
        existed: true,
        conflict_master: Some(config.side(master).name.clone()),
        own: Vec::new(),
        version: 0,
        repair: Some(Repair {
            observed,
            master_values,
        }),
        moved: Vec::new(),
    };
    Ok(Outgoing {
        topic: Topics::new(&config.kafka.topic_prefix).map(&map.name),
        key: mc.kafka_key(),
        payload: avro::encode(&mc).map_err(|e| e.to_string())?,
    })
}

/// Waits until the records agree on both sides or `wait` passed; the keys that agree.
async fn wait_equal<I: Inspect>(
    map: &MapConfig,
    sides: &mut [I; 2],
    keys: &[String],
    wait: Duration,
) -> Result<Vec<String>, String> {
    let keys: Vec<Key> = keys
        .iter()
        .filter_map(|k| serde_json::from_str(k).ok())
        .collect();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut agree = Vec::new();
        let l = read_rows(&mut sides[0], map, SideId::Left, &keys)
            .await
            .map_err(|e| e.message)?;
        let r = read_rows(&mut sides[1], map, SideId::Right, &keys)
            .await
            .map_err(|e| e.message)?;
        for k in &keys {
            if compare(map, l.get(k), r.get(k)).is_none() {
                agree.push(key_json(k));
            }
        }
        if agree.len() == keys.len() || tokio::time::Instant::now() >= deadline {
            return Ok(agree);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
