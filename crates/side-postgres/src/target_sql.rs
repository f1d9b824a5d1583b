//! SQL of the applier: the compare-and-set check, the write (an upsert or a
//! delete by alternate key) and the bookkeeping, each one statement over a
//! run of writes of one shape (see `Target`).
//!
//! Values travel as JSON objects of PostgreSQL text values, turned into
//! rows of the target table by `json_populate_record(set)`, so each value
//! goes through the column type's own input function, and comparisons are
//! made in the column types (`1.50` equals `1.5` in a numeric column).
//! A json or jsonb column is the exception: `json_populate_record` keeps
//! a JSON string as a JSON string there, so its value is read back out of
//! the string and cast ([`JsonColumns`]).

use std::collections::HashMap;

use crate::pg::fields_json as json_object;
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
/// superseded (`$5` keys, `$6` versions: decided, nothing else changes),
/// and reports every write made or superseded (`$7`, JSON texts), one
/// transactional logical message each: the side's capturer passes them
/// on, in their place among the side's own writes. One statement: the
/// bookkeeping is data-modifying `WITH`s, which run whether or not they
/// are read (a record occurs once per statement, so they do not meet).
pub const RECORD_AND_REPORT: &str = "WITH recorded AS (
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
SELECT count(pg_logical_emit_message(true, 'dualwrite.ack', a)) FROM unnest($7::text[]) AS a";

/// A target table's json and jsonb columns (name → type). Values travel
/// as JSON strings, and `json_populate_record` reproduces a JSON value
/// as it is in such a column: a JSON string, not the document the string
/// holds. So the statements read these columns back out of the string
/// (`#>> '{}'`, its text) and cast them: the type's input function takes
/// the text, as for every other column (and as the initial sync's copy
/// writes them), and a text that is no JSON is refused, not stored.
#[derive(Debug, Clone, Default)]
pub struct JsonColumns(HashMap<String, String>);

impl JsonColumns {
    pub fn new(columns: impl IntoIterator<Item = (String, String)>) -> JsonColumns {
        JsonColumns(columns.into_iter().collect())
    }

