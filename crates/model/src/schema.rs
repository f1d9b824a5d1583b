//! A map's mapping checked against both databases' actual tables (no IO:
//! the tables are described by the caller): missing tables and columns,
//! paired columns whose types cannot be converted, alternate keys
//! without a unique index to upsert on, and delete actions of foreign keys
//! that exist on one side only.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{Config, FieldMapping, MapConfig, SideId};
use crate::transform::{convert, ColumnType, Unmapped};

/// What a side's database says about a table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableInfo {
    /// Column name → type as PostgreSQL formats it (`format_type`).
    pub columns: BTreeMap<String, String>,
    /// Column sets of the unique indexes and constraints (primary key included).
    pub unique: Vec<Vec<String>>,
    /// The foreign keys of other tables (or this one) that refer to it.
    pub referenced_by: Vec<Reference>,
}

/// A foreign key referring to a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The constraint's name.
    pub constraint: String,
    /// The referring table, `schema.table`.
    pub child: String,
    /// `pg_constraint.confdeltype`: `a` no action, `r` restrict, `c`
    /// cascade, `n` set null, `d` set default.
    pub on_delete: char,
}

impl Reference {
    /// Whether deleting a referred row changes referring rows (in the
    /// deleting transaction, so under its replication origin).
    fn acts(&self) -> bool {
        matches!(self.on_delete, 'c' | 'n' | 'd')
    }

    fn action(&self) -> &'static str {
        match self.on_delete {
            'c' => "ON DELETE CASCADE",
            'n' => "ON DELETE SET NULL",
            'd' => "ON DELETE SET DEFAULT",
            _ => "ON DELETE NO ACTION",
        }
    }
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
    let mut c = Checker {
        config,
        map,
        out: Vec::new(),
    };
    for (side, table) in [(SideId::Left, left), (SideId::Right, right)] {
        c.table(side, table);
    }
    if let (Some(l), Some(r)) = (left, right) {
        for f in &map.fields {
            let types = [l.columns.get(&f.left), r.columns.get(&f.right)];
            c.declared_conversion(f, types);
            for from_side in [SideId::Left, SideId::Right] {
                if f.direction.carries_from(from_side) {
                    c.values_into(f, from_side, types);
                }
            }
        }
        c.out.extend(one_sided_delete_actions(config, map, [l, r]));
    }
    c.out
}

/// The problems found so far with one map.
struct Checker<'a> {
    config: &'a Config,
    map: &'a MapConfig,
    out: Vec<SchemaProblem>,
}

/// A column's type on the left and on the right (`None`: no such column).
type Types<'a> = [Option<&'a String>; 2];

fn on(types: Types<'_>, side: SideId) -> Option<&String> {
    match side {
        SideId::Left => types[0],
        SideId::Right => types[1],
    }
}

