//! SQL of the applier: the compare-and-set check, the write (an upsert or a
//! delete by alternate key) and the bookkeeping, each one statement over a
//! run of writes of one shape (see `Target`).
//!
//! Values travel as text, a run's values as one text array per column,
//! unnested into rows; each is cast to its column's type ([`ColumnTypes`]),
//! so it goes through the type's own input function (as the initial
//! sync's copy writes them), and comparisons are made in the column types
//! (`1.50` equals `1.5` in a numeric column). The insert applies the
//! column's modifier, so a text too long for a `varchar(n)` is refused,
//! not cut.

use std::collections::HashMap;

use dualwrite_model::record::{ApplyWrite, Field, WriteOp};
use postgres_protocol::escape::escape_identifier;

pub use crate::pg::table_ident;

/// Bookkeeping on each target, per map and record: the version of the
/// applier's last write, the row version (`xmin`) it left and whether the
/// row is there (a write whose expectation is "the applier's write of
/// version v, unchanged since" checks these), and the latest version
/// decided, written or superseded (a write of that version or an older
/// one is a redelivery, never decided again; `version` is 0 while no write
/// was made). `decided` came after the table: added where it lacks.
///
/// Sent as one simple query, so it runs as one transaction; the advisory
/// lock serialises appliers starting at once (`CREATE … IF NOT EXISTS`
/// alone races: two sessions can both decide to create and one fails on
/// the catalog's unique index).
pub const VERSIONS_DDL: &str = "SELECT pg_advisory_xact_lock(hashtext('dualwrite.ddl'));
CREATE SCHEMA IF NOT EXISTS dualwrite;
CREATE TABLE IF NOT EXISTS dualwrite.record_versions (
    map         text    NOT NULL,
    record_key  text    NOT NULL,
    version     bigint  NOT NULL,
    row_xmin    text,
    present     boolean NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    decided     bigint,
    PRIMARY KEY (map, record_key)
);
ALTER TABLE dualwrite.record_versions ADD COLUMN IF NOT EXISTS decided bigint";

/// The applier's session. Its statements match a run's keys (at most a
/// few thousand) with tables of any size, so one index probe per key is
/// the plan, however large the table grows:
/// - a plan per execution: the statements are prepared once, while the
///   tables may still be small (a cached generic plan scanned the
///   bookkeeping whole once it had grown);
/// - no hash or merge joins: given the exact row count of a run's
///   `unnest`, the planner took a hash join over a sequential scan of the
///   whole target table for the check and the delete, up to about 100,000
///   rows (a catch-up of 200,000 rows spent 28 % more of PostgreSQL's CPU;
///   BENCHMARKS.md). Every key a statement matches has an index: the
///   upsert's `ON CONFLICT` needs one on the key, the bookkeeping's is
///   its primary key.
pub const SESSION: &str = "SET standard_conforming_strings = on;
SET plan_cache_mode = force_custom_plan;
SET enable_hashjoin = off;
SET enable_mergejoin = off";

/// Rows removed per statement (short transactions, short locks).
pub const PRUNE_BATCH: i64 = 10_000;

/// Removes up to `$2` rows of records deleted more than `$1` seconds ago.
pub const PRUNE: &str = "DELETE FROM dualwrite.record_versions r USING (
  SELECT map, record_key FROM dualwrite.record_versions
   WHERE NOT present AND applied_at < now() - make_interval(secs => $1)
   LIMIT $2) old
 WHERE r.map = old.map AND r.record_key = old.record_key
   AND NOT r.present AND r.applied_at < now() - make_interval(secs => $1)";

