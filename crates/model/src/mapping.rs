//! Field mapping and key translation: turns a change captured on one side
//! into the changes a map writes to the other side.

use crate::config::{Config, MapConfig, SideId};
use crate::filter::{self, Scope};
use crate::record::{field, ApplyOp, ChangeOp, ChangeRecord, Field, MappedChange};

pub use crate::error::MappingError;

/// The maps a change from `side` on `entity` feeds, with the direction.
pub fn maps_for<'a>(
    config: &'a Config,
    side: SideId,
    entity: &str,
) -> impl Iterator<Item = &'a MapConfig> + 'a {
    let entity = entity.to_owned();
    config
        .maps
        .iter()
        .filter(move |m| m.entity(side).qualified() == entity)
}

/// Maps one change from `source` through `map`. An update that changes the
/// alternate key becomes a delete of the old key and an upsert of the new one.
/// A change outside the map's scope on `source` (filter, companies) maps to
/// nothing, or to an upsert or delete as it enters or leaves the scope
/// (see [`crate::filter`]).
pub fn map_change(
    config: &Config,
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
) -> Result<Vec<MappedChange>, MappingError> {
    let mut out = match filter::decide(map, source, change)? {
        Scope::Pass => map_unscoped(config, map, source, change)?,
        Scope::Skip => Vec::new(),
        Scope::Enter => map_unscoped(config, map, source, &filter::as_insert(change))?,
        Scope::Exit => map_unscoped(config, map, source, &filter::as_delete(change))?,
    };
    // With a scope on the source, a half of a key change may pass and the
    // other not: the two halves stay a delete and an insert.
    if filter::is_scoped(map, source) {
        out.iter_mut().for_each(|mc| mc.moved.clear());
    }
    Ok(out)
}

/// [`map_change`] without the map's scope.
fn map_unscoped(
    config: &Config,
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
) -> Result<Vec<MappedChange>, MappingError> {
    let key_of = |values: &[Field], which| target_key(map, source, change, values, which);
    let missing_image = |which| MappingError::MissingImage {
        map: map.name.clone(),
        entity: change.entity.clone(),
        op: change.op,
        which,
    };
    let master = config.side(config.conflict_master(map)).name.clone();
    let base = |op: ApplyOp, key: Vec<Field>, values: Vec<Field>| MappedChange {
        conflict_master: Some(master.clone()),
        ..mapped(config, map, source, change, op, key, values)
    };
    // The other half of a key change, when the source split it.
    let partner = || {
        change
            .moved
            .as_deref()
            .and_then(|m| key_of(m, "moved").ok())
            .unwrap_or_default()
    };
    let (before, after) = (change.before.as_deref(), change.after.as_deref());
    match change.op {
        ChangeOp::Applied => Ok(Vec::new()),
        ChangeOp::Delete => {
            let before = before.ok_or_else(|| missing_image("old"))?;
            let mut mc = base(ApplyOp::Delete, key_of(before, "old")?, Vec::new());
            mc.moved = partner();
            Ok(vec![mc])
        }
        ChangeOp::Insert | ChangeOp::Update | ChangeOp::Moved => {
            let after = after.ok_or_else(|| missing_image("new"))?;
            let values = target_values(map, source, change, after)?;
            let mut upsert = base(ApplyOp::Upsert, key_of(after, "new")?, values);
            upsert.own = own_values(map, source, change, after);
            upsert.moved = partner();
            let mut out = Vec::with_capacity(2);
            match (change.op, before) {
                // The old identity carries the old key only when the source
                // sent it (the capturer splits key changes already).
                (ChangeOp::Update, Some(before)) => match key_of(before, "old") {
                    Ok(old_key) if old_key != upsert.key => {
                        let mut delete = base(ApplyOp::Delete, old_key.clone(), Vec::new());
                        delete.moved = upsert.key.clone();
                        out.push(delete);
                        upsert.moved = old_key;
                        upsert.existed = false;
                    }
                    _ => {}
                },
                (ChangeOp::Update, None) => {}
                (ChangeOp::Moved, _) => upsert.op = ApplyOp::Moved,
                _ => upsert.existed = false,
            }
            out.push(upsert);
            Ok(out)
        }
    }
}

