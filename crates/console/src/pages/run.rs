//! The run dialog.

use dualwrite_model::config::{Config, MapConfig};
use dualwrite_model::lifecycle::{dependencies, MapState, ResumePolicy};
use maud::{html, Markup};

use super::Viewer;
use crate::snapshot::Snapshot;

/// The run dialog: the related maps (to include or not, in an order), the
/// conflict master, the initial sync, and the resume policy of a paused map.
pub fn run_dialog(config: &Config, snap: &Snapshot, map: &MapConfig, viewer: &Viewer) -> Markup {
    let mut order = dependencies(config, &map.name);
    order.push(map.name.clone());
    let master = config.side(config.conflict_master(map)).name.clone();
    let paused = snap
        .statuses
        .get(&map.name)
        .is_some_and(|s| s.state == MapState::Paused);
    html! {
        form method="post" action="/command" class="dialog" aria-labelledby="title" {
            input type="hidden" name="map" value=(map.name);
            input type="hidden" name="action" value="Run";
            @if let Some(csrf) = viewer.csrf() {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="id" value=(crate::random::id());
            }
            (related(&map.name, &order))
            p {
                label for="conflict_master" { "Conflict master " }
                select id="conflict_master" name="conflict_master" {
                    @for side in [&config.sides.left.name, &config.sides.right.name] {
                        option value=(side) selected[*side == master] { (side) }
                    }
                }
            }
            p {
                input type="checkbox" id="initial_sync" name="initial_sync" value="on" checked[map.initial_sync];
                label for="initial_sync" { " Initial Sync (copy the rows each side already has)" }
            }
            @if paused {
                p {
                    label for="resume_policy" { "Resume policy " }
                    select id="resume_policy" name="resume_policy" {
                        @for p in ResumePolicy::ALL { option value=(p.as_str()) { (p.as_str()) } }
                    }
                }
            }
            @if viewer.csrf().is_some() {
                button type="submit" { "Run" }
            } @else {
                p { a href="/login" { "Sign in" } " to run the map." }
            }
            " " a href="/" { "Cancel" }
        }
    }
}

/// The related maps, each with a checkbox and moves up and down (the
/// script adds dragging); the form sends them in the list's order.
fn related(map: &str, order: &[String]) -> Markup {
    html! {
        fieldset {
            legend { "Entity maps to run, in order (related maps first: Show related entity map(s))" }
            ol id="order" {
                @for (i, m) in order.iter().enumerate() {
                    li draggable="true" data-map=(m) {
                        input type="checkbox" id={ "include-" (i) } name="include" value=(m) checked disabled[m == map];
                        label for={ "include-" (i) } { " " (m) }
                        input type="hidden" name="order" value=(m);
                        @if m == map { input type="hidden" name="include" value=(m); }
                        " "
                        button type="button" class="up" aria-label={ "Move " (m) " up" } { "↑" }
                        button type="button" class="down" aria-label={ "Move " (m) " down" } { "↓" }
                    }
                }
            }
        }
    }
}
