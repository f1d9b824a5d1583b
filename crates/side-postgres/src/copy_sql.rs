//! SQL of the initial write: reading a side in key order from a snapshot,
//! and the guarded create and update.

use postgres_protocol::escape::{escape_identifier, escape_literal};

use dualwrite_runtime::side::{CopyWrite as Write, WriteKind};

use crate::pg::{fields_json as json_object, table_ident, ROW_AS_TEXT_JSON};

/// `(k1::text COLLATE "C", …)`: the key as the copy orders it (byte order
/// of the text of each value, the same on both sides).
fn key_exprs(key: &[String]) -> Vec<String> {
    key.iter()
        .map(|k| format!("t.{}::text COLLATE \"C\"", escape_identifier(k)))
        .collect()
}

/// Rows after `after` (a key, in key order), or all rows.
fn after_condition(key: &[String], after: Option<&[String]>) -> String {
    match after {
        None => "true".to_owned(),
        Some(a) => format!(
            "({}) > ({})",
            key_exprs(key).join(", "),
            a.iter()
                .map(|v| format!("{} COLLATE \"C\"", escape_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Counts the rows the copy will read.
pub fn count(entity: &str, key: &[String], after: Option<&[String]>) -> String {
    format!(
        "SELECT count(*) FROM {} AS t WHERE {}",
        table_ident(entity),
        after_condition(key, after)
    )
}

/// A cursor over the rows in key order: the key values as text, then the
/// whole row as a JSON object of text values.
pub fn declare_cursor(
    name: &str,
    entity: &str,
    key: &[String],
    after: Option<&[String]>,
) -> String {
    let keys = key_exprs(key);
    format!(
        "DECLARE {} NO SCROLL CURSOR FOR SELECT {}, {ROW_AS_TEXT_JSON} \
         FROM {} AS t WHERE {} ORDER BY {}",
        escape_identifier(name),
        key.iter()
            .map(|k| format!("t.{}::text", escape_identifier(k)))
            .collect::<Vec<_>>()
            .join(", "),
        table_ident(entity),
        after_condition(key, after),
        keys.join(", ")
    )
}

/// The statement of a write. A create does nothing if the record appeared
/// meanwhile; an update happens only while the target still has the values
/// the snapshot read ($2) and they differ from the new ones ($1), compared
/// as the column types compare them.
pub fn statement(entity: &str, w: &Write) -> String {
    let table = table_ident(entity);
    let keys: Vec<String> = w.key.iter().map(|f| escape_identifier(&f.name)).collect();
    match w.kind {
        WriteKind::Create => {
            let cols: Vec<String> = w.new.iter().map(|f| escape_identifier(&f.name)).collect();
            format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_record(NULL::{table}, $1::text::json) \
                 ON CONFLICT ({keys}) DO NOTHING",
                cols = cols.join(", "),
                keys = keys.join(", ")
            )
        }
        WriteKind::Update => {
            let cols: Vec<String> = w.new.iter().map(|f| escape_identifier(&f.name)).collect();
            let row = |alias: &str| {
                format!(
                    "ROW({})",
                    cols.iter()
                        .map(|c| format!("{alias}.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            format!(
                "UPDATE {table} AS t SET {sets} \
                 FROM json_populate_record(NULL::{table}, $1::text::json) AS n, \
                 json_populate_record(NULL::{table}, $2::text::json) AS o \
                 WHERE {cond} AND {t} IS NOT DISTINCT FROM {o} AND {t} IS DISTINCT FROM {n}",
                sets = cols
                    .iter()
                    .map(|c| format!("{c} = n.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                cond = keys
                    .iter()
                    .map(|k| format!("t.{k} = n.{k}"))
                    .collect::<Vec<_>>()
                    .join(" AND "),
                t = row("t"),
                o = row("o"),
                n = row("n"),
            )
        }
    }
}

/// Creates of the same fields (those of `like`) in one statement; its
/// parameter is [`rows_json`]. Rows that appeared meanwhile are left alone.
pub fn create_many(entity: &str, like: &Write) -> String {
    let table = table_ident(entity);
    let cols: Vec<String> = like
        .new
        .iter()
        .map(|f| escape_identifier(&f.name))
        .collect();
    let keys: Vec<String> = like
        .key
        .iter()
        .map(|f| escape_identifier(&f.name))
        .collect();
    format!(
        "INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_recordset(NULL::{table}, $1::text::json) \
         ON CONFLICT ({keys}) DO NOTHING",
        cols = cols.join(", "),
        keys = keys.join(", ")
    )
}

/// The rows of creates as a JSON array of objects.
pub fn rows_json<'a>(writes: impl Iterator<Item = &'a Write>) -> String {
    let rows: Vec<String> = writes
        .map(|w| json_object(w.key.iter().chain(&w.new)))
        .collect();
    format!("[{}]", rows.join(","))
}

/// The parameters of [`statement`]: new values and old values, each with the key.
pub fn parameters(w: &Write) -> (String, String) {
    (
        json_object(w.key.iter().chain(&w.new)),
        json_object(w.key.iter().chain(&w.old)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::SideId;
    use dualwrite_model::record::Field;

    #[test]
    fn cursor_reads_in_byte_order_after_the_checkpoint() {
        let key = vec!["company".to_owned(), "num".to_owned()];
        let sql = declare_cursor(
            "c",
            "public.accounts",
            &key,
            Some(&["A'1".into(), "7".into()]),
        );
        assert!(sql.contains("WHERE (t.\"company\"::text COLLATE \"C\", t.\"num\"::text COLLATE \"C\") > ('A''1' COLLATE \"C\", '7' COLLATE \"C\")"), "{sql}");
        assert!(
            sql.ends_with(
                "ORDER BY t.\"company\"::text COLLATE \"C\", t.\"num\"::text COLLATE \"C\""
            ),
            "{sql}"
        );
        assert!(
            count("accounts", &key, None).ends_with("FROM \"public\".\"accounts\" AS t WHERE true")
        );
    }

    #[test]
    fn updates_are_guarded_by_the_snapshot_values() {
        let w = Write {
            target: SideId::Right,
            kind: WriteKind::Update,
            key: vec![Field::new("number", Some("C1"))],
            new: vec![Field::new("name", Some("New"))],
            old: vec![Field::new("name", Some("Old"))],
        };
        let sql = statement("accounts", &w);
        assert!(sql.contains("SET \"name\" = n.\"name\""), "{sql}");
        assert!(sql.ends_with("WHERE t.\"number\" = n.\"number\" AND ROW(t.\"name\") IS NOT DISTINCT FROM ROW(o.\"name\") AND ROW(t.\"name\") IS DISTINCT FROM ROW(n.\"name\")"), "{sql}");
        let (n, o) = parameters(&w);
        assert_eq!(n, r#"{"name":"New","number":"C1"}"#);
        assert_eq!(o, r#"{"name":"Old","number":"C1"}"#);
        let create = Write {
            kind: WriteKind::Create,
            old: vec![],
            ..w
        };
        assert!(statement("accounts", &create).ends_with("ON CONFLICT (\"number\") DO NOTHING"));
        let many = create_many("accounts", &create);
        assert!(
            many.contains("json_populate_recordset(NULL::\"public\".\"accounts\", $1::text::json)"),
            "{many}"
        );
        let mut second = create.clone();
        second.key = vec![Field::new("number", Some("C2"))];
        second.new = vec![Field::new("name", None::<String>)];
        assert_eq!(
            rows_json([&create, &second].into_iter()),
            r#"[{"name":"New","number":"C1"},{"name":null,"number":"C2"}]"#
        );
    }
}
