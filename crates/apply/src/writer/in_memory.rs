//! The writer over a target kept in memory: the compare-and-set rule and
//! the batch's transactions, checked through the [`Target`] seam alone
//! (no database), as a second kind of database would meet them.

use std::collections::{BTreeMap, HashMap};

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ApplyWrite, ExpectKind, Expectation, Field, WriteOp};
use dualwrite_runtime::kafka::Shard;
use dualwrite_runtime::side::{Class, Decided, Outcome, RowState, SideError, Target, Version};

use super::Writer;

/// Rows by key (values, row version), the bookkeeping by record key, and
/// the reports committed, in order.
#[derive(Clone, Default)]
struct State {
    rows: BTreeMap<String, (Vec<Field>, u64)>,
    versions: HashMap<String, Version>,
    reports: Vec<(String, Outcome)>,
    next_row_version: u64,
}

#[derive(Default)]
struct Memory {
    committed: State,
    /// The transaction under way.
    open: Option<State>,
    /// Keys whose writes the target refuses (as a constraint would).
    refuse: Vec<String>,
    /// Fails the next write as a deadlock would.
    deadlock: bool,
}

impl Memory {
    fn tx(&mut self) -> &mut State {
        self.open.as_mut().expect("a transaction is open")
    }
}

impl Target for Memory {
    async fn connect(_: &Config, _: SideId, _: Shard) -> Result<Memory, SideError> {
        Ok(Memory::default())
    }

    async fn begin(&mut self) -> Result<(), SideError> {
        self.open = Some(self.committed.clone());
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), SideError> {
        self.committed = self.open.take().expect("a transaction is open");
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), SideError> {
        self.open = None;
        Ok(())
    }

