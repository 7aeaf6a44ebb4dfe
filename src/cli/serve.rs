//! `vault dev` and `vault serve`.

use std::net::SocketAddr;
use std::path::Path;

use tokenvault::config::{Config, ProcessEnv};
use tokenvault::devpki::{DEV_CLIENTS, ensure_dev_dir};
use tokenvault::hardening::{lock_memory, raise_open_files};
use tokenvault::server::{
    StartError, open_configured, serve as serve_vault, shutdown_signal_then_force,
};

/// Variables that would make `vault dev` use a key other than its own
/// development KEK, or a database outside its data directory. A production
/// KEK must never serve a development database, nor the development KEK a
/// database at a production path (PCI DSS 3.6.1.1: production and test use
/// different keys), so `vault dev` refuses to start while one is set,
/// before it creates anything.
const NOT_FOR_DEV: [&str; 3] = ["VAULT_KEK", "VAULT_KEK_FILE", "VAULT_DB"];

pub async fn dev(data_dir: &Path, listen: SocketAddr) -> Result<(), String> {
    let set: Vec<&str> = NOT_FOR_DEV
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    if !set.is_empty() {
        return Err(format!(
            "vault dev uses its own development KEK and database and refuses to start while {} \
             is set: a production KEK or database must never meet development keys; unset it, \
             or use `vault serve --config` for a real deployment",
            set.join(" and ")
        ));
    }
    let layout = ensure_dev_dir(data_dir, listen).map_err(|e| e.to_string())?;
    let mut cfg = Config::load(&layout.config(), &ProcessEnv).map_err(|e| e.to_string())?;
    cfg.listen = listen;
    let dir = data_dir.to_owned();
    run_server(cfg, move |addr| print_dev_help(&dir, addr))
        .await
        .map_err(|e| e.to_string())
}

pub async fn serve(config: &Path) -> Result<(), String> {
    let cfg = Config::load(config, &ProcessEnv).map_err(|e| e.to_string())?;
    run_server(cfg, |_| {}).await.map_err(|e| e.to_string())
}

/// Opens the vault, binds, announces the bound address on standard output
/// (`listening on ADDR`, one line, for scripts and tests using port 0), and
/// serves until SIGTERM or SIGINT.
async fn run_server(cfg: Config, announce: impl FnOnce(SocketAddr)) -> Result<(), StartError> {
    // Before any key is loaded (core dumps are already off, `main`).
    if cfg.server.lock_memory {
        lock_memory()?;
    }
    tracing::info!(
        memory_locked = cfg.server.lock_memory,
        "process hardened: core dumps off, not dumpable"
    );
    if !cfg.env_overrides.is_empty() {
        tracing::warn!(
            variables = ?cfg.env_overrides,
            "configuration file settings overridden from the environment"
        );
    }
    // Every connection is a descriptor; the store, its readers and logs
    // need some more.
    let wanted = u64::try_from(cfg.limits.max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(u64::try_from(cfg.limits.max_handshakes).unwrap_or(u64::MAX))
        .saturating_add(256);
    match raise_open_files(wanted) {
        Ok(open_files) if open_files < wanted => tracing::warn!(
            open_files,
            max_connections = cfg.limits.max_connections,
            "the open-files limit is below limits.max_connections plus max_handshakes \
             plus 256: near the limit, accepts fail (EMFILE) and are retried; raise \
             LimitNOFILE or lower those limits"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    if cfg.server.reflection {
        tracing::warn!("gRPC server reflection is on: turn it off in production");
    }
    // Bound before the store is opened: from the open on, every way out
    // goes through `serve`, which closes the store.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| StartError::Serve(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Serve(e.to_string()))?;
    // Handlers first: a signal while the keys load (a slow HSM, say) is
    // then a graceful stop as soon as serving begins, not a kill.
    let shutdown = shutdown_signal_then_force();
    let vault = open_configured(&cfg, &ProcessEnv).await?;
    if vault.is_sealed() {
        tracing::warn!("vault is sealed: custodians must submit their shares (vault unseal)");
    }
    tracing::info!(%addr, "vault serving (mutual TLS)");
    announce(addr);
    println!("listening on {addr}");
    serve_vault(listener, &cfg, vault, shutdown).await
}

fn print_dev_help(data_dir: &Path, listen: SocketAddr) {
    let d = data_dir.display();
    let names: Vec<&str> = DEV_CLIENTS.iter().map(|c| c.name).collect();
    println!(
        "tokenvault development setup in {d}\n\
         \x20 serving {listen} with mutual TLS; client certificates: {}\n\
         \x20 tokenize (card number on stdin):\n\
         \x20   vault client --data-dir {d} --server https://{listen} --as acme-checkout tokenize\n\
         \x20 detokenize:\n\
         \x20   vault client --data-dir {d} --server https://{listen} --as acme-payments detokenize TOKEN --purpose \"charge order 42\"\n\
         \x20 key status:\n\
         \x20   vault keys status --data-dir {d} --server https://{listen}\n\
         \x20 (with cargo: cargo run --release -- client ...)",
        names.join(", ")
    );
}
