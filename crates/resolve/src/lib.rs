//! The resolver: one decision per record, made once, from the map topic's
//! ordered events.
//!
//! Each record (map and alternate key) has one [`KeyState`], changed only
//! by [`apply`], which the pause buffer's gate calls for every event of
//! the map topic in offset order. The map topic carries, per record and in
//! each side's commit order, every write that side's database committed
//! for the record:
//! - [`Event::Local`]: a write made on the side itself (captured);
//! - [`Event::Applied`]: a write of the applier of that side (a [`Write`]
//!   the resolver sent), which the capturer reports from the same
//!   transaction in the side's WAL, so it is in its exact place among the
//!   side's own writes;
//! - [`Event::Superseded`]: a write the applier did not make, the side not
//!   being in the expected state, reported the same way;
//! - [`Event::Moved`]: a row the applier of that side moved to the record's
//!   key (an alternate-key change of the other side, see `crates/apply`),
//!   its values untouched: not a write of the side, only what it now holds.
//!
//! The state holds the record's **agreed** content ([`Agreed`]: presence,
//! the values each side should hold, and tags naming the event each part
//! came from) and, per side, what that side holds as far as the events
//! say ([`SideState`]). A local write of side X is **sequential** when X
//! held the agreed both-way content just before it (it was made on top
//! of it) and **concurrent** otherwise (X had not yet received a change of
//! the other side that the agreed content holds). A sequential write, or a
//! concurrent one of the conflict master, becomes the agreed content; a
//! concurrent write of the other side keeps the agreed both-way content
//! (its one-way fields, which that side owns, still count).
//!
//! After every event, each side that does not hold the agreed content is
//! sent a [`Write`] of it, with the state the side is expected to be in
//! ([`Expect`]): the applier writes only if the side is still in that
//! state (compare-and-set). A lost compare-and-set means the side wrote
//! something the resolver has not seen yet; that write is in the log and
//! is resolved in its turn. Since the side's events tell what it holds, a
//! write that was lost or that landed anyway is known, and the agreed
//! content is sent again until both sides hold it. The argument for why
//! this converges is in the README ("Convergence").
//!
//! Everything here is deterministic: the same state and event give the
//! same state and writes, so an event processed again after a restart
//! (from the last committed offset, with the state saved with it) does the
//! same. Events already folded in are recognised by their source position
//! and change nothing.

use dualwrite_model::config::SideId;
use dualwrite_model::record::Field;
use std::sync::Arc;

pub mod changelog;
pub mod records;

/// A row's values, by column name, in one side's names.
pub type Values = Vec<Field>;

/// Values kept in a record's state, shared between the agreed content,
/// what a side is known to hold and the expectations of writes on their
/// way (most of the time the same row).
pub type Shared = Arc<Values>;

/// Position of a write in its side's commit order: commit LSN and index
/// within the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub lsn: i64,
    pub seq: i32,
}

/// What the resolver needs to know of a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Per side (left, right): that side's names of the fields that flow
    /// only into it (owned by the other side).
    pub one_way_into: [Vec<String>; 2],
    /// The side whose write wins when both sides wrote concurrently.
    pub master: SideId,
}

/// One event of the map topic for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write made on `side` itself.
    Local {
        side: SideId,
        pos: Pos,
        /// Whether the record exists on `side` after the write.
        present: bool,
        /// `side`'s values of the columns the other side writes into it
        /// (key, both-way fields, fields flowing into `side`), as it has
        /// them after the write; empty when absent.
        own: Values,
        /// The write mapped into the other side's names: the key, the
        /// both-way fields and the fields `side` owns; empty for a delete.
        values: Values,
    },
    /// The applier of `side` committed the [`Write`] of `version`.
    Applied {
        side: SideId,
        pos: Pos,
        version: u64,
    },
    /// The applier of `side` did not make the [`Write`] of `version`: the
    /// side was not in the state it expected.
    Superseded {
        side: SideId,
        pos: Pos,
        version: u64,
    },
    /// The applier of `side` moved a row to this record's key, its values
    /// untouched (the other side changed the alternate key of the record
    /// whose row it was). The side holds `own` (as [`Event::Local::own`]),
    /// content that no write of either side made here: the agreed content
    /// does not change, and is sent to the side expecting that row.
    Moved { side: SideId, pos: Pos, own: Values },
    /// An operator's repair: both sides' rows as read by `ctl repair`,
    /// the master's to be written to the other side.
    Repair {
        /// The side whose row `master_values` is: a repair read for
        /// another master than the map's (a run that chose another
        /// master since) is dropped, as a read overtaken is.
        master: SideId,
        /// Per side (left, right): its row as read, and the position of
        /// its WAL when read.
        observed: [Observed; 2],
        /// The master's row mapped into the other side's names.
        master_values: Values,
    },
}

