//! Field mapping and key translation: turns a change captured on one side
//! into the changes a map writes to the other side.

use crate::config::{Config, Direction, MapConfig, SideId};
use crate::record::{field, ApplyOp, ChangeOp, ChangeRecord, Field, MappedChange};

/// Why a change could not be mapped. The record goes to the errors topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("map `{map}`: key field `{field}` is missing from the {which} values of the change on {entity}")]
    MissingKey {
        map: String,
        entity: String,
        field: String,
        which: &'static str,
    },
    #[error("map `{map}`: key field `{field}` is NULL on {entity}; a record without its alternate key cannot be linked")]
    NullKey {
        map: String,
        entity: String,
        field: String,
    },
    #[error("map `{map}`: mapped field `{field}` is missing from the change on {entity} (was the column dropped?)")]
    MissingField {
        map: String,
        entity: String,
        field: String,
    },
    #[error("map `{map}`: a {op:?} on {entity} carries no {which} values")]
    MissingImage {
        map: String,
        entity: String,
        op: ChangeOp,
        which: &'static str,
    },
}

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
pub fn map_change(
    config: &Config,
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
) -> Result<Vec<MappedChange>, MappingError> {
    let target = source.other();
    let src_ent = map.entity(source);
    let dst_ent = map.entity(target);

    let key_of = |values: &[Field], which: &'static str| -> Result<Vec<Field>, MappingError> {
        src_ent
            .key
            .iter()
            .zip(&dst_ent.key)
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
    };
    let missing_image = |which| MappingError::MissingImage {
        map: map.name.clone(),
        entity: change.entity.clone(),
        op: change.op,
        which,
    };

    // The fields that sync both ways, in target names, as `image` has them.
    let both_ways = |image: &[Field]| -> Option<Vec<Field>> {
        map.fields
            .iter()
            .filter(|f| f.direction == Direction::Both)
            .map(|f| {
                field(image, f.name(source)).map(|v| Field {
                    name: f.name(target).to_owned(),
                    value: v.value.clone(),
                })
            })
            .collect()
    };
    let master = config.side(config.conflict_master(map)).name.clone();
    let base = |op: ApplyOp, key: Vec<Field>, values: Vec<Field>| MappedChange {
        map: map.name.clone(),
        source_side: config.side(source).name.clone(),
        target_side: config.side(target).name.clone(),
        source_entity: src_ent.qualified(),
        target_entity: dst_ent.qualified(),
        op,
        key,
        values,
        source_lsn: change.commit_lsn,
        source_seq: change.seq,
        source_xid: change.xid,
        commit_time: change.commit_time,
        before: None,
        existed: true,
        conflict_master: Some(master.clone()),
    };

    match change.op {
        ChangeOp::Delete => {
            let before = change
                .before
                .as_deref()
                .ok_or_else(|| missing_image("old"))?;
            let mut mc = base(ApplyOp::Delete, key_of(before, "old")?, Vec::new());
            mc.before = both_ways(before);
            Ok(vec![mc])
        }
        ChangeOp::Insert | ChangeOp::Update => {
            let after = change
                .after
                .as_deref()
                .ok_or_else(|| missing_image("new"))?;
            let key = key_of(after, "new")?;
            let mut values = Vec::with_capacity(map.fields.len());
            for f in map
                .fields
                .iter()
                .filter(|f| f.direction.carries_from(source))
            {
                let src = f.name(source);
                // An update leaves out unchanged TOASTed values; the old row
                // (replica identity FULL) still has them.
                let unchanged = || match change.op {
                    ChangeOp::Update => change.before.as_deref().and_then(|b| field(b, src)),
                    _ => None,
                };
                let v = field(after, src).or_else(unchanged).ok_or_else(|| {
                    MappingError::MissingField {
                        map: map.name.clone(),
                        entity: change.entity.clone(),
                        field: src.to_owned(),
                    }
                })?;
                values.push(Field {
                    name: f.name(target).to_owned(),
                    value: v.value.clone(),
                });
            }
            let mut out = Vec::with_capacity(2);
            let mut upsert = base(ApplyOp::Upsert, key, values);
            match (change.op, change.before.as_deref()) {
                // The old identity carries the old key only when the source sent it.
                (ChangeOp::Update, Some(before)) => match key_of(before, "old") {
                    Ok(old_key) if old_key != upsert.key => {
                        let mut delete = base(ApplyOp::Delete, old_key, Vec::new());
                        delete.before = both_ways(before);
                        out.push(delete);
                        upsert.existed = false;
                        upsert.before = both_ways(after);
                    }
                    _ => upsert.before = both_ways(before),
                },
                (ChangeOp::Update, None) => {}
                _ => {
                    upsert.existed = false;
                    upsert.before = both_ways(after);
                }
            }
            out.push(upsert);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[kafka]
bootstrap_servers = "k:9092"
[sides.left]
name = "fno"
kind = "postgres"
connection = { host = "h", dbname = "a", user = "u" }
[sides.right]
name = "dataverse"
kind = "postgres"
connection = { host = "h", dbname = "b", user = "u" }
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
        // An insert expects the record absent; conflicts compare only fields that sync both ways.
        assert!(!mc.existed);
        assert_eq!(
            mc.before,
            Some(vec![
                f("accountnumber", Some("C1")),
                f("name", Some("Contoso"))
            ])
        );
        assert_eq!(mc.conflict_master.as_deref(), Some("dataverse"));
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
        assert_eq!(
            out[0].before,
            Some(vec![
                f("accountnumber", Some("C9")),
                f("name", Some("Contoso"))
            ])
        );
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