/// The target's alternate key of the source row `values` (`which` image).
fn target_key(
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
    values: &[Field],
    which: &'static str,
) -> Result<Vec<Field>, MappingError> {
    let target = map.entity(source.other());
    map.entity(source)
        .key
        .iter()
        .zip(&target.key)
        .map(|(s, t)| match field(values, s) {
            None => Err(MappingError::MissingKey {
                map: map.name.clone(),
                entity: change.entity.clone(),
                field: s.clone(),
                which,
            }),
            Some(Field { value: None, .. }) => Err(MappingError::NullKey {
                map: map.name.clone(),
                entity: change.entity.clone(),
                field: s.clone(),
            }),
            Some(f) => Ok(Field {
                name: t.clone(),
                value: f.value.clone(),
            }),
        })
        .collect()
}

/// The target's values of the fields carried from `source`, mapped from
/// the new image `after`.
fn target_values(
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
    after: &[Field],
) -> Result<Vec<Field>, MappingError> {
    let target = source.other();
    let mut values = Vec::with_capacity(map.fields.len());
    for f in map
        .fields
        .iter()
        .filter(|f| f.direction.carries_from(source))
    {
        let name = f.name(target).to_owned();
        let src = f.name(source);
        if !f.has_column(source) {
            // A constant: nothing to read on the source.
            let value = f.map_value(source, None).unwrap_or_default();
            values.push(Field { name, value });
            continue;
        }
        // An update leaves out unchanged TOASTed values; the old row
        // (replica identity FULL) still has them.
        let unchanged = || match change.op {
            ChangeOp::Update => change.before.as_deref().and_then(|b| field(b, src)),
            _ => None,
        };
        let v = field(after, src)
            .or_else(unchanged)
            .ok_or_else(|| MappingError::MissingField {
                map: map.name.clone(),
                entity: change.entity.clone(),
                field: src.to_owned(),
            })?;
        let value =
            f.map_value(source, v.value.as_deref())
                .map_err(|failure| MappingError::Transform {
                    map: map.name.clone(),
                    entity: change.entity.clone(),
                    field: src.to_owned(),
                    target_field: name.clone(),
                    failure: Box::new(failure),
                })?;
        values.push(Field { name, value });
    }
    Ok(values)
}

/// The names, on `side`, of the columns the other side writes into it:
/// the fields that flow into `side` and have a column there.
pub fn into_columns(map: &MapConfig, side: SideId) -> impl Iterator<Item = &str> + '_ {
    map.fields
        .iter()
        .filter(move |f| f.direction.carries_from(side.other()) && f.has_column(side))
        .map(move |f| f.name(side))
}

/// The names, on `side`, of the fields that flow only into it (owned by
/// the other side).
pub fn one_way_into(map: &MapConfig, side: SideId) -> Vec<String> {
    map.fields
        .iter()
        .filter(|f| f.direction.carries_from(side.other()) && !f.direction.carries_from(side))
        .filter(|f| f.has_column(side))
        .map(|f| f.name(side).to_owned())
        .collect()
}

/// `source`'s own values, as `after` (an update's unchanged TOASTed values
/// from the old row), of the columns the other side writes into it.
fn own_values(
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
    after: &[Field],
) -> Vec<Field> {
    let mut names: Vec<&str> = map.entity(source).key.iter().map(String::as_str).collect();
    for n in into_columns(map, source) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .filter_map(|n| {
            field(after, n)
                .or_else(|| change.before.as_deref().and_then(|b| field(b, n)))
                .cloned()
        })
        .collect()
}

/// An applier's report ([`ChangeOp::Applied`]) as the event of `map` it
/// is: the record's key (the map's key values) and the version. `None`
/// when the report is about another map or carries no key.
pub fn map_applied(
    config: &Config,
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
) -> Option<MappedChange> {
    let applied = change.applied.as_ref().filter(|a| a.map == map.name)?;
    let ids = change.before.as_deref()?;
    let target = source.other();
    let key = map
        .entity(source)
        .key
        .iter()
        .zip(&map.entity(target).key)
        .map(|(s, t)| {
            Some(Field {
                name: t.clone(),
                value: field(ids, s)?.value.clone(),
            })
        })
        .collect::<Option<Vec<Field>>>()?;
    let op = if applied.written {
        ApplyOp::Applied
    } else {
        ApplyOp::Superseded
    };
    let mut mc = mapped(config, map, source, change, op, key, Vec::new());
    mc.version = applied.version;
    Some(mc)
}

