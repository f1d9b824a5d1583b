//! Compares the two sides of a map: a pass reads both tables in key order
//! (one cursor per side, a snapshot each) and merges them, `chunk` keys at
//! a time, without holding a table in memory. Where the map's both-way
//! fields pass values unchanged and it has no scope, each side sends only
//! a hash of each row's compared values (the rows of keys whose hashes
//! differ are then read and compared); otherwise the rows themselves.
//!
//! Rows are compared as `ctl verify` does: the fields that sync both ways,
//! as text after the field's transform, records in the map's scope only.

use std::collections::{BTreeMap, VecDeque};

use dualwrite_model::config::{Direction, MapConfig, SideId};
use dualwrite_model::filter;
use dualwrite_model::record::Field;
use dualwrite_runtime::side::{Inspect, Payload, Reading, SideError};
use serde::Serialize;

pub use dualwrite_runtime::side::{TextKey as Key, TextRow as Row};

/// How a record differs between the sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Finding {
    OnlyLeft,
    OnlyRight,
    /// The first field that differs.
    Differs {
        left_field: String,
        right_field: String,
        left: Option<String>,
        right: Option<String>,
    },
}

const SIDES: [SideId; 2] = [SideId::Left, SideId::Right];

fn ix(side: SideId) -> usize {
    match side {
        SideId::Left => 0,
        SideId::Right => 1,
    }
}

/// The key as JSON (the form of the topics' record keys).
pub fn key_json(key: &Key) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

/// The columns read on `side`: the key, the fields with a column there,
/// the columns the map's scope reads.
fn columns(map: &MapConfig, side: SideId) -> Vec<String> {
    let mut cols: Vec<String> = map.entity(side).key.clone();
    let fields = map
        .fields
        .iter()
        .filter(|f| f.has_column(side))
        .map(|f| f.name(side).to_owned());
    for c in fields.chain(filter::scope_columns(map, side)) {
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    cols
}

/// Whether a side's rows can be compared by a hash of their text: the
/// both-way fields pass values unchanged and the map has no scope.
pub fn hashable(map: &MapConfig) -> bool {
    map.fields
        .iter()
        .filter(|f| f.direction == Direction::Both)
        .all(|f| {
            f.transform.is_identity() && f.has_column(SideId::Left) && f.has_column(SideId::Right)
        })
        && SIDES.iter().all(|&s| !filter::is_scoped(map, s))
}

/// What a comparison reads of `map` on `side`: hashes of the both-way
/// fields' values where [`hashable`] (and `hashes` asked), else the rows.
pub fn reading(map: &MapConfig, side: SideId, hashes: bool) -> Reading {
    let hashed = (hashes && hashable(map)).then(|| {
        map.fields
            .iter()
            .filter(|f| f.direction == Direction::Both)
            .map(|f| f.name(side).to_owned())
            .collect()
    });
    Reading {
        table: map.entity(side).qualified(),
        key: map.entity(side).key.clone(),
        columns: columns(map, side),
        hashed,
    }
}

/// One pass over a map's two sides.
pub struct Pass<'a, I: Inspect> {
    sides: [&'a mut I; 2],
    map: &'a MapConfig,
    buffers: [VecDeque<(Key, Payload)>; 2],
    exhausted: [bool; 2],
    fetch: usize,
    /// Rows read per side.
    pub rows: [u64; 2],
}

impl<'a, I: Inspect> Pass<'a, I> {
    /// Opens a snapshot on each side, read `fetch` rows at a time.
    pub async fn open(
        left: &'a mut I,
        right: &'a mut I,
        map: &'a MapConfig,
        fetch: usize,
    ) -> Result<Pass<'a, I>, SideError> {
        let sides = [left, right];
        for s in SIDES {
            sides[ix(s)].open_pass(&reading(map, s, true)).await?;
        }
        Ok(Pass {
            sides,
            map,
            buffers: Default::default(),
            exhausted: [false, false],
            fetch: fetch.max(1),
            rows: [0, 0],
        })
    }

    /// Ends the pass (the snapshots).
    pub async fn close(self) -> Result<(), SideError> {
        for side in self.sides {
            side.close_pass().await?;
        }
        Ok(())
    }

    async fn refill(&mut self, side: SideId) -> Result<(), SideError> {
        let i = ix(side);
        if self.exhausted[i] || !self.buffers[i].is_empty() {
            return Ok(());
        }
        let rows = self.sides[i].fetch(self.fetch).await?;
        self.exhausted[i] = rows.len() < self.fetch;
        self.rows[i] += rows.len() as u64;
        self.buffers[i].extend(rows);
        Ok(())
    }

    /// Merges up to `n` records and returns those that differ (in hashed
    /// mode, whose hashes differ: [`compare_rows`] of their rows decides).
    /// `None` when both sides are read to the end.
    pub async fn next(&mut self, n: usize) -> Result<Option<Vec<Key>>, SideError> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < n {
            self.refill(SideId::Left).await?;
            self.refill(SideId::Right).await?;
            let (l, r) = (self.buffers[0].front(), self.buffers[1].front());
            let take = match (l, r) {
                (None, None) => break,
                (Some(_), None) => [true, false],
                (None, Some(_)) => [false, true],
                (Some((lk, _)), Some((rk, _))) => [lk <= rk, rk <= lk],
            };
            let left = take[0].then(|| self.buffers[0].pop_front()).flatten();
            let right = take[1].then(|| self.buffers[1].pop_front()).flatten();
            seen += 1;
            if let Some(key) = self.differs(left, right) {
                out.push(key);
            }
        }
        if seen == 0 {
            return Ok(None);
        }
        Ok(Some(out))
    }

    fn differs(&self, left: Option<(Key, Payload)>, right: Option<(Key, Payload)>) -> Option<Key> {
        match (left, right) {
            (Some((k, Payload::Hash(a))), Some((_, Payload::Hash(b)))) => (a != b).then_some(k),
            (Some((k, Payload::Row(a))), Some((_, Payload::Row(b)))) => {
                compare(self.map, Some(&a), Some(&b)).map(|_| k)
            }
            (Some((k, Payload::Row(a))), None) => compare(self.map, Some(&a), None).map(|_| k),
            (None, Some((k, Payload::Row(b)))) => compare(self.map, None, Some(&b)).map(|_| k),
            (Some((k, _)), _) | (_, Some((k, _))) => Some(k),
            (None, None) => None,
        }
    }
}

