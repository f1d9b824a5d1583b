//! `dualwrite ctl verify`: compares both sides of each map, after mapping.
//!
//! For every record (by alternate key) it reports records missing on one
//! side and records whose fields that sync both ways differ (with
//! `--one-way`, also the one-way fields: a side's local edit of a field the
//! other side owns is not synced back, so those may legitimately differ
//! until the owner changes the record). Values are compared as text, read
//! in UTC, after the field's transforms (a left value is compared, as the
//! field maps it, with the right one). Each map's tables are read whole,
//! one side at a time, through the side's [`Inspect`]. Only records in the
//! map's scope (filters, companies) are compared.

use std::collections::BTreeMap;

use dualwrite_drift::{key_json, reading};
use dualwrite_model::config::{Config, Direction, MapConfig, SideId};
use dualwrite_model::filter;
use dualwrite_model::record::Field;
use dualwrite_runtime::side::{Inspect, Payload, SideError};
use serde::Serialize;

/// What `verify` found for one map.
#[derive(Debug, Default, Serialize)]
pub struct MapReport {
    pub map: String,
    pub left_rows: usize,
    pub right_rows: usize,
    /// Keys (JSON arrays) present on the left only.
    pub only_left: Vec<String>,
    /// Keys present on the right only.
    pub only_right: Vec<String>,
    /// Keys whose mapped fields differ, with the first differing field.
    pub differing: Vec<Difference>,
}

#[derive(Debug, Serialize)]
pub struct Difference {
    pub key: String,
    pub left_field: String,
    pub right_field: String,
    pub left: Option<String>,
    pub right: Option<String>,
}

impl MapReport {
    pub fn is_equal(&self) -> bool {
        self.only_left.is_empty() && self.only_right.is_empty() && self.differing.is_empty()
    }
}

/// Prints the reports as JSON, or a line per map with up to `examples`
/// keys of each kind of difference.
pub fn print(
    reports: &[MapReport],
    json: bool,
    examples: usize,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string_pretty(reports)?);
    }
    for r in reports {
        writeln!(
            out,
            "map {}: {} left, {} right: {} only left, {} only right, {} differing{}",
            r.map,
            r.left_rows,
            r.right_rows,
            r.only_left.len(),
            r.only_right.len(),
            r.differing.len(),
            if r.is_equal() { " — equal" } else { "" }
        )?;
        for k in r.only_left.iter().take(examples) {
            writeln!(out, "  only left:  {k}")?;
        }
        for k in r.only_right.iter().take(examples) {
            writeln!(out, "  only right: {k}")?;
        }
        for d in r.differing.iter().take(examples) {
            writeln!(
                out,
                "  differs:    {} {} = {:?} / {} = {:?}",
                d.key, d.left_field, d.left, d.right_field, d.right
            )?;
        }
    }
    Ok(())
}

type Rows = BTreeMap<String, BTreeMap<String, Option<String>>>;

/// Rows read from the pass at a time.
const FETCH: usize = 1000;

async fn read_side<I: Inspect>(
    config: &Config,
    map: &MapConfig,
    side: SideId,
) -> Result<Rows, SideError> {
    let mut inspect = I::connect(config, side, "dualwrite-verify").await?;
    inspect.open_pass(&reading(map, side, false)).await?;
    let mut out = Rows::new();
    loop {
        let rows = inspect.fetch(FETCH).await?;
        let end = rows.len() < FETCH;
        for (key, payload) in rows {
            if let Payload::Row(row) = payload {
                out.insert(key_json(&key), row);
            }
        }
        if end {
            break;
        }
    }
    inspect.close_pass().await?;
    Ok(out)
}

/// Removes the rows outside the scope of `map` on `side` (filter,
/// companies); returns their keys. A row whose scope cannot be evaluated
/// is kept (and so reported if it differs).
fn out_of_scope(map: &MapConfig, side: SideId, rows: &mut Rows) -> Vec<String> {
    if !filter::is_scoped(map, side) {
        return Vec::new();
    }
    let mut out = Vec::new();
    rows.retain(|key, row| {
        let fields: Vec<Field> = row
            .iter()
            .map(|(n, v)| Field::new(n.clone(), v.clone()))
            .collect();
        let keep = !matches!(filter::matches(map, side, &fields), Ok(Some(false)));
        if !keep {
            out.push(key.clone());
        }
        keep
    });
    out
}

/// Compares one map's two sides: the fields that sync both ways, and with
/// `one_way` also the fields that sync in one direction.
pub async fn verify_map<I: Inspect>(
    config: &Config,
    map: &MapConfig,
    one_way: bool,
) -> Result<MapReport, SideError> {
    let mut left = read_side::<I>(config, map, SideId::Left).await?;
    let mut right = read_side::<I>(config, map, SideId::Right).await?;
    // Only records in the map's scope count: a record in scope on one side
    // with a row outside the scope on the other is left out (a copy kept
    // after it left the scope, or not yet synced into it).
    let (left_out, right_out) = (
        out_of_scope(map, SideId::Left, &mut left),
        out_of_scope(map, SideId::Right, &mut right),
    );
    for k in &left_out {
        right.remove(k);
    }
    for k in &right_out {
        left.remove(k);
    }
    let mut report = MapReport {
        map: map.name.clone(),
        left_rows: left.len(),
        right_rows: right.len(),
        ..MapReport::default()
    };
    for (key, l) in &left {
        let Some(r) = right.get(key) else {
            report.only_left.push(key.clone());
            continue;
        };
        for f in map
            .fields
            .iter()
            .filter(|f| one_way || f.direction == Direction::Both)
        {
            let (lv, rv) = (
                l.get(&f.left).cloned().flatten(),
                r.get(&f.right).cloned().flatten(),
            );
            // Compared after the field's transform (value map, conversion…).
            if !f.values_agree(lv.as_deref(), rv.as_deref()) {
                report.differing.push(Difference {
                    key: key.clone(),
                    left_field: f.left.clone(),
                    right_field: f.right.clone(),
                    left: lv,
                    right: rv,
                });
                break;
            }
        }
    }
    report.only_right = right
        .keys()
        .filter(|k| !left.contains_key(*k))
        .cloned()
        .collect();
    Ok(report)
}