impl Checker<'_> {
    fn side_name(&self, s: SideId) -> &str {
        &self.config.side(s).name
    }

    fn push(&mut self, s: SideId, field: Option<&str>, problem: String, fix: String) {
        self.out.push(SchemaProblem {
            map: self.map.name.clone(),
            side: self.side_name(s).to_owned(),
            field: field.map(str::to_owned),
            problem,
            fix,
        });
    }

    /// The table exists and has the columns the map reads and a unique
    /// index on the alternate key.
    fn table(&mut self, side: SideId, table: Option<&TableInfo>) {
        let map = self.map;
        let entity = map.entity(side).qualified();
        let Some(t) = table else {
            let fix = format!("create it, or correct `{}.entity`", side.as_str());
            self.push(side, None, format!("table {entity} does not exist"), fix);
            return;
        };
        for col in crate::filter::scope_columns(map, side) {
            if !t.columns.contains_key(&col) {
                let s = side.as_str();
                self.push(
                    side,
                    Some(&col),
                    format!("column {col} (read by the map's scope) does not exist in {entity}"),
                    format!("add the column, or correct `{s}.filter` / `{s}.company_field`"),
                );
            }
        }
        for f in map.fields.iter().filter(|f| f.has_column(side)) {
            let col = f.name(side);
            if !t.columns.contains_key(col) {
                self.push(
                    side,
                    Some(col),
                    format!("column {col} does not exist in {entity}"),
                    format!(
                        "add the column, or correct the field mapping `{}` ↔ `{}`",
                        f.left, f.right
                    ),
                );
            }
        }
        self.unique_key(side, t, &entity);
    }

    fn unique_key(&mut self, side: SideId, t: &TableInfo, entity: &str) {
        let key = &self.map.entity(side).key;
        let mut sorted_key = key.clone();
        sorted_key.sort();
        let indexed = t.unique.iter().any(|u| {
            let mut u = u.clone();
            u.sort();
            u == sorted_key
        });
        if key.iter().all(|k| t.columns.contains_key(k)) && !indexed {
            let cols = key.join(", ");
            self.push(
                side,
                Some(&cols),
                format!(
                    "the alternate key ({cols}) of {entity} has no unique index: upserts need one"
                ),
                format!("CREATE UNIQUE INDEX ON {entity} ({cols}) (after removing duplicates)"),
            );
        }
    }

    /// A declared conversion must name the columns' actual types.
    fn declared_conversion(&mut self, f: &FieldMapping, types: Types<'_>) {
        let Some(c) = &f.transform.convert else {
            return;
        };
        for (side, written) in [(SideId::Left, &c.left), (SideId::Right, &c.right)] {
            let (Some(actual), Some(declared)) = (on(types, side), c.get(side)) else {
                continue;
            };
            if ColumnType::of_column(actual) == Some(declared) {
                continue;
            }
            let should = ColumnType::of_column(actual)
                .map(|t| t.as_str())
                .unwrap_or("a type convert does not handle: remove the conversion");
            self.push(
                side,
                Some(f.name(side)),
                format!(
                    "convert declares the {side} column `{written}` but {} {} is {actual}",
                    self.side_name(side),
                    f.name(side)
                ),
                format!(
                    "set `convert.{side}` to the column's type ({should}), or change the column"
                ),
            );
        }
    }

    /// The values `f` writes from `from_side` suit the other side's column:
    /// the configuration's literals, and the source's text where no
    /// transform produces the target's values.
    fn values_into(&mut self, f: &FieldMapping, from_side: SideId, types: Types<'_>) {
        let to_side = from_side.other();
        let Some(to) = on(types, to_side) else {
            return;
        };
        self.literals(f, to_side, to);
        let tr = &f.transform;
        let produces_target_values =
            tr.constant.is_some() || tr.value_map.is_some() || tr.convert.is_some();
        let Some(from) = on(types, from_side) else {
            return;
        };
        if produces_target_values || convertible(from, to) {
            return;
        }
        self.push(
            to_side,
            Some(f.name(to_side)),
            format!(
                "{} {} ({from}) cannot be converted to {} {} ({to})",
                self.side_name(from_side),
                f.name(from_side),
                self.side_name(to_side),
                f.name(to_side)
            ),
            "change a column's type, declare the conversion (`convert = { left = \"<type>\", right = \"<type>\" }`) or a `value_map`, or sync the field one way only".to_owned(),
        );
    }

    /// Values the configuration writes into the target as they are.
    fn literals(&mut self, f: &FieldMapping, to_side: SideId, to: &str) {
        let tr = &f.transform;
        let mut literals: Vec<(&str, &str)> = Vec::new();
        if let Some(v) = &tr.constant {
            literals.push(("constant", v));
        }
        if let Some(v) = tr.default.as_ref().and_then(|d| d.get(to_side)) {
            literals.push(("default", v));
        }
        if let Some(Unmapped::Default(d)) = &tr.unmapped {
            if let Some(v) = d.get(to_side) {
                literals.push(("unmapped", v));
            }
        }
        if let Some(table) = &tr.value_map {
            for (lv, rv) in table {
                literals.push(("value_map", if to_side == SideId::Left { lv } else { rv }));
            }
        }
        let Some(ty) = ColumnType::of_column(to) else {
            return;
        };
        for (what, v) in literals {
            if let Err(reason) = convert(v, ColumnType::Text, ty) {
                self.push(
                    to_side,
                    Some(f.name(to_side)),
                    format!(
                        "{what} value `{v}` written to {} {} ({to}) {reason}",
                        self.side_name(to_side),
                        f.name(to_side)
                    ),
                    format!("correct the field's `{what}`"),
                );
            }
        }
    }
}

