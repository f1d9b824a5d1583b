//! What the initial write does for one record (no IO): given the rows a key
//! has on each side, the writes that make the two sides agree.
//!
//! - A row on one side only is created on the other, with every field that
//!   flows that way.
//! - A row on both sides: a field that syncs both ways takes the conflict
//!   master's value; a one-way field takes its source's value. Only fields
//!   whose values differ are written; a record whose fields all match is not
//!   written at all.
//! - Values are compared and written as the field's transforms (value map,
//!   default, constant, conversion) make them for the target: each row is
//!   mapped through [`map_change`], like a live change.

use dualwrite_model::config::{Config, Direction, MapConfig, SideId};
use dualwrite_model::mapping::{map_change, MappingError};
use dualwrite_model::record::{field, ApplyOp, ChangeOp, ChangeRecord, Field};

pub use dualwrite_runtime::side::{CopyWrite as Write, WriteKind};

/// The writes for a record with rows `left` and `right` (every column as
/// text; `None`: no row on that side).
pub fn plan_record(
    config: &Config,
    map: &MapConfig,
    master: SideId,
    left: Option<&[Field]>,
    right: Option<&[Field]>,
) -> Result<Vec<Write>, MappingError> {
    let mut out = Vec::new();
    for (source, row, other) in [(SideId::Left, left, right), (SideId::Right, right, left)] {
        let Some(row) = row else { continue };
        let target = source.other();
        let change = ChangeRecord {
            side: config.side(source).name.clone(),
            entity: map.entity(source).qualified(),
            op: ChangeOp::Insert,
            before: None,
            after: Some(row.to_vec()),
            commit_lsn: 0,
            seq: 0,
            xid: 0,
            commit_time: 0,
            applied: None,
            moved: None,
        };
        let Some(mapped) = map_change(config, map, source, &change)?
            .into_iter()
            .find(|m| m.op == ApplyOp::Upsert)
        else {
            continue;
        };
        match other {
            None => {
                if !mapped.values.is_empty() {
                    out.push(Write {
                        target,
                        kind: WriteKind::Create,
                        key: mapped.key,
                        new: mapped.values,
                        old: Vec::new(),
                    });
                }
            }
            Some(current) => {
                let mut new = Vec::new();
                let mut old = Vec::new();
                for f in &mapped.values {
                    if mapped.key.iter().any(|k| k.name == f.name) {
                        continue;
                    }
                    let Some(fm) = map.fields.iter().find(|m| m.name(target) == f.name) else {
                        continue;
                    };
                    // A both-ways field flows from the master only.
                    if fm.direction == Direction::Both && source != master {
                        continue;
                    }
                    let now = field(current, &f.name).and_then(|c| c.value.clone());
                    // Compared after the field's transform (a value-mapped
                    // code that maps to the target's value is unchanged).
                    if !fm.same_on(target, f.value.as_deref(), now.as_deref()) {
                        new.push(f.clone());
                        old.push(Field {
                            name: f.name.clone(),
                            value: now,
                        });
                    }
                }
                if !new.is_empty() {
                    out.push(Write {
                        target,
                        kind: WriteKind::Update,
                        key: mapped.key,
                        new,
                        old,
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::config::TEST_SIDES;

    fn config() -> Config {
        Config::parse(
            &[
                TEST_SIDES,
                r#"
[[map]]
name = "customers"
left = { entity = "customers", key = ["account"] }
right = { entity = "accounts", key = ["number"] }
field = [
  { left = "account", right = "number" },
  { left = "name", right = "name" },
  { left = "credit", right = "credit", direction = "left_to_right" },
  { left = "note", right = "note", direction = "right_to_left" },
]
"#,
            ]
            .concat(),
        )
        .unwrap()
    }

    fn row(kv: &[(&str, Option<&str>)]) -> Vec<Field> {
        kv.iter().map(|(k, v)| Field::new(*k, *v)).collect()
    }

    #[test]
    fn a_row_on_one_side_is_created_on_the_other() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[
            ("account", Some("C1")),
            ("name", Some("Ann")),
            ("credit", Some("10")),
            ("note", Some("x")),
            ("other", Some("not mapped")),
        ]);
        let w = plan_record(&c, m, SideId::Right, Some(&left), None).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].target, w[0].kind), (SideId::Right, WriteKind::Create));
        assert_eq!(w[0].key, row(&[("number", Some("C1"))]));
        // The right-to-left field does not flow to the right side.
        assert_eq!(
            w[0].new,
            row(&[
                ("number", Some("C1")),
                ("name", Some("Ann")),
                ("credit", Some("10"))
            ])
        );
    }

    #[test]
    fn rows_on_both_sides_take_the_master_and_one_way_fields() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[
            ("account", Some("C1")),
            ("name", Some("Left name")),
            ("credit", Some("10")),
            ("note", None),
        ]);
        let right = row(&[
            ("number", Some("C1")),
            ("name", Some("Right name")),
            ("credit", Some("5")),
            ("note", Some("remember")),
        ]);
        // Master right: name goes right → left; credit left → right; note right → left.
        let w = plan_record(&c, m, SideId::Right, Some(&left), Some(&right)).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        let to_right = w.iter().find(|w| w.target == SideId::Right).unwrap();
        assert_eq!(to_right.kind, WriteKind::Update);
        assert_eq!(to_right.new, row(&[("credit", Some("10"))]));
        assert_eq!(to_right.old, row(&[("credit", Some("5"))]));
        let to_left = w.iter().find(|w| w.target == SideId::Left).unwrap();
        assert_eq!(
            to_left.new,
            row(&[("name", Some("Right name")), ("note", Some("remember"))])
        );
        assert_eq!(
            to_left.old,
            row(&[("name", Some("Left name")), ("note", None)])
        );
        // Master left: the name goes the other way.
        let w = plan_record(&c, m, SideId::Left, Some(&left), Some(&right)).unwrap();
        let to_right = w.iter().find(|w| w.target == SideId::Right).unwrap();
        assert_eq!(
            to_right.new,
            row(&[("name", Some("Left name")), ("credit", Some("10"))])
        );
    }

    #[test]
    fn matching_rows_need_no_write() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[
            ("account", Some("C1")),
            ("name", Some("Same")),
            ("credit", Some("1")),
            ("note", Some("n")),
        ]);
        let right = row(&[
            ("number", Some("C1")),
            ("name", Some("Same")),
            ("credit", Some("1")),
            ("note", Some("n")),
        ]);
        assert!(plan_record(&c, m, SideId::Right, Some(&left), Some(&right))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_row_without_its_key_is_an_error() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[("account", None), ("name", Some("A")), ("credit", None)]);
        let e = plan_record(&c, m, SideId::Right, Some(&left), None).unwrap_err();
        assert!(e.to_string().contains("NULL"), "{e}");
    }
}

