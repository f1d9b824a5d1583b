//! A model of the whole protocol, checked over random schedules.
//!
//! Two simulated databases (a row of one record each, with its `xmin`, and
//! the applier's bookkeeping row), their capture streams (local writes and
//! the applier's acknowledgements, in each side's commit order), a router
//! that interleaves the two streams into the map log in any order and
//! re-sends after a crash, the resolver ([`dualwrite_resolve::apply`]) that
//! reads the log, saves its state with its offset and restarts from the
//! last save, and two appliers that check the compare-and-set exactly as
//! the SQL does, record each write decided (made or superseded), and redo
//! writes after a crash (from their last committed one, or from any earlier
//! one). A schedule is a random sequence of these steps. At every step, a
//! write of the side that is not the master, made on the agreed content,
//! must win (a later write could hide a wrong verdict in the end state).
//! After the sides stop writing, everything is drained and the invariants
//! are checked:
//! - both sides hold the same record (presence, both-way fields);
//! - the right content won: the master's last write when the other side's
//!   last write was made without having seen it, otherwise the other
//!   side's last write (see [`expected`]);
//! - a one-way field holds its owner's last value (where the owner wrote it);
//! - the resolver knows what each side holds (its state is settled).

use std::collections::HashMap;

use dualwrite_model::config::SideId;
use dualwrite_model::record::Field;
use dualwrite_resolve::{apply, Event, Expect, KeyState, Pos, Shape, Write};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const L: usize = 0;
const R: usize = 1;

/// Column names per side: key, two both-way fields, the field the left
/// side owns (flows left to right), the field the right side owns.
const COLS: [[&str; 5]; 2] = [["k", "a", "b", "lo", "ro"], ["K", "A", "B", "LO", "RO"]];
const KEY: usize = 0;
const BOTH: [usize; 2] = [1, 2];
/// Index of the field each side owns.
const OWNED: [usize; 2] = [3, 4];

fn side(i: usize) -> SideId {
    if i == L {
        SideId::Left
    } else {
        SideId::Right
    }
}

/// Columns flowing into side `i` (key, both-way, the other side's field).
fn into_cols(i: usize) -> Vec<usize> {
    vec![KEY, BOTH[0], BOTH[1], OWNED[1 - i]]
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    present: bool,
    /// By column index.
    vals: [Option<String>; 5],
    xmin: u64,
    /// The local write that last set the owned column, if the side itself did.
    owned_by: Option<usize>,
    /// The local write (side, index) whose both-way content the row holds;
    /// `None`: the initial content.
    origin: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Copy)]
struct Bk {
    version: u64,
    xmin: u64,
    present: bool,
    /// The latest write decided (written or superseded): a write of this
    /// version or older is a redelivery.
    decided: u64,
}

#[derive(Debug, Default)]
struct Db {
    row: Row,
    bk: Option<Bk>,
    lsn: i64,
    txid: u64,
    /// The capture stream: every committed write, in commit order.
    stream: Vec<Event>,
}

/// A local write, for the oracle: presence and both-way values before and after.
#[derive(Debug, Clone, PartialEq)]
struct Content {
    present: bool,
    both: [Option<String>; 2],
}

#[derive(Debug, Clone)]
struct LocalWrite {
    /// Where the content the write was made on came from.
    before: Option<(usize, usize)>,
    after: Content,
}

impl Row {
    fn content(&self) -> Content {
        Content {
            present: self.present,
            both: if self.present {
                [self.vals[BOTH[0]].clone(), self.vals[BOTH[1]].clone()]
            } else {
                [None, None]
            },
        }
    }

    fn fields(&self, i: usize, cols: &[usize]) -> Vec<Field> {
        cols.iter()
            .map(|&c| Field {
                name: COLS[i][c].to_owned(),
                value: self.vals[c].clone(),
            })
            .collect()
    }
}

impl Db {
    fn commit(&mut self) -> Pos {
        self.lsn += 1;
        self.txid += 1;
        Pos {
            lsn: self.lsn,
            seq: 0,
        }
    }
}

