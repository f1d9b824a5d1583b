//! A map's mapping checked against both databases' actual tables (no IO:
//! the tables are described by the caller): missing tables and columns,
//! paired columns whose types cannot be converted, and alternate keys
//! without a unique index to upsert on.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{Config, MapConfig, SideId};

/// What a side's database says about a table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableInfo {
    /// Column name → type as PostgreSQL formats it (`format_type`).
    pub columns: BTreeMap<String, String>,
    /// Column sets of the unique indexes and constraints (primary key included).
    pub unique: Vec<Vec<String>>,
}

/// One problem, naming map, side, field and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    pub map: String,
    pub side: String,
    pub field: Option<String>,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "map `{}`, side `{}`", self.map, self.side)?;
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        write!(f, ": {} (fix: {})", self.problem, self.fix)
    }
}

/// The family a type's values convert within, through its text form.
fn family(ty: &str) -> &'static str {
    let base = ty.split('(').next().unwrap_or(ty).trim();
    match base {
        "text" | "character varying" | "character" | "name" | "citext" => "text",
        "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision" => "number",
        "boolean" => "boolean",
        "date" | "timestamp without time zone" | "timestamp with time zone" => "time",
        "uuid" => "uuid",
        "json" | "jsonb" => "json",
        _ => "other",
    }
}

/// Whether values of `from` can be written into a column of `to`.
fn convertible(from: &str, to: &str) -> bool {
    if from == to {
        return true;
    }
    let (f, t) = (family(from), family(to));
    // Anything can be stored as text; text into another type is checked per value by the target.
    t == "text" || (f == t && f != "other")
}

