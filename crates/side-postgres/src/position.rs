//! What the capturer may tell the server about its slot: the bookkeeping
//! behind the argument in [`crate::source`], apart from the connection so
//! that a model can run it over random schedules (the tests below).

/// What the capturer received of the stream and what it published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Everything committed before this is published; only grows.
    confirmed: u64,
    /// The end of the last commit received.
    received: u64,
    /// A transaction was begun and not committed yet.
    open: bool,
}

impl Position {
    /// At the slot's confirmed position, nothing received.
    pub fn new(slot: u64) -> Position {
        Position {
            confirmed: slot,
            received: slot,
            open: false,
        }
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// A transaction's first row arrived.
    pub fn begin(&mut self) {
        self.open = true;
    }

    /// A transaction's commit (ending at `lsn`) arrived.
    pub fn commit(&mut self, lsn: u64) {
        self.open = false;
        self.received = self.received.max(lsn);
    }

    /// Nothing received is unpublished.
    pub fn settled(&self) -> bool {
        !self.open && self.received <= self.confirmed
    }

    /// Kafka acknowledged every record up to the commit ending at `lsn`:
    /// the position to report, if it moved.
    pub fn published(&mut self, lsn: u64) -> Option<u64> {
        self.advance(lsn)
    }

    /// The server sent everything before `end` (or left it out): the
    /// position to report, if it moved. Only when nothing received is
    /// unpublished: the stream is in order, so every transaction committed
    /// before `end` was received, hence published.
    pub fn keepalive(&mut self, end: u64) -> Option<u64> {
        if self.settled() {
            self.advance(end)
        } else {
            None
        }
    }

    /// A new stream, from the slot's position: what was received and not
    /// published comes again.
    pub fn restart(&mut self) {
        self.open = false;
        self.received = self.confirmed;
    }

    fn advance(&mut self, lsn: u64) -> Option<u64> {
        (lsn > self.confirmed).then(|| {
            self.confirmed = lsn;
            lsn
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A transaction of the WAL: its commit's end; `kept`: wal2json
    /// outputs it (not left out by origin).
    #[derive(Clone, Copy)]
    struct Txn {
        commit: u64,
        kept: bool,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Row {
            commit: u64,
            first: bool,
            last: bool,
        },
        Keepalive(u64),
    }

    /// What the server streams from `slot`: the kept transactions
    /// committed after it, row by row, and keepalives between them at
    /// positions past the last transaction sent (WAL that is not a commit
    /// lies between commits).
    fn stream(wal: &[Txn], slot: u64, rng: &mut StdRng) -> Vec<Event> {
        let mut events = Vec::new();
        for t in wal.iter().filter(|t| t.commit > slot) {
            if t.kept {
                let rows = rng.random_range(1..4);
                for i in 0..rows {
                    events.push(Event::Row {
                        commit: t.commit,
                        first: i == 0,
                        last: i == rows - 1,
                    });
                }
            }
            if rng.random_bool(0.4) {
                events.push(Event::Keepalive(t.commit + rng.random_range(0..100)));
            }
        }
        events
    }

    /// One schedule: the capturer reads the stream, publishes at random
    /// moments (what it has received, up to the last commit), fails to
    /// publish, crashes; every report to the server is checked.
    fn run(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let wal: Vec<Txn> = (1..=rng.random_range(1..25u64))
            .map(|i| Txn {
                commit: i * 100,
                kept: rng.random_bool(0.7),
            })
            .collect();
        let kept: BTreeSet<u64> = wal.iter().filter(|t| t.kept).map(|t| t.commit).collect();
        let mut slot = 0u64;
        let mut published = BTreeSet::new();
        let mut pos = Position::new(slot);
        let mut events = stream(&wal, slot, &mut rng).into_iter();
        // Received, not published: complete transactions, the open one.
        let mut pending: Vec<u64> = Vec::new();
        let report = |v: u64, slot: &mut u64, published: &BTreeSet<u64>| {
            assert!(
                v > *slot,
                "seed {seed}: the slot would move back from {slot} to {v}"
            );
            for c in kept.range(..=v) {
                assert!(
                    published.contains(c),
                    "seed {seed}: slot moved to {v} past {c}, unpublished"
                );
            }
            *slot = v;
        };
        for _step in 0..10_000 {
            match rng.random_range(0..10) {
                // Crash: everything the process had is gone.
                0 => {
                    pos = Position::new(slot);
                    pending.clear();
                    events = stream(&wal, slot, &mut rng).into_iter();
                }
                // Publish what was received up to its last commit.
                1 | 2 => {
                    let complete = if pos.open {
                        pending.len().saturating_sub(1)
                    } else {
                        pending.len()
                    };
                    let Some(&last) = pending[..complete].last() else {
                        continue;
                    };
                    if rng.random_bool(0.2) {
                        // Failed: the next read starts a new stream.
                        pending.clear();
                        assert!(!pos.settled());
                        pos.restart();
                        events = stream(&wal, slot, &mut rng).into_iter();
                        continue;
                    }
                    published.extend(pending.drain(..complete));
                    if let Some(v) = pos.published(last) {
                        report(v, &mut slot, &published);
                    }
                }
                _ => match events.next() {
                    Some(Event::Row {
                        commit,
                        first,
                        last,
                    }) => {
                        if first {
                            pos.begin();
                            pending.push(commit);
                        }
                        if last {
                            pos.commit(commit);
                        }
                    }
                    Some(Event::Keepalive(end)) => {
                        if let Some(v) = pos.keepalive(end) {
                            report(v, &mut slot, &published);
                        }
                    }
                    None if pending.is_empty() => break,
                    None => {}
                },
            }
        }
        assert!(
            kept.is_subset(&published),
            "seed {seed}: a kept transaction was never published"
        );
    }

    #[test]
    fn the_slot_never_passes_an_unpublished_transaction_over_random_schedules() {
        for seed in 0..3_000 {
            run(seed);
        }
    }

    #[test]
    fn a_keepalive_moves_the_slot_only_when_nothing_received_is_unpublished() {
        let mut p = Position::new(10);
        assert_eq!(p.keepalive(20), Some(20));
        p.begin();
        assert_eq!(p.keepalive(30), None);
        p.commit(40);
        assert_eq!(p.keepalive(50), None);
        assert_eq!(p.published(40), Some(40));
        assert_eq!(p.keepalive(50), Some(50));
        assert_eq!(p.published(45), None, "never backwards");
        assert_eq!(p.confirmed(), 50);
    }
}
