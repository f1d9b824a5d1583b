//! The operator console: the reference's pages in a browser, served by
//! the binary itself (`dualwrite console`, or `dualwrite run --console`).
//!
//! It is not a second control path: it reads the maps as `ctl maps` does
//! ([`snapshot`]) and sends the same commands, with ids, to
//! `<prefix>.control` ([`send`]), so the CLI, the console and any Kafka
//! producer stay interchangeable. Reading needs nothing; commands need the
//! operator token ([`auth`]). Pages are HTML rendered on the server
//! ([`pages`]); a small script adds live updates (server-sent events) and
//! drag-to-reorder in the run dialog.

pub mod auth;
pub mod catchup;
pub mod pages;
pub mod random;
pub mod send;
pub mod snapshot;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use dualwrite_model::config::Config;
use dualwrite_runtime::side::{schema_problems, CopySide, Inspect};
use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::pages::{DetailsQuery, ErrorsQuery, Notice, Viewer};
use crate::send::Form;
use crate::snapshot::Snapshot;

/// The environment variable holding the operator token.
pub const TOKEN_ENV: &str = "DUALWRITE_CONSOLE_TOKEN";

/// What every request sees.
struct Console {
    config: Arc<Config>,
    auth: Auth,
    maps: watch::Receiver<Arc<Snapshot>>,
}

type Shared = State<Arc<Console>>;

/// Serves the console on `listen` until `shutdown`; the address bound.
/// `token`: the operator token (`None`: read-only). The schema check reads
/// the sides' tables through `C`; the retry of a change too large to
/// capture touches its row through `I`.
pub async fn serve<C: CopySide, I: Inspect>(
    config: Arc<Config>,
    listen: SocketAddr,
    token: Option<String>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    if token.is_none() {
        tracing::warn!("console: no operator token ({TOKEN_ENV}): the console is read-only");
    }
    let console = Arc::new(Console {
        maps: snapshot::watch_maps(config.clone(), shutdown.clone()),
        auth: Auth::new(token.as_deref()),
        config,
    });
    let app = Router::new()
        .route("/", get(maps_page))
        .route("/live", get(live))
        .route("/maps/{map}/run", get(run_page))
        .route("/maps/{map}/initial-sync", get(details_page))
        .route("/maps/{map}/mapping", get(mapping_page::<C>))
        .route("/errors", get(errors_page))
        .route("/command", axum::routing::post(command))
        .route("/retry", axum::routing::post(retry::<I>))
        .route("/retry-catchup", axum::routing::post(retry_catchup))
        .route("/login", get(login_page).post(login))
        .route("/console.css", get(css))
        .route("/console.js", get(js))
        .with_state(console);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "console: serving on http://{bound}/");
    tokio::spawn(async move {
        let stop = shutdown.cancelled_owned();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("console stopped: {e}");
        }
    });
    Ok(bound)
}

fn page(title: &str, viewer: &Viewer, notice: Option<&Notice>, body: maud::Markup) -> Response {
    Html(pages::layout(title, viewer, notice, body).into_string()).into_response()
}

async fn maps_page(State(c): Shared, headers: HeaderMap) -> Response {
    let viewer = c.auth.viewer(&headers);
    let notice = c.auth.take_flash(&headers);
    let snap = c.maps.borrow().clone();
    let body = pages::maps(&c.config, &snap, &viewer);
    page("Entity maps", &viewer, notice.as_ref(), body)
}