/// Checks `map` against the tables of both sides (`None`: no such table).
pub fn check_map(
    config: &Config,
    map: &MapConfig,
    left: Option<&TableInfo>,
    right: Option<&TableInfo>,
) -> Vec<SchemaProblem> {
    let mut out = Vec::new();
    let side_name = |s: SideId| config.side(s).name.clone();
    let problem = |s: SideId, field: Option<&str>, problem: String, fix: String| SchemaProblem {
        map: map.name.clone(),
        side: side_name(s),
        field: field.map(str::to_owned),
        problem,
        fix,
    };
    let tables = [(SideId::Left, left), (SideId::Right, right)];
    for (side, table) in tables {
        let entity = map.entity(side).qualified();
        let Some(t) = table else {
            out.push(problem(
                side,
                None,
                format!("table {entity} does not exist"),
                format!("create it, or correct `{}.entity`", side.as_str()),
            ));
            continue;
        };
        for f in &map.fields {
            let col = f.name(side);
            if !t.columns.contains_key(col) {
                out.push(problem(
                    side,
                    Some(col),
                    format!("column {col} does not exist in {entity}"),
                    format!(
                        "add the column, or correct the field mapping `{}` ↔ `{}`",
                        f.left, f.right
                    ),
                ));
            }
        }
        let key = &map.entity(side).key;
        let mut sorted_key = key.clone();
        sorted_key.sort();
        let indexed = t.unique.iter().any(|u| {
            let mut u = u.clone();
            u.sort();
            u == sorted_key
        });
        if key.iter().all(|k| t.columns.contains_key(k)) && !indexed {
            out.push(problem(
                side,
                Some(&key.join(", ")),
                format!(
                    "the alternate key ({}) of {entity} has no unique index: upserts need one",
                    key.join(", ")
                ),
                format!(
                    "CREATE UNIQUE INDEX ON {entity} ({}) (after removing duplicates)",
                    key.join(", ")
                ),
            ));
        }
    }
    if let (Some(l), Some(r)) = (left, right) {
        for f in &map.fields {
            let (Some(lt), Some(rt)) = (l.columns.get(&f.left), r.columns.get(&f.right)) else {
                continue;
            };
            for (from_side, from, to, to_side) in [
                (SideId::Left, lt, rt, SideId::Right),
                (SideId::Right, rt, lt, SideId::Left),
            ] {
                if f.direction.carries_from(from_side) && !convertible(from, to) {
                    out.push(problem(
                        to_side,
                        Some(f.name(to_side)),
                        format!(
                            "{} {} ({from}) cannot be converted to {} {} ({to})",
                            side_name(from_side),
                            f.name(from_side),
                            side_name(to_side),
                            f.name(to_side)
                        ),
                        "change a column's type, or sync the field one way only".to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(crate::config::DEMO_CONFIG).unwrap()
    }

    fn table(cols: &[(&str, &str)], unique: &[&[&str]]) -> TableInfo {
        TableInfo {
            columns: cols
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
            unique: unique
                .iter()
                .map(|u| u.iter().map(|c| c.to_string()).collect())
                .collect(),
        }
    }

    fn customers() -> (TableInfo, TableInfo) {
        (
            table(
                &[
                    ("customeraccount", "text"),
                    ("organizationname", "text"),
                    ("customergroupid", "text"),
                    ("salescurrencycode", "text"),
                    ("creditlimit", "numeric(14,2)"),
                    ("primaryphone", "text"),
                    ("primaryemail", "text"),
                    ("onhold", "boolean"),
                ],
                &[&["customeraccount"]],
            ),
            table(
                &[
                    ("accountid", "uuid"),
                    ("accountnumber", "character varying(20)"),
                    ("name", "character varying(160)"),
                    ("msdyn_customergroupid", "text"),
                    ("transactioncurrencycode", "text"),
                    ("creditlimit", "numeric"),
                    ("telephone1", "text"),
                    ("emailaddress1", "text"),
                    ("creditonhold", "boolean"),
                ],
                &[&["accountid"], &["accountnumber"]],
            ),
        )
    }

    #[test]
    fn the_demo_mapping_fits_its_tables() {
        let c = config();
        let (l, r) = customers();
        assert_eq!(
            check_map(&c, c.map("customers").unwrap(), Some(&l), Some(&r)),
            vec![]
        );
    }

    #[test]
    fn problems_name_map_side_field_and_fix() {
        let c = config();
        let m = c.map("customers").unwrap();
        let (mut l, mut r) = customers();
        l.columns.remove("primaryemail");
        l.columns.insert("onhold".into(), "integer".into());
        r.unique.retain(|u| u != &vec!["accountnumber".to_owned()]);
        let p = check_map(&c, m, Some(&l), Some(&r));
        let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert_eq!(p.len(), 4, "{text:#?}");
        assert!(text[0].starts_with("map `customers`, side `fno`, field `primaryemail`: column primaryemail does not exist"), "{text:#?}");
        assert!(text[1].contains("side `dataverse`, field `accountnumber`: the alternate key (accountnumber) of public.accounts has no unique index"), "{text:#?}");
        assert!(text[1].contains("CREATE UNIQUE INDEX ON public.accounts (accountnumber)"));
        // integer ↔ boolean, both ways.
        assert!(
            text[2].contains(
                "fno onhold (integer) cannot be converted to dataverse creditonhold (boolean)"
            ),
            "{text:#?}"
        );
        assert!(
            text[3].contains(
                "dataverse creditonhold (boolean) cannot be converted to fno onhold (integer)"
            ),
            "{text:#?}"
        );
        let missing = check_map(&c, m, None, Some(&r));
        assert!(missing[0]
            .to_string()
            .contains("table public.customers_v3 does not exist"));
    }

    #[test]
    fn conversions_follow_type_families() {
        assert!(convertible("integer", "numeric(14,2)"));
        assert!(convertible("timestamp with time zone", "date"));
        assert!(convertible("uuid", "text"));
        assert!(!convertible("text", "uuid"));
        assert!(!convertible("boolean", "integer"));
        assert!(convertible("jsonb", "json"));
        assert!(!convertible("point", "box"));
        assert!(convertible("point", "point"));
    }
}
