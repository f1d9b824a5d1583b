//! The writing of the resolver's decisions, whatever the kind of database:
//! each write is made only if the target is still in the state the
//! resolver expected (compare-and-set, [`decide`]), and is recorded and
//! reported, in the same transaction, through the [`Target`].

use std::collections::HashSet;

use dualwrite_model::record::{ApplyWrite, ExpectKind, Field, WriteOp};
use dualwrite_runtime::metrics::{direction, metrics};
pub use dualwrite_runtime::side::Outcome;
use dualwrite_runtime::side::{Decided, RowState, SideError, Target, Version};

/// The target, connected, and the writes' rules.
pub struct Writer<T> {
    target: T,
}

/// A write that the target rejected.
pub struct Rejected {
    pub index: usize,
    pub error: SideError,
}

/// What became of a batch: the writes the target rejected, and those
/// that wait (by index).
#[derive(Default)]
pub struct Done {
    pub rejected: Vec<Rejected>,
    pub waiting: Vec<usize>,
}

impl<T: Target> Writer<T> {
    pub fn new(target: T) -> Writer<T> {
        Writer { target }
    }

    /// Writes the writes in one transaction; if the target rejects one,
    /// writes them one transaction each so that only the rejected ones fail.
    /// `Err` only for failures worth retrying the whole batch.
    pub async fn write(&mut self, writes: &[(usize, ApplyWrite)]) -> Result<Done, SideError> {
        let mut done = Done::default();
        match self.transaction(writes).await {
            Ok(outcomes) => {
                for ((index, w), o) in writes.iter().zip(outcomes) {
                    done.note(*index, w, o);
                }
                return Ok(done);
            }
            Err(e) if e.is_retryable() => return Err(e),
            Err(_) => self.target.rollback().await?,
        }
        for (index, w) in writes {
            match self
                .transaction(std::slice::from_ref(&(*index, w.clone())))
                .await
            {
                Ok(o) => done.note(*index, w, o[0]),
                Err(e) if e.is_retryable() => return Err(e),
                Err(error) => {
                    self.target.rollback().await?;
                    done.rejected.push(Rejected {
                        index: *index,
                        error,
                    });
                }
            }
        }
        Ok(done)
    }

    /// The writes in one transaction, a run at a time (see [`runs`]).
    async fn transaction(
        &mut self,
        writes: &[(usize, ApplyWrite)],
    ) -> Result<Vec<Outcome>, SideError> {
        self.target.begin().await?;
        let mut outcomes = Vec::with_capacity(writes.len());
        for run in runs(writes) {
            let run: Vec<&ApplyWrite> = writes[run].iter().map(|(_, w)| w).collect();
            outcomes.extend(self.exec_run(&run).await?);
        }
        self.target.commit().await?;
        Ok(outcomes)
    }

    /// Writes a run of writes of one shape (see [`runs`]) with one call to
    /// the target for each step: the bookkeeping, the rows (locked), the
    /// write, the new bookkeeping and the reports. Each record occurs once,
    /// so the steps of different writes do not see each other.
    async fn exec_run(&mut self, run: &[&ApplyWrite]) -> Result<Vec<Outcome>, SideError> {
        let Some(first) = run.first() else {
            return Ok(Vec::new());
        };
        if !first.moved.is_empty() {
            return Ok(vec![self.exec_key_change(first).await?]);
        }
        let keys: Vec<String> = run.iter().map(|w| w.kafka_key()).collect();
        let versions = self.target.versions(&first.map, &keys).await?;
        let rows = self.target.rows(run).await?;
        let outcomes: Vec<Outcome> = run
            .iter()
            .zip(&keys)
            .zip(&rows)
            .map(|((w, k), row)| decide(w, versions.get(k), row.as_ref()))
            .collect();
        let made: Vec<&ApplyWrite> = run
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == Outcome::Written)
            .map(|(w, _)| *w)
            .collect();
        if !made.is_empty() {
            self.target.write(&made).await?;
        }
        let decided: Vec<Decided<'_>> = run
            .iter()
            .zip(&outcomes)
            .map(|(w, o)| Decided {
                write: w,
                outcome: *o,
                moved_to: None,
            })
            .collect();
        self.target.record_and_report(&first.map, &decided).await?;
        Ok(outcomes)
    }

    /// A half of a key change made on the other side (see `ApplyWrite::moved`):
    /// the delete of the old key moves the row to the new key (values
    /// untouched, the side's own columns kept) when no row has it; the
    /// upsert of the new key waits while the old key's row is there, so
    /// that it neither creates a second row nor clashes with it on another
    /// unique constraint. Otherwise each is written as usual.
    async fn exec_key_change(&mut self, w: &ApplyWrite) -> Result<Outcome, SideError> {
        let key = w.kafka_key();
        let versions = self
            .target
            .versions(&w.map, std::slice::from_ref(&key))
            .await?;
        let row = self.target.rows(&[w]).await?.pop().flatten();
        let outcome = decide(w, versions.get(&key), row.as_ref());
        let made = outcome == Outcome::Written;
        if made
            && w.op == WriteOp::Upsert
            && row.is_none()
            && self.target.other_key_taken(w).await?
        {
            return Ok(Outcome::Waiting);
        }
        let mut moved_to = None;
        if made && w.op == WriteOp::Delete {
            moved_to = self.target.move_row(w).await?;
        }
        if outcome == Outcome::Written && moved_to.is_none() {
            self.target.write(&[w]).await?;
        }
        let decided = Decided {
            write: w,
            outcome,
            moved_to: moved_to.as_deref(),
        };
        self.target.record_and_report(&w.map, &[decided]).await?;
        Ok(outcome)
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
                && row.is_none_or(|r| v.row_version.as_deref() == Some(r.row_version.as_str()))
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

/// Splits writes into runs that `Writer::exec_run` writes set-based:
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
mod in_memory;

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
            row_version: Some(xmin.to_owned()),
            present,
            decided: Some(version),
        };
        let row = |xmin: &str, same| RowState {
            row_version: xmin.to_owned(),
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
