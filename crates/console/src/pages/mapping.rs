//! A map's mapping: both entities and their alternate keys, each field
//! pair with its direction and transforms, the scope, and the schema
//! check against the live tables.

use dualwrite_model::config::{Config, Direction, FieldMapping, MapConfig, SideId};
use dualwrite_model::filter;
use dualwrite_model::schema::SchemaProblem;
use dualwrite_model::transform::{Transform, Unmapped, UnmappedMode};
use maud::{html, Markup};

use super::map_tabs;

/// The page; `check`: the schema check's problems, or why the tables
/// could not be read.
pub fn mapping(
    config: &Config,
    map: &MapConfig,
    check: &Result<Vec<SchemaProblem>, String>,
) -> Markup {
    let side = |s: SideId| config.side(s).name.as_str();
    html! {
        (map_tabs(&map.name, "mapping"))
        table class="entities-table" {
            thead { tr { th scope="col" { "" } th scope="col" { (side(SideId::Left)) } th scope="col" { (side(SideId::Right)) } } }
            tbody {
                tr { th scope="row" { "Entity" } td { (map.left.qualified()) } td { (map.right.qualified()) } }
                tr { th scope="row" { "Alternate key" } td { (map.left.key.join(", ")) } td { (map.right.key.join(", ")) } }
                tr { th scope="row" { "Scope" } td { (scope(map, SideId::Left)) } td { (scope(map, SideId::Right)) } }
            }
        }
        p { "Conflict master: " strong { (side(config.conflict_master(map))) }
            "; initial sync by default: " (if map.initial_sync { "on" } else { "off" })
            @if !map.depends_on.is_empty() { "; depends on " (map.depends_on.join(", ")) } }
        h2 { "Fields" }
        table id="fields" {
            thead { tr {
                th scope="col" { (side(SideId::Left)) }
                th scope="col" { "Direction" }
                th scope="col" { (side(SideId::Right)) }
                th scope="col" { "Transforms" }
            } }
            tbody { @for f in &map.fields { (field(f)) } }
        }
        h2 { "Schema check against the live tables" }
        @match check {
            Ok(problems) if problems.is_empty() => p class="notice ok" id="schema" { "The mapping fits both tables." },
            Ok(problems) => ul class="notice refused" id="schema" { @for p in problems { li { (p.to_string()) } } },
            Err(e) => p class="notice refused" id="schema" role="alert" { "The tables could not be read: " (e) },
        }
    }
}

fn scope(map: &MapConfig, side: SideId) -> String {
    match filter::describe(map, side) {
        s if s.is_empty() => "every record".to_owned(),
        s => s,
    }
}

fn field(f: &FieldMapping) -> Markup {
    let arrow = match f.direction {
        Direction::Both => "↔ both ways",
        Direction::LeftToRight => "→ left to right",
        Direction::RightToLeft => "← right to left",
    };
    html! {
        tr {
            td { code { (f.left) } }
            td { (arrow) }
            td { code { (f.right) } }
            td { (transforms(&f.transform)) }
        }
    }
}

/// The transforms in words.
fn transforms(t: &Transform) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &t.constant {
        parts.push(format!("constant `{c}`"));
    }
    if let Some(table) = &t.value_map {
        let pairs: Vec<String> = table.iter().map(|(l, r)| format!("{l} → {r}")).collect();
        parts.push(format!("value map: {}", pairs.join(", ")));
    }
    match &t.unmapped {
        Some(Unmapped::Mode(UnmappedMode::Error)) => parts.push("unmapped values: error".into()),
        Some(Unmapped::Mode(UnmappedMode::Keep)) => parts.push("unmapped values: kept".into()),
        Some(Unmapped::Default(d)) => {
            parts.push(format!("unmapped values: {}", per_side(|s| d.get(s))))
        }
        None => {}
    }
    if let Some(d) = &t.default {
        parts.push(format!("default when NULL: {}", per_side(|s| d.get(s))));
    }
    if let Some(c) = &t.convert {
        parts.push(format!("convert {} ↔ {}", c.left, c.right));
    }
    if parts.is_empty() {
        "values pass unchanged".to_owned()
    } else {
        parts.join("; ")
    }
}

fn per_side<'a>(get: impl Fn(SideId) -> Option<&'a str>) -> String {
    let show = |s| get(s).map_or("—".to_owned(), |v| format!("`{v}`"));
    format!("left {}, right {}", show(SideId::Left), show(SideId::Right))
}
