//! Logging. Log lines carry method, caller identity, token and outcome code,
//! never request or response bodies, so no card number, key or plaintext can
//! reach them: the vault never formats a `Pan`'s digits or key bytes, and
//! their `Debug` output is redacted.

use tracing_subscriber::EnvFilter;

/// Logs to standard error; the level comes from `VAULT_LOG` (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_env("VAULT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
