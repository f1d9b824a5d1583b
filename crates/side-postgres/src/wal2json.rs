//! Decoding of wal2json (format version 2) output into change records.
//!
//! The capturer streams the slot ([`crate::replication`]), which gives
//! whole transactions: a `B` row, one row per change, a `C` row.
//! Every record of a transaction is stamped with the commit's end LSN (the
//! source position) and commit time, which wal2json also puts on the `B`
//! row (`nextlsn`, `timestamp`), and with its position in the transaction
//! (`seq`). A [`Decoder`] takes the rows one at a time and gives each
//! change out as soon as its row is read, so a transaction of any size
//! passes through in bounded memory; reading a transaction again (after a
//! crash) gives the same records at the same positions.
//!
//! Only the columns some map of the side reads leave the decoder
//! ([`Context::columns`]): the new row keeps those; the old row keeps the
//! alternate key and scope columns, and those the new row lacks (an update
//! leaves out unchanged TOASTed values, which the old row has with
//! `REPLICA IDENTITY FULL`).
//!
//! A transaction of one of the side's appliers (its replication origin,
//! `include-origin`) is not a change of the side: its rows are left out (no
//! echo), and each `dualwrite.ack` message it carries becomes an
//! [`ChangeOp::Applied`] record, in its place among the side's own writes.
//!
//! Records are keyed by `[entity, alternate key values…]`, so that all
//! writes of a record on the side, and the applier's reports about it, are
//! in one partition in commit order; an update that changes the alternate
//! key becomes a delete of the old key and an insert of the new one.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use dualwrite_model::columns::ReadColumns;
use dualwrite_model::record::{field, Applied, ChangeOp, ChangeRecord, Field};
use serde::Deserialize;

pub use dualwrite_runtime::side::{BadRow, Captured, Decoded};
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
    origin: Option<i64>,
    #[serde(default)]
    prefix: Option<&'a str>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    timestamp: Option<&'a str>,
    /// `B` row: the end of the commit record (`include-lsn`).
    #[serde(default)]
    nextlsn: Option<&'a str>,
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

/// The prefix of the logical messages in which an applier reports the
/// writes it committed (one per record, in the same transaction).
pub const ACK_PREFIX: &str = "dualwrite.ack";

/// The content of an applier's report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Ack {
    pub map: String,
    pub entity: String,
    /// The alternate key values, in the entity's key order.
    pub key: Vec<Option<String>>,
    pub version: i64,
    /// False: the write was not made (superseded).
    #[serde(default = "written")]
    pub written: bool,
    /// A delete made as a move (a key change of the other side): the row
    /// as moved to its new key, column to text value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<BTreeMap<String, Option<String>>>,
}

fn written() -> bool {
    true
}

/// What decoding needs to know of the side.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub side: String,
    /// Replication origins of the side's appliers.
    pub applier_origins: HashSet<i64>,
    /// Per captured entity (`schema.table`), its alternate key columns.
    pub keys: BTreeMap<String, Vec<String>>,
    /// Per captured entity, the columns the side's maps read: the rest of a
    /// row is left out. An entity not listed keeps every column.
    pub columns: BTreeMap<String, ReadColumns>,
}

impl Context {
    /// A side with no appliers and no known keys (records keyed by primary key).
    pub fn plain(side: &str) -> Context {
        Context {
            side: side.to_owned(),
            ..Context::default()
        }
    }
}

struct Pending {
    op: ChangeOp,
    entity: String,
    before: Option<Vec<Field>>,
    after: Option<Vec<Field>>,
    pk: Vec<String>,
    applied: Option<Applied>,
    /// A half of a key change: the other half's key.
    moved: Option<Vec<Field>>,
}

/// Decodes rows into change records for the side (see [`Decoder`]).
pub fn decode(ctx: &Context, rows: &[SlotRow]) -> Decoded {
    let mut decoder = Decoder::new(Arc::new(ctx.clone()));
    let mut out = Decoded::default();
    for row in rows {
        decoder.push(row, &mut out);
    }
    out
}

