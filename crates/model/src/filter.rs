//! Scoping of a map: which records of each side it syncs.
//!
//! Each side's entity may carry a `filter`, a [CEL](https://cel.dev)
//! (Common Expression Language) expression over the side's columns, and a
//! map may carry `companies` with a `company_field` on each side's entity
//! (company / legal-entity scoping, e.g. `dataareaid`). A record is *in
//! scope* on a side when its company is one of the map's companies
//! (case-insensitively) and its filter is true.
//!
//! In a filter, each column is a variable holding the column's value in
//! PostgreSQL's text form (a string) or `null`: compare numbers with a
//! conversion (`int(qty) > 5`, `double(price) >= 9.5`), booleans as text
//! (`blocked == 'false'`). A filter must give `true` or `false`; an error while
//! evaluating it (e.g. `int('abc')`) is a mapping error of the record, which
//! goes to the errors topic while the rest keeps flowing.
//!
//! What a change does, given whether the row was in scope before and after:
//!
//! | Change | before | after | Result on the other side |
//! |---|---|---|---|
//! | insert | | in | upsert |
//! | insert | | out | nothing |
//! | update | in | in | upsert |
//! | update | out | in | upsert of a new record (enters the scope) |
//! | update | in | out | `on_filter_exit`: `keep` (default) nothing, `delete` a delete |
//! | update | out | out | nothing |
//! | delete | in | | delete |
//! | delete | out | | nothing |
//!
//! The old row comes from the change's old values: the table needs
//! `REPLICA IDENTITY FULL`. When the old values lack a column the scope
//! reads (default replica identity), the old row counts as in scope.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cel::objects::Value;
use cel::{Context, Program};

use crate::config::{EntityRef, FilterExit, MapConfig, SideId};
use crate::error::MappingError;
use crate::record::{field, key_string, ChangeOp, ChangeRecord, Field};

/// What a change does to the other side, by the scope of its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Map the change as it is.
    Pass,
    /// Nothing to sync.
    Skip,
    /// An update whose row enters the scope: an upsert of a new record.
    Enter,
    /// An update whose row leaves the scope, with `on_filter_exit = "delete"`:
    /// a delete of the old record.
    Exit,
}

thread_local! {
    static PROGRAMS: RefCell<HashMap<String, Rc<Program>>> = RefCell::new(HashMap::new());
}

/// Compiles a filter expression (syntax check).
pub fn compile(expr: &str) -> Result<Program, String> {
    Program::compile(expr).map_err(|e| e.to_string().trim().to_owned())
}

/// The compiled program of `expr`, compiled once per thread.
fn program(expr: &str) -> Result<Rc<Program>, String> {
    PROGRAMS.with(|p| {
        if let Some(prog) = p.borrow().get(expr) {
            return Ok(prog.clone());
        }
        let prog = Rc::new(compile(expr)?);
        p.borrow_mut().insert(expr.to_owned(), prog.clone());
        Ok(prog)
    })
}

