//! A state as its changelog record, [`ResolverState`] (the inverse is
//! [`records::state_of`](crate::records::state_of)), encoded straight from
//! the state without copying its rows into a record first.
//!
//! The pause buffer encodes every state that changed at each save (a
//! record's state changes about three times on its way: its change, the
//! report of the write it sent, the echo), and a state holds its row up to
//! four times: copying each row's fields before encoding them was about
//! as many allocations as the encoding itself. The views below borrow the
//! state's rows and serialize as [`ResolverState`] does: the same record
//! names, fields and field order as `schemas/resolver_state.avsc`. The
//! model test checks, for every state of its random schedules, that the
//! bytes decode to a record that encodes to the same bytes (directly and
//! through an Avro value) and back to the same state.

use dualwrite_model::avro::{self, AvroError};
use dualwrite_model::record::{ExpectKind, Field, HoldsRecord, ResolverState};
use serde::Serialize;

use crate::records::{expect_parts, holds_record};
use crate::{Expect, KeyState, SideState};

/// A state's changelog record, as [`ResolverState`] encodes it.
pub fn encode_state(
    map: &str,
    generation: i64,
    run: i64,
    s: &KeyState,
) -> Result<Vec<u8>, AvroError> {
    let view = StateView {
        map,
        generation,
        run,
        agreed: s.agreed.as_ref().map(|a| AgreedView {
            present: a.present,
            into_left: &a.into[0],
            into_right: &a.into[1],
            both: a.both as i64,
            both_from: a.both_from.map(|s| s.as_str()),
            one_way_left: a.one_way[0] as i64,
            one_way_right: a.one_way[1] as i64,
        }),
        left: side_view(&s.sides[0]),
        right: side_view(&s.sides[1]),
    };
    avro::encode_as::<ResolverState>(&view)
}

#[derive(Serialize)]
#[serde(rename = "ResolverState")]
struct StateView<'a> {
    map: &'a str,
    generation: i64,
    run: i64,
    agreed: Option<AgreedView<'a>>,
    left: SideView<'a>,
    right: SideView<'a>,
}

#[derive(Serialize)]
#[serde(rename = "Agreed")]
struct AgreedView<'a> {
    present: bool,
    into_left: &'a [Field],
    into_right: &'a [Field],
    both: i64,
    both_from: Option<&'static str>,
    one_way_left: i64,
    one_way_right: i64,
}

#[derive(Serialize)]
#[serde(rename = "SideState")]
struct SideView<'a> {
    lsn: Option<i64>,
    seq: i32,
    known: KnownView<'a>,
    holds: HoldsRecord,
    pending: Vec<PendingView<'a>>,
}

#[derive(Serialize)]
#[serde(rename = "Known")]
struct KnownView<'a> {
    kind: ExpectKind,
    version: i64,
    present: bool,
    values: &'a [Field],
}

#[derive(Serialize)]
#[serde(rename = "Pending")]
struct PendingView<'a> {
    version: i64,
    expect: KnownView<'a>,
    holds: HoldsRecord,
    overtaken: bool,
}

fn side_view(s: &SideState) -> SideView<'_> {
    SideView {
        lsn: s.pos.map(|p| p.lsn),
        seq: s.pos.map_or(0, |p| p.seq),
        known: known_view(&s.known),
        holds: holds_record(s.holds),
        pending: s
            .pending
            .iter()
            .map(|p| PendingView {
                version: p.version as i64,
                expect: known_view(&p.expect),
                holds: holds_record(p.holds),
                overtaken: p.overtaken,
            })
            .collect(),
    }
}

fn known_view(e: &Expect) -> KnownView<'_> {
    let (kind, version, present, values) = expect_parts(e);
    KnownView {
        kind,
        version,
        present,
        values,
    }
}
