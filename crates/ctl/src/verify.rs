//! `dualwrite ctl verify`: compares both sides of each map, after mapping.
//!
//! For every record (by alternate key) it reports records missing on one
//! side and records whose fields that sync both ways differ (with
//! `--one-way`, also the one-way fields: a side's local edit of a field the
//! other side owns is not synced back, so those may legitimately differ
//! until the owner changes the record). Values are compared as text, read with `row_to_json`
//! in UTC. Each map's tables are read whole, one side at a time.

use std::collections::BTreeMap;

use dualwrite_model::config::{Config, Direction, MapConfig, SideId};
use dualwrite_runtime::pg;
use postgres_protocol::escape::escape_identifier;
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

type Rows = BTreeMap<String, BTreeMap<String, Option<String>>>;

async fn read_side(config: &Config, map: &MapConfig, side: SideId) -> Result<Rows, String> {
    let conn = &config.side(side).connection;
    let client = pg::connect(conn, "dualwrite-verify")
        .await
        .map_err(|e| format!("side {}: cannot connect: {e}", config.side(side).name))?;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .map_err(|e| pg::describe(&e))?;
    let entity = map.entity(side);
    let (schema, table) = entity
        .qualified()
        .split_once('.')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap_or_default();
    let cols: Vec<String> = map
        .fields
        .iter()
        .map(|f| escape_identifier(f.name(side)))
        .collect();
    let sql = format!(
        "SELECT {} FROM (SELECT {} FROM {}.{}) AS t",
        dualwrite_runtime::pg::ROW_AS_TEXT_JSON,
        cols.join(", "),
        escape_identifier(&schema),
        escape_identifier(&table)
    );
    let rows = client.query(&sql, &[]).await.map_err(|e| {
        format!(
            "side {}: {}: {}",
            config.side(side).name,
            entity.qualified(),
            pg::describe(&e)
        )
    })?;
    let mut out = Rows::new();
    for r in rows {
        let text: Option<String> = r.get(0);
        let obj: BTreeMap<String, Option<String>> = text
            .and_then(|t| serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&t).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.as_str().map(str::to_owned)))
            .collect();
        let key: Vec<Option<&str>> = entity
            .key
            .iter()
            .map(|k| obj.get(k).and_then(|v| v.as_deref()))
            .collect();
        out.insert(serde_json::to_string(&key).unwrap_or_default(), obj);
    }
    Ok(out)
}

/// Compares one map's two sides.
/// Compares one map's two sides: the fields that sync both ways, and with
/// `one_way` also the fields that sync in one direction.
pub async fn verify_map(
    config: &Config,
    map: &MapConfig,
    one_way: bool,
) -> Result<MapReport, String> {
    let left = read_side(config, map, SideId::Left).await?;
    let right = read_side(config, map, SideId::Right).await?;
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
            if lv != rv {
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