/// The bookkeeping of records of one map (`$1`), keys `$2`, locked.
///
/// One index probe per key, whatever the planner thinks: matched with
/// `record_key = ANY($2)`, or joined with the keys, a batch of 2,000 keys
/// among 200,000 records was read by a sequential scan of the whole
/// table (30-47 ms a batch, growing with the table; probes: 10-25 ms;
/// BENCHMARKS.md). A lateral subquery with `OFFSET 0` is not flattened
/// into a join, so each key is looked up on its own.
pub const VERSIONS: &str = "SELECT r.record_key, r.version, r.row_xmin, r.present, r.decided \
 FROM unnest($2::text[]) AS k(record_key) \
 CROSS JOIN LATERAL (SELECT * FROM dualwrite.record_versions AS v \
   WHERE v.map = $1 AND v.record_key = k.record_key OFFSET 0 FOR UPDATE) AS r";

/// Records the writes made (`$2` keys, `$3` versions, `$4` presence) of
/// map `$1` (a present row's version is this transaction's) and the writes
/// superseded (`$5` keys, `$6` versions: decided, nothing else changes);
/// gives how many records it wrote. One statement: the bookkeeping is
/// data-modifying `WITH`s, which run whether or not they are read (a
/// record occurs once per statement, so they do not meet). The reports
/// follow ([`REPORT`]), under the other origin.
pub const RECORD: &str = "WITH recorded AS (
INSERT INTO dualwrite.record_versions AS r (map, record_key, version, row_xmin, present, decided)
SELECT $1, u.k, u.v, CASE WHEN u.p THEN pg_current_xact_id()::xid::text END, u.p, u.v
  FROM unnest($2::text[], $3::int8[], $4::bool[]) AS u(k, v, p)
ON CONFLICT (map, record_key) DO UPDATE
   SET version = EXCLUDED.version, row_xmin = EXCLUDED.row_xmin, present = EXCLUDED.present,
       decided = EXCLUDED.decided, applied_at = now()
RETURNING 1),
passed AS (
INSERT INTO dualwrite.record_versions AS r (map, record_key, version, present, decided)
SELECT $1, u.k, 0, false, u.v FROM unnest($5::text[], $6::int8[]) AS u(k, v)
ON CONFLICT (map, record_key) DO UPDATE SET decided = EXCLUDED.decided
RETURNING 1)
SELECT (SELECT count(*) FROM recorded) + (SELECT count(*) FROM passed)";

/// Reports every write made or superseded (`$1`, JSON texts: [`ack`],
/// [`ack_moved`]), one transactional logical message each (sent with the
/// commit, or not at all): the side's capturer passes them on, in their
/// place among the side's own writes.
pub const REPORT: &str =
    "SELECT count(pg_logical_emit_message(true, 'dualwrite.ack', a)) FROM unnest($1::text[]) AS a";

/// Puts the session under replication origin `origin`, from any origin or
/// none: the statements the applier's writes and reports switch with
/// (`target.rs`). The name is a literal: standard conforming strings are
/// PostgreSQL's default, and [`SESSION`] sets them.
pub fn use_origin(origin: &str) -> String {
    format!(
        "SELECT pg_replication_origin_session_reset() WHERE pg_replication_origin_session_is_setup();
SELECT pg_replication_origin_session_setup('{}')",
        origin.replace('\'', "''")
    )
}

/// A target table's column types (name → type, as `format_type` names it
/// without its modifier): a value's text is cast to its column's type,
/// and the column's modifier applies when it is stored. A json or jsonb
/// column takes the text of the document, as every other column its text.
#[derive(Debug, Clone, Default)]
pub struct ColumnTypes(HashMap<String, String>);

impl ColumnTypes {
    pub fn new(columns: impl IntoIterator<Item = (String, String)>) -> ColumnTypes {
        ColumnTypes(columns.into_iter().collect())
    }

    /// `text`, an expression of type text, cast to column `name`'s type
    /// (left as text for a column the table lacks: the statement fails
    /// naming it).
    fn cast(&self, text: &str, name: &str) -> String {
        match self.0.get(name) {
            Some(ty) => format!("{text}::{ty}"),
            None => text.to_owned(),
        }
    }
}

