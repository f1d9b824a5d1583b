//! The console's pages, as HTML rendered on the server (maud: checked at
//! compile time, every value escaped). The pages work without script; a
//! small script (`console.js`) adds live updates and drag-to-reorder.

mod details;
mod errors;
mod mapping;
mod maps;
mod run;

use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{Action, ControlCommand};
use dualwrite_model::plan::plan;
use maud::{html, Markup, DOCTYPE};

pub use details::{details, DetailsQuery};
pub use errors::{errors, ErrorsQuery};
pub use mapping::mapping;
pub use maps::{maps, maps_table};
pub use run::run_dialog;

use crate::snapshot::Snapshot;

/// Who is looking: an operator signed in (with the form token that
/// commands must carry), or a reader.
pub enum Viewer {
    Reader { can_sign_in: bool },
    Operator { csrf: String, name: String },
}

impl Viewer {
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Viewer::Operator { csrf, .. } => Some(csrf),
            Viewer::Reader { .. } => None,
        }
    }
}

/// A message shown above a page's content: a command's outcome.
#[derive(Debug, Clone)]
pub struct Notice {
    pub ok: bool,
    pub text: String,
}

/// The frame of every page.
pub fn layout(title: &str, viewer: &Viewer, notice: Option<&Notice>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · dualwrite" }
                link rel="stylesheet" href="/console.css";
                script src="/console.js" defer {}
            }
            body {
                header {
                    a href="/" class="brand" { "dualwrite" }
                    nav aria-label="Pages" {
                        a href="/" { "Entity maps" }
                        " "
                        a href="/errors" { "Errors" }
                    }
                    (session(viewer))
                }
                main id="main" {
                    h1 id="title" { (title) }
                    @if let Some(n) = notice {
                        p role="status" class=(if n.ok { "notice ok" } else { "notice refused" }) id="notice" { (n.text) }
                    }
                    (body)
                }
            }
        }
    }
}

fn session(viewer: &Viewer) -> Markup {
    html! {
        @match viewer {
            Viewer::Operator { name, .. } => span class="who" { "Signed in as operator " (name) },
            Viewer::Reader { can_sign_in: true } => a href="/login" class="who" { "Sign in to send commands" },
            Viewer::Reader { can_sign_in: false } => span class="who" { "Read-only (no operator token configured)" },
        }
    }
}

/// The actions the map's state allows (as the controller would decide).
pub fn allowed(config: &Config, snap: &Snapshot, map: &str) -> Vec<Action> {
    Action::ALL
        .into_iter()
        .filter(|a| plan(config, &snap.statuses, &ControlCommand::new(*a, map)).is_ok())
        .collect()
}

/// A button sending `action` on `map` (a reader sees its name only).
pub fn command_button(map: &str, action: Action, viewer: &Viewer) -> Markup {
    html! {
        @if let Some(csrf) = viewer.csrf() {
            form method="post" action="/command" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="id" value=(crate::random::id());
                input type="hidden" name="map" value=(map);
                input type="hidden" name="action" value=(action.to_string());
                button type="submit" { (action_label(action)) }
            }
        } @else {
            span class="muted" { (action_label(action)) }
        }
    }
}

pub fn action_label(a: Action) -> &'static str {
    match a {
        Action::Run => "Run",
        Action::Pause => "Pause",
        Action::Stop => "Stop",
        Action::SkipInitialSync => "Skip initial sync",
        Action::RerunInitialSync => "Rerun initial sync",
    }
}

/// A table's header row.
pub fn head(cols: &[&str]) -> Markup {
    html! { thead { tr { @for c in cols { th scope="col" { (c) } } } } }
}

/// The tabs of a map's pages.
pub fn map_tabs(map: &str, current: &str) -> Markup {
    let tabs = [
        ("initial-sync", "Initial sync details"),
        ("mapping", "Mapping"),
    ];
    html! {
        nav aria-label="Map pages" class="tabs" {
            @for (path, name) in tabs {
                @if path == current {
                    a href={ "/maps/" (map) "/" (path) } aria-current="page" { (name) }
                } @else {
                    a href={ "/maps/" (map) "/" (path) } { (name) }
                }
            }
        }
    }
}

/// Microseconds since the epoch as UTC text.
pub fn when(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// The sign-in page.
pub fn login(failed: bool) -> Markup {
    html! {
        @if failed { p role="alert" class="notice refused" { "That token is not the operator token." } }
        form method="post" action="/login" {
            p {
                label for="name" { "Your name (recorded with your commands) " }
                input type="text" id="name" name="name" autocomplete="name" required;
            }
            p {
                label for="token" { "Operator token " }
                input type="password" id="token" name="token" autocomplete="current-password" required;
            }
            button type="submit" { "Sign in" }
        }
    }
}
