//! The entity maps page: every map with its state (progress, backlog,
//! pause age, catch-up estimate, reason), mapping version, related maps,
//! error count, and the actions its state allows.

use dualwrite_ctl::MapRow;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{Action, MapState};
use maud::{html, Markup};

use super::{allowed, command_button, head, Viewer};
use crate::snapshot::Snapshot;

/// The page: the live table.
pub fn maps(config: &Config, snap: &Snapshot, viewer: &Viewer) -> Markup {
    html! {
        @if let Some(e) = &snap.error {
            p role="alert" class="notice refused" { "The maps could not be read just now: " (e) }
        }
        div id="maps" data-live="/live" { (maps_table(config, snap, viewer)) }
    }
}

/// The table of maps (also what live updates replace).
pub fn maps_table(config: &Config, snap: &Snapshot, viewer: &Viewer) -> Markup {
    html! {
        table aria-busy=(!snap.read) {
            caption { "Entity maps and their state (updated live)" }
            (head(&["Entity map", "Status", "Mapping version", "Related maps", "Initial sync", "Errors", "Actions"]))
            tbody {
                @if !snap.read {
                    tr data-reading { td colspan="7" { "Reading the maps' state from Kafka…" } }
                }
                @for row in &snap.rows {
                    (map_row(config, snap, row, viewer))
                }
            }
        }
    }
}

fn map_row(config: &Config, snap: &Snapshot, row: &MapRow, viewer: &Viewer) -> Markup {
    let errors = snap.error_counts.get(&row.map).copied().unwrap_or(0);
    html! {
        tr data-map=(row.map) {
            th scope="row" {
                a href={ "/maps/" (row.map) "/initial-sync" } { (row.map) }
                @if let Some(m) = config.map(&row.map) {
                    div class="entities" { (m.left.entity) " ↔ " (m.right.entity) }
                }
                div class="entities" { a href={ "/maps/" (row.map) "/mapping" } { "Mapping" } }
            }
            td data-label="Status" data-state=(row.state) { (status(snap, row)) }
            td data-label="Mapping version" { (version(row)) }
            td data-label="Related maps" { (row.depends_on.join(", ")) }
            td data-label="Initial sync" { (row.initial_sync.as_deref().unwrap_or("")) }
            td data-label="Errors" data-errors=(errors) {
                @if errors > 0 { a href={ "/errors?map=" (row.map) } { (errors) } } @else { "0" }
            }
            td data-label="Actions" { (actions(config, snap, &row.map, viewer)) }
        }
    }
}

/// The state and what goes with it: backlog, pause age, catch-up estimate.
fn status(snap: &Snapshot, row: &MapRow) -> Markup {
    let status = snap.statuses.get(&row.map);
    let paused_for = status
        .filter(|s| s.state == MapState::Paused)
        .and_then(|s| s.paused_at)
        .map(|at| (dualwrite_runtime::now_micros() - at).max(0) / 1_000_000);
    html! {
        span class="state" { (row.state) }
        @if row.backlog > 0 { div data-backlog=(row.backlog) { (row.backlog) " queued" } }
        @if let Some(secs) = paused_for { div { "paused for " (duration(secs)) } }
        @if let Some(eta) = snap.eta_secs.get(&row.map) { div { "caught up in about " (duration(*eta as i64)) } }
        @if !row.master_configured {
            div data-master=(row.conflict_master) { "conflict master " (row.conflict_master) ", chosen at run" }
        }
        @if let Some(r) = &row.reason { div class="reason" { (r) } }
    }
}

fn version(row: &MapRow) -> Markup {
    let running = row.mapping_version.as_deref();
    html! {
        @if running.is_some_and(|v| v != row.configured_version) {
            (running.unwrap_or_default()) " → " (row.configured_version)
            div class="reason" { "edited: the map runs the new mapping once run again" }
        } @else {
            (running.unwrap_or(&row.configured_version))
        }
    }
}

fn duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

fn actions(config: &Config, snap: &Snapshot, map: &str, viewer: &Viewer) -> Markup {
    html! {
        div class="actions" {
            @for a in allowed(config, snap, map) {
                @if a == Action::Run {
                    a class="button" href={ "/maps/" (map) "/run" } {
                        @if snap.statuses.get(map).is_some_and(|s| s.state == MapState::Paused) { "Resume…" } @else { "Run…" }
                    }
                } @else {
                    (command_button(map, a, viewer))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use dualwrite_model::config::{Config, TEST_SIDES};

    use super::*;

    fn row(map: &str) -> MapRow {
        MapRow {
            map: map.into(),
            state: "Not running".into(),
            generation: 0,
            backlog: 0,
            depends_on: vec![],
            reason: None,
            last_command_id: None,
            initial_sync: None,
            mapping_version: None,
            configured_version: "v".into(),
            conflict_master: "dataverse".into(),
            master_configured: true,
        }
    }

    #[test]
    fn before_the_first_read_the_table_says_it_is_reading() {
        let config = Config::parse(TEST_SIDES).unwrap();
        let reader = Viewer::Reader { can_sign_in: true };
        let before = maps_table(&config, &Snapshot::default(), &reader).into_string();
        assert!(before.contains("data-reading") && before.contains(r#"aria-busy="true""#));
        let read = Snapshot {
            read: true,
            rows: vec![row("customers")],
            ..Snapshot::default()
        };
        let after = maps_table(&config, &read, &reader).into_string();
        assert!(!after.contains("data-reading") && after.contains(r#"data-map="customers""#));
    }

    #[test]
    fn a_master_chosen_at_run_is_shown_under_the_state() {
        let config = Config::parse(TEST_SIDES).unwrap();
        let reader = Viewer::Reader { can_sign_in: true };
        let mut chosen = row("customers");
        chosen.conflict_master = "fno".into();
        chosen.master_configured = false;
        let snap = Snapshot {
            read: true,
            rows: vec![chosen, row("contacts")],
            ..Snapshot::default()
        };
        let html = maps_table(&config, &snap, &reader).into_string();
        assert!(html.contains(r#"data-master="fno">conflict master fno, chosen at run"#));
        assert_eq!(html.matches("data-master").count(), 1, "{html}");
    }
}
