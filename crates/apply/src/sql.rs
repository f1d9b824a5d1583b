//! SQL for writing a mapped change: an upsert or a delete by alternate key.
//!
//! Values travel as one JSON object of PostgreSQL text values, turned into a
//! row of the target table by `json_populate_record`, so each value goes
//! through the column type's own input function (numeric, timestamptz, uuid,
//! jsonb…) exactly as if it had been typed into the database.

use dualwrite_model::record::{ApplyOp, MappedChange};
use dualwrite_runtime::pg::fields_json as json_object;
use postgres_protocol::escape::escape_identifier;

/// Bookkeeping on each target: the latest source position applied per map,
/// record and source side.
///
/// Sent as one simple query, so it runs as one transaction; the advisory lock
/// serialises appliers starting at once (`CREATE … IF NOT EXISTS` alone races:
/// two sessions can both decide to create and one fails on the catalog's
/// unique index).
pub const POSITIONS_DDL: &str = "SELECT pg_advisory_xact_lock(hashtext('dualwrite.ddl'));
CREATE SCHEMA IF NOT EXISTS dualwrite;
CREATE TABLE IF NOT EXISTS dualwrite.applied_positions (
    map         text   NOT NULL,
    record_key  text   NOT NULL,
    source_side text   NOT NULL,
    source_lsn  bigint NOT NULL,
    source_seq  int    NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (map, record_key, source_side)
)";

/// Records a change's source position if it is newer than the one stored;
/// returns a row only then (the change is to be written).
pub const ADVANCE_POSITION: &str = "INSERT INTO dualwrite.applied_positions AS a (map, record_key, source_side, source_lsn, source_seq)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (map, record_key, source_side) DO UPDATE
   SET source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq, applied_at = now()
 WHERE (a.source_lsn, a.source_seq) < (EXCLUDED.source_lsn, EXCLUDED.source_seq)
RETURNING 1";

pub use dualwrite_runtime::pg::table_ident;

/// [`ADVANCE_POSITION`] for many records of one map and source side at once
/// (each record at most once): `$3` keys, `$4` LSNs, `$5` sequence numbers.
/// Returns the keys whose position advanced (their changes are to be written).
pub const ADVANCE_POSITIONS: &str = "INSERT INTO dualwrite.applied_positions AS a (map, record_key, source_side, source_lsn, source_seq)
SELECT $1, u.k, $2, u.l, u.s FROM unnest($3::text[], $4::int8[], $5::int4[]) AS u(k, l, s)
ON CONFLICT (map, record_key, source_side) DO UPDATE
   SET source_lsn = EXCLUDED.source_lsn, source_seq = EXCLUDED.source_seq, applied_at = now()
 WHERE (a.source_lsn, a.source_seq) < (EXCLUDED.source_lsn, EXCLUDED.source_seq)
RETURNING record_key";

/// The statement for a change (depends only on table, op and field names);
/// a re-assert request writes nothing.
pub fn statement(mc: &MappedChange) -> Option<String> {
    let table = table_ident(&mc.target_entity);
    let keys: Vec<String> = mc.key.iter().map(|f| escape_identifier(&f.name)).collect();
    match mc.op {
        ApplyOp::Upsert => {
            let cols: Vec<String> = mc
                .values
                .iter()
                .map(|f| escape_identifier(&f.name))
                .collect();
            let updates: Vec<String> = mc
                .values
                .iter()
                .filter(|f| !mc.key.iter().any(|k| k.name == f.name))
                .map(|f| {
                    let c = escape_identifier(&f.name);
                    format!("{c} = EXCLUDED.{c}")
                })
                .collect();
            let action = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            Some(format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_record(NULL::{table}, $1::text::json) \
                 ON CONFLICT ({keys}) {action}",
                cols = cols.join(", "),
                keys = keys.join(", "),
            ))
        }
        ApplyOp::Delete => {
            let cond: Vec<String> = keys.iter().map(|k| format!("t.{k} = r.{k}")).collect();
            Some(format!(
                "DELETE FROM {table} AS t USING json_populate_record(NULL::{table}, $1::text::json) AS r WHERE {}",
                cond.join(" AND ")
            ))
        }
        ApplyOp::Reassert => None,
    }
}

/// The set-based form of [`statement`] for many changes of the same shape
/// (table, operation and field names), each record at most once: one
/// statement over a JSON array of [`parameter`] objects.
pub fn statement_many(mc: &MappedChange) -> Option<String> {
    let one = statement(mc)?;
    Some(one.replace(
        "json_populate_record(NULL::",
        "json_populate_recordset(NULL::",
    ))
}

/// The parameter of [`statement_many`]: a JSON array of the changes' [`parameter`]s.
pub fn parameter_many<'a>(changes: impl Iterator<Item = &'a MappedChange>) -> String {
    json_array(changes.map(parameter))
}

