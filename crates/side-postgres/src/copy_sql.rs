//! SQL of the initial write: reading a side in key order from a snapshot,
//! and the guarded create and update.

use postgres_protocol::escape::{escape_identifier, escape_literal};

use std::collections::HashMap;

use dualwrite_runtime::side::{CopyWrite as Write, WriteKind};

use crate::pg::{fields_json as json_object, table_ident, Column};

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

/// A column as the cursor reads it: the text of its type's output
/// function, as the change source gives it (a boolean as `true` or
/// `false`, as wal2json writes it).
fn column_text(c: &Column) -> String {
    let column = format!("t.{}", escape_identifier(&c.name));
    if c.type_name == "boolean" {
        format!("to_json({column})::text")
    } else {
        format!("{column}::text")
    }
}

/// A cursor over the rows in key order: the key values as text, then
/// every column's text, in the order of `columns`.
pub fn declare_cursor(
    name: &str,
    entity: &str,
    key: &[String],
    columns: &[Column],
    after: Option<&[String]>,
) -> String {
    let keys = key_exprs(key);
    let selected: Vec<String> = key
        .iter()
        .map(|k| format!("t.{}::text", escape_identifier(k)))
        .chain(columns.iter().map(column_text))
        .collect();
    format!(
        "DECLARE {} NO SCROLL CURSOR FOR SELECT {} FROM {} AS t WHERE {} ORDER BY {}",
        escape_identifier(name),
        selected.join(", "),
        table_ident(entity),
        after_condition(key, after),
        keys.join(", ")
    )
}

