//! A pause's acknowledgement, sent once the pause is quiet.

use std::sync::Arc;

use dualwrite_initial_sync::Hold;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{ControlEvent, MapState, MapStatus};
use dualwrite_runtime::kafka;
use dualwrite_runtime::now_micros;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A pause's COMPLETED, sent once nothing of its map is in flight: the
/// gate holds the map by the paused status (it releases nothing more of
/// it) and the appliers wrote everything it released before. If the map
/// is run or stopped again first, the event says so instead. None on
/// shutdown (the pause stands; only its acknowledgement is not sent).
pub async fn quiet(
    config: Arc<Config>,
    mut ev: ControlEvent,
    since: i64,
    mut held: watch::Receiver<Hold>,
    mut status: watch::Receiver<MapStatus>,
    shutdown: CancellationToken,
) -> Option<ControlEvent> {
    let quiet = async {
        held.wait_for(|h| h.by >= since).await.ok()?;
        loop {
            match kafka::drain::appliers_drained(&config, &shutdown).await {
                Ok(done) => return done.then_some(()),
                Err(e) => tracing::warn!("waiting for the appliers to drain, retrying: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = status.wait_for(|s| s.updated_at > since && s.state != MapState::Paused) => {
            let state = r.ok()?.state;
            ev.message = format!("paused, then {state} before nothing of the map was in flight");
        }
        r = quiet => r?,
    }
    ev.at = now_micros();
    Some(ev)
}