/// Decodes the slot's rows one at a time, in their order. Each change is
/// given out as its row is read, stamped with the commit position and time
/// of the transaction's `B` row; a `B` row without them (a wal2json without
/// `nextlsn`) holds its transaction's changes back until the `C` row.
pub struct Decoder {
    ctx: Arc<Context>,
    txn: Txn,
    /// Between a `B` row and its `C` row.
    open: bool,
}

/// The transaction being read.
#[derive(Default)]
struct Txn {
    xid: i64,
    /// Written by one of the side's appliers.
    applier: bool,
    /// End LSN of the commit record and commit time, once known.
    stamp: Option<(u64, i64)>,
    /// Records given out so far: the next one's position in the transaction.
    seq: i32,
    /// Changes waiting for the stamp.
    held: Vec<Pending>,
}

impl Decoder {
    pub fn new(ctx: Arc<Context>) -> Decoder {
        Decoder {
            ctx,
            txn: Txn::default(),
            open: false,
        }
    }

    /// Whether a transaction was begun and not committed yet: the rows
    /// that follow belong to it.
    pub fn in_transaction(&self) -> bool {
        self.open
    }

    /// Whether a row can be left out unread: a row change (`I`, `U`, `D`)
    /// of an applier's transaction, which gives nothing (see the module
    /// docs). wal2json's format 2 writes the action first; a row written
    /// otherwise is read, and left out after.
    pub fn leaves_out(&self, data: &[u8]) -> bool {
        self.txn.applier
            && matches!(
                data.strip_prefix(br#"{"action":""#),
                Some([b'I' | b'U' | b'D', b'"', ..])
            )
    }

    /// Decodes one row, adding what it gives to `out`.
    pub fn push(&mut self, row: &SlotRow, out: &mut Decoded) {
        if self.leaves_out(row.data.as_bytes()) {
            return;
        }
        let msg: Message<'_> = match serde_json::from_str(&row.data) {
            Ok(m) => m,
            Err(e) => {
                out.bad
                    .push(bad(row, format!("wal2json output is not valid JSON: {e}")));
                return;
            }
        };
        let applier = self.txn.applier;
        match msg.action {
            "B" => {
                self.open = true;
                self.begin(&msg)
            }
            "C" => self.commit(row, &msg, out),
            "M" if applier && msg.prefix == Some(ACK_PREFIX) => {
                match ack_records(&self.ctx, msg.content.as_deref().unwrap_or_default()) {
                    Ok(ps) => ps.into_iter().for_each(|p| self.give(p, out)),
                    Err(e) => out.bad.push(bad(row, format!("applier report: {e}"))),
                }
            }
            // The side's applier wrote this: not a change of the side.
            "I" | "U" | "D" if applier => {}
            "I" | "U" | "D" => match change(msg) {
                Ok(p) => self.give(p, out),
                Err(e) => out.bad.push(bad(row, e)),
            },
            // Other logical decoding messages, truncates: not synced.
            _ => {}
        }
    }

    fn begin(&mut self, msg: &Message<'_>) {
        let time = msg.timestamp.and_then(parse_timestamp).unwrap_or(0);
        self.txn = Txn {
            xid: msg.xid.unwrap_or(0),
            applier: msg
                .origin
                .is_some_and(|o| self.ctx.applier_origins.contains(&o)),
            stamp: msg.nextlsn.and_then(parse_lsn).map(|lsn| (lsn, time)),
            ..Txn::default()
        };
    }