/// The maps table again each time it changes (server-sent events).
async fn live(
    State(c): Shared,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let viewer = c.auth.viewer(&headers);
    let mut rx = c.maps.clone();
    rx.mark_changed();
    let stream = futures::stream::unfold((rx, c, viewer), |(mut rx, c, viewer)| async move {
        rx.changed().await.ok()?;
        let snap = rx.borrow_and_update().clone();
        let html = pages::maps_table(&c.config, &snap, &viewer).into_string();
        Some((
            Ok(Event::default().event("maps").data(html)),
            (rx, c, viewer),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn run_page(State(c): Shared, headers: HeaderMap, Path(map): Path<String>) -> Response {
    let viewer = c.auth.viewer(&headers);
    let Some(m) = c.config.map(&map) else {
        return (StatusCode::NOT_FOUND, format!("no map named `{map}`")).into_response();
    };
    let snap = c.maps.borrow().clone();
    let title = format!("Run {map}");
    page(
        &title,
        &viewer,
        None,
        pages::run_dialog(&c.config, &snap, m, &viewer),
    )
}

/// A command form: checked, sent, and the maps page with its outcome.
async fn command(State(c): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let sender = match c.auth.may_command(&headers, form.get("csrf")) {
        Ok(sender) => sender,
        Err(why) => return (StatusCode::FORBIDDEN, why).into_response(),
    };
    let snap = c.maps.borrow().clone();
    let notice = match send::command_of(&form, sender) {
        Ok(cmd) => send::send(&c.config, &snap, cmd).await,
        Err(why) => Notice {
            ok: false,
            text: why,
        },
    };
    // Post, redirect, get: reloading the page does not send it again.
    c.auth.set_flash(&headers, notice);
    Redirect::to("/").into_response()
}

async fn details_page(
    State(c): Shared,
    headers: HeaderMap,
    Path(map): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let viewer = c.auth.viewer(&headers);
    let query = DetailsQuery::parse(query.as_deref().unwrap_or_default());
    let (cfg, m, run) = (c.config.clone(), map.clone(), query.run);
    let read =
        tokio::task::spawn_blocking(move || dualwrite_ctl::initial_sync_details(&cfg, &m, run))
            .await;
    let d = match read {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return (StatusCode::NOT_FOUND, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let snap = c.maps.borrow().clone();
    let actions = pages::allowed(&c.config, &snap, &map);
    let latest = snap
        .statuses
        .get(&map)
        .and_then(|s| s.initial.as_ref())
        .map(|i| i.run);
    let title = format!("{map}: initial sync details");
    page(
        &title,
        &viewer,
        None,
        pages::details(&d, &query, &actions, latest, &viewer),
    )
}

async fn mapping_page<C: CopySide>(
    State(c): Shared,
    headers: HeaderMap,
    Path(map): Path<String>,
) -> Response {
    let viewer = c.auth.viewer(&headers);
    let Some(m) = c.config.map(&map) else {
        return (StatusCode::NOT_FOUND, format!("no map named `{map}`")).into_response();
    };
    let check = schema_problems::<C>(&c.config, m)
        .await
        .map_err(|e| e.message);
    let title = format!("{map}: mapping");
    page(&title, &viewer, None, pages::mapping(&c.config, m, &check))
}

async fn errors_page(State(c): Shared, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let query = ErrorsQuery::parse(query.as_deref().unwrap_or_default());
    let notice = c.auth.take_flash(&headers);
    errors_with(&c, &headers, &query, notice.as_ref()).await
}

/// The errors page, with a command's outcome.
async fn errors_with(
    c: &Console,
    headers: &HeaderMap,
    query: &ErrorsQuery,
    notice: Option<&Notice>,
) -> Response {
    let viewer = c.auth.viewer(headers);
    let cfg = c.config.clone();
    let set_aside = tokio::task::spawn_blocking(move || catchup::read(&cfg))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let snap = c.maps.borrow().clone();
    let body = pages::errors(&snap, &set_aside, query, &viewer);
    page("Errors", &viewer, notice, body)
}

/// Sends the selected set-aside changes back, as `ctl retry-catchup` does.
async fn retry_catchup(State(c): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Err(why) = c.auth.may_command(&headers, form.get("csrf")) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let notice = match catchup::retry(&c.config, form.all("catchup")).await {
        Ok(text) => Notice { ok: true, text },
        Err(text) => Notice { ok: false, text },
    };
    c.auth.set_flash(&headers, notice);
    Redirect::to("/errors").into_response()
}

/// Retries the selected error records, as `ctl retry-errors --at` does.
async fn retry<I: Inspect>(State(c): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Err(why) = c.auth.may_command(&headers, form.get("csrf")) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let notice = match send::retry::<I>(&c.config, form.all("at")).await {
        Ok(text) => Notice { ok: true, text },
        Err(text) => Notice { ok: false, text },
    };
    c.auth.set_flash(&headers, notice);
    Redirect::to("/errors").into_response()
}

async fn login_page(State(c): Shared, headers: HeaderMap) -> Response {
    let viewer = c.auth.viewer(&headers);
    page("Sign in", &viewer, None, pages::login(false))
}

async fn login(State(c): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let (token, name) = (form.get("token"), form.get("name"));
    match c
        .auth
        .sign_in(token.unwrap_or_default(), name.unwrap_or_default())
    {
        Some(cookie) => ([(SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        None => {
            let viewer = c.auth.viewer(&headers);
            let body = page("Sign in", &viewer, None, pages::login(true));
            (StatusCode::UNAUTHORIZED, body).into_response()
        }
    }
}

async fn css() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/css")], include_str!("console.css"))
}

async fn js() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/javascript")],
        include_str!("console.js"),
    )
}
