//! Avro encoding of the records, as Avro single-object encoding: the two
//! marker bytes `C3 01`, the schema's 8-byte CRC-64-AVRO (Rabin) fingerprint,
//! little-endian, then the binary datum. A reader can tell which schema wrote
//! a message, and a message of another kind or a foreign one is refused with
//! a clear error instead of being misread.

use std::sync::Mutex;

use apache_avro::rabin::Rabin;
use apache_avro::schema::ResolvedSchema;
use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};
use serde::{de::DeserializeOwned, Serialize};

use crate::record::{
    ApplyWrite, ChangeRecord, ErrorRecord, InitialSyncError, MappedChange, ResolverState,
};

pub(crate) const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Schema sources, one `.avsc` per record kind.
pub const CHANGE_RECORD_AVSC: &str = include_str!("../../../schemas/change_record.avsc");
pub const MAPPED_CHANGE_AVSC: &str = include_str!("../../../schemas/mapped_change.avsc");
pub const ERROR_RECORD_AVSC: &str = include_str!("../../../schemas/error_record.avsc");
pub const CONTROL_COMMAND_AVSC: &str = include_str!("../../../schemas/control_command.avsc");
pub const MAP_STATUS_AVSC: &str = include_str!("../../../schemas/map_status.avsc");
pub const CONTROL_EVENT_AVSC: &str = include_str!("../../../schemas/control_event.avsc");
pub const INITIAL_SYNC_ERROR_AVSC: &str = include_str!("../../../schemas/initial_sync_error.avsc");
pub const APPLY_WRITE_AVSC: &str = include_str!("../../../schemas/apply_write.avsc");
pub const RESOLVER_STATE_AVSC: &str = include_str!("../../../schemas/resolver_state.avsc");
/// Earlier versions of the schemas, still read (resolved to the current one).
pub const MAP_STATUS_V1_AVSC: &str = include_str!("../../../schemas/legacy/map_status.v1.avsc");
pub const CHANGE_RECORD_V1_AVSC: &str =
    include_str!("../../../schemas/legacy/change_record.v1.avsc");
pub const MAPPED_CHANGE_V1_AVSC: &str =
    include_str!("../../../schemas/legacy/mapped_change.v1.avsc");
pub const CONTROL_EVENT_V1_AVSC: &str =
    include_str!("../../../schemas/legacy/control_event.v1.avsc");
pub const CONTROL_EVENT_V2_AVSC: &str =
    include_str!("../../../schemas/legacy/control_event.v2.avsc");
pub const CONTROL_COMMAND_V1_AVSC: &str =
    include_str!("../../../schemas/legacy/control_command.v1.avsc");

#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    #[error("empty message")]
    Empty,
    #[error("not an Avro single-object message (no C3 01 marker)")]
    NoMarker,
    #[error("message was written with schema fingerprint {found}, expected {expected} ({kind})")]
    WrongSchema {
        kind: &'static str,
        expected: String,
        found: String,
    },
    #[error("cannot decode {kind}: {message}")]
    Decode { kind: &'static str, message: String },
    #[error("cannot encode {kind}: {message}")]
    Encode { kind: &'static str, message: String },
}

/// A record kind with an Avro schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    const KIND: &'static str;
    fn schema() -> &'static Compiled;
    /// Earlier schemas of this kind that messages may still be written
    /// with (e.g. records of a compacted topic): read with schema resolution.
    fn legacy() -> &'static [Compiled] {
        &[]
    }
    /// Whether [`encode`] and [`decode`] take serde's direct paths (no
    /// value in between): for the types checked by the tests to be
    /// declared in their schema's field order (apache-avro 0.21 wrote
    /// fields in serde's order; 0.22 puts early ones aside until their
    /// turn) and under their schema's record names (its reader checks
    /// them), and read back equal that way.
    const DIRECT: bool = false;
}

/// A parsed schema and its fingerprint, with a writer and a reader that
/// resolve the schema's named types once, not for every record.
pub struct Compiled {
    /// Compiled schemas live for the whole process (in statics), so each is
    /// kept as `'static`, which lets the names it defines borrow from it.
    pub schema: &'static Schema,
    pub fingerprint: [u8; 8],
    /// The named types the schema defines, for serde's direct path
    /// ([`encode`]).
    names: ResolvedSchema<'static>,
    writer: Mutex<GenericSingleObjectWriter>,
    reader: GenericSingleObjectReader,
}