fn json_array(items: impl Iterator<Item = String>) -> String {
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

/// The parameter: a JSON object of the key and values.
pub fn parameter(mc: &MappedChange) -> String {
    json_object(mc.key.iter().chain(&mc.values))
}

/// Conflict check for a change that carries `before`: locks the target row
/// and says whether its fields that sync both ways equal the source's old
/// values ($1) and the change's new values ($2). No row: the record is absent.
pub fn conflict_check(mc: &MappedChange) -> Option<String> {
    let c = ConflictParts::of(mc)?;
    Some(format!(
        "SELECT {t} IS NOT DISTINCT FROM {b}, {t} IS NOT DISTINCT FROM {a} \
         FROM {table} AS t, json_populate_record(NULL::{table}, $1::text::json) AS b, \
         json_populate_record(NULL::{table}, $2::text::json) AS a \
         WHERE {cond} FOR UPDATE OF t",
        t = c.row("t"),
        b = c.row("b"),
        a = c.row("a"),
        table = c.table,
        cond = c.key_match,
    ))
}

/// What both conflict checks are made of: the target table, the fields
/// that sync both ways, and the key match of the target row `t` with the
/// old values `b`.
struct ConflictParts {
    table: String,
    cols: Vec<String>,
    key_match: String,
}

impl ConflictParts {
    fn of(mc: &MappedChange) -> Option<ConflictParts> {
        let before = mc.before.as_ref()?;
        let key_match: Vec<String> = mc
            .key
            .iter()
            .map(|k| {
                let k = escape_identifier(&k.name);
                format!("t.{k} = b.{k}")
            })
            .collect();
        Some(ConflictParts {
            table: table_ident(&mc.target_entity),
            cols: before.iter().map(|f| escape_identifier(&f.name)).collect(),
            key_match: key_match.join(" AND "),
        })
    }

    /// `ROW(alias.c1, alias.c2, …)` of the fields that sync both ways.
    fn row(&self, alias: &str) -> String {
        let cols: Vec<String> = self.cols.iter().map(|c| format!("{alias}.{c}")).collect();
        format!("ROW({})", cols.join(", "))
    }
}

/// Parameters of [`conflict_check`]: the old values and the new values, each with the key.
pub fn conflict_parameters(mc: &MappedChange) -> (String, String) {
    let before = mc.before.as_deref().unwrap_or(&[]);
    (
        json_object(before.iter().chain(&mc.key)),
        json_object(mc.values.iter().chain(&mc.key)),
    )
}

/// The set-based form of [`conflict_check`] for many changes of the same
/// shape, each record at most once: locks the target rows and returns, for
/// each change whose record is there, its 1-based position in the parameter
/// and the two comparisons.
pub fn conflict_check_many(mc: &MappedChange) -> Option<String> {
    let c = ConflictParts::of(mc)?;
    Some(format!(
        "SELECT x.i, {t} IS NOT DISTINCT FROM {b}, {t} IS NOT DISTINCT FROM {a} \
         FROM json_array_elements($1::text::json) WITH ORDINALITY AS x(j, i) \
         CROSS JOIN LATERAL json_populate_record(NULL::{table}, x.j->'b') AS b \
         CROSS JOIN LATERAL json_populate_record(NULL::{table}, x.j->'a') AS a \
         JOIN {table} AS t ON {cond} FOR UPDATE OF t",
        t = c.row("t"),
        b = c.row("b"),
        a = c.row("a"),
        table = c.table,
        cond = c.key_match,
    ))
}

/// The parameter of [`conflict_check_many`]: per change, its
/// [`conflict_parameters`] as `{"b": old, "a": new}`.
pub fn conflict_parameters_many<'a>(changes: impl Iterator<Item = &'a MappedChange>) -> String {
    json_array(changes.map(|mc| {
        let (b, a) = conflict_parameters(mc);
        format!("{{\"b\":{b},\"a\":{a}}}")
    }))
}

/// The record's current row on the target, every column as text (a JSON
/// object), locked until the transaction ends; no row when it is absent.
pub fn current_row(mc: &MappedChange) -> String {
    let table = table_ident(&mc.target_entity);
    let cond: Vec<String> = mc
        .key
        .iter()
        .map(|k| {
            let k = escape_identifier(&k.name);
            format!("t.{k} = r.{k}")
        })
        .collect();
    format!(
        "SELECT {row} \
         FROM {table} AS t, json_populate_record(NULL::{table}, $1::text::json) AS r WHERE {} FOR SHARE OF t",
        cond.join(" AND "),
        row = dualwrite_runtime::pg::ROW_AS_TEXT_JSON,
    )
}