/// Foreign keys whose delete action changes the rows of another map on one
/// side only. When the applier of side X deletes a record of `map`, X's
/// `ON DELETE CASCADE` (or `SET NULL`/`SET DEFAULT`) changes the referring
/// rows in the applier's transaction, under its replication origin: those
/// changes are not captured, never reach the other side, and nothing
/// reports it. That is only safe when the other side has a foreign key
/// between the same two tables too: then its own deletes cannot leave
/// referring rows behind (they are refused, or changed and captured).
/// Without one, the referring rows are removed (or cleared) on X and kept
/// on the other side.
fn one_sided_delete_actions(
    config: &Config,
    map: &MapConfig,
    tables: [&TableInfo; 2],
) -> Vec<SchemaProblem> {
    let mut out = Vec::new();
    for side in [SideId::Left, SideId::Right] {
        let (mine, other) = (tables[ix(side)], tables[ix(side.other())]);
        for r in mine.referenced_by.iter().filter(|r| r.acts()) {
            let Some(child_map) = config
                .maps
                .iter()
                .find(|m| m.entity(side).qualified() == r.child)
            else {
                // Rows no map syncs: nothing on the other side to keep equal.
                continue;
            };
            let counterpart = child_map.entity(side.other()).qualified();
            if other.referenced_by.iter().any(|o| o.child == counterpart) {
                continue;
            }
            let (me, them) = (&config.side(side).name, &config.side(side.other()).name);
            out.push(SchemaProblem {
                map: map.name.clone(),
                side: me.clone(),
                field: None,
                problem: format!(
                    "{} of constraint `{}` on {} (map `{}`) changes rows on `{me}` when the applier deletes a `{}` record there, and those changes are not synced: `{them}` has no foreign key from {counterpart} to {}, so it keeps the rows",
                    r.action(),
                    r.constraint,
                    r.child,
                    child_map.name,
                    map.name,
                    map.entity(side.other()).qualified(),
                ),
                fix: format!(
                    "add a foreign key from {counterpart} to {} on `{them}`, or make `{}` on `{me}` ON DELETE NO ACTION",
                    map.entity(side.other()).qualified(),
                    r.constraint
                ),
            });
        }
    }
    out
}

fn ix(side: SideId) -> usize {
    match side {
        SideId::Left => 0,
        SideId::Right => 1,
    }
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
            referenced_by: Vec::new(),
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

    fn contacts_fk(on: &str, constraint: &str, on_delete: char) -> Reference {
        Reference {
            constraint: constraint.to_owned(),
            child: format!("public.{on}"),
            on_delete,
        }
    }

    #[test]
    fn a_delete_action_on_one_side_only_is_refused_naming_the_constraint() {
        let c = config();
        let m = c.map("customers").unwrap();
        let (mut l, mut r) = customers();
        // The demo: both sides cascade from contacts.
        l.referenced_by = vec![contacts_fk(
            "contacts",
            "contacts_customeraccount_fkey",
            'c',
        )];
        r.referenced_by = vec![contacts_fk(
            "contacts",
            "contacts_parentcustomernumber_fkey",
            'c',
        )];
        assert_eq!(check_map(&c, m, Some(&l), Some(&r)), vec![]);
        // A plain foreign key on the other side is enough: its deletes
        // cannot leave contacts behind.
        r.referenced_by[0].on_delete = 'a';
        assert_eq!(check_map(&c, m, Some(&l), Some(&r)), vec![]);
        // None on the other side: the cascade under the applier is refused.
        r.referenced_by.clear();
        let p: Vec<String> = check_map(&c, m, Some(&l), Some(&r))
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("map `customers`, side `fno`: ON DELETE CASCADE of constraint `contacts_customeraccount_fkey` on public.contacts (map `contacts`)")
                && p[0].contains("`dataverse` has no foreign key from public.contacts to public.accounts"),
            "{}",
            p[0]
        );
        // SET NULL changes rows too; a table no map syncs does not count.
        l.referenced_by = vec![
            contacts_fk("contacts", "contacts_customeraccount_fkey", 'n'),
            contacts_fk("audit_log", "audit_customer_fkey", 'c'),
        ];
        let p = check_map(&c, m, Some(&l), Some(&r));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].problem.starts_with("ON DELETE SET NULL"), "{p:?}");
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