/// A [`MappedChange`] of `change` through `map`, with no conflict master,
/// own values or report.
fn mapped(
    config: &Config,
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
    op: ApplyOp,
    key: Vec<Field>,
    values: Vec<Field>,
) -> MappedChange {
    let target = source.other();
    MappedChange {
        map: map.name.clone(),
        source_side: config.side(source).name.clone(),
        target_side: config.side(target).name.clone(),
        source_entity: map.entity(source).qualified(),
        target_entity: map.entity(target).qualified(),
        op,
        key,
        values,
        source_lsn: change.commit_lsn,
        source_seq: change.seq,
        source_xid: change.xid,
        commit_time: change.commit_time,
        before: None,
        existed: true,
        conflict_master: None,
        own: Vec::new(),
        version: 0,
        repair: None,
        moved: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TEST_SIDES;

    fn config() -> Config {
        Config::parse(
            &[
                TEST_SIDES,
                r#"
[[map]]
name = "customers"
left = { entity = "customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "name", right = "name" },
  { left = "creditlimit", right = "creditlimit", direction = "left_to_right" },
  { left = "phone", right = "telephone1", direction = "right_to_left" },
]
"#,
            ]
            .concat(),
        )
        .unwrap()
    }

    fn f(n: &str, v: Option<&str>) -> Field {
        Field::new(n, v)
    }

    fn change(op: ChangeOp, before: Option<Vec<Field>>, after: Option<Vec<Field>>) -> ChangeRecord {
        ChangeRecord {
            side: "fno".into(),
            entity: "public.customers_v3".into(),
            op,
            before,
            after,
            commit_lsn: 100,
            seq: 2,
            xid: 7,
            commit_time: 1,
            applied: None,
            moved: None,
        }
    }

    fn row(acct: &str) -> Vec<Field> {
        vec![
            f("customeraccount", Some(acct)),
            f("name", Some("Contoso")),
            f("creditlimit", Some("10.50")),
            f("phone", None),
            f("unmapped", Some("x")),
        ]
    }

    #[test]
    fn insert_maps_fields_by_direction_and_translates_key() {
        let c = config();
        let m = &c.maps[0];
        let out = map_change(
            &c,
            m,
            SideId::Left,
            &change(ChangeOp::Insert, None, Some(row("C1"))),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        let mc = &out[0];
        assert_eq!(mc.op, ApplyOp::Upsert);
        assert_eq!(mc.key, vec![f("accountnumber", Some("C1"))]);
        assert_eq!(
            mc.values,
            vec![
                f("accountnumber", Some("C1")),
                f("name", Some("Contoso")),
                f("creditlimit", Some("10.50")),
            ]
        );
        assert_eq!(mc.target_entity, "public.accounts");
        assert_eq!(mc.target_side, "dataverse");
        assert_eq!((mc.source_lsn, mc.source_seq), (100, 2));
        assert_eq!(mc.kafka_key(), "[\"C1\"]");
        // An insert: the record was not there before.
        assert!(!mc.existed);
        assert_eq!(mc.conflict_master.as_deref(), Some("dataverse"));
        // The source's own values of what the other side writes into it:
        // the key, the both-way fields and the right-to-left field.
        assert_eq!(
            mc.own,
            vec![
                f("customeraccount", Some("C1")),
                f("name", Some("Contoso")),
                f("phone", None),
            ]
        );
        assert_eq!(one_way_into(m, SideId::Left), vec!["phone".to_owned()]);
        assert_eq!(
            one_way_into(m, SideId::Right),
            vec!["creditlimit".to_owned()]
        );
    }

    #[test]
    fn an_appliers_report_becomes_its_maps_event() {
        let c = config();
        let m = &c.maps[0];
        let mut report = change(
            ChangeOp::Applied,
            Some(vec![f("customeraccount", Some("C1"))]),
            None,
        );
        report.applied = Some(crate::record::Applied {
            map: "customers".into(),
            version: 77,
            written: true,
        });
        let mc = map_applied(&c, m, SideId::Left, &report).unwrap();
        assert_eq!((mc.op, mc.version), (ApplyOp::Applied, 77));
        assert_eq!(mc.kafka_key(), "[\"C1\"]");
        assert_eq!(mc.source_side, "fno");
        assert_eq!((mc.source_lsn, mc.source_seq), (100, 2));
        report.applied.as_mut().unwrap().map = "other".into();
        assert_eq!(map_applied(&c, m, SideId::Left, &report), None);
    }

    #[test]
    fn reverse_direction_uses_right_to_left_fields() {
        let c = config();
        let mut ch = change(
            ChangeOp::Insert,
            None,
            Some(vec![
                f("accountnumber", Some("C1")),
                f("name", Some("N")),
                f("creditlimit", Some("1")),
                f("telephone1", Some("555")),
            ]),
        );
        ch.side = "dataverse".into();
        ch.entity = "public.accounts".into();
        let out = map_change(&c, &c.maps[0], SideId::Right, &ch).unwrap();
        assert_eq!(
            out[0].values,
            vec![
                f("customeraccount", Some("C1")),
                f("name", Some("N")),
                f("phone", Some("555"))
            ]
        );
        assert_eq!(out[0].kafka_key(), "[\"C1\"]");
    }

    #[test]
    fn delete_uses_old_key() {
        let c = config();
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(ChangeOp::Delete, Some(row("C9")), None),
        )
        .unwrap();
        assert_eq!(out[0].op, ApplyOp::Delete);
        assert_eq!(out[0].key, vec![f("accountnumber", Some("C9"))]);
        assert!(out[0].values.is_empty());
        assert!(out[0].existed);
    }

    #[test]
    fn key_change_is_delete_then_upsert() {
        let c = config();
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(ChangeOp::Update, Some(row("C1")), Some(row("C2"))),
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].op, out[0].kafka_key().as_str()),
            (ApplyOp::Delete, "[\"C1\"]")
        );
        assert_eq!(
            (out[1].op, out[1].kafka_key().as_str()),
            (ApplyOp::Upsert, "[\"C2\"]")
        );
        // Each half names the other's key, in the target's names.
        assert_eq!(out[0].moved, vec![f("accountnumber", Some("C2"))]);
        assert_eq!(out[1].moved, vec![f("accountnumber", Some("C1"))]);
    }

    #[test]
    fn halves_split_by_the_capturer_name_each_other_and_a_move_is_what_the_side_holds() {
        let c = config();
        let m = &c.maps[0];
        let mut delete = change(ChangeOp::Delete, Some(row("C1")), None);
        delete.moved = Some(vec![f("customeraccount", Some("C2"))]);
        let out = map_change(&c, m, SideId::Left, &delete).unwrap();
        assert_eq!(out[0].moved, vec![f("accountnumber", Some("C2"))]);
        let moved = change(ChangeOp::Moved, None, Some(row("C2")));
        let out = map_change(&c, m, SideId::Left, &moved).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].op, ApplyOp::Moved);
        assert!(!out[0].own.is_empty());
    }

    #[test]
    fn errors_name_map_and_field() {
        let c = config();
        let m = &c.maps[0];
        let mut r = row("C1");
        r[0].value = None;
        let e = map_change(
            &c,
            m,
            SideId::Left,
            &change(ChangeOp::Insert, None, Some(r)),
        )
        .unwrap_err();
        assert!(matches!(e, MappingError::NullKey { .. }), "{e}");
        let mut r = row("C1");
        r.retain(|x| x.name != "name");
        let e = map_change(
            &c,
            m,
            SideId::Left,
            &change(ChangeOp::Insert, None, Some(r)),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "map `customers`: mapped field `name` is missing from the change on public.customers_v3 (was the column dropped?)");
        let e = map_change(&c, m, SideId::Left, &change(ChangeOp::Delete, None, None)).unwrap_err();
        assert!(matches!(e, MappingError::MissingImage { .. }));
    }

    #[test]
    fn update_without_an_unchanged_value_takes_it_from_the_old_row() {
        let c = config();
        let mut after = row("C1");
        after.retain(|x| x.name != "name");
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(ChangeOp::Update, Some(row("C1")), Some(after)),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].values.contains(&f("name", Some("Contoso"))));
    }

    #[test]
    fn maps_for_matches_side_and_entity() {
        let c = config();
        assert_eq!(maps_for(&c, SideId::Left, "public.customers_v3").count(), 1);
        assert_eq!(
            maps_for(&c, SideId::Right, "public.customers_v3").count(),
            0
        );
        assert_eq!(maps_for(&c, SideId::Right, "public.accounts").count(), 1);
    }
}