fn built_in<T>(e: apache_avro::Error) -> T {
    panic!("built-in schema: {e}")
}

fn new_writer(schema: &Schema) -> GenericSingleObjectWriter {
    GenericSingleObjectWriter::new_with_capacity(schema, 1024).unwrap_or_else(built_in)
}

pub(crate) fn compile(src: &str) -> Compiled {
    // The schemas are part of the binary and checked by the unit tests.
    let schema = Schema::parse_str(src).unwrap_or_else(built_in);
    let fp = schema.fingerprint::<Rabin>();
    let mut fingerprint = [0u8; 8];
    fingerprint.copy_from_slice(&fp.bytes[..8]);
    let schema: &'static Schema = Box::leak(Box::new(schema));
    Compiled {
        names: ResolvedSchema::new(schema).unwrap_or_else(built_in),
        writer: Mutex::new(new_writer(schema)),
        reader: GenericSingleObjectReader::builder()
            .schema(schema.clone())
            .build()
            .unwrap_or_else(built_in),
        schema,
        fingerprint,
    }
}

/// Makes a record type an [`AvroRecord`] of its schema (and the earlier
/// schema it still reads). The lifecycle records declare theirs where
/// they are defined.
macro_rules! avro_record {
    ($ty:ty, $kind:literal, $src:expr $(, direct = $direct:literal)? $(, legacy $($old:expr),+)?) => {
        impl $crate::avro::AvroRecord for $ty {
            const KIND: &'static str = $kind;
            $(const DIRECT: bool = $direct;)?
            fn schema() -> &'static $crate::avro::Compiled {
                static S: std::sync::OnceLock<$crate::avro::Compiled> = std::sync::OnceLock::new();
                S.get_or_init(|| $crate::avro::compile($src))
            }
            $(
            fn legacy() -> &'static [$crate::avro::Compiled] {
                static L: std::sync::OnceLock<Vec<$crate::avro::Compiled>> =
                    std::sync::OnceLock::new();
                L.get_or_init(|| vec![$($crate::avro::compile($old)),+])
            }
            )?
        }
    };
}

pub(crate) use avro_record;

// The records of every change take serde's direct path (see `encode`);
// `same_field_order` in the tests checks each against its schema.
avro_record!(ChangeRecord, "ChangeRecord", CHANGE_RECORD_AVSC, direct = true, legacy CHANGE_RECORD_V1_AVSC);
avro_record!(MappedChange, "MappedChange", MAPPED_CHANGE_AVSC, direct = true, legacy MAPPED_CHANGE_V1_AVSC);
avro_record!(ApplyWrite, "ApplyWrite", APPLY_WRITE_AVSC, direct = true);
avro_record!(
    ResolverState,
    "ResolverState",
    RESOLVER_STATE_AVSC,
    direct = true
);
avro_record!(ErrorRecord, "ErrorRecord", ERROR_RECORD_AVSC);
avro_record!(
    InitialSyncError,
    "InitialSyncError",
    INITIAL_SYNC_ERROR_AVSC
);

/// Encodes a record (single-object encoding).
pub fn encode<T: AvroRecord>(record: &T) -> Result<Vec<u8>, AvroError> {
    let c = T::schema();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&c.fingerprint);
    // Straight from serde to bytes, checked against the schema on the way;
    // what that path refuses takes the one through a value below.
    if T::DIRECT
        && apache_avro::write_avro_datum_ref(c.schema, c.names.get_names(), record, &mut out)
            .is_ok()
    {
        return Ok(out);
    }
    encode_through_value(record)
}

/// Encodes `view` with `T`'s schema: a borrowing form of a `T` that
/// serializes as `T` does (the same record names, fields and field
/// order), so that a `T` need not be built to be encoded. Only serde's
/// direct path: a view the schema refuses is an error, never resolved.
pub fn encode_as<T: AvroRecord>(view: &impl Serialize) -> Result<Vec<u8>, AvroError> {
    let c = T::schema();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&c.fingerprint);
    apache_avro::write_avro_datum_ref(c.schema, c.names.get_names(), view, &mut out).map_err(
        |e| AvroError::Encode {
            kind: T::KIND,
            message: e.to_string(),
        },
    )?;
    Ok(out)
}