#[cfg(test)]
mod transform_tests {
    use super::*;
    use crate::config::TEST_SIDES;

    fn config(fields: &str) -> Config {
        Config::parse(&format!(
            r#"{TEST_SIDES}[[map]]
name = "customers"
left = {{ entity = "customers", key = ["account"] }}
right = {{ entity = "accounts", key = ["number"] }}
field = [
  {{ left = "account", right = "number" }},
  {fields}
]
"#
        ))
        .unwrap()
    }

    fn tables() -> (TableInfo, TableInfo) {
        let t = |cols: &[(&str, &str)], key: &str| TableInfo {
            columns: cols
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
            unique: vec![vec![key.to_owned()]],
            referenced_by: Vec::new(),
        };
        (
            t(
                &[
                    ("account", "text"),
                    ("status", "text"),
                    ("onhold", "boolean"),
                    ("amount", "numeric(10,2)"),
                ],
                "account",
            ),
            t(
                &[
                    ("number", "text"),
                    ("statecode", "integer"),
                    ("creditonhold", "smallint"),
                    ("msdyn_source", "text"),
                    ("amount", "integer"),
                ],
                "number",
            ),
        )
    }

    fn check(fields: &str) -> Vec<String> {
        let c = config(fields);
        c.validate().unwrap();
        let (l, r) = tables();
        check_map(&c, &c.maps[0], Some(&l), Some(&r))
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn transforms_that_fit_the_columns_pass() {
        let p = check(
            r#"{ left = "status", right = "statecode", value_map = { Active = 0, Closed = 1 } },
  { left = "onhold", right = "creditonhold", convert = { left = "boolean", right = "integer" } },
  { right = "msdyn_source", constant = "fno" },
  { left = "amount", right = "amount", convert = { left = "numeric", right = "integer" }, default = 0 },"#,
        );
        assert_eq!(p, Vec::<String>::new());
    }

    #[test]
    fn without_a_conversion_the_family_rule_applies() {
        let p = check(r#"{ left = "onhold", right = "creditonhold" },"#);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].contains(
                "fno onhold (boolean) cannot be converted to dataverse creditonhold (smallint)"
            ),
            "{p:#?}"
        );
        assert!(p[0].contains("declare the conversion"), "{p:#?}");
        let p = check(r#"{ left = "status", right = "statecode", direction = "left_to_right" },"#);
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn a_declared_type_must_match_the_column() {
        let p = check(
            r#"{ left = "status", right = "creditonhold", convert = { left = "integer", right = "integer" } },"#,
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(
            p[0],
            "map `customers`, side `fno`, field `status`: convert declares the left column `integer` but fno status is text (fix: set `convert.left` to the column's type (text), or change the column)"
        );
    }

    #[test]
    fn literal_values_must_suit_the_target_column() {
        let p = check(
            r#"{ left = "status", right = "statecode", value_map = { Active = "zero", Closed = "1" } },"#,
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("map `customers`, side `dataverse`, field `statecode`: value_map value `zero` written to dataverse statecode (integer) is not an integer"),
            "{p:#?}"
        );
        let p = check(
            r#"{ left = "onhold", right = "creditonhold", convert = { left = "boolean", right = "integer" }, default = { right = "no" } },"#,
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("default value `no`"), "{p:#?}");
    }

    #[test]
    fn a_constant_needs_its_target_column_only() {
        let c = config(r#"{ right = "msdyn_missing", constant = "fno" },"#);
        let (l, r) = tables();
        let p: Vec<String> = check_map(&c, &c.maps[0], Some(&l), Some(&r))
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains(
                "side `dataverse`, field `msdyn_missing`: column msdyn_missing does not exist"
            ),
            "{p:#?}"
        );
    }
}