/// Rows made of text arrays, one per column of `names`, from parameter
/// `$first` on: `unnest($1::text[], …) AS u(c1, …)`, with the row's
/// 1-based position as `u.i` when `ordinality`. The columns are named by
/// position, so no table's column name can meet `i`.
struct Rows<'a> {
    names: &'a [&'a str],
    alias: &'a str,
}

impl Rows<'_> {
    fn from(&self, first: usize, ordinality: bool) -> String {
        let n = self.names.len();
        let arrays: Vec<String> = (first..first + n)
            .map(|i| format!("${i}::text[]"))
            .collect();
        let mut cols: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
        if ordinality {
            cols.push("i".to_owned());
        }
        format!(
            "unnest({}){} AS {}({})",
            arrays.join(", "),
            if ordinality { " WITH ORDINALITY" } else { "" },
            self.alias,
            cols.join(", ")
        )
    }

    /// Column `name` of these rows as a value of its column's type.
    fn field(&self, name: &str, types: &ColumnTypes) -> String {
        let at = self
            .names
            .iter()
            .position(|n| *n == name)
            .map_or(0, |i| i + 1);
        types.cast(&format!("{}.c{at}", self.alias), name)
    }
}

/// The parameters of [`Rows`]: for each of `names`, the values of the
/// field of that name in each write (the last of that name in
/// `fields(write)`; null when it has none), as one text array.
pub fn arrays<'a, F, I>(
    writes: &[&'a ApplyWrite],
    names: &[&str],
    fields: F,
) -> Vec<Vec<Option<&'a str>>>
where
    F: Fn(&'a ApplyWrite) -> I,
    I: Iterator<Item = &'a Field>,
{
    let mut out = vec![Vec::with_capacity(writes.len()); names.len()];
    for w in writes {
        let mut row: Vec<Option<&'a str>> = vec![None; names.len()];
        for f in fields(w) {
            if let Some(at) = names.iter().position(|n| *n == f.name) {
                row[at] = f.value.as_deref();
            }
        }
        for (column, value) in out.iter_mut().zip(row) {
            column.push(value);
        }
    }
    out
}

/// The report of one write (see [`crate::wal2json::Ack`]):
/// made, or not (superseded: the target was not in the expected state).
pub fn ack(w: &ApplyWrite, written: bool) -> String {
    ack_value(w, written).to_string()
}

fn ack_value(w: &ApplyWrite, written: bool) -> serde_json::Value {
    serde_json::json!({
        "map": w.map,
        "entity": w.target_entity,
        "key": w.key.iter().map(|f| f.value.clone()).collect::<Vec<_>>(),
        "version": w.version,
        "written": written,
    })
}

/// The report of a delete made as a move: `moved_to` is the row as moved,
/// a JSON object of column text values ([`move_row`]'s result).
pub fn ack_moved(w: &ApplyWrite, moved_to: &str) -> String {
    let mut ack = ack_value(w, true);
    if let Ok(row) = serde_json::from_str::<serde_json::Value>(moved_to) {
        ack["moved_to"] = row;
    }
    ack.to_string()
}

/// `t.k = $first::text::type AND …` over the key columns of `w`, each
/// compared with one text parameter from `$first` on.
fn key_is(w: &ApplyWrite, t: &str, first: usize, types: &ColumnTypes) -> String {
    w.key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let value = types.cast(&format!("${}::text", first + i), &k.name);
            format!("{t}.{} = {value}", escape_identifier(&k.name))
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Whether a row has the old key of a key change (its values, one
/// parameter each: [`moved_values`]).
pub fn key_exists(w: &ApplyWrite, types: &ColumnTypes) -> String {
    let table = table_ident(&w.target_entity);
    format!(
        "SELECT EXISTS (SELECT 1 FROM {table} AS t WHERE {})",
        key_is(w, "t", 1, types)
    )
}

/// Moves the record's row (its key: the first key's worth of parameters)
/// to the new key (the next ones) if no row has it, values untouched;
/// returns the row as moved, as a JSON object of column text values (no
/// row: not moved). Parameters: [`key_values`], then [`moved_values`].
pub fn move_row(w: &ApplyWrite, types: &ColumnTypes) -> String {
    let table = table_ident(&w.target_entity);
    let n = w.key.len();
    let set: Vec<String> = w
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let value = types.cast(&format!("${}::text", n + 1 + i), &k.name);
            format!("{} = {value}", escape_identifier(&k.name))
        })
        .collect();
    format!(
        "UPDATE {table} AS t SET {set} \
         WHERE {old} AND NOT EXISTS (SELECT 1 FROM {table} AS x WHERE {new}) \
         RETURNING (SELECT json_object_agg(c.key, c.value) FROM json_each_text(row_to_json(t)) AS c)::text",
        set = set.join(", "),
        old = key_is(w, "t", 1, types),
        new = key_is(w, "x", n + 1, types),
    )
}

/// The values of the record's key, in key order.
pub fn key_values(w: &ApplyWrite) -> Vec<Option<&str>> {
    w.key.iter().map(|f| f.value.as_deref()).collect()
}

/// The values of a key change's other key, in key order (it travels as
/// its values in key order), one per key column (null for one it lacks).
pub fn moved_values(w: &ApplyWrite) -> Vec<Option<&str>> {
    (0..w.key.len())
        .map(|i| w.moved.get(i).and_then(|f| f.value.as_deref()))
        .collect()
}

/// The columns [`rows_check`] reads: the key, then those compared (each once).
pub fn check_names<'a>(w: &'a ApplyWrite, compare: &'a [String]) -> Vec<&'a str> {
    distinct(
        w.key
            .iter()
            .map(|f| f.name.as_str())
            .chain(compare.iter().map(String::as_str)),
    )
}

/// Locks the target rows of a run's writes and returns, for each write
/// whose record is there, its 1-based position in the run, the row
/// version (`xmin`), and whether the row's columns `compare` equal the
/// expected values (in the column types; true when `compare` is empty).
/// Parameters: [`arrays`] of [`check_names`] over each write's key and
/// expected values.
pub fn rows_check(w: &ApplyWrite, compare: &[String], types: &ColumnTypes) -> String {
    let table = table_ident(&w.target_entity);
    let names = check_names(w, compare);
    let e = Rows {
        names: &names,
        alias: "e",
    };
    let same = if compare.is_empty() {
        "true".to_owned()
    } else {
        let t: Vec<String> = compare
            .iter()
            .map(|c| format!("t.{}::text", escape_identifier(c)))
            .collect();
        let v: Vec<String> = compare
            .iter()
            .map(|c| format!("{}::text", e.field(c, types)))
            .collect();
        format!(
            "ROW({}) IS NOT DISTINCT FROM ROW({})",
            t.join(", "),
            v.join(", ")
        )
    };
    format!(
        "SELECT e.i, t.xmin::text, {same} FROM {} JOIN {table} AS t ON {} FOR UPDATE OF t",
        e.from(1, true),
        key_match(w, &e, types),
    )
}

/// `t.k = e.ck::type AND …` over the key columns of `w`.
fn key_match(w: &ApplyWrite, e: &Rows, types: &ColumnTypes) -> String {
    w.key
        .iter()
        .map(|k| {
            format!(
                "t.{} = {}",
                escape_identifier(&k.name),
                e.field(&k.name, types)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The columns the set-based write of `w`'s run names: an upsert's key
/// then values (each once), a delete's key.
pub fn write_names(w: &ApplyWrite) -> Vec<&str> {
    let key = w.key.iter().map(|f| f.name.as_str());
    match w.op {
        WriteOp::Upsert => distinct(key.chain(w.values.iter().map(|f| f.name.as_str()))),
        WriteOp::Delete => distinct(key),
    }
}

/// The set-based write of a run (same table, operation and field names,
/// each record once): one statement over [`arrays`] of [`write_names`]
/// over each write's key and values.
pub fn statement_many(w: &ApplyWrite, types: &ColumnTypes) -> String {
    let table = table_ident(&w.target_entity);
    let names = write_names(w);
    let r = Rows {
        names: &names,
        alias: "r",
    };
    match w.op {
        WriteOp::Upsert => {
            let keys: Vec<String> = w.key.iter().map(|f| escape_identifier(&f.name)).collect();
            let cols: Vec<String> = names.iter().map(|c| escape_identifier(c)).collect();
            let values: Vec<String> = names.iter().map(|c| r.field(c, types)).collect();
            let updates: Vec<String> = cols
                .iter()
                .filter(|c| !keys.contains(c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let action = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            format!(
                "INSERT INTO {table} ({cols}) SELECT {values} FROM {from} \
                 ON CONFLICT ({keys}) {action}",
                cols = cols.join(", "),
                values = values.join(", "),
                from = r.from(1, false),
                keys = keys.join(", "),
            )
        }
        WriteOp::Delete => format!(
            "DELETE FROM {table} AS t USING {} WHERE {}",
            r.from(1, false),
            key_match(w, &r, types)
        ),
    }
}

/// `names` in order, each once.
fn distinct<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The names of fields.
pub fn names(fields: &[Field]) -> Vec<String> {
    fields.iter().map(|f| f.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::record::{ExpectKind, Expectation};

    fn w(op: WriteOp) -> ApplyWrite {
        ApplyWrite {
            map: "customers".into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            target_entity: "public.accounts".into(),
            key: vec![Field::new("accountnumber", Some("C1"))],
            version: 7,
            op,
            values: if op == WriteOp::Upsert {
                vec![
                    Field::new("accountnumber", Some("C1")),
                    Field::new("name", Some("O'Brien \"Ltd\"")),
                    Field::new("creditlimit", None::<String>),
                ]
            } else {
                vec![]
            },
            expect: Expectation {
                kind: ExpectKind::Row,
                version: 0,
                present: true,
                values: vec![Field::new("name", Some("Old"))],
            },
            moved: Vec::new(),
            source_lsn: 1,
            commit_time: 0,
        }
    }

    fn types() -> ColumnTypes {
        ColumnTypes::new([
            ("accountnumber".to_owned(), "character varying".to_owned()),
            ("name".to_owned(), "jsonb".to_owned()),
            ("creditlimit".to_owned(), "numeric".to_owned()),
        ])
    }

    #[test]
    fn upsert_and_delete_statements() {
        assert_eq!(
            statement_many(&w(WriteOp::Upsert), &types()),
            "INSERT INTO \"public\".\"accounts\" (\"accountnumber\", \"name\", \"creditlimit\") \
             SELECT r.c1::character varying, r.c2::jsonb, r.c3::numeric \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS r(c1, c2, c3) \
             ON CONFLICT (\"accountnumber\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"creditlimit\" = EXCLUDED.\"creditlimit\""
        );
        assert_eq!(
            statement_many(&w(WriteOp::Delete), &types()),
            "DELETE FROM \"public\".\"accounts\" AS t USING unnest($1::text[]) AS r(c1) \
             WHERE t.\"accountnumber\" = r.c1::character varying"
        );
        let (a, mut b) = (w(WriteOp::Upsert), w(WriteOp::Upsert));
        b.values[1].value = Some("Other".into());
        let names = write_names(&a);
        let columns = arrays(&[&a, &b], &names, |w| w.key.iter().chain(&w.values));
        assert_eq!(
            columns,
            vec![
                vec![Some("C1"), Some("C1")],
                vec![Some("O'Brien \"Ltd\""), Some("Other")],
                vec![None, None],
            ]
        );
        let d = w(WriteOp::Delete);
        assert_eq!(write_names(&d), vec!["accountnumber"]);
    }

    #[test]
    fn the_check_locks_rows_and_compares_in_the_column_types() {
        let sql = rows_check(&w(WriteOp::Upsert), &["name".to_owned()], &types());
        assert_eq!(
            sql,
            "SELECT e.i, t.xmin::text, ROW(t.\"name\"::text) IS NOT DISTINCT FROM ROW(e.c2::jsonb::text) \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS e(c1, c2, i) \
             JOIN \"public\".\"accounts\" AS t ON t.\"accountnumber\" = e.c1::character varying FOR UPDATE OF t"
        );
        assert!(rows_check(&w(WriteOp::Delete), &[], &types()).contains(", true FROM"));
        let up = w(WriteOp::Upsert);
        let compare = ["name".to_owned()];
        let names = check_names(&up, &compare);
        let columns = arrays(&[&up], &names, |w| w.key.iter().chain(&w.expect.values));
        assert_eq!(columns, vec![vec![Some("C1")], vec![Some("Old")]]);
        let a: serde_json::Value = serde_json::from_str(&ack(&up, false)).unwrap();
        assert_eq!(a["written"], false);
        assert_eq!(a["key"][0], "C1");
        assert_eq!(a["version"], 7);
        assert_eq!(a["entity"], "public.accounts");
    }

    /// A field named twice takes the last value (an expected value of a
    /// key column wins over the key, as in the write's own fields), and a
    /// write without a field gives null.
    #[test]
    fn arrays_take_the_last_field_of_a_name() {
        let mut a = w(WriteOp::Upsert);
        a.expect.values = vec![Field::new("accountnumber", Some("C0"))];
        let b = w(WriteOp::Delete);
        let names = ["accountnumber", "name"];
        let columns = arrays(&[&a, &b], &names, |w| w.key.iter().chain(&w.expect.values));
        assert_eq!(columns[0], vec![Some("C0"), Some("C1")]);
        assert_eq!(columns[1], vec![None, Some("Old")]);
    }

    #[test]
    fn an_origin_switch_resets_only_a_session_under_one_and_quotes_the_name() {
        let sql = use_origin("dw_o'x_rows");
        let (reset, setup) = sql.split_once(";\n").unwrap();
        assert!(reset.ends_with("WHERE pg_replication_origin_session_is_setup()"));
        assert_eq!(
            setup,
            "SELECT pg_replication_origin_session_setup('dw_o''x_rows')"
        );
    }

    #[test]
    fn a_key_change_compares_and_moves_by_one_parameter_per_key_column() {
        let mut k = w(WriteOp::Delete);
        k.key.push(Field::new("company", Some("usmf")));
        k.moved = vec![Field::new("accountnumber", Some("C2"))];
        assert_eq!(key_values(&k), vec![Some("C1"), Some("usmf")]);
        assert_eq!(moved_values(&k), vec![Some("C2"), None]);
        assert_eq!(
            key_exists(&k, &types()),
            "SELECT EXISTS (SELECT 1 FROM \"public\".\"accounts\" AS t \
             WHERE t.\"accountnumber\" = $1::text::character varying AND t.\"company\" = $2::text)"
        );
        let m = move_row(&k, &types());
        assert!(
            m.starts_with(
                "UPDATE \"public\".\"accounts\" AS t SET \"accountnumber\" = $3::text::character varying, \"company\" = $4::text \
                 WHERE t.\"accountnumber\" = $1::text::character varying AND t.\"company\" = $2::text \
                 AND NOT EXISTS (SELECT 1 FROM \"public\".\"accounts\" AS x WHERE x.\"accountnumber\" = $3::text::character varying AND x.\"company\" = $4::text) RETURNING"
            ),
            "{m}"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(table_ident("weird\"schema.t"), "\"weird\"\"schema\".\"t\"");
        assert_eq!(table_ident("accounts"), "\"public\".\"accounts\"");
    }
}
