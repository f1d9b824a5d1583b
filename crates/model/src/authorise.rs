//! What a side's writer may write: only the entity and the columns that the
//! configured map writes into that side. The applier checks every
//! [`ApplyWrite`] against the configuration before any statement, and the
//! initial sync checks its own writes the same way, so that a record
//! forged on a `map.*` or `apply.*` topic cannot make either write a table
//! or a column the configuration does not map (or the bookkeeping schema).
//!
//! The check is against the *configured* map (the file the service runs
//! with). A map whose configured version differs from the one it runs
//! with is held by its gate (Failed) until it is run again, so no write of
//! another version is released meanwhile; a write left on an apply topic
//! from before an edit is checked against the new mapping and refused if
//! it names a column the edit removed.

use std::fmt;

use crate::config::{qualify, Config, MapConfig, SideId};
use crate::mapping::into_columns;
use crate::record::{ApplyWrite, Field};

/// The schema of the appliers' bookkeeping (`dualwrite.record_versions`):
/// never a target of a map.
pub const BOOKKEEPING_SCHEMA: &str = "dualwrite";

/// Error class of a refused write on the errors topic.
pub const UNAUTHORISED_TARGET: &str = "unauthorised_target";

/// A write refused: what was refused and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What was refused (a map, a side, a table, a column).
    pub what: String,
    /// Why, naming what the configuration allows.
    pub why: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused {}: {}", self.what, self.why)
    }
}

fn refused(what: impl Into<String>, why: impl Into<String>) -> Refused {
    Refused {
        what: what.into(),
        why: why.into(),
    }
}

/// Whether `entity` (`schema.table` or `table`) is in the bookkeeping schema.
pub fn is_bookkeeping(entity: &str) -> bool {
    qualify(entity)
        .split_once('.')
        .is_some_and(|(schema, _)| schema.eq_ignore_ascii_case(BOOKKEEPING_SCHEMA))
}

/// The columns `map` may write on `side`: its key columns, then the
/// columns the other side writes into it.
pub fn writable_columns(map: &MapConfig, side: SideId) -> Vec<&str> {
    let mut out: Vec<&str> = map.entity(side).key.iter().map(String::as_str).collect();
    for c in into_columns(map, side) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Checks a decision read from `side`'s apply topic: its map is
/// configured, it targets this side and the map's entity there, its key is
/// the map's key on this side, and every column it writes or compares is
/// one the map writes into this side. Returns the map.
pub fn authorise_write<'a>(
    config: &'a Config,
    side: SideId,
    w: &ApplyWrite,
) -> Result<&'a MapConfig, Refused> {
    let here = &config.side(side).name;
    let map = config.map(&w.map).ok_or_else(|| {
        refused(
            format!("map `{}`", w.map),
            "no such map in the configuration",
        )
    })?;
    if &w.target_side != here {
        return Err(refused(
            format!("target side `{}`", w.target_side),
            format!("this applier writes side `{here}` only"),
        ));
    }
    if config.side_id(&w.source_side).is_none() {
        return Err(refused(
            format!("source side `{}`", w.source_side),
            "not a side of the configuration",
        ));
    }
    authorise_target(map, side, &w.target_entity)?;
    let key: Vec<&str> = w.key.iter().map(|f| f.name.as_str()).collect();
    if key != map.entity(side).key {
        return Err(refused(
            format!("key [{}] of {}", key.join(", "), w.target_entity),
            format!(
                "map `{}` links {} on `{here}` by [{}]",
                map.name,
                map.entity(side).qualified(),
                map.entity(side).key.join(", ")
            ),
        ));
    }
    if !w.moved.is_empty() && w.moved.len() != w.key.len() {
        return Err(refused(
            format!("other key of a key change ({} values)", w.moved.len()),
            format!("the key of {} has {}", w.target_entity, w.key.len()),
        ));
    }
    authorise_columns(map, side, "written", &w.values)?;
    authorise_columns(map, side, "compared", &w.expect.values)?;
    Ok(map)
}

/// Checks that `entity` is `map`'s entity on `side` and not in the
/// bookkeeping schema.
pub fn authorise_target(map: &MapConfig, side: SideId, entity: &str) -> Result<(), Refused> {
    if is_bookkeeping(entity) {
        return Err(refused(
            format!("table {entity}"),
            format!("the `{BOOKKEEPING_SCHEMA}` schema holds the appliers' bookkeeping and is never a target"),
        ));
    }
    let mapped = map.entity(side).qualified();
    if qualify(entity) != mapped {
        return Err(refused(
            format!("table {entity}"),
            format!("map `{}` writes {mapped} on this side", map.name),
        ));
    }
    Ok(())
}