/// A side's row as read by a repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub pos: Pos,
    pub present: bool,
    /// As [`Event::Local::own`].
    pub own: Values,
}

/// What the applier of a side is to write, and the state in which the
/// side must be for it to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub target: SideId,
    /// The version of the event that made the decision; increases with
    /// the map topic's offsets, so a redelivered write is recognised.
    pub version: u64,
    /// Upsert (`true`) or delete (`false`).
    pub present: bool,
    /// The row's columns to write, in the target's names.
    pub values: Values,
    pub expect: Expect,
}

/// The state a side must be in for a write to be made (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expect {
    /// Nothing is known of the side: write.
    #[default]
    Nothing,
    /// The side's last write of the record was the applier's write of
    /// this version, and nothing changed the row since.
    Applied(u64),
    /// The row is present with these values (in the columns given), or absent.
    Row { present: bool, values: Shared },
}

/// A record's content that both sides are to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    pub present: bool,
    /// Per side (left, right): the values that side is to hold.
    pub into: [Shared; 2],
    /// Tag (event version) of the both-way content and the presence.
    pub both: u64,
    /// The side whose own write the both-way content is (`None`: a repair).
    pub both_from: Option<SideId>,
    /// Per side: tag of the content of the fields flowing only into it.
    pub one_way: [u64; 2],
}

/// Which content a side holds, as tags; `None`: not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holds {
    pub present: Option<bool>,
    pub both: Option<u64>,
    pub one_way: Option<u64>,
}

/// A write sent to a side and not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub version: u64,
    pub expect: Expect,
    /// What the side holds once it is written.
    pub holds: Holds,
    /// Sent before the side's latest own write: it may still land (its
    /// acknowledgement is understood), but it is not counted on.
    pub overtaken: bool,
}

/// What the resolver knows of one side of a record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SideState {
    /// Position of the side's last event folded in.
    pub pos: Option<Pos>,
    /// The side's state after its last event, as an expectation.
    pub known: Expect,
    pub holds: Holds,
    /// Writes sent to the side, oldest first, not acknowledged yet.
    pub pending: Vec<Pending>,
}

/// Everything the resolver keeps of one record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyState {
    pub agreed: Option<Agreed>,
    /// Left, right.
    pub sides: [SideState; 2],
}

/// Unacknowledged writes kept per side (a write overtaken by a write of
/// the side itself keeps only its tags, a few bytes). An acknowledgement of
/// a write older than these is taken as unknown content: the agreed content
/// is sent again, which is safe, but the side's next write then counts as
/// concurrent.
const MAX_PENDING: usize = 1024;

fn ix(side: SideId) -> usize {
    match side {
        SideId::Left => 0,
        SideId::Right => 1,
    }
}

const SIDES: [SideId; 2] = [SideId::Left, SideId::Right];

impl KeyState {
    /// Drops the values of a quiescent record (both sides hold the agreed
    /// content and no write sent to either is unanswered): they are in both
    /// databases, and the record's next event makes new content whichever
    /// side it comes from (both hold the agreed content, so it is
    /// sequential). What remains is a few numbers per side: positions (an
    /// event read again is still recognised), tags and versions. A side last
    /// known by its own write's values is then expected in no particular
    /// state (the next write to it is made whatever it holds, and its report
    /// tells what it overwrote).
    pub fn compact(&mut self, shape: &Shape) {
        let Some(a) = &mut self.agreed else { return };
        let quiescent = SIDES.iter().all(|&s| {
            let st = &self.sides[ix(s)];
            st.pending.is_empty() && holds_all(st.holds, a, shape, s)
        });
        if !quiescent || a.into.iter().all(|v| v.is_empty()) {
            return;
        }
        a.into = [empty(), empty()];
        for st in &mut self.sides {
            if matches!(st.known, Expect::Row { .. }) {
                st.known = Expect::Nothing;
            }
        }
    }

