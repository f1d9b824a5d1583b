//! The errors page: the error records by map and class (newest first),
//! each selectable for a retry (`ctl retry-errors --at`), and the changes a
//! skip-to-live resume set aside, each selectable to be sent back
//! (`ctl retry-catchup`).

use maud::{html, Markup};

use super::{head, when, Viewer};
use crate::catchup::SetAside;
use crate::send::Form;
use crate::snapshot::{Located, Snapshot};

/// Which records to list.
#[derive(Debug, Default)]
pub struct ErrorsQuery {
    pub map: String,
    pub class: String,
}

impl ErrorsQuery {
    pub fn parse(query: &str) -> ErrorsQuery {
        let form = Form::parse(query.as_bytes());
        ErrorsQuery {
            map: form.get("map").unwrap_or_default().to_owned(),
            class: form.get("class").unwrap_or_default().to_owned(),
        }
    }

    fn keeps(&self, e: &Located) -> bool {
        (self.map.is_empty() || e.error.map.as_deref() == Some(self.map.as_str()))
            && (self.class.is_empty() || e.error.error_class == self.class)
    }
}

/// The page; `set_aside`: the catch-up errors, or why they could not be read.
pub fn errors(
    snap: &Snapshot,
    set_aside: &Result<Vec<SetAside>, String>,
    query: &ErrorsQuery,
    viewer: &Viewer,
) -> Markup {
    let shown: Vec<&Located> = snap
        .errors
        .iter()
        .rev()
        .filter(|e| query.keeps(e))
        .collect();
    let mut classes: Vec<&str> = snap
        .errors
        .iter()
        .map(|e| e.error.error_class.as_str())
        .collect();
    classes.sort_unstable();
    classes.dedup();
    html! {
        form method="get" action="/errors" class="search" {
            label for="map" { "Map " }
            select id="map" name="map" {
                option value="" { "every map" }
                @for m in snap.error_counts.keys().filter(|m| !m.is_empty()) {
                    option value=(m) selected[*m == query.map] { (m) " (" (snap.error_counts[m]) ")" }
                }
            }
            " " label for="class" { "Class " }
            select id="class" name="class" {
                option value="" { "every class" }
                @for c in &classes { option value=(c) selected[*c == query.class] { (c) } }
            }
            " " button type="submit" { "Show" }
        }
        p { (shown.len()) " record(s) shown, newest first (the latest " (snap.errors.len()) " read)." }
        form method="post" action="/retry" {
            @if let Some(csrf) = viewer.csrf() { input type="hidden" name="csrf" value=(csrf); }
            table id="errors" {
                (head(&["Retry", "When", "Map", "Class", "Service", "Key", "Message"]))
                tbody { @for e in &shown { (row(e)) } }
            }
            @if viewer.csrf().is_some() && !shown.is_empty() {
                p { button type="submit" { "Retry the selected records" } }
            }
        }
        h2 { "Changes a skip-to-live resume set aside" }
        @match set_aside {
            Ok(changes) => (catchup(changes, query, viewer)),
            Err(e) => p role="alert" class="notice refused" { "The catch-up errors could not be read: " (e) },
        }
    }
}

fn catchup(changes: &[SetAside], query: &ErrorsQuery, viewer: &Viewer) -> Markup {
    let shown: Vec<&SetAside> = changes
        .iter()
        .rev()
        .filter(|c| query.map.is_empty() || c.map == query.map)
        .collect();
    html! {
        form method="post" action="/retry-catchup" {
            @if let Some(csrf) = viewer.csrf() { input type="hidden" name="csrf" value=(csrf); }
            table id="catchup" {
                (head(&["Send back", "Committed", "Map", "From side", "Operation", "Key"]))
                tbody {
                    @for (i, c) in shown.iter().enumerate() {
                        tr {
                            td {
                                input type="checkbox" id={ "catchup-" (i) } name="catchup" value=(c.selector());
                                label for={ "catchup-" (i) } class="visually-hidden" { "Send back " (c.key) }
                            }
                            td { (when(c.commit_time)) }
                            td { (c.map) }
                            td { (c.source_side) }
                            td { (c.op) }
                            td { code { (c.key) } }
                        }
                    }
                }
            }
            @if viewer.csrf().is_some() && !shown.is_empty() {
                p { button type="submit" { "Send the selected changes back" } }
            }
        }
    }
}

fn row(e: &Located) -> Markup {
    let r = &e.error;
    let id = format!("retry-{}", e.at.replace(':', "-"));
    html! {
        tr data-at=(e.at) {
            td { input type="checkbox" id=(id) name="at" value=(e.at); label for=(id) class="visually-hidden" { "Retry the record at " (e.at) } }
            td { (when(r.occurred_at)) }
            td { (r.map.as_deref().unwrap_or("")) }
            td { (r.error_class) }
            td { (r.service) }
            td { code { (r.key.as_deref().unwrap_or("")) } }
            td { (dualwrite_model::transform::redact_values(&r.message)) }
        }
    }
}