struct World {
    rng: StdRng,
    dbs: [Db; 2],
    shape: Shape,
    /// The map log (the map topic's partition of the record).
    log: Vec<Event>,
    /// Per side: the next index of its stream the router sends.
    routed: [usize; 2],
    /// Per side: the index up to which the router's sends are acknowledged.
    routed_safe: [usize; 2],
    /// The resolver: its state and the next log offset. Its saves, as the
    /// pause buffer makes them: the last save the changelog acknowledged
    /// (state and offset), the save on its way (not waited for: the next
    /// save waits for it first), and the offset committed, which is that of
    /// the last save settled, so the changelog may hold states of events
    /// after it (read again after a crash, they must change nothing).
    state: KeyState,
    next: usize,
    saved: (KeyState, usize),
    sending: Option<(KeyState, usize)>,
    stored: usize,
    /// Per side: the apply topic, the applier's next index, its committed index.
    apply: [Vec<Write>; 2],
    applied: [usize; 2],
    applied_safe: [usize; 2],
    writes: [Vec<LocalWrite>; 2],
    counter: u64,
    /// Per side: the local write of each commit LSN.
    by_lsn: [HashMap<i64, usize>; 2],
    /// Per write version: the local write whose content it carries.
    carries: HashMap<u64, Option<(usize, usize)>>,
    /// What happened, for a failure's report.
    trace: Vec<String>,
    /// Times the agreed record became absent; a new record after each.
    epoch: u32,
    /// Whether the schedule writes behind the pipeline's back.
    sneaky: bool,
    /// Whether appliers move rows in (the other side changed a key).
    moves: bool,
    /// Whether local writes only delete and insert the record on the side
    /// that is not the master, and only update it on the master.
    toggles: bool,
    /// Probability of a crash at each step beyond the usual.
    extra_crashes: f64,
    /// A write the resolver misjudged (see [`World::judge`]).
    misjudged: Option<String>,
    /// The local writes folded in while the agreed record was present, with the epoch.
    flowed: HashMap<(usize, usize), u32>,
}

impl World {
    fn new(seed: u64, master: usize) -> World {
        let mut dbs: [Db; 2] = Default::default();
        for (i, db) in dbs.iter_mut().enumerate() {
            // The record exists on both sides at the start, equal (an initial sync).
            db.row = Row {
                present: true,
                vals: [
                    Some("k1".into()),
                    Some("a0".into()),
                    Some("b0".into()),
                    Some("lo0".into()),
                    Some("ro0".into()),
                ],
                xmin: 1,
                owned_by: None,
                origin: None,
            };
            db.txid = 1;
            let _ = i;
        }
        World {
            rng: StdRng::seed_from_u64(seed),
            dbs,
            shape: Shape {
                one_way_into: [vec!["ro".into()], vec!["LO".into()]],
                master: side(master),
            },
            log: Vec::new(),
            routed: [0, 0],
            routed_safe: [0, 0],
            state: KeyState::default(),
            next: 0,
            saved: (KeyState::default(), 0),
            sending: None,
            stored: 0,
            apply: [Vec::new(), Vec::new()],
            applied: [0, 0],
            applied_safe: [0, 0],
            writes: [Vec::new(), Vec::new()],
            counter: 0,
            by_lsn: Default::default(),
            carries: HashMap::new(),
            trace: Vec::new(),
            epoch: 0,
            sneaky: false,
            moves: false,
            toggles: false,
            misjudged: None,
            extra_crashes: 0.0,
            flowed: HashMap::new(),
        }
    }

    fn unique(&mut self, prefix: &str) -> Option<String> {
        self.counter += 1;
        Some(format!("{prefix}{}", self.counter))
    }

    /// A write made on side `i` itself: update, delete, insert or upsert.
    fn local_write(&mut self, i: usize) {
        let master = self.shape.master == side(i);
        let kind = match (self.toggles, master) {
            (true, true) => 5,
            (true, false) => 0,
            _ => self.rng.random_range(0..10),
        };
        self.local_write_as(i, kind);
    }

