//! The comparisons' reader on a PostgreSQL side: a pass is a
//! `REPEATABLE READ` snapshot read through a cursor ordered by the key's
//! text in the "C" collation (byte order); a row is each read column's
//! text (its type's output, as the change stream carries it), a hash the
//! `md5` of a JSON array of the hashed columns' text values.

use std::collections::BTreeMap;

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{parse_lsn, Field};
use dualwrite_runtime::side::{Inspect, Payload, Reading, SideError, TextKey, TextRow};
use postgres_protocol::escape::escape_identifier;
use tokio_postgres::{Client, Row};

use crate::pg::{self, side_error, table_ident};

const CURSOR: &str = "dualwrite_inspect";

/// A connection for comparisons, with the pass under way (if any).
pub struct PgInspect {
    client: Client,
    /// The pass's key length, and the columns of its rows (`None`: it
    /// reads hashes).
    pass: Option<(usize, Option<Vec<String>>)>,
}

fn failed(what: &str) -> impl Fn(tokio_postgres::Error) -> SideError + '_ {
    move |e| side_error(&e).context(what)
}

impl Inspect for PgInspect {
    async fn connect(
        config: &Config,
        side: SideId,
        application: &str,
    ) -> Result<PgInspect, SideError> {
        let name = &config.side(side).name;
        let client = pg::connect(&config.side(side).connection, application)
            .await
            .map_err(|e| SideError::from(e).context(&format!("side `{name}`")))?;
        client
            .batch_execute("SET TimeZone = 'UTC'")
            .await
            .map_err(failed("setting the time zone"))?;
        Ok(PgInspect { client, pass: None })
    }

    async fn open_pass(&mut self, reading: &Reading) -> Result<(), SideError> {
        let what = format!("reading {}", reading.table);
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(failed(&what))?;
        self.client
            .batch_execute(&format!(
                "DECLARE {CURSOR} NO SCROLL CURSOR FOR {}",
                pass_query(reading)
            ))
            .await
            .map_err(failed(&what))?;
        let rows = reading.hashed.is_none().then(|| reading.columns.clone());
        self.pass = Some((reading.key.len(), rows));
        Ok(())
    }

    async fn fetch(&mut self, n: usize) -> Result<Vec<(TextKey, Payload)>, SideError> {
        let Some((key_len, columns)) = &self.pass else {
            return Ok(Vec::new());
        };
        let rows = self
            .client
            .query(&format!("FETCH {n} FROM {CURSOR}"), &[])
            .await
            .map_err(failed("reading the pass"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let p = match columns {
                    Some(columns) => Payload::Row(row_of(r, *key_len, columns)),
                    None => Payload::Hash(r.get::<_, Option<String>>(*key_len).unwrap_or_default()),
                };
                (key_of(r, *key_len), p)
            })
            .collect())
    }

    async fn close_pass(&mut self) -> Result<(), SideError> {
        if self.pass.take().is_some() {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(failed("ending the pass"))?;
        }
        Ok(())
    }

    async fn read_rows(
        &mut self,
        reading: &Reading,
        keys: &[TextKey],
    ) -> Result<BTreeMap<TextKey, TextRow>, SideError> {
        let param = serde_json::to_string(keys).unwrap_or_default();
        let rows = self
            .client
            .query(&rows_query(reading), &[&param])
            .await
            .map_err(failed(&format!("reading {}", reading.table)))?;
        let n = reading.key.len();
        Ok(rows
            .iter()
            .map(|r| (key_of(r, n), row_of(r, n, &reading.columns)))
            .collect())
    }

    async fn position(&mut self) -> Result<u64, SideError> {
        let lsn: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(failed("reading the WAL position"))?
            .get(0);
        Ok(parse_lsn(&lsn).unwrap_or(0))
    }

    async fn touch(&mut self, entity: &str, key: &[Field]) -> Result<bool, SideError> {
        let names: Vec<String> = key.iter().map(|f| f.name.clone()).collect();
        let n = self
            .client
            .execute(&touch_sql(entity, &names), &[&pg::fields_json(key.iter())])
            .await
            .map_err(failed(&format!("touching a row of {entity}")))?;
        Ok(n > 0)
    }
}

fn key_of(r: &Row, n: usize) -> TextKey {
    (0..n)
        .map(|c| r.get::<_, Option<String>>(c).unwrap_or_default())
        .collect()
}

