//! The connection to the target and the writing of the resolver's
//! decisions: each write is made only if the target is still in the state
//! the resolver expected (compare-and-set), and is reported, in the same
//! transaction, by a logical message that the side's capturer passes on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ApplyWrite, ExpectKind, Field, WriteOp};
use dualwrite_runtime::kafka::Shard;
use dualwrite_runtime::metrics::{direction, metrics};
use dualwrite_runtime::pg;
use tokio_postgres::{Client, Statement};

use crate::sql;

/// A connection to the target with its prepared statements.
pub struct Writer {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// A write that the target rejected.
pub struct Rejected {
    pub index: usize,
    pub error: tokio_postgres::Error,
}

/// What became of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// A redelivery: a write of this version or a later one was decided
    /// (made or superseded).
    Stale,
    /// The target changed since the decision (a write of its own the
    /// resolver has not seen yet, which it resolves in its turn).
    Superseded,
    /// The upsert of a key change's new key, while the row of the old key
    /// is still there: it waits for that row to be moved or deleted.
    Waiting,
}

/// What became of a batch: the writes the target rejected, and those
/// that wait (by index).
#[derive(Default)]
pub struct Done {
    pub rejected: Vec<Rejected>,
    pub waiting: Vec<usize>,
}

/// The bookkeeping of one record on the target.
struct Version {
    version: i64,
    row_xmin: Option<String>,
    present: bool,
    /// The latest write decided (made or superseded); `None` in rows
    /// written before the column was added.
    decided: Option<i64>,
}

/// The target row of one write: its version and whether it has the expected values.
struct RowState {
    xmin: String,
    same: bool,
}

impl Writer {
    pub async fn connect(
        config: &Arc<Config>,
        side: SideId,
        shard: Shard,
    ) -> Result<Writer, pg::ConnectError> {
        let client = pg::connect(&config.side(side).connection, "dualwrite-apply").await?;
        // One session holds an origin at a time: each instance has its own.
        let origins = config.origin_names(side);
        let origin = if shard.count > 1 {
            origins[1 + shard.index as usize].clone()
        } else {
            origins[0].clone()
        };
        pg::ensure_origin(&client, &origin).await?;
        client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await?;
        client.batch_execute(sql::VERSIONS_DDL).await?;
        // The statements are prepared once, while the bookkeeping table may
        // still be small; a plan per execution keeps its key lookups on the
        // primary key as it grows (a cached generic plan scanned it whole).
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await?;
        Ok(Writer {
            client,
            statements: HashMap::new(),
        })
    }

