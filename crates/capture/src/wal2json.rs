//! Decoding of wal2json (format version 2) output into change records.
//!
//! The capturer reads the slot with `pg_logical_slot_peek_changes`, which
//! returns whole transactions: a `B` row, one row per change, a `C` row. A
//! transaction's changes are released only at its `C` row, stamped with the
//! commit's end LSN (the source position) and commit time.

use dualwrite_model::record::{ChangeOp, ChangeRecord, Field};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One output row of the slot.
#[derive(Debug, Clone)]
pub struct SlotRow {
    /// LSN of the row (for a `C` row: the end of the commit record).
    pub lsn: u64,
    pub data: String,
}

#[derive(Deserialize)]
struct Message<'a> {
    action: &'a str,
    #[serde(default)]
    timestamp: Option<&'a str>,
    #[serde(default)]
    xid: Option<i64>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default, borrow)]
    columns: Option<Vec<Column<'a>>>,
    #[serde(default, borrow)]
    identity: Option<Vec<Column<'a>>>,
    #[serde(default)]
    pk: Option<Vec<PkColumn>>,
}

#[derive(Deserialize)]
struct Column<'a> {
    name: String,
    #[serde(borrow)]
    value: &'a RawValue,
}

#[derive(Deserialize)]
struct PkColumn {
    name: String,
}

/// A decoded change with the key used on the capture topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub record: ChangeRecord,
    /// `[entity, primary key values…]` as JSON.
    pub kafka_key: String,
}

/// A row that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub lsn: u64,
    pub message: String,
    pub data: String,
}

/// Output of one read of the slot.
#[derive(Debug, Default)]
pub struct Decoded {
    pub changes: Vec<Captured>,
    pub bad: Vec<BadRow>,
    /// End LSN of the last complete transaction: where the slot may advance to.
    pub last_commit: Option<u64>,
}

struct Pending {
    op: ChangeOp,
    entity: String,
    before: Option<Vec<Field>>,
    after: Option<Vec<Field>>,
    pk: Vec<String>,
}

/// Decodes rows into change records for `side`. Changes of a transaction
/// whose `C` row is not among `rows` are left out (they are read again next time).
pub fn decode(side: &str, rows: &[SlotRow]) -> Decoded {
    let mut out = Decoded::default();
    let mut txn: Vec<Pending> = Vec::new();
    let mut xid = 0i64;
    for row in rows {
        let msg: Message<'_> = match serde_json::from_str(&row.data) {
            Ok(m) => m,
            Err(e) => {
                out.bad.push(BadRow {
                    lsn: row.lsn,
                    message: format!("wal2json output is not valid JSON: {e}"),
                    data: row.data.clone(),
                });
                continue;
            }
        };
        match msg.action {
            "B" => {
                txn.clear();
                xid = msg.xid.unwrap_or(0);
            }
            "C" => {
                let commit_time = msg.timestamp.and_then(parse_timestamp).unwrap_or(0);
                for (seq, p) in txn.drain(..).enumerate() {
                    let key_src = p.after.as_deref().or(p.before.as_deref()).unwrap_or(&[]);
                    let mut key: Vec<Option<&str>> = vec![Some(p.entity.as_str())];
                    for k in &p.pk {
                        key.push(
                            key_src
                                .iter()
                                .find(|f| &f.name == k)
                                .and_then(|f| f.value.as_deref()),
                        );
                    }
                    let kafka_key = serde_json::to_string(&key).unwrap_or_default();
                    out.changes.push(Captured {
                        record: ChangeRecord {
                            side: side.to_owned(),
                            entity: p.entity,
                            op: p.op,
                            before: p.before,
                            after: p.after,
                            commit_lsn: row.lsn as i64,
                            seq: seq as i32,
                            xid,
                            commit_time,
                        },
                        kafka_key,
                    });
                }
                out.last_commit = Some(row.lsn);
            }
            "I" | "U" | "D" => {
                let op = match msg.action {
                    "I" => ChangeOp::Insert,
                    "U" => ChangeOp::Update,
                    _ => ChangeOp::Delete,
                };
                let entity = format!(
                    "{}.{}",
                    msg.schema.unwrap_or_default(),
                    msg.table.unwrap_or_default()
                );
                let conv = |cols: Option<Vec<Column<'_>>>| -> Result<Option<Vec<Field>>, String> {
                    cols.map(|cs| cs.into_iter().map(to_field).collect())
                        .transpose()
                };
                let (before, after) = match (conv(msg.identity), conv(msg.columns)) {
                    (Ok(b), Ok(a)) => (b, a),
                    (Err(e), _) | (_, Err(e)) => {
                        out.bad.push(BadRow {
                            lsn: row.lsn,
                            message: format!("change on {entity}: {e}"),
                            data: row.data.clone(),
                        });
                        continue;
                    }
                };
                txn.push(Pending {
                    op,
                    entity,
                    before,
                    after: if op == ChangeOp::Delete { None } else { after },
                    pk: msg
                        .pk
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| c.name)
                        .collect(),
                });
            }
            // Logical decoding messages, truncates: not synced.
            _ => {}
        }
    }
    out
}