/// Encodes a record through an Avro value: serde's value, written as it
/// is when it matches the schema, else resolved against the schema first.
/// Slower than [`encode`]'s direct path, and public for the tests that
/// check both give the same bytes.
#[doc(hidden)]
pub fn encode_through_value<T: AvroRecord>(record: &T) -> Result<Vec<u8>, AvroError> {
    let c = T::schema();
    let err = |e: apache_avro::Error| AvroError::Encode {
        kind: T::KIND,
        message: e.to_string(),
    };
    let value = apache_avro::to_value(record).map_err(err)?;
    let mut out = Vec::with_capacity(256);
    let mut writer = c.writer.lock().unwrap_or_else(|p| p.into_inner());
    // Most values match the schema as serde gives them; the others (an
    // enum symbol as a string, a union branch) are resolved first.
    let written = writer.write_value_ref(&value, &mut out).or_else(|_| {
        out.clear();
        let value = value.resolve(c.schema)?;
        writer.write_value_ref(&value, &mut out)
    });
    if let Err(e) = written {
        // A writer that failed half-way keeps a partial record in its
        // buffer and refuses every later one: start a fresh one.
        *writer = new_writer(c.schema);
        return Err(err(e));
    }
    Ok(out)
}

/// Decodes a record written by [`encode`] with the same schema.
pub fn decode<T: AvroRecord>(bytes: &[u8]) -> Result<T, AvroError> {
    let c = T::schema();
    if bytes.is_empty() {
        return Err(AvroError::Empty);
    }
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(AvroError::NoMarker);
    }
    let writer = if bytes[2..HEADER_LEN] == c.fingerprint {
        None
    } else if let Some(old) = T::legacy()
        .iter()
        .find(|l| l.fingerprint[..] == bytes[2..HEADER_LEN])
    {
        Some(old.schema)
    } else {
        return Err(AvroError::WrongSchema {
            kind: T::KIND,
            expected: hex(&c.fingerprint),
            found: hex(&bytes[2..HEADER_LEN]),
        });
    };
    let err = |e: apache_avro::Error| AvroError::Decode {
        kind: T::KIND,
        message: e.to_string(),
    };
    let mut body = bytes;
    let record = match writer {
        // Straight from the bytes into serde (the records of changes);
        // what that refuses is read through a value.
        None if T::DIRECT => c.reader.read_deser::<T>(&mut body).or_else(|_| {
            body = bytes;
            decode_through_value(&c.reader, &mut body)
        }),
        None => decode_through_value(&c.reader, &mut body),
        Some(w) => {
            body = &bytes[HEADER_LEN..];
            apache_avro::reader::datum::GenericDatumReader::builder(w)
                .reader_schema(c.schema)
                .build()
                .and_then(|r| r.read_value(&mut body))
                .and_then(|v| apache_avro::from_value(&v))
        }
    }
    .map_err(err)?;
    if !body.is_empty() {
        return Err(AvroError::Decode {
            kind: T::KIND,
            message: format!("{} bytes left over after the record", body.len()),
        });
    }
    Ok(record)
}