    fn commit(&mut self, row: &SlotRow, msg: &Message<'_>, out: &mut Decoded) {
        match self.txn.stamp {
            Some((lsn, _)) if lsn != row.lsn => tracing::warn!(
                begin = %format_lsn(lsn),
                commit = %format_lsn(row.lsn),
                "wal2json gave a transaction two commit positions; its records carry the first"
            ),
            Some(_) => {}
            None => {
                let time = msg.timestamp.and_then(parse_timestamp).unwrap_or(0);
                self.txn.stamp = Some((row.lsn, time));
                for p in std::mem::take(&mut self.txn.held) {
                    self.give(p, out);
                }
            }
        }
        out.last_commit = Some(row.lsn);
        self.txn = Txn::default();
        self.open = false;
    }

    /// Gives out a change of the transaction (held until its stamp is known).
    fn give(&mut self, p: Pending, out: &mut Decoded) {
        let Some((lsn, commit_time)) = self.txn.stamp else {
            self.txn.held.push(p);
            return;
        };
        for mut p in split(&self.ctx, p) {
            if let Some(cols) = self.ctx.columns.get(&p.entity) {
                project(cols, &mut p);
            }
            let kafka_key = kafka_key(&self.ctx, &p);
            out.changes.push(Captured {
                record: ChangeRecord {
                    side: self.ctx.side.clone(),
                    entity: p.entity,
                    op: p.op,
                    before: p.before,
                    after: p.after,
                    commit_lsn: lsn as i64,
                    seq: self.txn.seq,
                    xid: self.txn.xid,
                    commit_time,
                    applied: p.applied,
                    moved: p.moved,
                },
                kafka_key,
            });
            self.txn.seq += 1;
        }
    }
}

fn bad(row: &SlotRow, message: String) -> BadRow {
    BadRow {
        lsn: row.lsn,
        message,
        data: row.data.clone(),
    }
}

/// A row change (`I`, `U`, `D`) as a pending record.
fn change(msg: Message<'_>) -> Result<Pending, String> {
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
            .map_err(|e| format!("change on {entity}: {e}"))
    };
    let before = conv(msg.identity)?;
    let after = conv(msg.columns)?;
    Ok(Pending {
        op,
        before,
        after: if op == ChangeOp::Delete { None } else { after },
        pk: msg
            .pk
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect(),
        applied: None,
        moved: None,
        entity,
    })
}

/// Leaves out of a change the columns no map of the side reads. The old
/// row of an update keeps the key and scope columns and the read columns
/// the new row lacks (unchanged TOASTed values); of a delete, the key and
/// scope columns. An applier's report carries the key only.
fn project(cols: &ReadColumns, p: &mut Pending) {
    if p.op == ChangeOp::Applied {
        return;
    }
    if let Some(after) = &mut p.after {
        after.retain(|f| cols.all.contains(&f.name));
    }
    let after = p.after.as_deref().unwrap_or_default();
    if let Some(before) = &mut p.before {
        before.retain(|f| {
            cols.identity.contains(&f.name)
                || (p.op == ChangeOp::Update
                    && cols.all.contains(&f.name)
                    && field(after, &f.name).is_none())
        });
    }
}

/// An applier's report as pending records: the report (`before` holds the
/// key) and, for a move, the row as moved to its new key.
fn ack_records(ctx: &Context, content: &str) -> Result<Vec<Pending>, String> {
    let ack: Ack = serde_json::from_str(content).map_err(|e| format!("not valid: {e}"))?;
    let names = ctx
        .keys
        .get(&ack.entity)
        .ok_or_else(|| format!("entity {} is not captured", ack.entity))?;
    if names.len() != ack.key.len() {
        return Err(format!(
            "{} key values for {}, whose key has {}",
            ack.key.len(),
            ack.entity,
            names.len()
        ));
    }
    let key = names
        .iter()
        .zip(ack.key)
        .map(|(n, v)| Field {
            name: n.clone(),
            value: v,
        })
        .collect();
    let moved = ack.moved_to.map(|row| Pending {
        op: ChangeOp::Moved,
        entity: ack.entity.clone(),
        before: None,
        after: Some(
            row.into_iter()
                .map(|(name, value)| Field { name, value })
                .collect(),
        ),
        pk: Vec::new(),
        applied: None,
        moved: None,
    });
    let report = Pending {
        op: ChangeOp::Applied,
        entity: ack.entity,
        before: Some(key),
        after: None,
        pk: Vec::new(),
        applied: Some(Applied {
            map: ack.map,
            version: ack.version,
            written: ack.written,
        }),
        moved: None,
    };
    Ok(std::iter::once(report).chain(moved).collect())
}