/// Whether `row` is in the map's scope on `side` (a row whose scope cannot
/// be evaluated counts as in it).
fn in_scope(map: &MapConfig, side: SideId, row: &Row) -> bool {
    if !filter::is_scoped(map, side) {
        return true;
    }
    let fields: Vec<Field> = row
        .iter()
        .map(|(n, v)| Field::new(n.clone(), v.clone()))
        .collect();
    !matches!(filter::matches(map, side, &fields), Ok(Some(false)))
}

/// How a record's two rows differ (`None`: they agree). Only records in
/// the map's scope count: a record out of scope on either side is left
/// out (a copy kept after it left the scope, or not yet synced into it).
pub fn compare(map: &MapConfig, left: Option<&Row>, right: Option<&Row>) -> Option<Finding> {
    if left.is_some_and(|l| !in_scope(map, SideId::Left, l))
        || right.is_some_and(|r| !in_scope(map, SideId::Right, r))
    {
        return None;
    }
    let (l, r) = match (left, right) {
        (None, None) => return None,
        (Some(_), None) => return Some(Finding::OnlyLeft),
        (None, Some(_)) => return Some(Finding::OnlyRight),
        (Some(l), Some(r)) => (l, r),
    };
    map.fields
        .iter()
        .filter(|f| f.direction == Direction::Both)
        .find_map(|f| {
            let (lv, rv) = (
                l.get(&f.left).cloned().flatten(),
                r.get(&f.right).cloned().flatten(),
            );
            (!f.values_agree(lv.as_deref(), rv.as_deref())).then(|| Finding::Differs {
                left_field: f.left.clone(),
                right_field: f.right.clone(),
                left: lv,
                right: rv,
            })
        })
}

/// The rows of `keys` on `side` (compared columns, as text); keys without
/// a row are left out.
pub async fn read_rows<I: Inspect>(
    inspect: &mut I,
    map: &MapConfig,
    side: SideId,
    keys: &[Key],
) -> Result<BTreeMap<Key, Row>, SideError> {
    inspect.read_rows(&reading(map, side, false), keys).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::{Config, TEST_SIDES};

    fn config(extra: &str) -> Config {
        Config::parse(
            &[
                TEST_SIDES,
                r#"
[[map]]
name = "customers"
left = { entity = "customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "name", right = "name" },
  { left = "creditlimit", right = "creditlimit", direction = "left_to_right" },
"#,
                extra,
                "]\n",
            ]
            .concat(),
        )
        .unwrap()
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn both_way_fields_are_compared_after_their_transform() {
        let c = config(
            r#"  { left = "status", right = "statecode", value_map = { Active = "0", Closed = "1" } },"#,
        );
        let m = &c.maps[0];
        assert!(!hashable(m));
        let l = row(&[
            ("customeraccount", Some("C1")),
            ("name", Some("A")),
            ("creditlimit", Some("1")),
            ("status", Some("Active")),
        ]);
        let mut r = row(&[
            ("accountnumber", Some("C1")),
            ("name", Some("A")),
            ("creditlimit", Some("2")),
            ("statecode", Some("0")),
        ]);
        // The one-way field differs: not drift (its owner side wins it).
        assert_eq!(compare(m, Some(&l), Some(&r)), None);
        r.insert("statecode".into(), Some("1".into()));
        assert!(
            matches!(compare(m, Some(&l), Some(&r)), Some(Finding::Differs { ref left_field, .. }) if left_field == "status")
        );
        assert_eq!(compare(m, Some(&l), None), Some(Finding::OnlyLeft));
        assert_eq!(compare(m, None, Some(&r)), Some(Finding::OnlyRight));
        assert_eq!(compare(m, None, None), None);
    }

    #[test]
    fn passes_read_hashes_of_the_both_way_fields_where_they_compare() {
        let c = config("");
        let m = &c.maps[0];
        assert!(hashable(m));
        let r = reading(m, SideId::Right, true);
        assert_eq!(r.table, "public.accounts");
        assert_eq!(r.key, ["accountnumber"]);
        assert_eq!(r.columns, ["accountnumber", "name", "creditlimit"]);
        assert_eq!(
            r.hashed.as_deref(),
            Some(&["accountnumber".to_owned(), "name".to_owned()][..])
        );
        assert_eq!(reading(m, SideId::Right, false).hashed, None);
        assert_eq!(key_json(&vec!["C1".into()]), "[\"C1\"]");
    }
}
