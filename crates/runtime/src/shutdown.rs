//! Shutdown: SIGINT or SIGTERM cancel one token that every task watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled when the process receives SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot listen for SIGTERM: {e}");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
        exit_after(GRACE);
    });
    token
}

/// How long a stop may take before the process exits anyway.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Exits the process `grace` from now, should it still run then. A stop
/// waits for the broker (deliveries, commits, a consumer's leaving) and the
/// databases; one that does not answer would hold the process until
/// something killed it (the pause buffer waited more than 40 s with the
/// broker down). Exiting then is safe as a `kill -9` is: each service
/// confirms what it read only after what it made of it was acknowledged,
/// so what was not is read again at the next start.
fn exit_after(grace: std::time::Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        tracing::error!(
            "did not stop within {} s of the signal (the broker or a database does not answer); exiting now: what was not acknowledged is read again at the next start",
            grace.as_secs()
        );
        std::process::exit(1);
    });
}