/// The columns a filter expression reads.
pub fn filter_columns(expr: &str) -> Result<Vec<String>, String> {
    let p = compile(expr)?;
    let mut v: Vec<String> = p
        .references()
        .variables()
        .into_iter()
        .map(str::to_owned)
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// The columns the scope of `map` on `side` reads (company field, filter).
pub fn scope_columns(map: &MapConfig, side: SideId) -> Vec<String> {
    let e = map.entity(side);
    let mut v = Vec::new();
    if !map.companies.is_empty() {
        v.extend(e.company_field.clone());
    }
    if let Some(f) = &e.filter {
        v.extend(filter_columns(f).unwrap_or_default());
    }
    v.sort();
    v.dedup();
    v
}

/// Whether `map` limits the records of `side` at all.
pub fn is_scoped(map: &MapConfig, side: SideId) -> bool {
    map.entity(side).filter.is_some() || !map.companies.is_empty()
}

/// Problems with the scoping settings of a map, as (field, message).
pub fn problems(map: &MapConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (side, e) in [("left", &map.left), ("right", &map.right)] {
        if let Some(f) = &e.filter {
            if let Err(msg) = compile(f) {
                out.push((
                    format!("{side}.filter"),
                    format!("`{f}` is not a valid CEL expression: {msg}"),
                ));
            }
        }
        match (&e.company_field, map.companies.is_empty()) {
            (None, false) => out.push((
                format!("{side}.company_field"),
                "the map lists `companies`: name the column that holds the company (e.g. company_field = \"dataareaid\")".into(),
            )),
            (Some(_), true) => out.push((
                format!("{side}.company_field"),
                "has no effect without `companies` on the map: list the companies to sync".into(),
            )),
            _ => {}
        }
    }
    if map.companies.iter().any(|c| c.trim().is_empty()) {
        out.push(("companies".into(), "a company must not be empty".into()));
    }
    out
}

/// Whether `row` (a side's columns) is in the scope of `map` on `side`.
/// `Ok(None)`: the row lacks a column the scope reads.
pub fn matches(map: &MapConfig, side: SideId, row: &[Field]) -> Result<Option<bool>, String> {
    let e = map.entity(side);
    if !map.companies.is_empty() {
        let Some(col) = &e.company_field else {
            return Err("`companies` without a `company_field`".into());
        };
        let Some(f) = field(row, col) else {
            return Ok(None);
        };
        let ok = f.value.as_deref().is_some_and(|v| {
            map.companies
                .iter()
                .any(|c| c.trim().eq_ignore_ascii_case(v.trim()))
        });
        if !ok {
            return Ok(Some(false));
        }
    }
    match &e.filter {
        None => Ok(Some(true)),
        Some(expr) => evaluate(expr, row),
    }
}

/// Evaluates a filter on a row. `Ok(None)`: the row lacks a column it reads.
pub fn evaluate(expr: &str, row: &[Field]) -> Result<Option<bool>, String> {
    let prog = program(expr)?;
    let mut ctx = Context::default();
    for name in prog.references().variables() {
        let Some(f) = field(row, name) else {
            return Ok(None);
        };
        let v = match &f.value {
            Some(s) => Value::String(Arc::new(s.clone())),
            None => Value::Null,
        };
        ctx.add_variable_from_value(name, v);
    }
    match prog.execute(&ctx) {
        Ok(Value::Bool(b)) => Ok(Some(b)),
        Ok(other) => Err(format!(
            "gave {other:?}, not true or false (columns are text: compare with 'text' or convert, e.g. int(qty) > 5)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `row` is in scope, for the error messages of a change.
fn in_scope(
    map: &MapConfig,
    side: SideId,
    row: &[Field],
    change: &ChangeRecord,
    missing: Option<bool>,
) -> Result<bool, MappingError> {
    match matches(map, side, row) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => missing
            .ok_or_else(|| filter_error(map, side, row, change, missing_message(map, side, row))),
        Err(message) => Err(filter_error(map, side, row, change, message)),
    }
}

fn missing_message(map: &MapConfig, side: SideId, row: &[Field]) -> String {
    let absent: Vec<String> = scope_columns(map, side)
        .into_iter()
        .filter(|c| field(row, c).is_none())
        .collect();
    format!(
        "column(s) {} are not in the change (does the table have them?)",
        absent.join(", ")
    )
}

fn filter_error(
    map: &MapConfig,
    side: SideId,
    row: &[Field],
    change: &ChangeRecord,
    message: String,
) -> MappingError {
    let e: &EntityRef = map.entity(side);
    let key = key_string(
        e.key
            .iter()
            .map(|k| field(row, k).and_then(|f| f.value.as_deref())),
    );
    MappingError::Filter {
        map: map.name.clone(),
        side: side.as_str().to_owned(),
        key,
        message: format!("`{}` on {}: {message}", describe(map, side), change.entity),
    }
}

/// The scope of a side in words, for messages.
pub fn describe(map: &MapConfig, side: SideId) -> String {
    let e = map.entity(side);
    let mut parts = Vec::new();
    if !map.companies.is_empty() {
        parts.push(format!(
            "{} in [{}]",
            e.company_field.as_deref().unwrap_or("?"),
            map.companies.join(", ")
        ));
    }
    if let Some(f) = &e.filter {
        parts.push(f.clone());
    }
    parts.join(" && ")
}

/// Decides what a change from `source` does under the scope of `map`.
pub fn decide(
    map: &MapConfig,
    source: SideId,
    change: &ChangeRecord,
) -> Result<Scope, MappingError> {
    if !is_scoped(map, source) {
        return Ok(Scope::Pass);
    }
    match change.op {
        // An applier's report is about a write the resolver decided.
        ChangeOp::Applied => Ok(Scope::Pass),
        ChangeOp::Insert | ChangeOp::Moved => {
            let Some(after) = change.after.as_deref() else {
                return Ok(Scope::Pass); // mapping reports the missing image
            };
            Ok(if in_scope(map, source, after, change, None)? {
                Scope::Pass
            } else {
                Scope::Skip
            })
        }
        ChangeOp::Delete => {
            let Some(before) = change.before.as_deref() else {
                return Ok(Scope::Pass);
            };
            // Old values without the scope's columns: counts as in scope.
            Ok(if in_scope(map, source, before, change, Some(true))? {
                Scope::Pass
            } else {
                Scope::Skip
            })
        }
        ChangeOp::Update => {
            let Some(after) = change.after.as_deref() else {
                return Ok(Scope::Pass);
            };
            let full_after = with_unchanged(after, change.before.as_deref());
            let now = in_scope(map, source, &full_after, change, None)?;
            let was = match change.before.as_deref() {
                Some(b) => in_scope(map, source, b, change, Some(true))?,
                None => true,
            };
            Ok(match (was, now) {
                (true, true) => Scope::Pass,
                (false, true) => Scope::Enter,
                (false, false) => Scope::Skip,
                (true, false) => match map.on_filter_exit {
                    FilterExit::Keep => Scope::Skip,
                    FilterExit::Delete => Scope::Exit,
                },
            })
        }
    }
}

/// The new values, with unchanged (TOASTed) values left out of an update
/// taken from the old row.
fn with_unchanged(after: &[Field], before: Option<&[Field]>) -> Vec<Field> {
    let mut row = after.to_vec();
    for b in before.unwrap_or_default() {
        if field(after, &b.name).is_none() {
            row.push(b.clone());
        }
    }
    row
}

/// An update whose row enters the scope, as an insert of its new values.
pub fn as_insert(change: &ChangeRecord) -> ChangeRecord {
    let mut c = change.clone();
    c.op = ChangeOp::Insert;
    c.after = change
        .after
        .as_deref()
        .map(|a| with_unchanged(a, change.before.as_deref()));
    c.before = None;
    c
}

/// An update whose row leaves the scope, as a delete of the old row.
pub fn as_delete(change: &ChangeRecord) -> ChangeRecord {
    let mut c = change.clone();
    c.op = ChangeOp::Delete;
    c.after = None;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TEST_SIDES};

    fn config(extra_left: &str, extra_right: &str, map_extra: &str) -> Config {
        let text = format!(
            r#"{TEST_SIDES}[[map]]
name = "customers"
left = {{ entity = "custtable", key = ["dataareaid", "accountnum"]{extra_left} }}
right = {{ entity = "accounts", key = ["company", "accountnumber"]{extra_right} }}
{map_extra}
field = [
  {{ left = "dataareaid", right = "company" }},
  {{ left = "accountnum", right = "accountnumber" }},
  {{ left = "qty", right = "qty" }},
]
"#
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        c
    }

    fn scoped(exit: &str) -> Config {
        config(
            ", company_field = \"dataareaid\", filter = \"qty == null || int(qty) < 100\"",
            ", company_field = \"company\"",
            &format!("companies = [\"usmf\", \"DEMF\"]\non_filter_exit = \"{exit}\""),
        )
    }

    fn row(company: &str, qty: Option<&str>) -> Vec<Field> {
        vec![
            Field::new("dataareaid", Some(company)),
            Field::new("accountnum", Some("A1")),
            Field::new("qty", qty),
        ]
    }

    fn change(op: ChangeOp, before: Option<Vec<Field>>, after: Option<Vec<Field>>) -> ChangeRecord {
        ChangeRecord {
            side: "fno".into(),
            entity: "public.custtable".into(),
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

    #[test]
    fn companies_and_filter_combine() {
        let c = scoped("keep");
        let m = &c.maps[0];
        assert_eq!(
            matches(m, SideId::Left, &row("usmf", Some("5"))),
            Ok(Some(true))
        );
        assert_eq!(matches(m, SideId::Left, &row("demf", None)), Ok(Some(true)));
        assert_eq!(
            matches(m, SideId::Left, &row("USMF", Some("5"))),
            Ok(Some(true))
        );
        assert_eq!(
            matches(m, SideId::Left, &row("frrt", Some("5"))),
            Ok(Some(false))
        );
        assert_eq!(
            matches(m, SideId::Left, &row("usmf", Some("500"))),
            Ok(Some(false))
        );
        assert!(matches(m, SideId::Left, &row("usmf", Some("x"))).is_err());
        assert_eq!(
            matches(m, SideId::Left, &row("usmf", Some("5"))[..1]),
            Ok(None)
        );
        // The right side has companies only.
        assert_eq!(
            matches(m, SideId::Right, &[Field::new("company", Some("demf"))]),
            Ok(Some(true))
        );
        assert_eq!(
            matches(m, SideId::Right, &[Field::new("company", None::<String>)]),
            Ok(Some(false))
        );
        assert_eq!(scope_columns(m, SideId::Left), ["dataareaid", "qty"]);
        assert_eq!(
            describe(m, SideId::Left),
            "dataareaid in [usmf, DEMF] && qty == null || int(qty) < 100"
        );
    }

    #[test]
    fn cel_list_membership_and_strings() {
        let r = row("usmf", Some("7"));
        assert_eq!(
            evaluate("dataareaid in ['usmf', 'demf']", &r),
            Ok(Some(true))
        );
        assert_eq!(evaluate("dataareaid.startsWith('us')", &r), Ok(Some(true)));
        assert_eq!(
            evaluate("int(qty) > 5 && accountnum != 'A2'", &r),
            Ok(Some(true))
        );
        assert!(evaluate("qty", &r)
            .unwrap_err()
            .contains("not true or false"));
        assert_eq!(evaluate("nosuch == 'x'", &r), Ok(None));
        assert_eq!(
            filter_columns("a == 'x' || int(b) > a.size()").unwrap(),
            ["a", "b"]
        );
    }

    #[test]
    fn every_transition() {
        let c = scoped("keep");
        let m = &c.maps[0];
        let d = |op, b: Option<Vec<Field>>, a: Option<Vec<Field>>| {
            decide(m, SideId::Left, &change(op, b, a)).unwrap()
        };
        let inn = || row("usmf", Some("1"));
        let out = || row("frrt", Some("1"));
        assert_eq!(d(ChangeOp::Insert, None, Some(inn())), Scope::Pass);
        assert_eq!(d(ChangeOp::Insert, None, Some(out())), Scope::Skip);
        assert_eq!(d(ChangeOp::Update, Some(inn()), Some(inn())), Scope::Pass);
        assert_eq!(d(ChangeOp::Update, Some(out()), Some(inn())), Scope::Enter);
        assert_eq!(d(ChangeOp::Update, Some(inn()), Some(out())), Scope::Skip);
        assert_eq!(d(ChangeOp::Update, Some(out()), Some(out())), Scope::Skip);
        assert_eq!(d(ChangeOp::Delete, Some(inn()), None), Scope::Pass);
        assert_eq!(d(ChangeOp::Delete, Some(out()), None), Scope::Skip);
        // Old values without the scope's columns (default replica identity): in scope.
        let key_only = || vec![Field::new("accountnum", Some("A1"))];
        assert_eq!(d(ChangeOp::Delete, Some(key_only()), None), Scope::Pass);
        assert_eq!(
            d(ChangeOp::Update, Some(key_only()), Some(inn())),
            Scope::Pass
        );
        assert_eq!(d(ChangeOp::Update, None, Some(inn())), Scope::Pass);
        // An unchanged (TOASTed) column left out of the new values comes from the old row.
        let mut partial = inn();
        partial.retain(|f| f.name != "qty");
        assert_eq!(
            d(ChangeOp::Update, Some(out()), Some(partial)),
            Scope::Enter
        );

        let c = scoped("delete");
        let m = &c.maps[0];
        let ch = change(ChangeOp::Update, Some(inn()), Some(out()));
        assert_eq!(decide(m, SideId::Left, &ch).unwrap(), Scope::Exit);
    }

    #[test]
    fn mapped_changes_follow_the_scope() {
        use crate::mapping::map_change;
        use crate::record::ApplyOp;
        let inn = |acct: &str| {
            let mut r = row("usmf", Some("1"));
            r[1].value = Some(acct.into());
            r
        };
        let out = || row("frrt", Some("1"));
        for exit in ["keep", "delete"] {
            let c = scoped(exit);
            let m = &c.maps[0];
            let map = |ch: ChangeRecord| map_change(&c, m, SideId::Left, &ch).unwrap();
            // Entering (here also with a key change): an upsert of a new record, no delete.
            let got = map(change(ChangeOp::Update, Some(out()), Some(inn("A2"))));
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].op, ApplyOp::Upsert);
            assert!(!got[0].existed);
            assert_eq!(got[0].kafka_key(), "[\"usmf\",\"A2\"]");
            // Leaving: per on_filter_exit, a delete of the old record.
            let got = map(change(ChangeOp::Update, Some(inn("A1")), Some(out())));
            if exit == "keep" {
                assert!(got.is_empty());
            } else {
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].op, ApplyOp::Delete);
                assert_eq!(got[0].kafka_key(), "[\"usmf\",\"A1\"]");
            }
            assert!(map(change(ChangeOp::Insert, None, Some(out()))).is_empty());
            assert!(map(change(ChangeOp::Delete, Some(out()), None)).is_empty());
            assert_eq!(
                map(change(ChangeOp::Delete, Some(inn("A1")), None))[0].op,
                ApplyOp::Delete
            );
        }
    }

    #[test]
    fn evaluation_errors_name_map_side_scope_and_key() {
        let c = scoped("keep");
        let m = &c.maps[0];
        let e = decide(
            m,
            SideId::Left,
            &change(ChangeOp::Insert, None, Some(row("usmf", Some("lots")))),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("map `customers`"), "{e}");
        assert!(e.contains("left"), "{e}");
        assert!(e.contains("int(qty) < 100"), "{e}");
        assert!(e.contains("[\"usmf\",\"A1\"]"), "{e}");
        // A column the filter reads missing from the new values is an error too.
        let e = decide(
            m,
            SideId::Left,
            &change(
                ChangeOp::Insert,
                None,
                Some(row("usmf", None)[..2].to_vec()),
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("qty"), "{e}");
    }

    #[test]
    fn schema_check_finds_columns_the_scope_reads() {
        use crate::schema::{check_map, TableInfo};
        let c = scoped("keep");
        let m = &c.maps[0];
        let table = |cols: &[&str], key: &[&str]| TableInfo {
            columns: cols
                .iter()
                .map(|c| (c.to_string(), "text".to_string()))
                .collect(),
            unique: vec![key.iter().map(|k| k.to_string()).collect()],
            referenced_by: Vec::new(),
        };
        let left = table(&["dataareaid", "accountnum"], &["dataareaid", "accountnum"]);
        let right = table(&["accountnumber", "qty"], &["company", "accountnumber"]);
        let p: Vec<String> = check_map(&c, m, Some(&left), Some(&right))
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert!(
            p.iter().any(
                |p| p.contains("side `fno`, field `qty`: column qty (read by the map's scope)")
            ),
            "{p:?}"
        );
        assert!(
            p.iter().any(|p| p.contains(
                "side `dataverse`, field `company`: column company (read by the map's scope)"
            )),
            "{p:?}"
        );
    }

    #[test]
    fn unscoped_maps_pass_everything() {
        let c = config("", "", "");
        let m = &c.maps[0];
        let ch = change(ChangeOp::Insert, None, Some(row("x", Some("1"))));
        assert_eq!(decide(m, SideId::Left, &ch).unwrap(), Scope::Pass);
    }

    #[test]
    fn bad_settings_are_problems() {
        let text = |left: &str, extra: &str| {
            format!(
                r#"{TEST_SIDES}[[map]]
name = "m"
left = {{ entity = "a", key = ["k"]{left} }}
right = {{ entity = "b", key = ["k"] }}
{extra}
field = [{{ left = "k", right = "k" }}]
"#
            )
        };
        let p = Config::parse(&text(", filter = \"qty >\"", ""))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(p[0].location, "map \"m\": left.filter");
        assert!(p[0].message.contains("not a valid CEL expression"), "{p:?}");
        let p = Config::parse(&text(", company_field = \"c\"", "companies = [\"usmf\"]"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].location, "map \"m\": right.company_field");
    }
}
