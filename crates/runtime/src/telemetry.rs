//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (else the
//! caller's default level), as JSON when `DUALWRITE_LOG_FORMAT=json`.

use tracing_subscriber::EnvFilter;

/// `default`: the filter when `RUST_LOG` is not set (e.g. `info`).
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("DUALWRITE_LOG_FORMAT").is_ok_and(|v| v == "json");
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