    /// Whether the record's values were dropped ([`KeyState::compact`]).
    pub fn compacted(&self) -> bool {
        self.agreed
            .as_ref()
            .is_some_and(|a| a.present && a.into.iter().all(|v| v.is_empty()))
    }

    /// Whether both sides hold the agreed content and no write that could
    /// still land is on its way.
    pub fn settled(&self, shape: &Shape) -> bool {
        let Some(a) = &self.agreed else {
            return true;
        };
        SIDES.iter().all(|&s| {
            let st = &self.sides[ix(s)];
            st.predicted().2 == 0 && holds_all(st.holds, a, shape, s)
        })
    }
}

impl SideState {
    /// Whether the pending write at `i` was counted on (it expects what the
    /// writes before it leave).
    fn predicted_through(&self, i: usize) -> bool {
        let mut expect = self.known.clone();
        for (j, p) in self.pending.iter().enumerate() {
            if p.overtaken || p.expect != expect {
                continue;
            }
            if j == i {
                return true;
            }
            expect = Expect::Applied(p.version);
        }
        false
    }

    /// What the side will hold after the pending writes that can still
    /// succeed (each expects what the one before it leaves), what a new
    /// write must then expect, and how many such writes there are.
    fn predicted(&self) -> (Expect, Holds, usize) {
        let mut expect = self.known.clone();
        let mut holds = self.holds;
        let mut viable = 0;
        for p in self.pending.iter().filter(|p| !p.overtaken) {
            if p.expect == expect {
                expect = Expect::Applied(p.version);
                holds = p.holds;
                viable += 1;
            }
        }
        (expect, holds, viable)
    }
}

/// Whether `h` is the agreed presence and both-way content. Tags, not
/// values, decide: a side that deleted a record itself does not hold the
/// other side's delete of it until that delete was applied to it (a
/// no-op write that acknowledges it), so what counts as concurrent does
/// not depend on the order in which the two deletes reach the log.
fn holds_both(h: Holds, a: &Agreed) -> bool {
    h.present == Some(a.present) && h.both == Some(a.both)
}

/// Whether `h` is everything `side` is to hold of `a`.
fn holds_all(h: Holds, a: &Agreed, shape: &Shape, side: SideId) -> bool {
    holds_both(h, a)
        && (!a.present
            || shape.one_way_into[ix(side)].is_empty()
            || h.one_way == Some(a.one_way[ix(side)]))
}

/// Folds one event into a record's state and returns the writes to send,
/// in order. `version` identifies the event (it increases with the map
/// topic's offsets; the writes made for it carry it).
pub fn apply(state: &mut KeyState, shape: &Shape, version: u64, event: &Event) -> Vec<Write> {
    let folded = match event {
        Event::Local {
            side,
            pos,
            present,
            own,
            values,
        } => {
            let w = Local {
                side: *side,
                tag: version,
                present: *present,
                own: Arc::new(own.clone()),
                values: Arc::new(values.clone()),
            };
            local(state, shape, &w, *pos)
        }
        Event::Applied { side, pos, version } => applied(state, *side, *pos, *version),
        Event::Superseded { side, pos, version } => superseded(state, *side, *pos, *version),
        Event::Moved { side, pos, own } => moved(state, *side, *pos, own),
        Event::Repair {
            master,
            observed,
            master_values,
        } => *master == shape.master && repair(state, shape, version, observed, master_values),
    };
    if !folded {
        return Vec::new();
    }
    let writes = SIDES
        .iter()
        .filter_map(|&s| send_if_needed(state, shape, version, s))
        .collect();
    state.compact(shape);
    writes
}

/// Whether `pos` is new for `side` (records it if so).
fn advance(st: &mut SideState, pos: Pos) -> bool {
    if st.pos.is_some_and(|p| pos <= p) {
        return false;
    }
    st.pos = Some(pos);
    true
}

/// A write made on a side itself, as [`Event::Local`] has it.
struct Local {
    side: SideId,
    tag: u64,
    present: bool,
    own: Shared,
    values: Shared,
}