    /// [`World::local_write`] of a chosen kind: below 2, a delete if the
    /// record is there; otherwise an update or insert.
    fn local_write_as(&mut self, i: usize, kind: u32) {
        let before = self.dbs[i].row.clone();
        let mut row = before.clone();
        if before.present && kind < 2 {
            row = Row::default();
        } else {
            if !before.present {
                row.vals = Default::default();
                row.vals[KEY] = Some("k1".into());
                row.owned_by = None;
            }
            row.present = true;
            // Some of the both-way fields and, now and then, the owned one.
            let mut any = false;
            for c in BOTH {
                if !before.present || self.rng.random_bool(0.6) {
                    row.vals[c] = self.unique(if i == L { "L" } else { "R" });
                    any = true;
                }
            }
            if !before.present || !any || self.rng.random_bool(0.3) {
                row.vals[OWNED[i]] = self.unique(if i == L { "lo" } else { "ro" });
                row.owned_by = Some(self.writes[i].len());
            }
        }
        let id = (i, self.writes[i].len());
        row.origin = Some(id);
        let db = &mut self.dbs[i];
        let pos = db.commit();
        row.xmin = db.txid;
        db.row = row.clone();
        self.by_lsn[i].insert(pos.lsn, id.1);
        let other = 1 - i;
        let values = if row.present {
            // Mapped into the other side's names.
            into_cols(other)
                .iter()
                .map(|&c| Field {
                    name: COLS[other][c].to_owned(),
                    value: row.vals[c].clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let own = if row.present {
            row.fields(i, &into_cols(i))
        } else {
            Vec::new()
        };
        db.stream.push(Event::Local {
            side: side(i),
            pos,
            present: row.present,
            own,
            values,
        });
        self.trace.push(format!(
            "local {i}#{} lsn {} before {:?} -> {:?}",
            self.writes[i].len(),
            pos.lsn,
            before.origin,
            compact(&row)
        ));
        self.writes[i].push(LocalWrite {
            before: before.origin,
            after: row.content(),
        });
    }

    /// A write on side `i` behind the pipeline's back (as under the
    /// applier's origin, with no report): the capture never sees it.
    fn sneak(&mut self, i: usize) {
        if !self.dbs[i].row.present {
            return;
        }
        let v = self.unique("S");
        let db = &mut self.dbs[i];
        db.txid += 1;
        db.row.vals[BOTH[0]] = v;
        db.row.xmin = db.txid;
        db.row.origin = None;
        self.trace
            .push(format!("sneak {i} -> {}", compact(&self.dbs[i].row)));
    }

    /// The applier of side `i` moves a row to the record's key (the other
    /// side renamed another record to this key, which the record's own
    /// events carry): where the record is absent, a row appears with content
    /// of no write, reported in the side's commit order.
    fn move_in(&mut self, i: usize) -> bool {
        if self.dbs[i].row.present || self.writes[1 - i].is_empty() {
            return false;
        }
        let mut row = Row {
            present: true,
            ..Row::default()
        };
        row.vals[KEY] = Some("k1".into());
        for c in [BOTH[0], BOTH[1], OWNED[0], OWNED[1]] {
            row.vals[c] = self.unique("M");
        }
        let db = &mut self.dbs[i];
        let pos = db.commit();
        row.xmin = db.txid;
        db.row = row;
        let own = db.row.fields(i, &into_cols(i));
        db.stream.push(Event::Moved {
            side: side(i),
            pos,
            own,
        });
        self.trace
            .push(format!("move in {i} -> {}", compact(&self.dbs[i].row)));
        true
    }

    /// `ctl repair`: both rows as read now, to the map log.
    fn repair(&mut self) {
        let master = if self.shape.master == SideId::Left {
            L
        } else {
            R
        };
        self.repair_as(master);
    }

    /// `ctl repair` made for `master` as the conflict master.
    fn repair_as(&mut self, master: usize) {
        let other = 1 - master;
        let observed = [L, R].map(|i| {
            let row = &self.dbs[i].row;
            dualwrite_resolve::Observed {
                pos: Pos {
                    lsn: self.dbs[i].lsn,
                    seq: i32::MAX,
                },
                present: row.present,
                own: if row.present {
                    row.fields(i, &into_cols(i))
                } else {
                    Vec::new()
                },
            }
        });
        let m = &self.dbs[master].row;
        let master_values = if m.present {
            into_cols(other)
                .iter()
                .map(|&c| Field {
                    name: COLS[other][c].to_owned(),
                    value: m.vals[c].clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        self.trace.push(format!("repair -> log@{}", self.log.len()));
        self.log.push(Event::Repair {
            master: side(master),
            observed,
            master_values,
        });
    }

    /// The router sends side `i`'s next captured write to the map log.
    fn route(&mut self, i: usize) -> bool {
        let Some(e) = self.dbs[i].stream.get(self.routed[i]).cloned() else {
            return false;
        };
        self.trace
            .push(format!("route {i} -> log@{} {}", self.log.len(), event(&e)));
        self.log.push(e);
        self.routed[i] += 1;
        if self.rng.random_bool(0.7) {
            self.routed_safe[i] = self.routed[i];
        }
        true
    }

    /// The resolver folds the next log event.
    fn resolve(&mut self) -> bool {
        let Some(e) = self.log.get(self.next).cloned() else {
            return false;
        };
        let version = 1000 + self.next as u64;
        let was = self.state.clone();
        let agreed_origin = self.origin_of_agreed();
        let writes = apply(&mut self.state, &self.shape, version, &e);
        self.note_epoch(&was, &e);
        self.judge(&was, &e, agreed_origin, version);
        if !writes.is_empty() {
            let origin = self.origin_of_agreed();
            self.carries.insert(version, origin);
        }
        self.trace
            .push(format!("resolve log@{} v{version}", self.next));
        for w in writes {
            let t = if w.target == SideId::Left { L } else { R };
            self.trace.push(format!(
                "  write {t} v{} present {} {:?} expect {:?}",
                w.version,
                w.present,
                values(&w.values),
                w.expect
            ));
            self.apply[t].push(w);
        }
        self.next += 1;
        if self.rng.random_bool(0.5) {
            // A save settles the one on its way (its offset is committed),
            // then sends this one.
            if let Some(s) = self.sending.take() {
                self.stored = s.1;
                self.saved = s;
            }
            self.sending = Some((through_changelog(&self.state), self.next));
        }
        true
    }

    /// Records a write of the side that is not the master, made on top of
    /// the agreed content, that the resolver took as concurrent (it loses:
    /// a later write may hide this in the end state, so it is caught here).
    fn judge(&mut self, was: &KeyState, e: &Event, origin: Option<(usize, usize)>, version: u64) {
        let Event::Local { side: s, pos, .. } = e else {
            return;
        };
        let i = if *s == SideId::Left { L } else { R };
        let fresh = was.sides[i].pos.is_none_or(|p| *pos > p);
        let from_write = was.agreed.as_ref().is_some_and(|a| a.both_from.is_some());
        if *s == self.shape.master || !fresh || !from_write || self.misjudged.is_some() {
            return;
        }
        let idx = self.by_lsn[i][&pos.lsn];
        let on_agreed = self.writes[i][idx].before == origin;
        let won = self
            .state
            .agreed
            .as_ref()
            .is_some_and(|a| a.both == version);
        if on_agreed && !won {
            self.misjudged = Some(format!(
                "local {i}#{idx} was made on the agreed content but lost"
            ));
        }
    }

    /// Counts the record's epochs, and which local writes flowed in one.
    fn note_epoch(&mut self, was: &KeyState, e: &Event) {
        let present = |s: &KeyState| s.agreed.as_ref().is_some_and(|a| a.present);
        if present(was) && !present(&self.state) {
            self.epoch += 1;
        }
        if let (true, Event::Local { side: s, pos, .. }) = (present(&self.state), e) {
            let i = if *s == SideId::Left { L } else { R };
            if let Some(&idx) = self.by_lsn[i].get(&pos.lsn) {
                if was.sides[i].pos.is_none_or(|p| *pos > p) {
                    self.flowed.insert((i, idx), self.epoch);
                }
            }
        }
    }

    /// The local write the agreed both-way content comes from.
    fn origin_of_agreed(&self) -> Option<(usize, usize)> {
        let tag = self.state.agreed.as_ref()?.both;
        match &self.log[(tag - 1000) as usize] {
            Event::Local { side: s, pos, .. } => {
                let i = if *s == SideId::Left { L } else { R };
                Some((i, self.by_lsn[i][&pos.lsn]))
            }
            _ => None,
        }
    }

    /// The applier of side `i` takes its next write.
    fn apply_next(&mut self, i: usize) -> bool {
        let Some(w) = self.apply[i].get(self.applied[i]).cloned() else {
            return false;
        };
        self.applied[i] += 1;
        if self.rng.random_bool(0.2) {
            self.applied_safe[i] = self.applied[i];
        }
        let db = &mut self.dbs[i];
        if db.bk.is_some_and(|b| b.decided >= w.version) {
            self.trace.push(format!("apply {i} v{} stale", w.version));
            return true;
        }
        if !cas(db, &w.expect, i) {
            // Reported, in the side's commit order, like a write, and
            // recorded as decided.
            let bk = db.bk.get_or_insert(Bk {
                version: 0,
                xmin: 0,
                present: false,
                decided: 0,
            });
            bk.decided = w.version;
            let pos = db.commit();
            db.stream.push(Event::Superseded {
                side: side(i),
                pos,
                version: w.version,
            });
            self.trace
                .push(format!("apply {i} v{} superseded", w.version));
            return true;
        }
        self.trace.push(format!("apply {i} v{} written", w.version));
        let pos = db.commit();
        if w.present {
            if !db.row.present {
                db.row = Row {
                    present: true,
                    ..Row::default()
                };
            }
            for f in &w.values {
                let c = COLS[i].iter().position(|n| *n == f.name).expect("column");
                db.row.vals[c] = f.value.clone();
            }
        } else {
            db.row = Row::default();
        }
        db.row.xmin = db.txid;
        db.row.origin = self.carries[&w.version];
        db.bk = Some(Bk {
            version: w.version,
            xmin: db.txid,
            present: w.present,
            decided: w.version,
        });
        db.stream.push(Event::Applied {
            side: side(i),
            pos,
            version: w.version,
        });
        true
    }

    /// A crash of one component: it goes back to its last safe point.
    fn crash(&mut self) {
        self.trace.push("crash".into());
        match self.rng.random_range(0..5) {
            0 | 1 => {
                let i = self.rng.random_range(0..2);
                self.routed[i] = self.routed_safe[i];
            }
            2 => {
                // The save on its way reached the changelog or not; the
                // events after the committed offset are read again.
                if let Some(s) = self.sending.take() {
                    if self.rng.random_bool(0.5) {
                        self.saved = s;
                    }
                }
                self.state = self.saved.0.clone();
                self.next = self.stored;
            }
            3 => {
                let i = self.rng.random_range(0..2);
                self.applied[i] = self.applied_safe[i];
            }
            _ => {
                // Back to any earlier write (offsets committed long ago).
                let i = self.rng.random_range(0..2);
                self.applied[i] = self.rng.random_range(0..=self.applied[i]);
            }
        }
    }

    fn step(&mut self, budget: &mut [usize; 2], crashes: bool) -> bool {
        if self.extra_crashes > 0.0 && self.rng.random_bool(self.extra_crashes) {
            self.crash();
            return true;
        }
        let choice = self.rng.random_range(0..103);
        match choice {
            0..=9 if budget[L] > 0 => {
                budget[L] -= 1;
                self.local_write(L);
                true
            }
            10..=19 if budget[R] > 0 => {
                budget[R] -= 1;
                self.local_write(R);
                true
            }
            20..=34 => self.route(L),
            35..=49 => self.route(R),
            50..=69 => self.resolve(),
            70..=83 => self.apply_next(L),
            84..=97 => self.apply_next(R),
            98 if crashes => {
                self.crash();
                true
            }
            99 if self.sneaky => {
                let i = self.rng.random_range(0..2);
                self.sneak(i);
                true
            }
            100..=102 if self.moves => {
                let i = self.rng.random_range(0..2);
                self.move_in(i)
            }
            _ => false,
        }
    }

    fn drain(&mut self) {
        for _ in 0..100_000 {
            let moved = self.route(L)
                | self.route(R)
                | self.resolve()
                | self.apply_next(L)
                | self.apply_next(R);
            if !moved {
                return;
            }
        }
        panic!("no quiescence after 100000 rounds: writes keep coming");
    }
}

/// A state as saved and read back: encoded as its changelog record (what
/// the pause buffer sends to the changelog and to its spill file) and
/// decoded again, which must give the same state.
fn through_changelog(s: &KeyState) -> KeyState {
    use dualwrite_model::avro::{decode, encode, encode_through_value};
    use dualwrite_model::record::ResolverState;
    use dualwrite_resolve::changelog::encode_state;
    use dualwrite_resolve::records::state_of;
    let bytes = encode_state("m", 1, 0, s).expect("encodes");
    let rec = decode::<ResolverState>(&bytes).expect("decodes");
    assert_eq!(
        bytes,
        encode(&rec).expect("encodes"),
        "the state encoded straight and its record encoded give the same bytes"
    );
    assert_eq!(
        bytes,
        encode_through_value(&rec).expect("encodes"),
        "and so does the path through an Avro value, resolved against the schema"
    );
    let back = state_of(rec);
    assert_eq!(
        &back, s,
        "a state must come back whole from its changelog record"
    );
    back
}

fn cas(db: &Db, expect: &Expect, i: usize) -> bool {
    match expect {
        Expect::Nothing => true,
        Expect::Applied(v) => db.bk.is_some_and(|b| {
            b.version == *v
                && b.present == db.row.present
                && (!db.row.present || db.row.xmin == b.xmin)
        }),
        Expect::Row { present, values } => {
            *present == db.row.present
                && (!present
                    || values.iter().all(|f| {
                        let c = COLS[i].iter().position(|n| *n == f.name).expect("column");
                        db.row.vals[c] == f.value
                    }))
        }
    }
}

/// The content the rule says the record ends with: the master's last
/// write, unless the other side's last write was made after it had
/// received it (some write of that side, at or before its last, started
/// from the master's last content); then the other side's last write.
fn expected(w: &World, master: usize) -> Content {
    let other = 1 - master;
    let m = w.writes[master].last();
    let n = w.writes[other].last();
    match (m, n) {
        (None, None) => w.dbs[0].row.content(), // unchanged (both equal at the start)
        (Some(m), None) => m.after.clone(),
        (None, Some(n)) => n.after.clone(),
        (Some(m), Some(n)) => {
            let id = Some((master, w.writes[master].len() - 1));
            let saw = w.writes[other].iter().any(|x| x.before == id);
            if saw {
                n.after.clone()
            } else {
                m.after.clone()
            }
        }
    }
}

fn compact(r: &Row) -> String {
    if !r.present {
        return "absent".into();
    }
    format!(
        "{:?} origin {:?}",
        r.vals.iter().flatten().collect::<Vec<_>>(),
        r.origin
    )
}

fn values(v: &[Field]) -> Vec<String> {
    v.iter()
        .map(|f| format!("{}={}", f.name, f.value.as_deref().unwrap_or("-")))
        .collect()
}

fn event(e: &Event) -> String {
    match e {
        Event::Local {
            pos, present, own, ..
        } => format!("local lsn {} present {present} {:?}", pos.lsn, values(own)),
        Event::Applied { pos, version, .. } => format!("applied lsn {} v{version}", pos.lsn),
        Event::Superseded { pos, version, .. } => {
            format!("superseded lsn {} v{version}", pos.lsn)
        }
        Event::Repair { .. } => "repair".into(),
        Event::Moved { pos, own, .. } => format!("moved lsn {} {:?}", pos.lsn, values(own)),
    }
}

fn same(a: &Content, b: &Content) -> bool {
    a.present == b.present && (!a.present || a.both == b.both)
}

/// A schedule with writes behind the pipeline's back, then repairs (as
/// `ctl repair` makes them) until the sides agree: they must, within a few
/// rounds, and the resolver must end settled.
/// Drift behind the pipeline's back, repaired once everything drained;
/// with `anytime`, repairs also come at random moments, while writes of
/// either side are still on their way (read before them, they reach the
/// log after the repair).
fn run_with_drift(seed: u64, writes: usize, anytime: bool) -> Result<(), String> {
    let mut w = World::new(seed, (seed % 2) as usize);
    w.sneaky = true;
    let mut budget = [writes, writes];
    let mut steps = 0;
    while budget != [0, 0] && steps < 1_000_000 {
        if anytime && w.rng.random_bool(0.05) {
            w.repair();
        }
        w.step(&mut budget, true);
        steps += 1;
    }
    w.drain();
    for _ in 0..3 {
        if same(&w.dbs[L].row.content(), &w.dbs[R].row.content()) {
            break;
        }
        w.repair();
        w.drain();
    }
    let (l, r) = (&w.dbs[L].row, &w.dbs[R].row);
    if !same(&l.content(), &r.content()) || !w.state.settled(&w.shape) {
        return Err(format!(
            "seed {seed}: not repaired\nleft {}\nright {}\nstate {:?}\ntrace:\n{}",
            compact(l),
            compact(r),
            w.state,
            w.trace.join("\n")
        ));
    }
    Ok(())
}

/// [`run`] with crashes at three steps in ten, appliers going back to any
/// earlier write, and the record only deleted and inserted on the side
/// that is not the master (updated on the master): superseded writes meet
/// the state they expected again, and writes of that side made on the
/// master's content are frequent.
fn run_far_redeliveries(seed: u64, writes: usize) -> Result<(), String> {
    let master = (seed % 2) as usize;
    let mut w = World::new(seed, master);
    w.toggles = true;
    w.extra_crashes = 0.3;
    let initial = w.dbs[0].row.content();
    let mut budget = [writes, writes];
    while budget != [0, 0] {
        w.step(&mut budget, true);
    }
    w.drain();
    verdict(&w, seed, master, initial)
}

fn run(seed: u64, writes: usize, crashes: bool) -> Result<(), String> {
    run_with(seed, writes, crashes, false)
}

/// [`run`], with rows moved in by the appliers at random moments when
/// `moves`: content of no write, which must never win.
fn run_with(seed: u64, writes: usize, crashes: bool, moves: bool) -> Result<(), String> {
    let master = (seed % 2) as usize;
    let mut w = World::new(seed, master);
    w.moves = moves;
    let initial = w.dbs[0].row.content();
    let mut budget = [writes, writes];
    let mut steps = 0;
    while budget != [0, 0] && steps < 1_000_000 {
        w.step(&mut budget, crashes);
        steps += 1;
    }
    w.drain();
    verdict(&w, seed, master, initial)
}

/// Checks a drained world against the invariants (see the module's comment).
fn verdict(w: &World, seed: u64, master: usize, initial: Content) -> Result<(), String> {
    let (l, r) = (&w.dbs[L].row, &w.dbs[R].row);
    let ctx = || {
        format!(
            "seed {seed} master {master}\nleft {}\nright {}\nstate {:?}\ntrace:\n{}",
            compact(l),
            compact(r),
            w.state,
            w.trace.join("\n")
        )
    };
    if let Some(m) = &w.misjudged {
        return Err(format!("{m}\n{}", ctx()));
    }
    if !same(&l.content(), &r.content()) {
        return Err(format!("sides differ\n{}", ctx()));
    }
    let mut want = expected(w, master);
    if w.writes[L].is_empty() && w.writes[R].is_empty() {
        want = initial;
    }
    if !same(&l.content(), &want) {
        return Err(format!("expected {want:?}\n{}", ctx()));
    }
    if l.present && r.present {
        // A one-way field holds its owner's value, where the owner's write of
        // it reached the agreed record that both sides now hold.
        for owner in [L, R] {
            let c = OWNED[owner];
            let flowed = w.dbs[owner]
                .row
                .owned_by
                .and_then(|idx| w.flowed.get(&(owner, idx)))
                .is_some_and(|&e| e == w.epoch);
            if flowed && l.vals[c] != r.vals[c] {
                return Err(format!("one-way field of side {owner} differs\n{}", ctx()));
            }
        }
    }
    if !w.state.settled(&w.shape) {
        return Err(format!("resolver not settled\n{}", ctx()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn converges_to_the_rule_over_random_schedules(seed in any::<u64>(), writes in 1usize..12) {
        prop_assert_eq!(run(seed, writes, false), Ok(()));
    }

    #[test]
    fn converges_with_crashes_and_redeliveries(seed in any::<u64>(), writes in 1usize..12) {
        prop_assert_eq!(run(seed, writes, true), Ok(()));
    }

    #[test]
    fn rows_moved_in_by_key_changes_converge_to_the_rule(seed in any::<u64>(), writes in 1usize..12) {
        prop_assert_eq!(run_with(seed, writes, seed % 3 == 0, true), Ok(()));
    }

    #[test]
    fn drift_behind_the_pipeline_is_repaired(seed in any::<u64>(), writes in 1usize..12) {
        prop_assert_eq!(run_with_drift(seed, writes, false), Ok(()));
    }

    #[test]
    fn repairs_at_any_moment_converge(seed in any::<u64>(), writes in 1usize..12) {
        prop_assert_eq!(run_with_drift(seed, writes, true), Ok(()));
    }
}

/// A superseded write redelivered after the side came back to the state it
/// expected (an applier restarted from its committed offset, behind the
/// supersession) is not written: its moment has passed. Were it written,
/// the side would hold the master's content through a write the resolver
/// no longer knows of, and the side's delete made on top of it would count
/// as concurrent and be undone.
#[test]
fn a_superseded_write_redelivered_later_is_not_written() {
    const DELETE: u32 = 0;
    const WRITE: u32 = 5;
    let master = L;
    let mut w = World::new(7, master);
    let initial = w.dbs[L].row.content();
    let settle = |w: &mut World| {
        while w.route(L) | w.route(R) | w.resolve() {}
    };
    // The right side deletes the record; the delete reaches the left.
    w.local_write_as(R, DELETE);
    settle(&mut w);
    while w.apply_next(L) {}
    settle(&mut w);
    // The master inserts it again; before its write reaches the right
    // side, the right side inserts it too.
    w.local_write_as(L, WRITE);
    settle(&mut w);
    w.local_write_as(R, WRITE);
    let from = w.applied[R];
    assert!(w.apply_next(R), "the master's insert is on its way");
    // The right side deletes its row; its applier restarts from before
    // the superseded write and meets it again, the row absent as it expected.
    w.local_write_as(R, DELETE);
    w.applied[R] = from;
    assert!(w.apply_next(R));
    settle(&mut w);
    // The right side deletes the record again, whatever it holds now.
    if w.dbs[R].row.present {
        w.local_write_as(R, DELETE);
    }
    w.drain();
    verdict(&w, 7, master, initial)
        .map_err(|e| panic!("{e}"))
        .ok();
}

/// A repair read for another conflict master than the map runs with (the
/// map was run again with the other master in between) is dropped: were
/// it folded, the resolver would take the other side's row for the
/// master's and leave the drift in place as agreed. The repair made for
/// the map's master then mends it.
#[test]
fn a_repair_for_another_master_is_dropped() {
    let master = L;
    let mut w = World::new(3, master);
    w.drain();
    w.sneak(R);
    assert!(!same(&w.dbs[L].row.content(), &w.dbs[R].row.content()));
    let state = format!("{:?}", w.state);
    w.repair_as(R);
    w.drain();
    assert_eq!(
        format!("{:?}", w.state),
        state,
        "the repair changed the state"
    );
    assert_eq!(w.applied, [0, 0], "the repair wrote");
    w.repair();
    w.drain();
    assert!(same(&w.dbs[L].row.content(), &w.dbs[R].row.content()));
    assert!(w.state.settled(&w.shape));
}

proptest! {
    // Before the applier recorded superseded writes as decided, about one
    // schedule in 1,100 of these failed: enough cases to find it.
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn superseded_writes_redelivered_late_are_not_written(seed in any::<u64>(), writes in 1usize..16) {
        prop_assert_eq!(run_far_redeliveries(seed, writes), Ok(()));
    }
}

#[test]
fn long_storms_converge() {
    for seed in 0..300u64 {
        if let Err(e) = run(seed, 60, seed % 3 == 0) {
            panic!("{e}");
        }
        if let Err(e) = run_with(seed, 60, seed % 3 == 0, true) {
            panic!("with moves: {e}");
        }
    }
}

/// Replays one schedule: `DUALWRITE_MODEL_SEED=<seed> DUALWRITE_MODEL_WRITES=<n>
/// [DUALWRITE_MODEL_CRASHES=1] cargo test -p dualwrite-resolve replay`.
#[test]
fn replay() {
    let Some(seed) = std::env::var("DUALWRITE_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    let writes = std::env::var("DUALWRITE_MODEL_WRITES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let crashes = std::env::var_os("DUALWRITE_MODEL_CRASHES").is_some();
    if let Err(e) = run(seed, writes, crashes) {
        panic!("{e}");
    }
}

/// A long form for soaking: `DUALWRITE_MODEL_SOAK=<schedules> cargo test
/// --release -p dualwrite-resolve soak -- --nocapture`.
#[test]
fn soak() {
    let Some(n) = std::env::var("DUALWRITE_MODEL_SOAK")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(n);
    for i in 0..n {
        let seed = rng.random();
        let writes = rng.random_range(1..200);
        if let Err(e) = run(seed, writes, i % 2 == 0) {
            panic!("schedule {i} (writes {writes}): {e}");
        }
        let writes = writes % 16 + 1;
        if let Err(e) = run_far_redeliveries(seed, writes) {
            panic!("schedule {i} with far redeliveries (writes {writes}): {e}");
        }
    }
    println!("{n} schedules converged to the rule");
}