fn decode_through_value<T: DeserializeOwned>(
    reader: &GenericSingleObjectReader,
    body: &mut &[u8],
) -> Result<T, apache_avro::Error> {
    apache_avro::from_value(&reader.read_value(body)?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `body` behind the marker and fingerprint of `T`'s schema.
#[cfg(test)]
pub(crate) fn framed<T: AvroRecord>(body: &[u8]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&T::schema().fingerprint);
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::*;
    use proptest::prelude::*;

    fn arb_fields() -> impl Strategy<Value = Vec<Field>> {
        prop::collection::vec(
            ("[a-z_]{1,12}", prop::option::of(any::<String>()))
                .prop_map(|(name, value)| Field { name, value }),
            0..6,
        )
    }

    fn arb_change() -> impl Strategy<Value = ChangeRecord> {
        (
            "[a-z]{1,8}",
            "[a-z]{1,8}\\.[a-z_]{1,12}",
            prop_oneof![
                Just(ChangeOp::Insert),
                Just(ChangeOp::Update),
                Just(ChangeOp::Delete),
                Just(ChangeOp::Applied)
            ],
            prop::option::of(arb_fields()),
            prop::option::of(arb_fields()),
            any::<i64>(),
            any::<i32>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(side, entity, op, before, after, commit_lsn, seq, xid, commit_time)| {
                    ChangeRecord {
                        side,
                        entity,
                        op,
                        before,
                        after,
                        commit_lsn,
                        seq,
                        xid,
                        commit_time,
                        applied: (op == ChangeOp::Applied).then(|| Applied {
                            map: "customers".into(),
                            version: commit_lsn,
                            written: seq % 2 == 0,
                        }),
                        moved: (op == ChangeOp::Delete).then(|| vec![Field::new("k", Some("2"))]),
                    }
                },
            )
    }

    fn arb_mapped() -> impl Strategy<Value = MappedChange> {
        (
            (
                prop::option::of(arb_fields()),
                any::<bool>(),
                prop::option::of("[a-z]{1,8}"),
            ),
            "[a-z_]{1,10}",
            prop_oneof![
                Just(ApplyOp::Upsert),
                Just(ApplyOp::Delete),
                Just(ApplyOp::Applied)
            ],
            arb_fields(),
            arb_fields(),
            any::<i64>(),
            any::<i32>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(
                    (before, existed, conflict_master),
                    map,
                    op,
                    key,
                    values,
                    source_lsn,
                    source_seq,
                    source_xid,
                    commit_time,
                )| {
                    MappedChange {
                        before,
                        existed,
                        conflict_master,
                        map,
                        source_side: "fno".into(),
                        target_side: "dataverse".into(),
                        source_entity: "public.customers_v3".into(),
                        target_entity: "public.accounts".into(),
                        op,
                        key,
                        source_lsn,
                        source_seq,
                        source_xid,
                        commit_time,
                        own: values.clone(),
                        version: source_lsn,
                        repair: None,
                        moved: Vec::new(),
                        values,
                    }
                },
            )
            .prop_flat_map(|m| {
                let repair = prop::option::of((arb_fields(), arb_fields(), any::<i64>()).prop_map(
                    |(own, master_values, lsn)| Repair {
                        observed: vec![Observed {
                            side: "fno".into(),
                            lsn,
                            present: true,
                            own,
                        }],
                        master_values,
                    },
                ));
                (Just(m), repair, arb_fields())
            })
            .prop_map(|(m, repair, moved)| MappedChange { repair, moved, ..m })
    }

    /// Checks that `v` (serde's value of a record) has its fields, and its
    /// records' fields, in the order of `schema` (named types looked up in
    /// `names`). `Err` names the first record out of order.
    fn same_field_order(
        v: &apache_avro::types::Value,
        schema: &Schema,
        names: &apache_avro::schema::NamesRef,
    ) -> Result<(), String> {
        use apache_avro::types::Value;
        let nested = |v, s| same_field_order(v, s, names);
        match (v, schema) {
            (_, Schema::Ref { name }) => nested(v, names[name]),
            (Value::Record(fields), Schema::Record(r)) => {
                let got: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
                let want: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
                if got != want {
                    return Err(format!(
                        "{}: fields {got:?}, schema {want:?}",
                        r.name.name()
                    ));
                }
                fields
                    .iter()
                    .zip(&r.fields)
                    .try_for_each(|((_, v), f)| nested(v, &f.schema))
            }
            (Value::Array(items), Schema::Array(a)) => {
                items.iter().try_for_each(|i| nested(i, &a.items))
            }
            (Value::Union(_, inner), Schema::Union(_)) => nested(inner, schema),
            (Value::Null, _) => Ok(()),
            (v, Schema::Union(u)) => u
                .variants()
                .iter()
                .filter(|s| !matches!(s, Schema::Null))
                .try_for_each(|s| nested(v, s)),
            _ => Ok(()),
        }
    }

    fn assert_direct<T: AvroRecord + PartialEq + std::fmt::Debug>(record: &T) {
        assert!(T::DIRECT, "{} takes serde's direct path", T::KIND);
        let c = T::schema();
        let value = apache_avro::to_value(record).unwrap();
        if let Err(e) = same_field_order(&value, c.schema, c.names.get_names()) {
            panic!("{} is not declared in its schema's order: {e}", T::KIND);
        }
        assert!(fast(record), "{record:?}");
    }

    fn arb_error() -> impl Strategy<Value = ErrorRecord> {
        (
            any::<String>(),
            prop::option::of("[a-z]{1,8}"),
            prop::option::of(any::<i32>()),
            prop::option::of(any::<i64>()),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            any::<i64>(),
        )
            .prop_map(|(message, map, partition, offset, payload, occurred_at)| {
                let mut e = ErrorRecord::new("router", "mapping", message, occurred_at);
                e.map = map;
                e.partition = partition;
                e.offset = offset;
                e.payload = payload;
                e
            })
    }

    /// The encoding of the releases before the cached writer: a value
    /// resolved against the schema, then written with the header.
    #[allow(deprecated)] // to_avro_datum: the writer of the releases before
    fn encoded_as_before<T: AvroRecord>(record: &T) -> Vec<u8> {
        let c = T::schema();
        let value = apache_avro::to_value(record)
            .unwrap()
            .resolve(c.schema)
            .unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&c.fingerprint);
        out.extend(apache_avro::to_avro_datum(c.schema, value).unwrap());
        out
    }

    /// Whether `record` is written straight from serde (the fast path),
    /// and the path through a value gives the same bytes.
    fn fast<T: AvroRecord + PartialEq + std::fmt::Debug>(record: &T) -> bool {
        let c = T::schema();
        let names = c.names.get_names();
        let direct = apache_avro::write_avro_datum_ref(c.schema, names, record, &mut Vec::new());
        let bytes = encode(record).unwrap();
        assert_eq!(bytes, encode_through_value(record).unwrap());
        // Read back straight from the bytes too, to the same record.
        let back: T = c.reader.read_deser(&mut bytes.as_slice()).unwrap();
        assert_eq!(&back, record);
        direct.is_ok()
    }

    #[test]
    fn a_write_and_a_resolver_state_take_the_fast_path_and_encode_as_before() {
        let f = |n: &str, v: &str| Field::new(n, Some(v));
        let w = ApplyWrite {
            map: "customers".into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            target_entity: "public.accounts".into(),
            key: vec![f("accountnumber", "C1")],
            version: 7,
            op: WriteOp::Delete,
            values: vec![f("name", "x"), Field::new("v", None::<String>)],
            expect: Expectation {
                kind: ExpectKind::Row,
                version: 0,
                present: true,
                values: vec![f("name", "y")],
            },
            moved: vec![f("accountnumber", "C2")],
            source_lsn: 5,
            commit_time: 6,
        };
        let side = SideStateRecord {
            lsn: Some(3),
            seq: 1,
            known: Known {
                kind: ExpectKind::Applied,
                version: 2,
                present: true,
                values: vec![],
            },
            holds: HoldsRecord {
                present: Some(true),
                both: None,
                one_way: Some(4),
            },
            pending: vec![],
        };
        let busy = SideStateRecord {
            lsn: None,
            pending: vec![PendingRecord {
                version: 9,
                expect: side.known.clone(),
                holds: side.holds,
                overtaken: true,
            }],
            ..side.clone()
        };
        let st = ResolverState {
            map: "customers".into(),
            generation: 1,
            run: 2,
            agreed: Some(AgreedState {
                present: true,
                into_left: vec![f("name", "x")],
                into_right: vec![Field::new("v", None::<String>)],
                both: 3,
                both_from: Some("fno".into()),
                one_way_left: 0,
                one_way_right: 4,
            }),
            left: side.clone(),
            right: busy,
        };
        let idle = ResolverState {
            agreed: None,
            left: side.clone(),
            ..st.clone()
        };
        for r in [&st, &idle] {
            assert_direct(r);
        }
        assert_direct(&w);
        assert_eq!(decode::<ResolverState>(&encode(&st).unwrap()).unwrap(), st);
        assert_eq!(encode(&w).unwrap(), encoded_as_before(&w));
        assert_eq!(encode(&st).unwrap(), encoded_as_before(&st));
        assert_eq!(decode::<ApplyWrite>(&encode(&w).unwrap()).unwrap(), w);
    }

    proptest! {
        #[test]
        fn records_are_encoded_byte_for_byte_as_before(c in arb_change(), m in arb_mapped(), e in arb_error()) {
            prop_assert_eq!(encode(&c).unwrap(), encoded_as_before(&c));
            prop_assert_eq!(encode(&m).unwrap(), encoded_as_before(&m));
            prop_assert_eq!(encode(&e).unwrap(), encoded_as_before(&e));
        }

        #[test]
        fn the_records_of_every_change_take_the_fast_path(c in arb_change(), m in arb_mapped()) {
            assert_direct(&c);
            assert_direct(&m);
        }

        #[test]
        fn change_record_round_trips(r in arb_change()) {
            let bytes = encode(&r).unwrap();
            prop_assert_eq!(decode::<ChangeRecord>(&bytes).unwrap(), r);
        }

        #[test]
        fn mapped_change_round_trips(r in arb_mapped()) {
            let bytes = encode(&r).unwrap();
            prop_assert_eq!(decode::<MappedChange>(&bytes).unwrap(), r);
        }

        #[test]
        fn error_record_round_trips(r in arb_error()) {
            let bytes = encode(&r).unwrap();
            prop_assert_eq!(decode::<ErrorRecord>(&bytes).unwrap(), r);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<ChangeRecord>(&bytes);
            let _ = decode::<MappedChange>(&bytes);
        }

        #[test]
        fn truncated_records_are_errors(r in arb_change(), cut in 0usize..1000) {
            let bytes = encode(&r).unwrap();
            let cut = cut % bytes.len();
            prop_assert!(decode::<ChangeRecord>(&bytes[..cut]).is_err());
        }

        /// Past the header check: random bodies behind each record kind's
        /// own marker and fingerprint.
        #[test]
        fn any_body_behind_a_valid_header_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            use crate::record::InitialSyncError;
            let _ = decode::<ChangeRecord>(&framed::<ChangeRecord>(&body));
            let _ = decode::<MappedChange>(&framed::<MappedChange>(&body));
            let _ = decode::<ErrorRecord>(&framed::<ErrorRecord>(&body));
            let _ = decode::<InitialSyncError>(&framed::<InitialSyncError>(&body));
        }

        #[test]
        fn corrupted_body_never_panics(r in arb_mapped(), pos in any::<usize>(), b in any::<u8>()) {
            let mut bytes = encode(&r).unwrap();
            let at = HEADER_LEN + pos % (bytes.len() - HEADER_LEN);
            bytes[at] = b;
            let _ = decode::<MappedChange>(&bytes);
        }
    }

    #[test]
    fn initial_sync_errors_round_trip() {
        let err = InitialSyncError {
            map: "m".into(),
            run: 2,
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            target_entity: "public.accounts".into(),
            key: "[\"C1\"]".into(),
            operation: "create".into(),
            sqlstate: Some("23503".into()),
            message: "fk".into(),
            occurred_at: 1,
        };
        assert_eq!(
            decode::<InitialSyncError>(&encode(&err).unwrap()).unwrap(),
            err
        );
    }

    #[test]
    fn another_kind_is_refused_by_fingerprint() {
        let e = ErrorRecord::new("apply", "x", "y", 1);
        let bytes = encode(&e).unwrap();
        let err = decode::<ChangeRecord>(&bytes).unwrap_err();
        assert!(matches!(err, AvroError::WrongSchema { .. }), "{err}");
        assert!(matches!(
            decode::<ChangeRecord>(b"{\"a\":1}").unwrap_err(),
            AvroError::NoMarker
        ));
        assert!(matches!(
            decode::<ChangeRecord>(b"").unwrap_err(),
            AvroError::Empty
        ));
    }

    #[test]
    fn schemas_parse_and_differ() {
        let a = ChangeRecord::schema().fingerprint;
        let b = MappedChange::schema().fingerprint;
        let c = ErrorRecord::schema().fingerprint;
        assert!(a != b && b != c && a != c);
    }
}
