//! What the pause buffer's loop holds of each map's gate.

use std::sync::Arc;

use dualwrite_initial_sync::Hold;
use dualwrite_model::lifecycle::MapStatus;
use tokio::sync::watch;

/// What the loop holds of a map's gate.
pub struct MapLinks {
    /// The map's status, as the gate and the drift check see it.
    pub status: watch::Sender<MapStatus>,
    /// Whether a map it depends on is catching up.
    pub parents: watch::Sender<bool>,
    /// Whether, and where, the gate holds the map.
    pub held: watch::Receiver<Hold>,
    /// The map's initial writes still running (the gate waits for none).
    pub copies: Arc<watch::Sender<u32>>,
}