    async fn versions(
        &mut self,
        _: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Version>, SideError> {
        let tx = self.tx();
        Ok(keys
            .iter()
            .filter_map(|k| tx.versions.get(k).map(|v| (k.clone(), v.clone())))
            .collect())
    }

    async fn rows(&mut self, writes: &[&ApplyWrite]) -> Result<Vec<Option<RowState>>, SideError> {
        let tx = self.tx();
        Ok(writes
            .iter()
            .map(|w| {
                tx.rows.get(&w.kafka_key()).map(|(values, v)| RowState {
                    row_version: v.to_string(),
                    same: w.expect.values.iter().all(|f| values.contains(f)),
                })
            })
            .collect())
    }

    async fn write(&mut self, writes: &[&ApplyWrite]) -> Result<(), SideError> {
        if std::mem::take(&mut self.deadlock) {
            return Err(SideError::new(Class::RetryNow, "deadlock detected"));
        }
        if let Some(w) = writes.iter().find(|w| self.refuse.contains(&w.kafka_key())) {
            return Err(SideError::new(
                Class::Record,
                format!("{} refused", w.kafka_key()),
            ));
        }
        let tx = self.tx();
        for w in writes {
            tx.next_row_version += 1;
            match w.op {
                WriteOp::Upsert => {
                    let row = (w.values.clone(), tx.next_row_version);
                    tx.rows.insert(w.kafka_key(), row);
                }
                WriteOp::Delete => {
                    tx.rows.remove(&w.kafka_key());
                }
            }
        }
        Ok(())
    }

    async fn other_key_taken(&mut self, _: &ApplyWrite) -> Result<bool, SideError> {
        Ok(false)
    }

    async fn move_row(&mut self, _: &ApplyWrite) -> Result<Option<String>, SideError> {
        Ok(None)
    }

    async fn record_and_report(
        &mut self,
        _: &str,
        decided: &[Decided<'_>],
    ) -> Result<(), SideError> {
        let tx = self.tx();
        for d in decided {
            let (k, v) = (d.write.kafka_key(), d.write.version);
            let row_version = tx.rows.get(&k).map(|r| r.1.to_string());
            match d.outcome {
                Outcome::Written => {
                    let present = d.write.op == WriteOp::Upsert;
                    let version = Version {
                        version: v,
                        row_version,
                        present,
                        decided: Some(v),
                    };
                    tx.versions.insert(k.clone(), version);
                }
                Outcome::Superseded => {
                    let empty = Version {
                        version: 0,
                        row_version: None,
                        present: false,
                        decided: None,
                    };
                    tx.versions.entry(k.clone()).or_insert(empty).decided = Some(v);
                }
                Outcome::Stale | Outcome::Waiting => continue,
            }
            tx.reports.push((k, d.outcome));
        }
        Ok(())
    }

    async fn prune(_: &Config, _: SideId, _: u64) -> Result<u64, SideError> {
        Ok(0)
    }
}

fn write(key: &str, version: i64, op: WriteOp, expect: Expectation) -> ApplyWrite {
    ApplyWrite {
        map: "m".into(),
        source_side: "a".into(),
        target_side: "b".into(),
        target_entity: "public.t".into(),
        key: vec![Field::new("k", Some(key))],
        version,
        op,
        values: match op {
            WriteOp::Upsert => vec![Field::new("k", Some(key)), Field::new("v", Some("1"))],
            WriteOp::Delete => Vec::new(),
        },
        expect,
        moved: Vec::new(),
        source_lsn: 1,
        commit_time: 0,
    }
}

fn absent() -> Expectation {
    Expectation {
        kind: ExpectKind::Row,
        version: 0,
        present: false,
        values: Vec::new(),
    }
}

fn key(k: &str) -> String {
    dualwrite_model::record::key_string([Some(k)])
}

#[tokio::test]
async fn a_refused_write_fails_alone_and_the_rest_of_the_batch_is_written() {
    let mut target = Memory::default();
    target.refuse.push(key("2"));
    let mut writer = Writer::new(target);
    let batch: Vec<(usize, ApplyWrite)> = ["1", "2", "3"]
        .iter()
        .enumerate()
        .map(|(i, k)| (i, write(k, 10, WriteOp::Upsert, absent())))
        .collect();
    let done = writer.write(&batch).await.unwrap();
    assert_eq!(done.rejected.len(), 1);
    assert_eq!(done.rejected[0].index, 1);
    assert_eq!(done.rejected[0].error.class, Class::Record);
    let state = &writer.target.committed;
    assert_eq!(
        state.rows.keys().cloned().collect::<Vec<_>>(),
        [key("1"), key("3")]
    );
    // Reported once each, in the transactions that made them.
    assert_eq!(
        state.reports,
        [(key("1"), Outcome::Written), (key("3"), Outcome::Written)]
    );
}

#[tokio::test]
async fn a_clash_of_the_moment_fails_the_batch_to_be_retried_and_nothing_is_kept() {
    let mut writer = Writer::new(Memory {
        deadlock: true,
        ..Memory::default()
    });
    let batch = vec![(0, write("1", 10, WriteOp::Upsert, absent()))];
    let e = writer
        .write(&batch)
        .await
        .err()
        .expect("a deadlock fails the batch");
    assert_eq!(e.class, Class::RetryNow);
    assert!(writer.target.committed.rows.is_empty());
    assert!(writer.target.committed.reports.is_empty());
    // The same batch again: written.
    writer.target.rollback().await.unwrap();
    assert!(writer.write(&batch).await.unwrap().rejected.is_empty());
    assert_eq!(writer.target.committed.rows.len(), 1);
}

#[tokio::test]
async fn a_superseded_write_delivered_again_after_the_side_went_back_is_not_written() {
    let mut writer = Writer::new(Memory::default());
    // The side wrote the record itself meanwhile: "insert, expecting absent" is superseded.
    writer
        .target
        .committed
        .rows
        .insert(key("1"), (Vec::new(), 99));
    let insert = vec![(0, write("1", 10, WriteOp::Upsert, absent()))];
    writer.write(&insert).await.unwrap();
    assert_eq!(
        writer.target.committed.reports,
        [(key("1"), Outcome::Superseded)]
    );
    // The side deletes its row: absent again, as the write expected.
    writer.target.committed.rows.clear();
    // The same write, delivered again: decided once, so not written.
    writer.write(&insert).await.unwrap();
    assert!(writer.target.committed.rows.is_empty());
    assert_eq!(writer.target.committed.reports.len(), 1);
}