/// Checks that every field names a column `map` writes into `side`.
pub fn authorise_columns(
    map: &MapConfig,
    side: SideId,
    how: &str,
    fields: &[Field],
) -> Result<(), Refused> {
    let allowed = writable_columns(map, side);
    match fields.iter().find(|f| !allowed.contains(&f.name.as_str())) {
        None => Ok(()),
        Some(f) => Err(refused(
            format!(
                "column `{}` of {} ({how})",
                f.name,
                map.entity(side).qualified()
            ),
            format!(
                "map `{}` writes only [{}] into this side",
                map.name,
                allowed.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TEST_SIDES;
    use crate::record::{ExpectKind, Expectation, WriteOp};

    fn config() -> Config {
        Config::parse(&format!(
            r#"{TEST_SIDES}
[[map]]
name = "customers"
left = {{ entity = "customers_v3", key = ["customeraccount"] }}
right = {{ entity = "accounts", key = ["accountnumber"] }}
field = [
  {{ left = "customeraccount", right = "accountnumber" }},
  {{ left = "name", right = "name" }},
  {{ left = "creditlimit", right = "creditlimit", direction = "left_to_right" }},
]
"#
        ))
        .unwrap()
    }

    fn write() -> ApplyWrite {
        ApplyWrite {
            map: "customers".into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            target_entity: "public.accounts".into(),
            key: vec![Field::new("accountnumber", Some("C1"))],
            version: 1,
            op: WriteOp::Upsert,
            values: vec![
                Field::new("accountnumber", Some("C1")),
                Field::new("name", Some("n")),
                Field::new("creditlimit", Some("5")),
            ],
            expect: Expectation {
                kind: ExpectKind::Row,
                version: 0,
                present: true,
                values: vec![Field::new("name", Some("o"))],
            },
            moved: Vec::new(),
            source_lsn: 0,
            commit_time: 0,
        }
    }

    fn refusal(w: &ApplyWrite, side: SideId) -> String {
        authorise_write(&config(), side, w).unwrap_err().to_string()
    }

    #[test]
    fn a_mapped_write_is_authorised() {
        let c = config();
        assert_eq!(
            authorise_write(&c, SideId::Right, &write()).unwrap().name,
            "customers"
        );
        let mut w = write();
        w.target_entity = "accounts".into(); // unqualified: public
        assert!(authorise_write(&c, SideId::Right, &w).is_ok());
    }

    #[test]
    fn unmapped_targets_are_refused_with_what_and_why() {
        let mut w = write();
        w.map = "payroll".into();
        assert_eq!(
            refusal(&w, SideId::Right),
            "refused map `payroll`: no such map in the configuration"
        );
        let e = refusal(&write(), SideId::Left);
        assert!(
            e.contains("target side `dataverse`") && e.contains("`fno` only"),
            "{e}"
        );
        let mut w = write();
        w.target_entity = "public.salaries".into();
        let e = refusal(&w, SideId::Right);
        assert!(
            e.starts_with("refused table public.salaries: map `customers` writes public.accounts"),
            "{e}"
        );
        w.target_entity = "dualwrite.record_versions".into();
        let e = refusal(&w, SideId::Right);
        assert!(e.contains("never a target"), "{e}");
        let mut w = write();
        w.values.push(Field::new("is_admin", Some("t")));
        let e = refusal(&w, SideId::Right);
        assert!(
            e.starts_with("refused column `is_admin` of public.accounts (written)"),
            "{e}"
        );
        assert!(e.contains("[accountnumber, name, creditlimit]"), "{e}");
        let mut w = write();
        w.source_side = "elsewhere".into();
        assert!(refusal(&w, SideId::Right).starts_with("refused source side `elsewhere`"));
        let mut w = write();
        w.key[0].name = "id".into();
        assert!(refusal(&w, SideId::Right).contains("by [accountnumber]"));
        let mut w = write();
        w.expect.values.push(Field::new("password", None::<String>));
        assert!(refusal(&w, SideId::Right).contains("`password`"));
        // A key change's other key must be a whole key.
        let mut w = write();
        w.moved = vec![Field::new("a", Some("1")), Field::new("b", Some("2"))];
        let e = refusal(&w, SideId::Right);
        assert!(
            e.starts_with("refused other key of a key change (2 values)"),
            "{e}"
        );
        w.moved.pop();
        assert!(authorise_write(&config(), SideId::Right, &w).is_ok());
    }

    #[test]
    fn a_one_way_column_is_written_only_into_its_target() {
        // creditlimit flows left to right: fno's creditlimit is not writable.
        let mut w = write();
        w.target_side = "fno".into();
        w.target_entity = "public.customers_v3".into();
        w.key = vec![Field::new("customeraccount", Some("C1"))];
        w.values = vec![Field::new("creditlimit", Some("1"))];
        w.expect.values.clear();
        let e = refusal(&w, SideId::Left);
        assert!(e.contains("column `creditlimit`"), "{e}");
        w.values = vec![Field::new("name", Some("x"))];
        assert!(authorise_write(&config(), SideId::Left, &w).is_ok());
    }

    #[test]
    fn the_bookkeeping_schema_is_recognised_in_any_case() {
        assert!(is_bookkeeping("dualwrite.record_versions"));
        assert!(is_bookkeeping("DualWrite.x"));
        assert!(!is_bookkeeping("record_versions"));
        assert!(!is_bookkeeping("public.dualwrite"));
    }
}