/// The statement of a write. A create does nothing if the record appeared
/// meanwhile; an update happens only while the target still has the values
/// the snapshot read ($2) and they differ from the new ones ($1), compared
/// as the column types compare them. Each value is cast from its text to
/// its column's type as `types` names it (see [`create_many`]).
pub fn statement(entity: &str, w: &Write, types: &HashMap<String, String>) -> String {
    let table = table_ident(entity);
    let keys: Vec<String> = w.key.iter().map(|f| escape_identifier(&f.name)).collect();
    let cols: Vec<String> = w.new.iter().map(|f| escape_identifier(&f.name)).collect();
    let new_names: Vec<&str> = w.new.iter().map(|f| f.name.as_str()).collect();
    match w.kind {
        WriteKind::Create => format!(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM ({n}) AS n \
             ON CONFLICT ({keys}) DO NOTHING",
            cols = cols.join(", "),
            n = typed("$1", &new_names, types),
            keys = keys.join(", ")
        ),
        WriteKind::Update => {
            let row = |alias: &str| {
                let fields: Vec<String> = cols.iter().map(|c| format!("{alias}.{c}")).collect();
                format!("ROW({})", fields.join(", "))
            };
            let mut n_names: Vec<&str> = w.key.iter().map(|f| f.name.as_str()).collect();
            for c in &new_names {
                if !n_names.contains(c) {
                    n_names.push(c);
                }
            }
            format!(
                "UPDATE {table} AS t SET {sets} FROM ({n}) AS n, ({o}) AS o \
                 WHERE {cond} AND {t} IS NOT DISTINCT FROM {o_row} AND {t} IS DISTINCT FROM {n_row}",
                sets = cols
                    .iter()
                    .map(|c| format!("{c} = n.{c}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                n = typed("$1", &n_names, types),
                o = typed("$2", &new_names, types),
                cond = keys
                    .iter()
                    .map(|k| format!("t.{k} = n.{k}"))
                    .collect::<Vec<_>>()
                    .join(" AND "),
                t = row("t"),
                o_row = row("o"),
                n_row = row("n"),
            )
        }
    }
}

/// The text `value` of column `name` cast to the column's type (as
/// [`Column::type_name`]); left as text for a column `types` lacks.
fn cast(value: String, name: &str, types: &HashMap<String, String>) -> String {
    match types.get(name) {
        Some(t) => format!("{value}::{t}"),
        None => value,
    }
}

/// `SELECT (p ->> 'c')::type AS "c", …`: the fields `names` of the JSON
/// object parameter `param` ([`parameters`]), each cast from its text to
/// its column's type.
fn typed(param: &str, names: &[&str], types: &HashMap<String, String>) -> String {
    let values: Vec<String> = names
        .iter()
        .map(|name| {
            let text = format!("({param}::text::json ->> {})", escape_literal(name));
            format!("{} AS {}", cast(text, name, types), escape_identifier(name))
        })
        .collect();
    format!("SELECT {}", values.join(", "))
}

/// Creates of the same fields (those of `like`) in one statement. Each
/// column's values are one array parameter of text ([`columns`]), cast to
/// the column's type as `types` names it ([`Column::type_name`]). Rows
/// that appeared meanwhile are left alone.
pub fn create_many(entity: &str, like: &Write, types: &HashMap<String, String>) -> String {
    let table = table_ident(entity);
    let cols: Vec<String> = like
        .new
        .iter()
        .map(|f| escape_identifier(&f.name))
        .collect();
    let values: Vec<String> = like
        .new
        .iter()
        .zip(&cols)
        .map(|(f, c)| cast(format!("u.{c}"), &f.name, types))
        .collect();
    let arrays: Vec<String> = (1..=cols.len()).map(|i| format!("${i}::text[]")).collect();
    let keys: Vec<String> = like
        .key
        .iter()
        .map(|f| escape_identifier(&f.name))
        .collect();
    format!(
        "INSERT INTO {table} ({cols}) SELECT {values} FROM unnest({arrays}) AS u({cols}) \
         ON CONFLICT ({keys}) DO NOTHING",
        cols = cols.join(", "),
        values = values.join(", "),
        arrays = arrays.join(", "),
        keys = keys.join(", ")
    )
}

/// The values of creates of the same fields, column by column: the
/// parameters of [`create_many`].
pub fn columns<'a>(writes: &[&'a Write]) -> Vec<Vec<Option<&'a str>>> {
    let width = writes.first().map_or(0, |w| w.new.len());
    (0..width)
        .map(|i| {
            writes
                .iter()
                .map(|w| w.new.get(i).and_then(|f| f.value.as_deref()))
                .collect()
        })
        .collect()
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
        let columns = [
            Column {
                name: "name".into(),
                type_name: "text".into(),
                json: false,
            },
            Column {
                name: "active".into(),
                type_name: "boolean".into(),
                json: false,
            },
        ];
        let sql = declare_cursor(
            "c",
            "public.accounts",
            &key,
            &columns,
            Some(&["A'1".into(), "7".into()]),
        );
        assert!(sql.starts_with("DECLARE \"c\" NO SCROLL CURSOR FOR SELECT t.\"company\"::text, t.\"num\"::text, t.\"name\"::text, to_json(t.\"active\")::text FROM \"public\".\"accounts\" AS t"), "{sql}");
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
        let types = HashMap::from([("name".to_owned(), "character varying".to_owned())]);
        let sql = statement("accounts", &w, &types);
        assert!(
            sql.contains("FROM (SELECT ($1::text::json ->> 'number') AS \"number\", ($1::text::json ->> 'name')::character varying AS \"name\") AS n, \
                          (SELECT ($2::text::json ->> 'name')::character varying AS \"name\") AS o"),
            "{sql}"
        );
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
        assert!(
            statement("accounts", &create, &types).ends_with("ON CONFLICT (\"number\") DO NOTHING")
        );
        let create = Write {
            new: vec![
                Field::new("number", Some("C1")),
                Field::new("name", Some("New")),
            ],
            ..create
        };
        let many = create_many("accounts", &create, &types);
        assert_eq!(
            many,
            "INSERT INTO \"public\".\"accounts\" (\"number\", \"name\") \
             SELECT u.\"number\", u.\"name\"::character varying \
             FROM unnest($1::text[], $2::text[]) AS u(\"number\", \"name\") \
             ON CONFLICT (\"number\") DO NOTHING"
        );
        let mut second = create.clone();
        second.key = vec![Field::new("number", Some("C2"))];
        second.new = vec![
            Field::new("number", Some("C2")),
            Field::new("name", None::<String>),
        ];
        assert_eq!(
            columns(&[&create, &second]),
            vec![vec![Some("C1"), Some("C2")], vec![Some("New"), None]]
        );
    }
}