#[cfg(test)]
mod transform_tests {
    use super::*;
    use crate::config::{Direction, TEST_SIDES};

    fn config() -> Config {
        Config::parse(&[TEST_SIDES, r#"
[[map]]
name = "customers"
left = { entity = "customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "status", right = "statecode", value_map = { Active = 0, Closed = 1 } },
  { left = "onhold", right = "creditonhold", convert = { left = "boolean", right = "integer" } },
  { left = "note", right = "description", default = { right = "(none)" }, direction = "left_to_right" },
  { right = "msdyn_source", constant = "fno" },
]
"#].concat())
        .unwrap()
    }

    fn f(n: &str, v: Option<&str>) -> Field {
        Field::new(n, v)
    }

    fn change(
        side: SideId,
        op: ChangeOp,
        before: Option<Vec<Field>>,
        after: Option<Vec<Field>>,
    ) -> ChangeRecord {
        let (side, entity) = match side {
            SideId::Left => ("fno", "public.customers_v3"),
            SideId::Right => ("dataverse", "public.accounts"),
        };
        ChangeRecord {
            side: side.into(),
            entity: entity.into(),
            op,
            before,
            after,
            commit_lsn: 1,
            seq: 0,
            xid: 1,
            commit_time: 1,
            applied: None,
            moved: None,
        }
    }

    fn left_row(status: &str, onhold: &str, note: Option<&str>) -> Vec<Field> {
        vec![
            f("customeraccount", Some("C1")),
            f("status", Some(status)),
            f("onhold", Some(onhold)),
            f("note", note),
        ]
    }

    #[test]
    fn the_configuration_validates() {
        let c = config();
        c.validate().unwrap();
        let src = &c.maps[0].fields[4];
        assert_eq!(
            (src.left.as_str(), src.direction),
            ("", Direction::LeftToRight)
        );
    }

    #[test]
    fn left_to_right_applies_value_map_convert_default_and_constant() {
        let c = config();
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(
                SideId::Left,
                ChangeOp::Insert,
                None,
                Some(left_row("Closed", "true", None)),
            ),
        )
        .unwrap();
        assert_eq!(
            out[0].values,
            vec![
                f("accountnumber", Some("C1")),
                f("statecode", Some("1")),
                f("creditonhold", Some("1")),
                f("description", Some("(none)")),
                f("msdyn_source", Some("fno")),
            ]
        );
    }

    #[test]
    fn right_to_left_inverts_the_value_map_and_converts_back() {
        let c = config();
        let row = vec![
            f("accountnumber", Some("C1")),
            f("statecode", Some("0")),
            f("creditonhold", Some("0")),
            f("description", Some("not synced back")),
            f("msdyn_source", Some("fno")),
        ];
        let mut old = row.clone();
        old[1].value = Some("1".into());
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Right,
            &change(SideId::Right, ChangeOp::Update, Some(old), Some(row)),
        )
        .unwrap();
        assert_eq!(
            out[0].values,
            vec![
                f("customeraccount", Some("C1")),
                f("status", Some("Active")),
                f("onhold", Some("false")),
            ]
        );
    }