fn local(state: &mut KeyState, shape: &Shape, w: &Local, pos: Pos) -> bool {
    let xi = ix(w.side);
    if !advance(&mut state.sides[xi], pos) {
        return false;
    }
    let before = state.sides[xi].holds;
    let holds = match &mut state.agreed {
        None => {
            state.agreed = Some(first_content(w));
            Holds {
                present: Some(w.present),
                both: Some(w.tag),
                one_way: Some(w.tag),
            }
        }
        // Made on top of the agreed content, or after this side's own write
        // that is the agreed content (a side's writes are never concurrent
        // with each other, even when a late write of older content landed in
        // between), or the master's: it wins.
        Some(a)
            if holds_both(before, a) || a.both_from == Some(w.side) || w.side == shape.master =>
        {
            wins(a, shape, w, before)
        }
        Some(a) => loses(a, shape, w, before),
    };
    let st = &mut state.sides[xi];
    overtake(&mut st.pending);
    st.holds = holds;
    st.known = Expect::Row {
        present: w.present,
        values: w.own.clone(),
    };
    true
}

/// The agreed content of a record whose first event is a write of one side.
fn first_content(w: &Local) -> Agreed {
    let mut into: [Shared; 2] = [w.values.clone(), w.values.clone()];
    into[ix(w.side)] = w.own.clone();
    Agreed {
        present: w.present,
        into,
        both: w.tag,
        both_from: Some(w.side),
        one_way: [w.tag, w.tag],
    }
}

/// The write becomes the agreed content; what the side then holds.
fn wins(a: &mut Agreed, shape: &Shape, w: &Local, before: Holds) -> Holds {
    let (xi, yi) = (ix(w.side), ix(w.side.other()));
    let keep_one_way = a.present && w.present;
    let mut into_x = w.own.clone();
    if keep_one_way {
        let from = a.into[xi].clone();
        overlay(&mut into_x, &from, &shape.one_way_into[xi]);
    } else {
        a.one_way[xi] = w.tag;
    }
    a.present = w.present;
    a.both = w.tag;
    a.both_from = Some(w.side);
    a.into[xi] = into_x;
    a.into[yi] = w.values.clone();
    a.one_way[yi] = w.tag;
    Holds {
        present: Some(w.present),
        both: Some(w.tag),
        // A row that existed keeps what it had of the other side's one-way
        // fields; a new one has its own values there.
        one_way: match (keep_one_way, before.present) {
            (false, _) => Some(w.tag),
            (true, Some(true)) => before.one_way,
            (true, _) => None,
        },
    }
}

/// Concurrent with a change of the master that this side has not
/// received: the master's content stays; the fields this side owns still
/// flow. What the side then holds.
fn loses(a: &mut Agreed, shape: &Shape, w: &Local, before: Holds) -> Holds {
    let yi = ix(w.side.other());
    if a.present && w.present && !shape.one_way_into[yi].is_empty() {
        overlay(&mut a.into[yi], &w.values, &shape.one_way_into[yi]);
        a.one_way[yi] = w.tag;
    }
    Holds {
        present: Some(w.present),
        both: Some(w.tag),
        one_way: if w.present && before.present == Some(true) {
            before.one_way
        } else {
            None
        },
    }
}

fn applied(state: &mut KeyState, x: SideId, pos: Pos, version: u64) -> bool {
    let st = &mut state.sides[ix(x)];
    if !advance(st, pos) {
        return false;
    }
    st.holds = match st.pending.iter().position(|p| p.version == version) {
        Some(i) => {
            let holds = st.pending[i].holds;
            st.pending.drain(..=i);
            holds
        }
        None => {
            // A write the state no longer knows of: what it wrote is unknown.
            st.pending.retain(|p| p.version > version);
            Holds::default()
        }
    };
    st.known = Expect::Applied(version);
    true
}

/// A write the side's applier did not make. Expected when the write was
/// overtaken by a write of the side itself (folded in before this report,
/// which follows it in the side's commit order). Otherwise the side was
/// not in the state its events say: something wrote it behind the
/// pipeline's back. Its state is then unknown, and the agreed content is
/// sent again expecting nothing (a write of the side after this report is
/// resolved as usual; the drift detector reports what this cannot mend).
fn superseded(state: &mut KeyState, x: SideId, pos: Pos, version: u64) -> bool {
    let st = &mut state.sides[ix(x)];
    if !advance(st, pos) {
        return false;
    }
    let Some(i) = st.pending.iter().position(|p| p.version == version) else {
        return true;
    };
    let expected = st.predicted_through(i);
    st.pending.drain(..=i);
    if expected {
        st.known = Expect::Nothing;
        st.holds = Holds::default();
        overtake(&mut st.pending);
    }
    true
}