/// The key as the parameter of [`current_row`].
pub fn key_parameter(mc: &MappedChange) -> String {
    json_object(mc.key.iter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::record::Field;

    fn mc(op: ApplyOp) -> MappedChange {
        MappedChange {
            map: "customers".into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            source_entity: "public.customers_v3".into(),
            target_entity: "public.accounts".into(),
            op,
            key: vec![Field::new("accountnumber", Some("C1"))],
            values: if op == ApplyOp::Upsert {
                vec![
                    Field::new("accountnumber", Some("C1")),
                    Field::new("name", Some("O'Brien \"Ltd\"")),
                    Field::new("creditlimit", None::<String>),
                ]
            } else {
                vec![]
            },
            source_lsn: 1,
            source_seq: 0,
            source_xid: 1,
            commit_time: 0,
            before: None,
            existed: true,
            conflict_master: None,
        }
    }

    #[test]
    fn upsert_statement() {
        assert_eq!(
            statement(&mc(ApplyOp::Upsert)).unwrap(),
            "INSERT INTO \"public\".\"accounts\" (\"accountnumber\", \"name\", \"creditlimit\") \
             SELECT \"accountnumber\", \"name\", \"creditlimit\" FROM json_populate_record(NULL::\"public\".\"accounts\", $1::text::json) \
             ON CONFLICT (\"accountnumber\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"creditlimit\" = EXCLUDED.\"creditlimit\""
        );
    }

    #[test]
    fn delete_statement() {
        assert_eq!(
            statement(&mc(ApplyOp::Delete)).unwrap(),
            "DELETE FROM \"public\".\"accounts\" AS t USING json_populate_record(NULL::\"public\".\"accounts\", $1::text::json) AS r \
             WHERE t.\"accountnumber\" = r.\"accountnumber\""
        );
    }

    #[test]
    fn parameter_escapes_and_keeps_nulls() {
        let p: serde_json::Value = serde_json::from_str(&parameter(&mc(ApplyOp::Upsert))).unwrap();
        assert_eq!(p["name"], "O'Brien \"Ltd\"");
        assert!(p["creditlimit"].is_null());
        assert_eq!(p["accountnumber"], "C1");
    }

    #[test]
    fn conflict_check_compares_both_way_fields_and_locks() {
        let mut c = mc(ApplyOp::Upsert);
        assert_eq!(conflict_check(&c), None);
        c.before = Some(vec![
            Field::new("accountnumber", Some("C1")),
            Field::new("name", Some("Old")),
        ]);
        let sql = conflict_check(&c).unwrap();
        assert!(sql.starts_with("SELECT ROW(t.\"accountnumber\", t.\"name\") IS NOT DISTINCT FROM ROW(b.\"accountnumber\", b.\"name\")"), "{sql}");
        assert!(
            sql.ends_with("WHERE t.\"accountnumber\" = b.\"accountnumber\" FOR UPDATE OF t"),
            "{sql}"
        );
        let (b, a) = conflict_parameters(&c);
        let b: serde_json::Value = serde_json::from_str(&b).unwrap();
        let a: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(
            (b["name"].as_str(), a["name"].as_str()),
            (Some("Old"), Some("O'Brien \"Ltd\""))
        );
        assert!(current_row(&c)
            .ends_with("WHERE t.\"accountnumber\" = r.\"accountnumber\" FOR SHARE OF t"));
        assert_eq!(key_parameter(&c), "{\"accountnumber\":\"C1\"}");
        assert_eq!(statement(&mc(ApplyOp::Reassert)), None);
    }

    #[test]
    fn set_based_statements_take_a_json_array() {
        let u = mc(ApplyOp::Upsert);
        assert_eq!(
            statement_many(&u).unwrap(),
            statement(&u)
                .unwrap()
                .replace("json_populate_record(", "json_populate_recordset(")
        );
        assert!(statement_many(&mc(ApplyOp::Delete)).unwrap().contains(
            "USING json_populate_recordset(NULL::\"public\".\"accounts\", $1::text::json) AS r"
        ));
        assert_eq!(statement_many(&mc(ApplyOp::Reassert)), None);
        let mut other = mc(ApplyOp::Upsert);
        other.key = vec![Field::new("accountnumber", Some("C2"))];
        other.values[0] = Field::new("accountnumber", Some("C2"));
        let p: serde_json::Value =
            serde_json::from_str(&parameter_many([&u, &other].into_iter())).unwrap();
        assert_eq!(p[0]["accountnumber"], "C1");
        assert_eq!(p[1]["accountnumber"], "C2");
        assert_eq!(parameter_many(std::iter::empty()), "[]");

        assert_eq!(conflict_check_many(&u), None);
        let mut c = u.clone();
        c.before = Some(vec![Field::new("name", Some("Old"))]);
        let sql = conflict_check_many(&c).unwrap();
        assert!(
            sql.starts_with("SELECT x.i, ROW(t.\"name\") IS NOT DISTINCT FROM ROW(b.\"name\")"),
            "{sql}"
        );
        assert!(sql.ends_with("JOIN \"public\".\"accounts\" AS t ON t.\"accountnumber\" = b.\"accountnumber\" FOR UPDATE OF t"), "{sql}");
        let p: serde_json::Value =
            serde_json::from_str(&conflict_parameters_many([&c].into_iter())).unwrap();
        assert_eq!(p[0]["b"]["name"], "Old");
        assert_eq!(p[0]["b"]["accountnumber"], "C1");
        assert_eq!(p[0]["a"]["name"], "O'Brien \"Ltd\"");
        assert!(ADVANCE_POSITIONS.contains("unnest($3::text[], $4::int8[], $5::int4[])"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(table_ident("weird\"schema.t"), "\"weird\"\"schema\".\"t\"");
        assert_eq!(table_ident("accounts"), "\"public\".\"accounts\"");
    }
}