/// The row of `columns`, read after the `n` key values.
fn row_of(r: &Row, n: usize, columns: &[String]) -> TextRow {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), r.get::<_, Option<String>>(n + i)))
        .collect()
}

/// The table as the queries read it: its read columns, as `t`.
fn source(reading: &Reading) -> String {
    let cols: Vec<String> = reading
        .columns
        .iter()
        .map(|c| escape_identifier(c))
        .collect();
    format!(
        "(SELECT {} FROM {}) AS t",
        cols.join(", "),
        table_ident(&reading.table)
    )
}

/// `t.c::text` for each of `columns`.
fn texts(columns: &[String]) -> Vec<String> {
    columns
        .iter()
        .map(|c| format!("t.{}::text", escape_identifier(c)))
        .collect()
}

fn key_texts(reading: &Reading) -> Vec<String> {
    texts(&reading.key)
}

/// The SELECT a pass reads: the key values as text, then the row's hash
/// or each of its columns as text.
pub fn pass_query(reading: &Reading) -> String {
    let payload = match &reading.hashed {
        Some(cols) => format!("md5(json_build_array({})::text)", texts(cols).join(", ")),
        None => texts(&reading.columns).join(", "),
    };
    let order: Vec<String> = key_texts(reading)
        .into_iter()
        .map(|k| format!("{k} COLLATE \"C\""))
        .collect();
    format!(
        "SELECT {keys}, {payload} FROM {source} ORDER BY {order}",
        keys = key_texts(reading).join(", "),
        source = source(reading),
        order = order.join(", "),
    )
}

/// The SELECT of the rows whose keys are in `$1` (a JSON array of key
/// value arrays).
fn rows_query(reading: &Reading) -> String {
    format!(
        "SELECT {keys}, {row} FROM {source} \
         WHERE json_build_array({keys})::jsonb IN (SELECT value FROM jsonb_array_elements($1::text::jsonb))",
        keys = key_texts(reading).join(", "),
        row = texts(&reading.columns).join(", "),
        source = source(reading),
    )
}

/// A no-op update of the row whose key (`$1`, a JSON object of text
/// values, each read by its column type's input function) is given.
fn touch_sql(entity: &str, key: &[String]) -> String {
    let table = table_ident(entity);
    let col = |k: &String| escape_identifier(k);
    let first = col(&key[0]);
    let matches: Vec<String> = key
        .iter()
        .map(|k| format!("t.{0} = r.{0}", col(k)))
        .collect();
    format!(
        "UPDATE {table} AS t SET {first} = t.{first} \
         FROM json_populate_record(NULL::{table}, $1::text::json) AS r WHERE {}",
        matches.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(hashed: bool) -> Reading {
        Reading {
            table: "public.accounts".into(),
            key: vec!["accountnumber".into()],
            columns: vec!["accountnumber".into(), "name".into(), "creditlimit".into()],
            hashed: hashed.then(|| vec!["accountnumber".into(), "name".into()]),
        }
    }

    #[test]
    fn passes_read_in_key_order_with_hashes_where_they_compare() {
        assert_eq!(
            pass_query(&reading(true)),
            "SELECT t.\"accountnumber\"::text, md5(json_build_array(t.\"accountnumber\"::text, t.\"name\"::text)::text) \
             FROM (SELECT \"accountnumber\", \"name\", \"creditlimit\" FROM \"public\".\"accounts\") AS t \
             ORDER BY t.\"accountnumber\"::text COLLATE \"C\""
        );
        assert_eq!(
            pass_query(&reading(false)),
            "SELECT t.\"accountnumber\"::text, \
             t.\"accountnumber\"::text, t.\"name\"::text, t.\"creditlimit\"::text \
             FROM (SELECT \"accountnumber\", \"name\", \"creditlimit\" FROM \"public\".\"accounts\") AS t \
             ORDER BY t.\"accountnumber\"::text COLLATE \"C\""
        );
    }

    #[test]
    fn the_touch_sets_the_key_to_itself() {
        assert_eq!(
            touch_sql(
                "public.custtable",
                &["dataareaid".into(), "accountnum".into()]
            ),
            "UPDATE \"public\".\"custtable\" AS t SET \"dataareaid\" = t.\"dataareaid\" \
             FROM json_populate_record(NULL::\"public\".\"custtable\", $1::text::json) AS r \
             WHERE t.\"dataareaid\" = r.\"dataareaid\" AND t.\"accountnum\" = r.\"accountnum\""
        );
    }
}
