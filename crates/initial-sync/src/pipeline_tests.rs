//! The copy's pipeline over sides kept in memory: reading runs ahead of
//! writing, a chunk is written to both sides at once, and the checkpoint
//! moves past a chunk only once both sides committed it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dualwrite_model::config::{Config, SideId, TEST_SIDES};
use dualwrite_model::lifecycle::{InitialSync, SideSnapshot};
use dualwrite_model::record::Field;
use dualwrite_model::schema::TableInfo;
use dualwrite_runtime::side::{
    Class, CopyOutcome, CopySide, CopyWrite, CopyWriter, SideError, SnapshotRow,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{CopyRun, SideCopy, Writers, CHUNK};

/// Rows per fetch, per side: both sides' batches make one chunk.
const BATCH: usize = CHUNK / 2;
/// How long a writer waits for what the pipeline must do meanwhile.
const DEADLINE: Duration = Duration::from_secs(10);

/// What the fake sides did so far.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Batches fetched, per side (left, right).
    fetched: [usize; 2],
    /// Write transactions begun, per side.
    writes: [usize; 2],
}

/// A side's snapshot, in batches; it fails on the batch `fail_at` (1-based).
struct FakeReader {
    side: usize,
    batches: VecDeque<Vec<SnapshotRow>>,
    fail_at: Option<usize>,
    seen: watch::Sender<Seen>,
    snapshot: SideSnapshot,
}

/// A side's writer: keeps the keys it committed; fails on its write
/// `fail_at`; with `overlap`, each write waits until the other side's
/// writer began the same chunk and the reader fetched the next batch.
struct FakeWriter {
    side: usize,
    fail_at: Option<usize>,
    overlap: Option<usize>,
    seen: watch::Sender<Seen>,
    committed: Arc<Mutex<BTreeSet<String>>>,
}

fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// Keys 0..2n: the left side holds the even ones, the right the odd ones,
/// so every chunk creates rows on both sides.
fn batches(side: usize, n: usize) -> VecDeque<Vec<SnapshotRow>> {
    let (key_field, rows): (&str, Vec<usize>) = match side {
        0 => ("account", (0..2 * n).step_by(2).collect()),
        _ => ("number", (1..2 * n).step_by(2).collect()),
    };
    rows.chunks(BATCH)
        .map(|c| {
            c.iter()
                .map(|i| {
                    let fields = vec![
                        Field::new(key_field, Some(key(*i))),
                        Field::new("name", Some("n")),
                    ];
                    (vec![Some(key(*i))], fields)
                })
                .collect()
        })
        .collect()
}

impl CopySide for FakeReader {
    type Writer = FakeWriter;

    async fn open(
        _: &Config,
        _: &dualwrite_model::config::MapConfig,
        _: SideId,
        _: Option<&[String]>,
    ) -> Result<(Self, FakeWriter), SideError> {
        Err(SideError::new(
            Class::Fatal,
            "the fake sides are built by the test",
        ))
    }

    fn snapshot(&self) -> &SideSnapshot {
        &self.snapshot
    }

    fn rows(&self) -> i64 {
        self.batches.iter().map(Vec::len).sum::<usize>() as i64
    }

    async fn fetch(&mut self) -> Result<Vec<SnapshotRow>, SideError> {
        let next = self.seen.borrow().fetched[self.side] + 1;
        if self.fail_at == Some(next) {
            return Err(SideError::new(Class::RetryLater, "connection lost"));
        }
        let Some(batch) = self.batches.pop_front() else {
            return Ok(Vec::new());
        };
        self.seen.send_modify(|s| s.fetched[self.side] = next);
        Ok(batch)
    }

    async fn finish(&mut self) -> Result<(), SideError> {
        Ok(())
    }

    async fn wait_captured(
        _: &Config,
        _: SideId,
        _: &CancellationToken,
    ) -> Result<bool, SideError> {
        Ok(true)
    }

    async fn describe_table(
        _: &Config,
        _: SideId,
        _: &str,
    ) -> Result<Option<TableInfo>, SideError> {
        Ok(None)
    }
}

impl CopyWriter for FakeWriter {
    async fn write(&mut self, writes: &[&CopyWrite]) -> Result<Vec<CopyOutcome>, SideError> {
        let mut seen = self.seen.subscribe();
        let call = self.seen.borrow().writes[self.side] + 1;
        self.seen.send_modify(|s| s.writes[self.side] = call);
        if self.fail_at == Some(call) {
            return Err(SideError::new(Class::RetryLater, "connection lost"));
        }
        if let Some(batches) = self.overlap {
            let (side, other) = (self.side, 1 - self.side);
            let ahead =
                |s: &Seen| s.writes[other] >= call && s.fetched[side] >= (call + 1).min(batches);
            if tokio::time::timeout(DEADLINE, seen.wait_for(ahead))
                .await
                .is_err()
            {
                let seen = self.seen.borrow().clone();
                let message = format!("write {call} on side {side} ran alone: {seen:?}");
                return Err(SideError::new(Class::Fatal, message));
            }
        }
        let mut committed = self.committed.lock().unwrap();
        for w in writes {
            committed.insert(w.key[0].value.clone().unwrap_or_default());
        }
        Ok(writes.iter().map(|_| CopyOutcome::Written).collect())
    }
}

