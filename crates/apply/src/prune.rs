//! Forgetting the bookkeeping of deleted records.
//!
//! The target's bookkeeping keeps, per map and record, the applier's last
//! write. A live record's row is needed for as long as the record exists;
//! a deleted record's row would stay forever, one per record ever deleted.
//! Rows of records the applier deleted longer than
//! `apply.bookkeeping_retention_secs` ago are removed.
//!
//! Why that is safe: the bookkeeping serves two checks. A write that
//! expects the applier's own last write finds no row and is reported
//! superseded; the resolver then sends the record's content again, written
//! whatever the target holds (one more round trip, never a wrong write). A
//! redelivered write is recognised by its version only while the row
//! exists; redeliveries come from an applier's committed offsets, seconds
//! behind, never days, so the retention (7 days by default) keeps every
//! row a redelivery can meet.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::config::{Config, SideId};
use dualwrite_runtime::side::Target;
use tokio_util::sync::CancellationToken;

/// Prunes `side`'s bookkeeping every quarter of the retention (at most
/// hourly) until `shutdown`; a failure is logged and tried at the next turn.
pub async fn run<T: Target>(config: Arc<Config>, side: SideId, shutdown: CancellationToken) {
    let retention = config.apply.bookkeeping_retention_secs;
    if retention == 0 {
        return;
    }
    let every = Duration::from_secs((retention / 4).clamp(1, 3600));
    let name = config.side(side).name.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match T::prune(&config, side, retention).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(side = %name, rows = n, "forgot the bookkeeping of records deleted more than {retention} s ago")
            }
            Err(e) => {
                tracing::warn!(side = %name, "pruning the bookkeeping failed (tried again later): {e}")
            }
        }
    }
}
