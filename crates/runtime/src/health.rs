//! Health of a process: `/healthz` (alive: the runtime ticks), `/readyz`
//! (ready: every component reported ready: connected, state loaded,
//! partitions assigned) and `/metrics`, on one HTTP listener.
//!
//! A broker or database outage makes a component not ready; it never stops
//! the process (services retry with backoff).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;

/// Readiness of the process's components.
pub struct Health {
    components: Mutex<BTreeMap<String, bool>>,
    last_tick: AtomicI64,
}

/// The process's health.
pub fn health() -> &'static Health {
    static H: OnceLock<Health> = OnceLock::new();
    H.get_or_init(|| Health {
        components: Mutex::new(BTreeMap::new()),
        last_tick: AtomicI64::new(crate::now_micros()),
    })
}

impl Health {
    /// Records whether a component (e.g. `apply.fno:database`) is ready.
    pub fn set(&self, component: &str, ready: bool) {
        {
            let c = self.components.lock().unwrap_or_else(|e| e.into_inner());
            if c.get(component) == Some(&ready) {
                return;
            }
        }
        let service = component.split(':').next().unwrap_or(component).to_owned();
        let mut c = self.components.lock().unwrap_or_else(|e| e.into_inner());
        c.insert(component.to_owned(), ready);
        let all = c
            .iter()
            .filter(|(k, _)| k.split(':').next() == Some(service.as_str()))
            .all(|(_, v)| *v);
        metrics()
            .ready
            .with_label_values(&[&service])
            .set(i64::from(all));
    }

    /// Components not ready, or None when all are (and there is at least one).
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let c = self.components.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_empty() {
            return Some(vec!["starting".to_owned()]);
        }
        let down: Vec<String> = c
            .iter()
            .filter(|(_, v)| !**v)
            .map(|(k, _)| k.clone())
            .collect();
        (!down.is_empty()).then_some(down)
    }

    fn alive(&self) -> bool {
        crate::now_micros() - self.last_tick.load(Ordering::Relaxed) < 30_000_000
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until shutdown;
/// returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(|| async { metrics().render() }))
        .route(
            "/healthz",
            get(|| async {
                if health().alive() {
                    (StatusCode::OK, "alive\n".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the runtime stopped ticking\n".to_owned(),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(|| async {
                match health().not_ready() {
                    None => (StatusCode::OK, "ready\n".to_owned()),
                    Some(down) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", down.join(", ")),
                    ),
                }
            }),
        );
    // The liveness tick: stops when the runtime is stuck.
    let t = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                _ = tick.tick() => health().last_tick.store(crate::now_micros(), Ordering::Relaxed),
            }
        }
    });
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    tracing::info!("metrics on http://{bound}/metrics, health on /healthz and /readyz");
    Ok(bound)
}