    async fn prepared(&mut self, sql: String) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Writes the writes in one transaction; if the target rejects one,
    /// writes them one transaction each so that only the rejected ones fail.
    /// `Err` only for failures worth retrying the whole batch.
    pub async fn write(
        &mut self,
        writes: &[(usize, ApplyWrite)],
    ) -> Result<Done, tokio_postgres::Error> {
        let all_at_once = async {
            self.client.batch_execute("BEGIN").await?;
            let mut outcomes = Vec::with_capacity(writes.len());
            for run in runs(writes) {
                outcomes.extend(self.exec_run(&writes[run]).await?);
            }
            self.client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(outcomes)
        }
        .await;
        let mut done = Done::default();
        match all_at_once {
            Ok(outcomes) => {
                for ((index, w), o) in writes.iter().zip(outcomes) {
                    done.note(*index, w, o);
                }
                return Ok(done);
            }
            Err(e) if pg::is_transient(&e) => return Err(e),
            Err(_) => self.client.batch_execute("ROLLBACK").await?,
        }
        for (index, w) in writes {
            let one = async {
                self.client.batch_execute("BEGIN").await?;
                let o = self
                    .exec_run(std::slice::from_ref(&(*index, w.clone())))
                    .await?;
                self.client.batch_execute("COMMIT").await?;
                Ok::<_, tokio_postgres::Error>(o)
            }
            .await;
            match one {
                Ok(o) => done.note(*index, w, o[0]),
                Err(e) if pg::is_transient(&e) => return Err(e),
                Err(error) => {
                    self.client.batch_execute("ROLLBACK").await?;
                    done.rejected.push(Rejected {
                        index: *index,
                        error,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Writes a run of writes of one shape (see [`runs`]) with one
    /// statement for each step: the bookkeeping, the rows (locked), the
    /// write, the new bookkeeping and the reports. Each record occurs once,
    /// so the steps of different writes do not see each other.
    async fn exec_run(
        &mut self,
        run: &[(usize, ApplyWrite)],
    ) -> Result<Vec<Outcome>, tokio_postgres::Error> {
        let Some((_, first)) = run.first() else {
            return Ok(Vec::new());
        };
        if !first.moved.is_empty() {
            return Ok(vec![self.exec_key_change(first).await?]);
        }
        let keys: Vec<String> = run.iter().map(|(_, w)| w.kafka_key()).collect();
        let versions = self.versions(&first.map, &keys).await?;
        let rows = self.rows(run).await?;
        let outcomes: Vec<Outcome> = run
            .iter()
            .zip(&keys)
            .zip(&rows)
            .map(|(((_, w), k), row)| decide(w, versions.get(k), row.as_ref()))
            .collect();
        let made: Vec<usize> = (0..run.len())
            .filter(|&i| outcomes[i] == Outcome::Written)
            .collect();
        if !made.is_empty() {
            let stmt = self.prepared(sql::statement_many(first)).await?;
            let param = sql::parameter_many(made.iter().map(|&i| &run[i].1));
            self.client.execute(&stmt, &[&param]).await?;
        }
        // Every write made or superseded is reported (a redelivery is not).
        let acks: Vec<String> = run
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o != Outcome::Stale)
            .map(|((_, w), o)| sql::ack(w, *o == Outcome::Written))
            .collect();
        let decided: Vec<(&ApplyWrite, Outcome)> = run
            .iter()
            .map(|(_, w)| w)
            .zip(outcomes.iter().copied())
            .collect();
        self.record_and_report(&first.map, &decided, &acks).await?;
        Ok(outcomes)
    }

    /// Records the writes decided in the bookkeeping and emits the reports.
    async fn record_and_report(
        &mut self,
        map: &str,
        decided: &[(&ApplyWrite, Outcome)],
        acks: &[String],
    ) -> Result<(), tokio_postgres::Error> {
        if acks.is_empty() {
            return Ok(());
        }
        let of = |o: Outcome| {
            decided
                .iter()
                .filter(move |(_, x)| *x == o)
                .map(|(w, _)| *w)
        };
        let ks: Vec<String> = of(Outcome::Written).map(|w| w.kafka_key()).collect();
        let vs: Vec<i64> = of(Outcome::Written).map(|w| w.version).collect();
        let ps: Vec<bool> = of(Outcome::Written)
            .map(|w| w.op == WriteOp::Upsert)
            .collect();
        let sk: Vec<String> = of(Outcome::Superseded).map(|w| w.kafka_key()).collect();
        let sv: Vec<i64> = of(Outcome::Superseded).map(|w| w.version).collect();
        let stmt = self.prepared(sql::RECORD_AND_REPORT.to_owned()).await?;
        self.client
            .query_one(&stmt, &[&map, &ks, &vs, &ps, &sk, &sv, &acks])
            .await?;
        Ok(())
    }

    /// A half of a key change made on the other side (see `ApplyWrite::moved`):
    /// the delete of the old key moves the row to the new key (values
    /// untouched, the side's own columns kept) when no row has it; the
    /// upsert of the new key waits while the old key's row is there, so
    /// that it neither creates a second row nor clashes with it on another
    /// unique constraint. Otherwise each is written as usual.
    async fn exec_key_change(&mut self, w: &ApplyWrite) -> Result<Outcome, tokio_postgres::Error> {
        let one = [(0, w.clone())];
        let key = w.kafka_key();
        let versions = self.versions(&w.map, std::slice::from_ref(&key)).await?;
        let row = self.rows(&one).await?.pop().flatten();
        let outcome = decide(w, versions.get(&key), row.as_ref());
        let (own, other) = sql::key_parameters(w);
        let mut moved_to = None;
        match (outcome, w.op) {
            (Outcome::Written, WriteOp::Upsert) if row.is_none() => {
                let stmt = self.prepared(sql::key_exists(w)).await?;
                if self
                    .client
                    .query_one(&stmt, &[&other])
                    .await?
                    .get::<_, bool>(0)
                {
                    return Ok(Outcome::Waiting);
                }
            }
            (Outcome::Written, WriteOp::Delete) => {
                let stmt = self.prepared(sql::move_row(w)).await?;
                let r = self.client.query_opt(&stmt, &[&own, &other]).await?;
                moved_to = r.map(|r| r.get::<_, String>(0));
            }
            _ => {}
        }
        if outcome == Outcome::Written && moved_to.is_none() {
            let stmt = self.prepared(sql::statement_many(w)).await?;
            let param = sql::parameter_many(std::iter::once(w));
            self.client.execute(&stmt, &[&param]).await?;
        }
        let acks: Vec<String> = match (outcome, &moved_to) {
            (Outcome::Stale, _) => Vec::new(),
            (_, Some(row)) => vec![sql::ack_moved(w, row)],
            (o, None) => vec![sql::ack(w, o == Outcome::Written)],
        };
        self.record_and_report(&w.map, &[(w, outcome)], &acks)
            .await?;
        Ok(outcome)
    }

    /// The bookkeeping of the records, locked, by record key.
    async fn versions(
        &mut self,
        map: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Version>, tokio_postgres::Error> {
        let stmt = self.prepared(sql::VERSIONS.to_owned()).await?;
        let rows = self.client.query(&stmt, &[&map, &keys]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    Version {
                        version: r.get(1),
                        row_xmin: r.get(2),
                        present: r.get(3),
                        decided: r.get(4),
                    },
                )
            })
            .collect())
    }

    /// Each write's target row, locked (`None`: the record is absent).
    async fn rows(
        &mut self,
        run: &[(usize, ApplyWrite)],
    ) -> Result<Vec<Option<RowState>>, tokio_postgres::Error> {
        let first = &run[0].1;
        let compare = run
            .iter()
            .find(|(_, w)| w.expect.kind == ExpectKind::Row)
            .map(|(_, w)| sql::names(&w.expect.values))
            .unwrap_or_default();
        let stmt = self.prepared(sql::rows_check(first, &compare)).await?;
        let param = sql::json_array(run.iter().map(|(_, w)| sql::row_parameter(w)));
        let mut out: Vec<Option<RowState>> = (0..run.len()).map(|_| None).collect();
        for r in self.client.query(&stmt, &[&param]).await? {
            let at = usize::try_from(r.get::<_, i64>(0) - 1).unwrap_or(usize::MAX);
            if let Some(slot) = out.get_mut(at) {
                *slot = Some(RowState {
                    xmin: r.get(1),
                    same: r.get::<_, Option<bool>>(2).unwrap_or(false),
                });
            }
        }
        Ok(out)
    }
}

/// Whether a write is to be made, from the record's bookkeeping and row.
///
/// A write of a version already decided (made, or superseded) is a
/// redelivery (an applier restarted from its committed offset, a resolver
/// from its last save) and is not decided again: the side may be back in
/// the state it expected (a row deleted again), but the resolver has taken
/// its report and moved on; written now, it would put content on the side
/// through a write the resolver no longer knows, and the side's next own
/// write would count as made without it.
fn decide(w: &ApplyWrite, version: Option<&Version>, row: Option<&RowState>) -> Outcome {
    if version.is_some_and(|v| v.version.max(v.decided.unwrap_or(0)) >= w.version) {
        return Outcome::Stale;
    }
    let expected = match w.expect.kind {
        ExpectKind::Nothing => true,
        ExpectKind::Applied => version.is_some_and(|v| {
            v.version == w.expect.version
                && v.present == row.is_some()
                && row.is_none_or(|r| v.row_xmin.as_deref() == Some(r.xmin.as_str()))
        }),
        ExpectKind::Row => match row {
            Some(r) => w.expect.present && r.same,
            None => !w.expect.present,
        },
    };
    if expected {
        Outcome::Written
    } else {
        Outcome::Superseded
    }
}

/// Splits writes into runs that [`Writer::exec_run`] writes set-based:
/// consecutive writes of the same map, target table, operation, field
/// names and expected columns, in which no record occurs twice. Runs keep
/// the writes' order, so a parent written before its child in the batch is
/// still written first.
pub fn runs(writes: &[(usize, ApplyWrite)]) -> Vec<std::ops::Range<usize>> {
    fn names(a: &[Field], b: &[Field]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name)
    }
    fn same_shape(a: &ApplyWrite, b: &ApplyWrite) -> bool {
        // A half of a key change is written on its own.
        a.moved.is_empty()
            && b.moved.is_empty()
            && a.op == b.op
            && a.map == b.map
            && a.target_entity == b.target_entity
            && names(&a.key, &b.key)
            && names(&a.values, &b.values)
            && (a.expect.kind != ExpectKind::Row
                || b.expect.kind != ExpectKind::Row
                || names(&a.expect.values, &b.expect.values))
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut seen = HashSet::new();
    let mut row_shape: Option<&ApplyWrite> = None;
    for (i, (_, w)) in writes.iter().enumerate() {
        let key = w.kafka_key();
        let clash = row_shape.is_some_and(|r| !same_shape(r, w));
        if i > start && (!same_shape(&writes[start].1, w) || clash || seen.contains(&key)) {
            out.push(start..i);
            start = i;
            seen.clear();
            row_shape = None;
        }
        if w.expect.kind == ExpectKind::Row {
            row_shape.get_or_insert(w);
        }
        seen.insert(key);
    }
    if start < writes.len() {
        out.push(start..writes.len());
    }
    out
}

impl Done {
    fn note(&mut self, index: usize, w: &ApplyWrite, outcome: Outcome) {
        if outcome == Outcome::Waiting {
            self.waiting.push(index);
        }
        record(w, outcome);
    }
}

/// Counts a committed write in the metrics, with its latency when written.
fn record(w: &ApplyWrite, outcome: Outcome) {
    let label = match outcome {
        Outcome::Written => "written",
        Outcome::Stale => "stale",
        Outcome::Superseded => "superseded",
        Outcome::Waiting => "waiting_for_key_change",
    };
    let m = metrics();
    let dir = direction(&w.source_side, &w.target_side);
    m.applied.with_label_values(&[&w.map, &dir, label]).inc();
    if outcome == Outcome::Written && w.commit_time > 0 {
        let seconds = (dualwrite_runtime::now_micros() - w.commit_time).max(0) as f64 / 1e6;
        m.latency
            .with_label_values(&[&w.map, &dir])
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::record::Expectation;

    fn w(map: &str, op: WriteOp, key: &str, kind: ExpectKind) -> (usize, ApplyWrite) {
        let w = ApplyWrite {
            map: map.into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            target_entity: format!("public.{map}"),
            key: vec![Field::new("k", Some(key))],
            version: 10,
            op,
            values: match op {
                WriteOp::Upsert => vec![Field::new("k", Some(key)), Field::new("v", Some("1"))],
                WriteOp::Delete => vec![],
            },
            expect: Expectation {
                kind,
                version: 3,
                present: true,
                values: vec![Field::new("k", Some(key)), Field::new("v", Some("0"))],
            },
            moved: Vec::new(),
            source_lsn: 1,
            commit_time: 0,
        };
        (0, w)
    }

    #[test]
    fn runs_group_consecutive_writes_of_one_shape_with_distinct_records() {
        use ExpectKind::*;
        use WriteOp::*;
        let writes = vec![
            w("a", Upsert, "1", Row),
            w("a", Upsert, "2", Nothing),
            w("a", Upsert, "3", Applied),
            // The same record again: a new run, so the two are written in order.
            w("a", Upsert, "2", Row),
            // Another operation, another table: new runs.
            w("a", Delete, "4", Row),
            w("b", Delete, "5", Row),
            w("b", Delete, "6", Nothing),
        ];
        assert_eq!(runs(&writes), vec![0..3, 3..4, 4..5, 5..7]);
        // Expected rows with other columns do not share a run.
        let mut other = w("a", Upsert, "9", Row);
        other.1.expect.values.pop();
        assert_eq!(runs(&[w("a", Upsert, "1", Row), other]), vec![0..1, 1..2]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn a_write_is_made_only_in_the_expected_state() {
        let (_, mut x) = w("a", WriteOp::Upsert, "1", ExpectKind::Applied);
        let bk = |version, xmin: &str, present| Version {
            version,
            row_xmin: Some(xmin.to_owned()),
            present,
            decided: Some(version),
        };
        let row = |xmin: &str, same| RowState {
            xmin: xmin.to_owned(),
            same,
        };
        // Redelivered: the target has this version already.
        assert_eq!(decide(&x, Some(&bk(10, "5", true)), None), Outcome::Stale);
        // Redelivered after it was superseded: not decided again, even
        // though the target is now as it expected.
        let passed = Version {
            decided: Some(10),
            ..bk(3, "5", true)
        };
        assert_eq!(
            decide(&x, Some(&passed), Some(&row("5", false))),
            Outcome::Stale
        );
        // The applier's write of version 3, untouched since: written.
        assert_eq!(
            decide(&x, Some(&bk(3, "5", true)), Some(&row("5", false))),
            Outcome::Written
        );
        // Changed since (another row version), or deleted: superseded.
        assert_eq!(
            decide(&x, Some(&bk(3, "5", true)), Some(&row("6", true))),
            Outcome::Superseded
        );
        assert_eq!(
            decide(&x, Some(&bk(3, "5", true)), None),
            Outcome::Superseded
        );
        assert_eq!(decide(&x, None, Some(&row("5", true))), Outcome::Superseded);
        x.expect.kind = ExpectKind::Row;
        assert_eq!(decide(&x, None, Some(&row("9", true))), Outcome::Written);
        assert_eq!(
            decide(&x, None, Some(&row("9", false))),
            Outcome::Superseded
        );
        assert_eq!(decide(&x, None, None), Outcome::Superseded);
        x.expect.present = false;
        assert_eq!(decide(&x, None, None), Outcome::Written);
        x.expect.kind = ExpectKind::Nothing;
        assert_eq!(
            decide(&x, Some(&bk(3, "1", false)), Some(&row("2", false))),
            Outcome::Written
        );
    }
}
