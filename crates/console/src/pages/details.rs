//! A map's initial sync details: a run's progress and counts, every row
//! it could not write (filtered by a search), and Rerun / Skip.

use dualwrite_ctl::InitialSyncDetails;
use dualwrite_model::lifecycle::Action;
use dualwrite_model::record::InitialSyncError;
use maud::{html, Markup};

use super::{command_button, head, map_tabs, when, Viewer};
use crate::send::Form;

/// Which run, and what to search the failed rows for.
#[derive(Debug, Default)]
pub struct DetailsQuery {
    pub run: Option<i64>,
    pub q: String,
}

impl DetailsQuery {
    pub fn parse(query: &str) -> DetailsQuery {
        let form = Form::parse(query.as_bytes());
        DetailsQuery {
            run: form.get("run").and_then(|r| r.parse().ok()),
            q: form.get("q").unwrap_or_default().trim().to_owned(),
        }
    }
}

fn matches(e: &InitialSyncError, q: &str) -> bool {
    let q = q.to_lowercase();
    [
        &e.target_side,
        &e.target_entity,
        &e.key,
        &e.operation,
        &e.message,
        e.sqlstate.as_deref().unwrap_or_default(),
    ]
    .iter()
    .any(|f| f.to_lowercase().contains(&q))
}

/// The page; `actions`: what the map's state allows.
pub fn details(
    d: &InitialSyncDetails,
    query: &DetailsQuery,
    actions: &[Action],
    latest_run: Option<i64>,
    viewer: &Viewer,
) -> Markup {
    let shown: Vec<&InitialSyncError> = d
        .failed_rows
        .iter()
        .filter(|e| query.q.is_empty() || matches(e, &query.q))
        .collect();
    html! {
        (map_tabs(&d.map, "initial-sync"))
        p { "State: " strong data-state=(d.state) { (d.state) } }
        div class="actions" {
            @for a in actions.iter().filter(|a| matches!(a, Action::RerunInitialSync | Action::SkipInitialSync)) {
                (command_button(&d.map, *a, viewer))
            }
        }
        @match &d.progress {
            Some(p) => {
                dl class="counts" {
                    dt { "Run" } dd data-run=(p.run) { (p.run) }
                    dt { "Phase" } dd data-phase=(p.phase.to_string()) { (p.phase.to_string()) }
                    dt { "Rows read" } dd { (p.rows_done) " of " (p.rows_total) }
                    dt { "Created" } dd { (p.created) }
                    dt { "Updated" } dd { (p.updated) }
                    dt { "Unchanged" } dd { (p.unchanged) }
                    dt { "Failed" } dd data-failed=(p.failed) { (p.failed) }
                    dt { "Started" } dd { (when(p.started_at)) }
                    @if let Some(f) = p.finished_at { dt { "Finished" } dd { (when(f)) } }
                }
            }
            None => p { "No initial sync recorded for this run." }
        }
        (search(&d.map, query, latest_run))
        h2 { "Rows not written (" (shown.len()) " of " (d.failed_rows.len()) ")" }
        (failed_rows(&shown))
    }
}

fn search(map: &str, query: &DetailsQuery, latest_run: Option<i64>) -> Markup {
    html! {
        form method="get" action={ "/maps/" (map) "/initial-sync" } class="search" {
            @if let Some(latest) = latest_run {
                label for="run" { "Run " }
                select id="run" name="run" {
                    @for r in (1..=latest).rev() {
                        option value=(r) selected[query.run.unwrap_or(latest) == r] { (r) }
                    }
                }
                " "
            }
            label for="q" { "Search " }
            input type="search" id="q" name="q" value=(query.q) placeholder="key, table, SQLSTATE, message";
            " "
            button type="submit" { "Show" }
        }
    }
}

fn failed_rows(rows: &[&InitialSyncError]) -> Markup {
    html! {
        table id="failed" {
            (head(&["Target side", "Table", "Key", "Operation", "SQLSTATE", "Message", "When"]))
            tbody {
                @for e in rows {
                    tr data-key=(e.key) {
                        td { (e.target_side) }
                        td { (e.target_entity) }
                        td { code { (e.key) } }
                        td { (e.operation) }
                        td { (e.sqlstate.as_deref().unwrap_or("")) }
                        td { (e.message) }
                        td { (when(e.occurred_at)) }
                    }
                }
            }
        }
    }
}