/// A row moved to the key by the side's applier: the side holds it, as
/// content of no write (so it holds no agreed content, and its next own
/// write counts as made without the agreed content). Writes sent to the
/// side before are overtaken: they expected the record absent there.
fn moved(state: &mut KeyState, x: SideId, pos: Pos, own: &Values) -> bool {
    let st = &mut state.sides[ix(x)];
    if !advance(st, pos) {
        return false;
    }
    overtake(&mut st.pending);
    st.known = Expect::Row {
        present: true,
        values: Arc::new(own.clone()),
    };
    st.holds = Holds {
        present: Some(true),
        both: None,
        one_way: None,
    };
    true
}

fn repair(
    state: &mut KeyState,
    shape: &Shape,
    tag: u64,
    observed: &[Observed; 2],
    master_values: &Values,
) -> bool {
    // Only a settled record is repaired, and only from reads that no event
    // of either side has overtaken: anything newer is resolved as usual.
    let stale = SIDES.iter().any(|&s| {
        let st = &state.sides[ix(s)];
        st.predicted().2 > 0 || st.pos.is_some_and(|p| p > observed[ix(s)].pos)
    });
    if stale {
        return false;
    }
    let (m, o) = (ix(shape.master), ix(shape.master.other()));
    let mine = &observed[m];
    let mut into: [Shared; 2] = Default::default();
    into[m] = Arc::new(mine.own.clone());
    into[o] = Arc::new(if mine.present {
        master_values.clone()
    } else {
        Vec::new()
    });
    state.agreed = Some(Agreed {
        present: mine.present,
        into,
        both: tag,
        both_from: None,
        one_way: [tag, tag],
    });
    for s in SIDES {
        let seen = &observed[ix(s)];
        let st = &mut state.sides[ix(s)];
        overtake(&mut st.pending);
        st.known = Expect::Row {
            present: seen.present,
            values: Arc::new(seen.own.clone()),
        };
        st.holds = if ix(s) == m {
            Holds {
                present: Some(seen.present),
                both: Some(tag),
                one_way: Some(tag),
            }
        } else {
            Holds {
                present: Some(seen.present),
                both: None,
                one_way: None,
            }
        };
    }
    true
}

/// Marks writes as overtaken by a write of the side itself; only their
/// tags are kept, to understand a late acknowledgement.
fn overtake(pending: &mut [Pending]) {
    for p in pending {
        p.overtaken = true;
        p.expect = Expect::Nothing;
    }
}

/// The values of a compacted record (one allocation for all).
fn empty() -> Shared {
    static EMPTY: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::new(Vec::new())).clone()
}

/// Replaces the fields named in `names` of `into` with those of `from`
/// (adding those `into` lacks).
fn overlay(into: &mut Shared, from: &Values, names: &[String]) {
    let mut fields = from.iter().filter(|f| names.contains(&f.name)).peekable();
    if fields.peek().is_none() {
        return;
    }
    let into = Arc::make_mut(into);
    for f in fields {
        match into.iter_mut().find(|g| g.name == f.name) {
            Some(g) => g.value = f.value.clone(),
            None => into.push(f.clone()),
        }
    }
}

/// Sends the agreed content to `side` unless it holds it, or a write of it
/// is on its way with an expectation that the side's known state meets.
fn send_if_needed(
    state: &mut KeyState,
    shape: &Shape,
    version: u64,
    side: SideId,
) -> Option<Write> {
    if state.compacted() {
        // Nothing to send but the values it no longer has: only a report of
        // a write it no longer knows could lead here; the drift detector
        // reports what follows.
        return None;
    }
    let a = state.agreed.as_ref()?;
    let st = &mut state.sides[ix(side)];
    let (expect, holds, _) = st.predicted();
    if holds_all(holds, a, shape, side) {
        return None;
    }
    let write = Write {
        target: side,
        version,
        present: a.present,
        values: if a.present {
            a.into[ix(side)].to_vec()
        } else {
            Vec::new()
        },
        expect: expect.clone(),
    };
    st.pending.push(Pending {
        version,
        expect,
        holds: Holds {
            present: Some(a.present),
            both: Some(a.both),
            one_way: Some(a.one_way[ix(side)]),
        },
        overtaken: false,
    });
    if st.pending.len() > MAX_PENDING {
        st.pending.remove(0);
    }
    Some(write)
}
