//! SQL for writing a mapped change: an upsert or a delete by alternate key.
//!
//! Values travel as one JSON object of PostgreSQL text values, turned into a
//! row of the target table by `json_populate_record`, so each value goes
//! through the column type's own input function (numeric, timestamptz, uuid,
//! jsonb…) exactly as if it had been typed into the database.

use dualwrite_model::record::{ApplyOp, Field, MappedChange};
use postgres_protocol::escape::escape_identifier;

/// Bookkeeping on each target: the latest source position applied per map,
/// record and source side.
pub const POSITIONS_DDL: &str = "CREATE SCHEMA IF NOT EXISTS dualwrite;
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

/// `schema.table` as a quoted identifier.
pub fn table_ident(entity: &str) -> String {
    let (schema, table) = entity.split_once('.').unwrap_or(("public", entity));
    format!("{}.{}", escape_identifier(schema), escape_identifier(table))
}

/// The statement for a change (depends only on table, op and field names).
pub fn statement(mc: &MappedChange) -> String {
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
            format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_record(NULL::{table}, $1::text::json) \
                 ON CONFLICT ({keys}) {action}",
                cols = cols.join(", "),
                keys = keys.join(", "),
            )
        }
        ApplyOp::Delete => {
            let cond: Vec<String> = keys.iter().map(|k| format!("t.{k} = r.{k}")).collect();
            format!(
                "DELETE FROM {table} AS t USING json_populate_record(NULL::{table}, $1::text::json) AS r WHERE {}",
                cond.join(" AND ")
            )
        }
    }
}

/// The parameter: a JSON object of the key and values.
pub fn parameter(mc: &MappedChange) -> String {
    let mut obj = serde_json::Map::new();
    let mut put = |f: &Field| {
        obj.insert(
            f.name.clone(),
            f.value
                .clone()
                .map_or(serde_json::Value::Null, serde_json::Value::String),
        );
    };
    mc.key.iter().for_each(&mut put);
    mc.values.iter().for_each(&mut put);
    serde_json::Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    #[test]
    fn upsert_statement() {
        assert_eq!(
            statement(&mc(ApplyOp::Upsert)),
            "INSERT INTO \"public\".\"accounts\" (\"accountnumber\", \"name\", \"creditlimit\") \
             SELECT \"accountnumber\", \"name\", \"creditlimit\" FROM json_populate_record(NULL::\"public\".\"accounts\", $1::text::json) \
             ON CONFLICT (\"accountnumber\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"creditlimit\" = EXCLUDED.\"creditlimit\""
        );
    }

    #[test]
    fn delete_statement() {
        assert_eq!(
            statement(&mc(ApplyOp::Delete)),
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
    fn identifiers_are_quoted() {
        assert_eq!(table_ident("weird\"schema.t"), "\"weird\"\"schema\".\"t\"");
        assert_eq!(table_ident("accounts"), "\"public\".\"accounts\"");
    }
}