    /// Column `name` of the row `alias` made by `json_populate_record`,
    /// as a value of the column's type.
    fn field(&self, alias: &str, name: &str) -> String {
        let col = format!("{alias}.{}", escape_identifier(name));
        match self.0.get(name) {
            Some(ty) => format!("({col} #>> '{{}}')::{ty}"),
            None => col,
        }
    }
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
/// a JSON object of column text values ([`MOVE`]'s result).
pub fn ack_moved(w: &ApplyWrite, moved_to: &str) -> String {
    let mut ack = ack_value(w, true);
    if let Ok(row) = serde_json::from_str::<serde_json::Value>(moved_to) {
        ack["moved_to"] = row;
    }
    ack.to_string()
}

/// The key values of `key` with the key columns' names of `w` (a key
/// change's other key travels with its values in key order).
fn key_as(w: &ApplyWrite, key: &[Field]) -> String {
    let fields: Vec<Field> = w
        .key
        .iter()
        .zip(key)
        .map(|(k, v)| Field {
            name: k.name.clone(),
            value: v.value.clone(),
        })
        .collect();
    json_object(fields.iter())
}

/// Whether a row has the old key of a key change (`$1`: the second of
/// [`key_parameters`]).
pub fn key_exists(w: &ApplyWrite, json: &JsonColumns) -> String {
    let table = table_ident(&w.target_entity);
    format!(
        "SELECT EXISTS (SELECT 1 FROM json_populate_record(NULL::{table}, $1::text::json) AS e \
         JOIN {table} AS t ON {cond})",
        cond = key_match(w, "t", "e", json),
    )
}

/// Moves the record's row (key `$1`) to the new key `$2` if no row has
/// it, values untouched; returns the row as moved, as a JSON object of
/// column text values (no row: not moved).
pub fn move_row(w: &ApplyWrite, json: &JsonColumns) -> String {
    let table = table_ident(&w.target_entity);
    let set: Vec<String> = w
        .key
        .iter()
        .map(|k| {
            format!(
                "{} = {}",
                escape_identifier(&k.name),
                json.field("n", &k.name)
            )
        })
        .collect();
    format!(
        "UPDATE {table} AS t SET {set} \
         FROM json_populate_record(NULL::{table}, $1::text::json) AS e, \
              json_populate_record(NULL::{table}, $2::text::json) AS n \
         WHERE {old} AND NOT EXISTS (SELECT 1 FROM {table} AS x WHERE {new}) \
         RETURNING (SELECT json_object_agg(c.key, c.value) FROM json_each_text(row_to_json(t)) AS c)::text",
        set = set.join(", "),
        old = key_match(w, "t", "e", json),
        new = key_match(w, "x", "n", json),
    )
}

/// `a.k = b.k AND …` over the key columns of `w` (`b`: a row made by
/// `json_populate_record`).
fn key_match(w: &ApplyWrite, a: &str, b: &str, json: &JsonColumns) -> String {
    w.key
        .iter()
        .map(|k| {
            let col = escape_identifier(&k.name);
            format!("{a}.{col} = {}", json.field(b, &k.name))
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The parameters of a key change: the write's own key, and the other key.
pub fn key_parameters(w: &ApplyWrite) -> (String, String) {
    (json_object(w.key.iter()), key_as(w, &w.moved))
}

/// Locks the target rows of a run's writes and returns, for each write
/// whose record is there, its 1-based position in the parameter, the row
/// version (`xmin`), and whether the row's columns `compare` equal the
/// expected values (in the column types; true when `compare` is empty).
/// The parameter is a JSON array of objects with the key and the expected
/// values ([`row_parameter`]).
pub fn rows_check(w: &ApplyWrite, compare: &[String], json: &JsonColumns) -> String {
    let table = table_ident(&w.target_entity);
    let same = if compare.is_empty() {
        "true".to_owned()
    } else {
        let cols = |field: &dyn Fn(&String) -> String| -> String {
            let c: Vec<String> = compare
                .iter()
                .map(|c| format!("{}::text", field(c)))
                .collect();
            format!("ROW({})", c.join(", "))
        };
        let target = cols(&|c| format!("t.{}", escape_identifier(c)));
        format!(
            "{target} IS NOT DISTINCT FROM {}",
            cols(&|c| json.field("e", c))
        )
    };
    format!(
        "SELECT x.i, t.xmin::text, {same} \
         FROM json_array_elements($1::text::json) WITH ORDINALITY AS x(j, i) \
         CROSS JOIN LATERAL json_populate_record(NULL::{table}, x.j) AS e \
         JOIN {table} AS t ON {cond} FOR UPDATE OF t",
        cond = key_match(w, "t", "e", json),
    )
}

/// One element of [`rows_check`]'s parameter: the key and the expected values.
pub fn row_parameter(w: &ApplyWrite) -> String {
    json_object(w.key.iter().chain(&w.expect.values))
}

/// The set-based write of a run (same table, operation and field names,
/// each record once): one statement over a JSON array of [`parameter`]s.
pub fn statement_many(w: &ApplyWrite, json: &JsonColumns) -> String {
    let table = table_ident(&w.target_entity);
    let keys: Vec<String> = w.key.iter().map(|f| escape_identifier(&f.name)).collect();
    match w.op {
        WriteOp::Upsert => {
            let names = columns(w);
            let cols: Vec<String> = names.iter().map(|c| escape_identifier(c)).collect();
            let values: Vec<String> = names.iter().map(|c| json.field("r", c)).collect();
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
                "INSERT INTO {table} ({cols}) SELECT {values} \
                 FROM json_populate_recordset(NULL::{table}, $1::text::json) AS r \
                 ON CONFLICT ({keys}) {action}",
                cols = cols.join(", "),
                values = values.join(", "),
                keys = keys.join(", "),
            )
        }
        WriteOp::Delete => format!(
            "DELETE FROM {table} AS t USING json_populate_recordset(NULL::{table}, $1::text::json) AS r WHERE {}",
            key_match(w, "t", "r", json)
        ),
    }
}

/// The columns an upsert writes: the key, then the values (each once).
fn columns(w: &ApplyWrite) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for f in w.key.iter().chain(&w.values) {
        if !out.contains(&f.name.as_str()) {
            out.push(&f.name);
        }
    }
    out
}

/// The parameter of [`statement_many`]: a JSON array of the writes' key and values.
pub fn parameter_many<'a>(writes: impl Iterator<Item = &'a ApplyWrite>) -> String {
    json_array(writes.map(parameter))
}

/// One write's key and values as a JSON object.
pub fn parameter(w: &ApplyWrite) -> String {
    json_object(w.key.iter().chain(&w.values))
}

/// A JSON array of JSON texts.
pub fn json_array(items: impl Iterator<Item = String>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    out.push(']');
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

    #[test]
    fn upsert_and_delete_statements() {
        let none = JsonColumns::default();
        assert_eq!(
            statement_many(&w(WriteOp::Upsert), &none),
            "INSERT INTO \"public\".\"accounts\" (\"accountnumber\", \"name\", \"creditlimit\") \
             SELECT r.\"accountnumber\", r.\"name\", r.\"creditlimit\" \
             FROM json_populate_recordset(NULL::\"public\".\"accounts\", $1::text::json) AS r \
             ON CONFLICT (\"accountnumber\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"creditlimit\" = EXCLUDED.\"creditlimit\""
        );
        assert_eq!(
            statement_many(&w(WriteOp::Delete), &none),
            "DELETE FROM \"public\".\"accounts\" AS t USING json_populate_recordset(NULL::\"public\".\"accounts\", $1::text::json) AS r \
             WHERE t.\"accountnumber\" = r.\"accountnumber\""
        );
        let p: serde_json::Value =
            serde_json::from_str(&parameter_many([w(WriteOp::Upsert)].iter())).unwrap();
        assert_eq!(p[0]["name"], "O'Brien \"Ltd\"");
        assert!(p[0]["creditlimit"].is_null());
    }

    #[test]
    fn the_check_locks_rows_and_compares_in_the_column_types() {
        let none = JsonColumns::default();
        let sql = rows_check(&w(WriteOp::Upsert), &["name".to_owned()], &none);
        assert!(sql.starts_with("SELECT x.i, t.xmin::text, ROW(t.\"name\"::text) IS NOT DISTINCT FROM ROW(e.\"name\"::text)"), "{sql}");
        assert!(sql.ends_with("JOIN \"public\".\"accounts\" AS t ON t.\"accountnumber\" = e.\"accountnumber\" FOR UPDATE OF t"), "{sql}");
        assert!(rows_check(&w(WriteOp::Delete), &[], &none).contains(", true FROM"));
        let p: serde_json::Value =
            serde_json::from_str(&row_parameter(&w(WriteOp::Upsert))).unwrap();
        assert_eq!(
            (p["accountnumber"].as_str(), p["name"].as_str()),
            (Some("C1"), Some("Old"))
        );
        let a: serde_json::Value = serde_json::from_str(&ack(&w(WriteOp::Upsert), false)).unwrap();
        assert_eq!(a["written"], false);
        assert_eq!(a["key"][0], "C1");
        assert_eq!(a["version"], 7);
        assert_eq!(a["entity"], "public.accounts");
    }

    /// A json or jsonb column's value is the text of the JSON string it
    /// travels as, cast: wherever the statements read the row made from
    /// the parameter (the written values, the compared ones, the key).
    #[test]
    fn json_columns_are_cast_from_the_strings_they_travel_as() {
        let json = JsonColumns::new([
            ("name".to_owned(), "jsonb".to_owned()),
            ("accountnumber".to_owned(), "json".to_owned()),
        ]);
        let name = "(r.\"name\" #>> '{}')::jsonb";
        let write = statement_many(&w(WriteOp::Upsert), &json);
        assert!(
            write.contains(&format!(
                "SELECT (r.\"accountnumber\" #>> '{{}}')::json, {name}, r.\"creditlimit\" FROM"
            )),
            "{write}"
        );
        assert!(write.ends_with("DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"creditlimit\" = EXCLUDED.\"creditlimit\""), "{write}");
        let check = rows_check(&w(WriteOp::Upsert), &["name".to_owned()], &json);
        assert!(
            check.contains("IS NOT DISTINCT FROM ROW((e.\"name\" #>> '{}')::jsonb::text)"),
            "{check}"
        );
        assert!(
            check.contains("ON t.\"accountnumber\" = (e.\"accountnumber\" #>> '{}')::json"),
            "{check}"
        );
        let delete = statement_many(&w(WriteOp::Delete), &json);
        assert!(
            delete.ends_with("WHERE t.\"accountnumber\" = (r.\"accountnumber\" #>> '{}')::json"),
            "{delete}"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(table_ident("weird\"schema.t"), "\"weird\"\"schema\".\"t\"");
        assert_eq!(table_ident("accounts"), "\"public\".\"accounts\"");
    }
}