fn to_field(c: Column<'_>) -> Result<Field, String> {
    let raw = c.value.get();
    let value = if raw == "null" {
        None
    } else if raw.starts_with('"') {
        Some(
            serde_json::from_str::<String>(raw)
                .map_err(|e| format!("column `{}`: bad string value: {e}", c.name))?,
        )
    } else {
        // Numbers and booleans: keep wal2json's text exactly (no float rounding).
        Some(raw.to_owned())
    };
    Ok(Field {
        name: c.name,
        value,
    })
}

/// PostgreSQL's `timestamptz` text (`2026-11-26 14:02:52.453588+00`) to
/// microseconds since the epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.timestamp_micros())
}

pub use dualwrite_model::record::{format_lsn, parse_lsn};

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(lines: &[(&str, &str)]) -> Vec<SlotRow> {
        lines
            .iter()
            .map(|(lsn, data)| SlotRow {
                lsn: parse_lsn(lsn).unwrap(),
                data: data.to_string(),
            })
            .collect()
    }

    #[test]
    fn decodes_a_transaction() {
        let r = rows(&[
            (
                "0/1505468",
                r#"{"action":"B","xid":726,"timestamp":"2026-11-26 14:02:52.453588+00"}"#,
            ),
            (
                "0/1505468",
                r#"{"action":"I","xid":726,"schema":"public","table":"t1","columns":[{"name":"id","type":"integer","value":1},{"name":"name","type":"text","value":"a'b \"q\""},{"name":"amt","type":"numeric(10,2)","value":12.50},{"name":"ok","type":"boolean","value":true},{"name":"j","type":"jsonb","value":null}],"pk":[{"name":"id","type":"integer"}]}"#,
            ),
            (
                "0/1505710",
                r#"{"action":"D","schema":"public","table":"t1","identity":[{"name":"id","type":"integer","value":2}],"pk":[{"name":"id","type":"integer"}]}"#,
            ),
            (
                "0/1505630",
                r#"{"action":"C","xid":726,"timestamp":"2026-11-26 14:02:52.453588+00"}"#,
            ),
        ]);
        let d = decode("fno", &r);
        assert!(d.bad.is_empty());
        assert_eq!(d.last_commit, parse_lsn("0/1505630"));
        assert_eq!(d.changes.len(), 2);
        let ins = &d.changes[0].record;
        assert_eq!(ins.op, ChangeOp::Insert);
        assert_eq!(ins.entity, "public.t1");
        assert_eq!(ins.xid, 726);
        assert_eq!(ins.seq, 0);
        assert_eq!(ins.commit_lsn as u64, parse_lsn("0/1505630").unwrap());
        let after = ins.after.as_ref().unwrap();
        assert_eq!(after[1].value.as_deref(), Some("a'b \"q\""));
        assert_eq!(after[2].value.as_deref(), Some("12.50"));
        assert_eq!(after[3].value.as_deref(), Some("true"));
        assert_eq!(after[4].value, None);
        assert_eq!(d.changes[0].kafka_key, r#"["public.t1","1"]"#);
        let del = &d.changes[1].record;
        assert_eq!((del.op, del.seq), (ChangeOp::Delete, 1));
        assert!(del.after.is_none());
        assert_eq!(d.changes[1].kafka_key, r#"["public.t1","2"]"#);
        assert_eq!(
            ins.commit_time,
            parse_timestamp("2026-11-26 14:02:52.453588+00").unwrap()
        );
    }

    #[test]
    fn incomplete_transaction_is_held_back() {
        let r = rows(&[
            ("0/10", r#"{"action":"B","xid":1}"#),
            (
                "0/10",
                r#"{"action":"I","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1}]}"#,
            ),
        ]);
        let d = decode("a", &r);
        assert!(d.changes.is_empty());
        assert_eq!(d.last_commit, None);
    }

    #[test]
    fn bad_row_is_reported_and_the_rest_decodes() {
        let r = rows(&[
            ("0/10", r#"{"action":"B","xid":1}"#),
            ("0/11", r#"{"action":"I", garbage"#),
            (
                "0/12",
                r#"{"action":"I","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1}]}"#,
            ),
            ("0/20", r#"{"action":"C","xid":1}"#),
        ]);
        let d = decode("a", &r);
        assert_eq!(d.bad.len(), 1);
        assert!(d.bad[0].message.contains("not valid JSON"));
        assert_eq!(d.changes.len(), 1);
    }

    #[test]
    fn lsn_text_round_trips() {
        for s in ["0/0", "0/1505630", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
        }
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn timestamps_with_offsets() {
        let a = parse_timestamp("2026-11-26 14:02:52+00").unwrap();
        let b = parse_timestamp("2026-11-26 19:32:52+05:30").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            parse_timestamp("2026-11-26 14:02:52.5+00").unwrap(),
            a + 500_000
        );
    }
}