#[cfg(test)]
mod transform_tests {
    use super::*;
    use dualwrite_model::config::TEST_SIDES;

    fn config() -> Config {
        Config::parse(
            &[
                TEST_SIDES,
                r#"
[[map]]
name = "customers"
left = { entity = "customers", key = ["account"] }
right = { entity = "accounts", key = ["number"] }
field = [
  { left = "account", right = "number" },
  { left = "status", right = "statecode", value_map = { Active = 0, Closed = 1 } },
  { left = "amount", right = "amount", convert = { left = "integer", right = "numeric" } },
  { right = "source", constant = "fno" },
]
"#,
            ]
            .concat(),
        )
        .unwrap()
    }

    fn row(kv: &[(&str, Option<&str>)]) -> Vec<Field> {
        kv.iter().map(|(k, v)| Field::new(*k, *v)).collect()
    }

    #[test]
    fn a_create_writes_transformed_values() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[
            ("account", Some("C1")),
            ("status", Some("Closed")),
            ("amount", Some("5")),
        ]);
        let w = plan_record(&c, m, SideId::Right, Some(&left), None).unwrap();
        assert_eq!(
            w[0].new,
            row(&[
                ("number", Some("C1")),
                ("statecode", Some("1")),
                ("amount", Some("5")),
                ("source", Some("fno"))
            ])
        );
        let right = row(&[
            ("number", Some("C2")),
            ("statecode", Some("0")),
            ("amount", Some("7.00")),
            ("source", Some("x")),
        ]);
        let w = plan_record(&c, m, SideId::Right, None, Some(&right)).unwrap();
        assert_eq!(
            w[0].new,
            row(&[
                ("account", Some("C2")),
                ("status", Some("Active")),
                ("amount", Some("7"))
            ])
        );
    }

    #[test]
    fn values_that_map_to_each_other_are_unchanged() {
        let c = config();
        let m = c.map("customers").unwrap();
        let left = row(&[
            ("account", Some("C1")),
            ("status", Some("Active")),
            ("amount", Some("5")),
        ]);
        let right = row(&[
            ("number", Some("C1")),
            ("statecode", Some("0")),
            ("amount", Some("5.00")),
            ("source", Some("fno")),
        ]);
        for master in [SideId::Left, SideId::Right] {
            let w = plan_record(&c, m, master, Some(&left), Some(&right)).unwrap();
            assert!(w.is_empty(), "{w:?}");
        }
        // A code that maps to another value is written, as the target's value.
        let mut other = right.clone();
        other[1].value = Some("1".into());
        let w = plan_record(&c, m, SideId::Left, Some(&left), Some(&other)).unwrap();
        assert_eq!(w[0].new, row(&[("statecode", Some("0"))]));
        assert_eq!(w[0].old, row(&[("statecode", Some("1"))]));
        // A value that cannot be mapped is an error naming the field.
        let mut bad = left.clone();
        bad[1].value = Some("Pending".into());
        let e = plan_record(&c, m, SideId::Left, Some(&bad), Some(&right)).unwrap_err();
        assert!(
            e.to_string().contains("field `status` → `statecode`"),
            "{e}"
        );
    }
}