/// How the fake sides behave.
#[derive(Default, Clone, Copy)]
struct Script {
    /// Keys per side.
    keys: usize,
    fail_fetch: Option<usize>,
    fail_write: [Option<usize>; 2],
    overlap: bool,
}

/// What one copy attempt over the fake sides did.
struct Outcome {
    result: Result<bool, SideError>,
    progress: InitialSync,
    /// Keys created, on the left then the right.
    committed: [BTreeSet<String>; 2],
}

/// A map of customers (left) and accounts (right): the key, the name and
/// the `more` fields (TOML lines).
pub(crate) fn config_with(more: &str) -> Config {
    Config::parse(&format!(
        r#"{TEST_SIDES}
[[map]]
name = "customers"
left = {{ entity = "customers", key = ["account"] }}
right = {{ entity = "accounts", key = ["number"] }}
field = [
  {{ left = "account", right = "number" }},
  {{ left = "name", right = "name" }},
{more}
]
"#
    ))
    .unwrap()
}

async fn copy(script: Script) -> Outcome {
    let config = config_with("");
    let producer = dualwrite_runtime::kafka::producer(&config.kafka, "test").unwrap();
    let (seen, _) = watch::channel(Seen::default());
    let n_batches = script.keys.div_ceil(BATCH);
    let reader = |side| SideCopy {
        side: FakeReader {
            side,
            batches: batches(side, script.keys),
            fail_at: script.fail_fetch.filter(|_| side == 0),
            seen: seen.clone(),
            snapshot: SideSnapshot::parse("1:1:", 0).unwrap(),
        },
        buf: VecDeque::new(),
    };
    let committed = [Arc::default(), Arc::default()];
    let writer = |side: usize| FakeWriter {
        side,
        fail_at: script.fail_write[side],
        overlap: script.overlap.then_some(n_batches),
        seen: seen.clone(),
        committed: Arc::clone(&committed[side]),
    };
    let (mut left, mut right) = (reader(0), reader(1));
    let (mut to_left, mut to_right) = (writer(0), writer(1));
    let run = CopyRun {
        config: &config,
        map: &config.maps[0],
        master: SideId::Left,
        on_their_way: Default::default(),
        producer: &producer,
        run: 1,
    };
    let mut progress = InitialSync::new(1, 0);
    let (reports, _keep) = mpsc::channel(1024);
    let writers = Writers {
        left: &mut to_left,
        right: &mut to_right,
    };
    let cancel = CancellationToken::new();
    let result = run
        .chunks(
            [&mut left, &mut right],
            writers,
            &mut progress,
            &reports,
            &cancel,
        )
        .await;
    let committed = committed.map(|c| c.lock().unwrap().clone());
    Outcome {
        result,
        progress,
        committed,
    }
}

/// Every key up to the checkpoint, created on the side that lacked it.
fn written_up_to(o: &Outcome) -> Vec<String> {
    let all: BTreeSet<String> = o.committed[0].union(&o.committed[1]).cloned().collect();
    let checkpoint = o.progress.checkpoint.as_ref().expect("a checkpoint")[0].clone();
    all.into_iter().filter(|k| *k <= checkpoint).collect()
}

#[tokio::test]
async fn reads_ahead_and_writes_both_sides_at_once() {
    let keys = 4 * BATCH;
    let o = copy(Script {
        keys,
        overlap: true,
        ..Script::default()
    })
    .await;
    assert!(matches!(o.result, Ok(true)), "{:?}", o.result.err());
    assert_eq!(
        o.committed[0].len(),
        keys,
        "every right row created on the left"
    );
    assert_eq!(
        o.committed[1].len(),
        keys,
        "every left row created on the right"
    );
    assert_eq!(o.progress.created, 2 * keys as i64);
    assert_eq!(o.progress.rows_done, 2 * keys as i64);
    assert_eq!(o.progress.checkpoint, Some(vec![key(2 * keys - 1)]));
}

#[tokio::test]
async fn a_failed_read_fails_the_attempt_behind_its_checkpoint() {
    let o = copy(Script {
        keys: 6 * BATCH,
        fail_fetch: Some(4),
        ..Script::default()
    })
    .await;
    assert!(
        o.result.as_ref().is_err_and(SideError::is_retryable),
        "{:?}",
        o.result
    );
    // Chunk 3 ends on a right key after the left's last of batch 3, so it
    // needs the left's batch 4 and fails; chunks 1 and 2, read before, are
    // written and checkpointed, and nothing further.
    let written = written_up_to(&o);
    assert_eq!(written.len(), 2 * CHUNK, "{:?}", o.progress.checkpoint);
    assert_eq!(written.last(), Some(&key(2 * CHUNK - 1)));
    assert_eq!(o.progress.created, 2 * CHUNK as i64);
}

#[tokio::test]
async fn the_checkpoint_waits_for_both_sides() {
    let o = copy(Script {
        keys: 6 * BATCH,
        fail_write: [None, Some(2)],
        ..Script::default()
    })
    .await;
    assert!(o.result.is_err());
    // The left may have committed chunk 2; the right did not: the
    // checkpoint stays after chunk 1, whose rows were all counted.
    assert_eq!(o.progress.checkpoint, Some(vec![key(CHUNK - 1)]));
    assert_eq!(o.progress.created, CHUNK as i64);
    assert_eq!(o.progress.rows_done, CHUNK as i64);
    assert!(o.committed[1].iter().all(|k| *k <= key(CHUNK - 1)));
}
