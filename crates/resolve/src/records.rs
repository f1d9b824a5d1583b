//! The resolver's inputs and outputs as the records on the topics: map
//! topic events ([`MappedChange`]) in, apply topic writes ([`ApplyWrite`])
//! out, and its state as [`ResolverState`] on the changelog topic.

use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::mapping::one_way_into;
use dualwrite_model::record::{
    ApplyOp, ApplyWrite, ExpectKind, Expectation, Field, HoldsRecord, Known, MappedChange,
    ResolverState, SideStateRecord, WriteOp,
};

use std::sync::Arc;

use crate::{
    Agreed, Event, Expect, Holds, KeyState, Observed, Pending, Pos, Shape, Shared, SideState, Write,
};

impl Shape {
    /// The shape of `map`, with `master` (the configured or the run's
    /// conflict master) winning concurrent writes.
    pub fn of(map: &MapConfig, master: SideId) -> Shape {
        Shape {
            one_way_into: [
                one_way_into(map, SideId::Left),
                one_way_into(map, SideId::Right),
            ],
            master,
        }
    }
}

/// Why a map topic record is not an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAnEvent {
    /// A record of an earlier version that means nothing now (a re-assert request).
    Obsolete,
    /// It names a side that is not configured.
    UnknownSide(String),
}

/// The event a map topic record is.
pub fn event(config: &Config, mc: &MappedChange) -> Result<Event, NotAnEvent> {
    let side = config
        .side_id(&mc.source_side)
        .ok_or_else(|| NotAnEvent::UnknownSide(mc.source_side.clone()))?;
    let pos = Pos {
        lsn: mc.source_lsn,
        seq: mc.source_seq,
    };
    Ok(match mc.op {
        ApplyOp::Upsert | ApplyOp::Delete => Event::Local {
            side,
            pos,
            present: mc.op == ApplyOp::Upsert,
            own: mc.own.clone(),
            values: mc.values.clone(),
        },
        ApplyOp::Applied => Event::Applied {
            side,
            pos,
            version: mc.version as u64,
        },
        ApplyOp::Superseded => Event::Superseded {
            side,
            pos,
            version: mc.version as u64,
        },
        ApplyOp::Repair => {
            let repair = mc.repair.as_ref().ok_or(NotAnEvent::Obsolete)?;
            let observed = |s: SideId| -> Result<Observed, NotAnEvent> {
                let name = &config.side(s).name;
                let o = repair
                    .observed
                    .iter()
                    .find(|o| &o.side == name)
                    .ok_or_else(|| NotAnEvent::UnknownSide(name.clone()))?;
                Ok(Observed {
                    // Every write committed before the read is at or below it.
                    pos: Pos {
                        lsn: o.lsn,
                        seq: i32::MAX,
                    },
                    present: o.present,
                    own: o.own.clone(),
                })
            };
            Event::Repair {
                // A repair's source is the master it was read for.
                master: side,
                observed: [observed(SideId::Left)?, observed(SideId::Right)?],
                master_values: repair.master_values.clone(),
            }
        }
        ApplyOp::Moved => Event::Moved {
            side,
            pos,
            own: mc.own.clone(),
        },
        ApplyOp::Reassert => return Err(NotAnEvent::Obsolete),
    })
}

/// A decision as the record for the target's applier. `key` holds the
/// record's alternate key values (any names); `cause` is the event's record.
pub fn apply_write(
    config: &Config,
    map: &MapConfig,
    cause: &MappedChange,
    w: &Write,
) -> ApplyWrite {
    let target = map.entity(w.target);
    let from_other = config.side_id(&cause.source_side) == Some(w.target.other())
        && matches!(cause.op, ApplyOp::Upsert | ApplyOp::Delete);
    // Key values under the target's key column names.
    let as_key = |values: &[Field]| -> Vec<Field> {
        target
            .key
            .iter()
            .zip(values)
            .map(|(name, f)| Field {
                name: name.clone(),
                value: f.value.clone(),
            })
            .collect()
    };
    ApplyWrite {
        map: map.name.clone(),
        source_side: cause.source_side.clone(),
        target_side: config.side(w.target).name.clone(),
        target_entity: target.qualified(),
        key: as_key(&cause.key),
        version: w.version as i64,
        op: if w.present {
            WriteOp::Upsert
        } else {
            WriteOp::Delete
        },
        values: w.values.clone(),
        expect: expectation(&w.expect),
        // The half of a key change that this write makes on the other side.
        moved: if from_other && w.present == (cause.op == ApplyOp::Upsert) {
            as_key(&cause.moved)
        } else {
            Vec::new()
        },
        source_lsn: cause.source_lsn,
        commit_time: if from_other { cause.commit_time } else { 0 },
    }
}