/// An update that changes the alternate key, as a delete of the old key
/// and an insert of the new one (each keyed by its own key).
fn split(ctx: &Context, p: Pending) -> Vec<Pending> {
    let Some(names) = ctx.keys.get(&p.entity) else {
        return vec![p];
    };
    let (Some(before), Some(after)) = (p.before.as_deref(), p.after.as_deref()) else {
        return vec![p];
    };
    if p.op != ChangeOp::Update || key_values(names, before) == key_values(names, after) {
        return vec![p];
    }
    let mut full = before.to_vec();
    for f in after {
        match full.iter_mut().find(|g| g.name == f.name) {
            Some(g) => g.value = f.value.clone(),
            None => full.push(f.clone()),
        }
    }
    // Each half names the other's key, so that the target's applier can
    // move the record's row instead of deleting and inserting it.
    let key_of = |fields: &[Field]| -> Vec<Field> {
        names
            .iter()
            .filter_map(|n| fields.iter().find(|f| &f.name == n).cloned())
            .collect()
    };
    vec![
        Pending {
            op: ChangeOp::Delete,
            after: None,
            pk: p.pk.clone(),
            entity: p.entity.clone(),
            before: p.before.clone(),
            applied: None,
            moved: Some(key_of(&full)),
        },
        Pending {
            op: ChangeOp::Insert,
            before: None,
            moved: Some(key_of(before)),
            after: Some(full),
            ..p
        },
    ]
}

fn key_values<'a>(names: &[String], fields: &'a [Field]) -> Vec<Option<&'a str>> {
    names
        .iter()
        .map(|n| {
            fields
                .iter()
                .find(|f| &f.name == n)
                .and_then(|f| f.value.as_deref())
        })
        .collect()
}