    #[test]
    fn an_unmapped_value_is_an_error_naming_map_field_and_value() {
        let c = config();
        let e = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(
                SideId::Left,
                ChangeOp::Insert,
                None,
                Some(left_row("Pending", "true", None)),
            ),
        )
        .unwrap_err();
        assert!(matches!(e, MappingError::Transform { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "map `customers`: field `status` → `statecode` on public.customers_v3: value `Pending` has no entry in value_map (left values: Active, Closed); add it, or set `unmapped`"
        );
        let e = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(
                SideId::Left,
                ChangeOp::Insert,
                None,
                Some(left_row("Active", "maybe", None)),
            ),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("field `onhold` → `creditonhold` on public.customers_v3: value `maybe` is not a boolean"),
            "{e}"
        );
    }

    #[test]
    fn an_update_from_a_value_that_does_not_transform_still_maps() {
        // The record held an unmapped value (its change failed); fixing it must go through.
        let c = config();
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(
                SideId::Left,
                ChangeOp::Update,
                Some(left_row("Pending", "true", None)),
                Some(left_row("Active", "true", None)),
            ),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0].values.contains(&f("statecode", Some("0"))));
    }

    #[test]
    fn a_delete_maps_its_key_from_old_values() {
        let c = config();
        let out = map_change(
            &c,
            &c.maps[0],
            SideId::Left,
            &change(
                SideId::Left,
                ChangeOp::Delete,
                Some(left_row("Active", "f", Some("n"))),
                None,
            ),
        )
        .unwrap();
        assert_eq!(out[0].key, vec![f("accountnumber", Some("C1"))]);
    }
}