fn expectation(e: &Expect) -> Expectation {
    let (kind, version, present, values) = expect_parts(e);
    Expectation {
        kind,
        version,
        present,
        values: values.to_vec(),
    }
}

/// An expectation's parts as its records have them: kind, the version of
/// an applier's write, presence and the row's values.
pub(crate) fn expect_parts(e: &Expect) -> (ExpectKind, i64, bool, &[Field]) {
    match e {
        Expect::Nothing => (ExpectKind::Nothing, 0, false, &[]),
        Expect::Applied(v) => (ExpectKind::Applied, *v as i64, false, &[]),
        Expect::Row { present, values } => (ExpectKind::Row, 0, *present, values),
    }
}

fn expect_of(k: Known) -> Expect {
    match k.kind {
        ExpectKind::Nothing => Expect::Nothing,
        ExpectKind::Applied => Expect::Applied(k.version as u64),
        ExpectKind::Row => Expect::Row {
            present: k.present,
            values: Arc::new(k.values),
        },
    }
}

pub(crate) fn holds_record(h: Holds) -> HoldsRecord {
    HoldsRecord {
        present: h.present,
        both: h.both.map(|v| v as i64),
        one_way: h.one_way.map(|v| v as i64),
    }
}

fn holds_of(h: &HoldsRecord) -> Holds {
    Holds {
        present: h.present,
        both: h.both.map(|v| v as u64),
        one_way: h.one_way.map(|v| v as u64),
    }
}

fn side_of(r: SideStateRecord) -> SideState {
    SideState {
        pos: r.lsn.map(|lsn| Pos { lsn, seq: r.seq }),
        known: expect_of(r.known),
        holds: holds_of(&r.holds),
        pending: r
            .pending
            .into_iter()
            .map(|p| Pending {
                version: p.version as u64,
                expect: expect_of(p.expect),
                holds: holds_of(&p.holds),
                overtaken: p.overtaken,
            })
            .collect(),
    }
}

/// A changelog record back as the state, its equal rows shared again.
pub fn state_of(r: ResolverState) -> KeyState {
    let mut s = KeyState {
        agreed: r.agreed.map(|a| Agreed {
            present: a.present,
            into: [Arc::new(a.into_left), Arc::new(a.into_right)],
            both: a.both as u64,
            both_from: match a.both_from.as_deref() {
                Some("left") => Some(SideId::Left),
                Some("right") => Some(SideId::Right),
                _ => None,
            },
            one_way: [a.one_way_left as u64, a.one_way_right as u64],
        }),
        sides: [side_of(r.left), side_of(r.right)],
    };
    share(&mut s);
    s
}

/// Makes equal rows of a state one shared row again.
fn share(s: &mut KeyState) {
    for i in 0..2 {
        let agreed = s.agreed.as_ref().map(|a| a.into[i].clone());
        let st = &mut s.sides[i];
        let same = |v: &mut Shared, with: &Shared| {
            if v == with {
                *v = with.clone();
            }
        };
        if let (Expect::Row { values, .. }, Some(a)) = (&mut st.known, &agreed) {
            same(values, a);
        }
        let known = match &st.known {
            Expect::Row { values, .. } => Some(values.clone()),
            _ => None,
        };
        for p in &mut st.pending {
            if let (Expect::Row { values, .. }, Some(k)) = (&mut p.expect, &known) {
                same(values, k);
            }
        }
    }
}

/// The version of the event at `offset` of a map topic partition in
/// `generation`: increases with the offset, and from one generation to the next.
pub fn version(generation: i64, offset: i64) -> u64 {
    ((generation.max(0) as u64) << 40) | (offset.max(0) as u64 & ((1 << 40) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_its_record() {
        let mut s = KeyState::default();
        let shape = Shape {
            one_way_into: [vec!["ro".into()], vec![]],
            master: SideId::Right,
        };
        let own = vec![Field::new("k", Some("1")), Field::new("a", Some("x"))];
        let values = vec![Field::new("K", Some("1")), Field::new("A", Some("x"))];
        let pos = Pos { lsn: 10, seq: 2 };
        let e = Event::Local {
            side: SideId::Left,
            pos,
            present: true,
            own,
            values,
        };
        let writes = crate::apply(&mut s, &shape, version(3, 7), &e);
        assert_eq!(writes.len(), 1);
        let bytes = crate::changelog::encode_state("m", 3, 1, &s).unwrap();
        let back: ResolverState = dualwrite_model::avro::decode(&bytes).unwrap();
        assert_eq!((back.map.as_str(), back.generation, back.run), ("m", 3, 1));
        assert_eq!(state_of(back), s);
        assert!(version(3, 7) > version(2, 1 << 39));
        assert!(version(3, 8) > version(3, 7));
    }
}