/// `[entity, alternate key values…]` (primary key values for an entity of
/// unknown key), from the new values, or the old ones for a delete.
fn kafka_key(ctx: &Context, p: &Pending) -> String {
    let image = p.after.as_deref().or(p.before.as_deref()).unwrap_or(&[]);
    let names = ctx.keys.get(&p.entity).unwrap_or(&p.pk);
    let mut key: Vec<Option<&str>> = vec![Some(p.entity.as_str())];
    key.extend(key_values(names, image));
    serde_json::to_string(&key).unwrap_or_default()
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
        let d = decode(&Context::plain("fno"), &r);
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

    fn ctx() -> Context {
        Context {
            side: "fno".into(),
            applier_origins: [7].into_iter().collect(),
            keys: [("public.t".to_owned(), vec!["code".to_owned()])]
                .into_iter()
                .collect(),
            columns: BTreeMap::new(),
        }
    }

    #[test]
    fn an_appliers_transaction_becomes_its_reports() {
        let r = rows(&[
            ("0/10", r#"{"action":"B","xid":9,"origin":7}"#),
            (
                "0/11",
                r#"{"action":"U","origin":7,"schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"}],"identity":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"}]}"#,
            ),
            (
                "0/12",
                r#"{"action":"M","origin":7,"transactional":true,"prefix":"dualwrite.ack","content":"{\"map\":\"m\",\"entity\":\"public.t\",\"key\":[\"A\"],\"version\":42}"}"#,
            ),
            ("0/20", r#"{"action":"C","xid":9,"origin":7}"#),
        ]);
        let d = decode(&ctx(), &r);
        assert!(d.bad.is_empty(), "{:?}", d.bad);
        assert_eq!(
            d.changes.len(),
            1,
            "the applier's row is not a change of the side"
        );
        let c = &d.changes[0];
        assert_eq!(c.record.op, ChangeOp::Applied);
        assert_eq!(
            c.record.applied,
            Some(Applied {
                map: "m".into(),
                version: 42,
                written: true,
            })
        );
        assert_eq!(c.record.before, Some(vec![Field::new("code", Some("A"))]));
        // Keyed like the record's own writes: same partition, commit order.
        assert_eq!(c.kafka_key, r#"["public.t","A"]"#);
        assert_eq!(c.record.commit_lsn as u64, parse_lsn("0/20").unwrap());
        // A local transaction's message with that prefix is not a report.
        let local = rows(&[
            ("0/30", r#"{"action":"B","xid":10,"origin":0}"#),
            (
                "0/31",
                r#"{"action":"M","transactional":true,"prefix":"dualwrite.ack","content":"{}"}"#,
            ),
            ("0/40", r#"{"action":"C","xid":10}"#),
        ]);
        assert!(decode(&ctx(), &local).changes.is_empty());
    }

    #[test]
    fn an_appliers_row_changes_are_left_out_unread() {
        // Not JSON past the action: read, it would be a bad row.
        let cut = r#"{"action":"I","schema":"public","table":"t","columns":[{"#;
        let txn = |origin: i64| {
            let begin = format!(r#"{{"action":"B","xid":9,"origin":{origin}}}"#);
            rows(&[
                ("0/10", begin.as_str()),
                ("0/11", cut),
                (
                    "0/12",
                    r#"{"origin":7,"action":"D","schema":"public","table":"t","identity":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"}]}"#,
                ),
                ("0/20", r#"{"action":"C","xid":9}"#),
            ])
        };
        let d = decode(&ctx(), &txn(7));
        assert!(d.bad.is_empty(), "left out unread: {:?}", d.bad);
        assert!(d.changes.is_empty(), "the action not first: read, left out");
        assert_eq!(d.last_commit, parse_lsn("0/20"));
        let local = decode(&ctx(), &txn(0));
        assert_eq!(local.bad.len(), 1, "a side's own row is read");
        assert_eq!(local.changes.len(), 1);
    }

    #[test]
    fn records_are_keyed_by_alternate_key_and_a_key_change_splits() {
        let r = rows(&[
            ("0/10", r#"{"action":"B","xid":9}"#),
            (
                "0/11",
                r#"{"action":"U","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"B"},{"name":"v","type":"text","value":"x"}],"identity":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"},{"name":"v","type":"text","value":"x"}],"pk":[{"name":"id","type":"integer"}]}"#,
            ),
            ("0/20", r#"{"action":"C","xid":9}"#),
        ]);
        let d = decode(&ctx(), &r);
        let got: Vec<(ChangeOp, &str, i32)> = d
            .changes
            .iter()
            .map(|c| (c.record.op, c.kafka_key.as_str(), c.record.seq))
            .collect();
        assert_eq!(
            got,
            [
                (ChangeOp::Delete, r#"["public.t","A"]"#, 0),
                (ChangeOp::Insert, r#"["public.t","B"]"#, 1)
            ]
        );
        let ins = d.changes[1].record.after.as_ref().unwrap();
        assert!(ins.contains(&Field::new("v", Some("x"))));
        // Each half names the other's key, for the target to move the row.
        assert_eq!(
            d.changes[0].record.moved,
            Some(vec![Field::new("code", Some("B"))])
        );
        assert_eq!(
            d.changes[1].record.moved,
            Some(vec![Field::new("code", Some("A"))])
        );
    }

    #[test]
    fn a_move_is_reported_with_the_row_at_its_new_key() {
        let r = rows(&[
            ("0/10", r#"{"action":"B","xid":9,"origin":7}"#),
            (
                "0/11",
                r#"{"action":"M","origin":7,"transactional":true,"prefix":"dualwrite.ack","content":"{\"map\":\"m\",\"entity\":\"public.t\",\"key\":[\"A\"],\"version\":42,\"written\":true,\"moved_to\":{\"id\":\"1\",\"code\":\"B\",\"v\":null}}"}"#,
            ),
            ("0/20", r#"{"action":"C","xid":9,"origin":7}"#),
        ]);
        let d = decode(&ctx(), &r);
        assert!(d.bad.is_empty(), "{:?}", d.bad);
        let got: Vec<(ChangeOp, &str, i32)> = d
            .changes
            .iter()
            .map(|c| (c.record.op, c.kafka_key.as_str(), c.record.seq))
            .collect();
        assert_eq!(
            got,
            [
                (ChangeOp::Applied, r#"["public.t","A"]"#, 0),
                (ChangeOp::Moved, r#"["public.t","B"]"#, 1)
            ]
        );
        let row = d.changes[1].record.after.as_ref().unwrap();
        assert!(row.contains(&Field::new("code", Some("B"))));
        assert!(row.contains(&Field::new("v", None::<String>)));
    }

    /// A transaction as wal2json prints it with `include-lsn`: the commit's
    /// position on the `B` row too.
    fn streamed() -> Vec<SlotRow> {
        rows(&[
            (
                "0/10",
                r#"{"action":"B","xid":5,"timestamp":"2026-12-01 22:49:11.5+00","lsn":"0/90","nextlsn":"0/A0"}"#,
            ),
            (
                "0/11",
                r#"{"action":"I","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"}]}"#,
            ),
            (
                "0/12",
                r#"{"action":"U","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"B"}],"identity":[{"name":"id","type":"integer","value":1},{"name":"code","type":"text","value":"A"}]}"#,
            ),
            (
                "0/A0",
                r#"{"action":"C","xid":5,"timestamp":"2026-12-01 22:49:11.5+00","lsn":"0/90","nextlsn":"0/A0"}"#,
            ),
        ])
    }

    #[test]
    fn changes_come_out_as_their_rows_are_read_at_their_commit_position() {
        let rows = streamed();
        let ctx = ctx();
        let mut decoder = Decoder::new(Arc::new(ctx.clone()));
        let mut out = Decoded::default();
        decoder.push(&rows[0], &mut out);
        decoder.push(&rows[1], &mut out);
        assert_eq!(out.changes.len(), 1, "the insert is out before the commit");
        assert_eq!(out.last_commit, None);
        decoder.push(&rows[2], &mut out);
        decoder.push(&rows[3], &mut out);
        assert_eq!(out.last_commit, parse_lsn("0/A0"));
        let got: Vec<(ChangeOp, i64, i32)> = out
            .changes
            .iter()
            .map(|c| (c.record.op, c.record.commit_lsn, c.record.seq))
            .collect();
        let commit = parse_lsn("0/A0").unwrap() as i64;
        // The key change splits: positions count the records given out.
        assert_eq!(
            got,
            [
                (ChangeOp::Insert, commit, 0),
                (ChangeOp::Delete, commit, 1),
                (ChangeOp::Insert, commit, 2)
            ]
        );
        assert!(out.changes.iter().all(|c| c.record.xid == 5
            && c.record.commit_time == parse_timestamp("2026-12-01 22:49:11.5+00").unwrap()));
    }

    #[test]
    fn a_commit_position_on_the_begin_row_changes_nothing() {
        // Without `nextlsn` (older wal2json) the records wait for the C row,
        // and come out the same: a transaction read again by either gives
        // the same records at the same positions.
        let with = decode(&ctx(), &streamed());
        let mut without = streamed();
        without[0].data = without[0].data.replace(r#","nextlsn":"0/A0""#, "");
        let ctx = ctx();
        let mut decoder = Decoder::new(Arc::new(ctx.clone()));
        let mut out = Decoded::default();
        for r in &without[..3] {
            decoder.push(r, &mut out);
        }
        assert!(out.changes.is_empty(), "held until the commit");
        decoder.push(&without[3], &mut out);
        assert_eq!(out.changes, with.changes);
        assert_eq!(out.last_commit, with.last_commit);
    }

    fn read_ctx() -> Context {
        let mut c = ctx();
        c.columns.insert(
            "public.t".into(),
            ReadColumns {
                identity: ["code".to_owned(), "region".to_owned()].into(),
                all: ["code", "region", "name", "big"].map(str::to_owned).into(),
            },
        );
        c
    }

    fn names(fields: &Option<Vec<Field>>) -> Vec<&str> {
        fields.iter().flatten().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn only_the_columns_maps_read_are_kept() {
        let col = |n: &str, v: &str| format!(r#"{{"name":"{n}","type":"text","value":"{v}"}}"#);
        let row = |cols: &[(&str, &str)]| {
            cols.iter()
                .map(|(n, v)| col(n, v))
                .collect::<Vec<_>>()
                .join(",")
        };
        let full = |code: &str, name: &str| {
            row(&[
                ("id", "1"),
                ("code", code),
                ("region", "north"),
                ("name", name),
                ("big", "BIG"),
                ("secret", "S"),
            ])
        };
        // An update leaving `big` out (unchanged, TOASTed), an update that
        // changes the key, a delete.
        let upd_new = row(&[
            ("id", "1"),
            ("code", "A"),
            ("region", "north"),
            ("name", "n2"),
            ("secret", "S2"),
        ]);
        let data = [
            r#"{"action":"B","xid":1,"nextlsn":"0/20"}"#.to_owned(),
            format!(
                r#"{{"action":"I","schema":"public","table":"t","columns":[{}]}}"#,
                full("A", "n1")
            ),
            format!(
                r#"{{"action":"U","schema":"public","table":"t","columns":[{upd_new}],"identity":[{}]}}"#,
                full("A", "n1")
            ),
            format!(
                r#"{{"action":"U","schema":"public","table":"t","columns":[{}],"identity":[{}]}}"#,
                full("B", "n2"),
                full("A", "n2")
            ),
            format!(
                r#"{{"action":"D","schema":"public","table":"t","identity":[{}]}}"#,
                full("B", "n2")
            ),
            r#"{"action":"C","xid":1}"#.to_owned(),
        ];
        let r: Vec<SlotRow> = data
            .iter()
            .map(|d| SlotRow {
                lsn: 0x20,
                data: d.clone(),
            })
            .collect();
        let d = decode(&read_ctx(), &r);
        let c: Vec<&ChangeRecord> = d.changes.iter().map(|c| &c.record).collect();
        assert_eq!(c.len(), 5, "{c:?}");
        assert_eq!(names(&c[0].after), ["code", "region", "name", "big"]);
        // The update's old row: key and scope, and what the new row lacks.
        assert_eq!(names(&c[1].after), ["code", "region", "name"]);
        assert_eq!(names(&c[1].before), ["code", "region", "big"]);
        assert_eq!(
            c[1].before.as_ref().unwrap()[2].value.as_deref(),
            Some("BIG")
        );
        // The key change: a delete of the old key, an insert of the whole new row.
        assert_eq!(
            (c[2].op, names(&c[2].before)),
            (ChangeOp::Delete, vec!["code", "region"])
        );
        assert_eq!(
            (c[3].op, names(&c[3].after)),
            (ChangeOp::Insert, vec!["code", "region", "name", "big"])
        );
        assert_eq!(names(&c[4].before), ["code", "region"]);
        assert!(
            !format!("{c:?}").contains("secret") && !format!("{c:?}").contains("\"id\""),
            "{c:?}"
        );
        // An entity no map reads columns of keeps them all.
        let all = decode(&ctx(), &r);
        assert_eq!(names(&all.changes[0].record.after).len(), 6);
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
        let d = decode(&Context::plain("a"), &r);
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
        let d = decode(&Context::plain("a"), &r);
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
