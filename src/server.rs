//! Process assembly: load the KEK and open the store and vault from config,
//! then serve gRPC over mutual TLS with health, optional reflection, message
//! limits and deadlines, and drain gracefully on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::config::ProcessEnv;
use crate::config::{Config, Env, KekSource};
use crate::crypto::hsm::{HsmKek, HsmSettings};
use crate::crypto::kek::{Kek, KeyBytes, LocalKek, check_private};
use crate::crypto::shamir::{split, write_share_files};
use crate::domain::auditing::CheckpointPolicy;
use crate::domain::{Vault, VaultSettings};
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::proto::token_service_server::TokenServiceServer;
use crate::storage::{SqliteOptions, SqliteStore};
use crate::transport::audit::AuditServiceImpl;
use crate::transport::auth::Authenticator;
use crate::transport::grpc::TokenServiceImpl;
use crate::transport::keys::KeyServiceImpl;
use crate::transport::listener::{Bounds, Incoming};

/// Encoded descriptors of `vault.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vault_descriptor.bin"));

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("KEK: {0}")]
    Kek(String),
    #[error("{0}")]
    Open(#[from] crate::domain::vault::OpenError),
    #[error("storage: {0}")]
    Store(#[from] crate::domain::StoreError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server: {0}")]
    Serve(String),
    #[error("process hardening: {0}")]
    Hardening(#[from] crate::hardening::HardeningError),
}

/// Loads the KEK from the configured source. For `file`: `VAULT_KEK`
/// (base64) if set, else the key file. For `hsm`: the key object in the
/// token, logging in with the PIN from the environment.
pub fn load_kek(cfg: &Config, env: &dyn Env) -> Result<Arc<dyn Kek>, StartError> {
    match cfg.kek.source {
        KekSource::File => {}
        KekSource::Hsm => {
            let settings = hsm_settings(cfg, env)?;
            let kek = HsmKek::open(&settings).map_err(|e| StartError::Kek(format!("HSM: {e}")))?;
            return Ok(Arc::new(kek));
        }
        KekSource::Shamir => {
            return Err(StartError::Kek(
                "a split-knowledge KEK is never loaded at start: the vault starts sealed".into(),
            ));
        }
    }
    if let Some(text) = env.get("VAULT_KEK").map(Zeroizing::new) {
        let kek =
            LocalKek::from_base64(&text).map_err(|e| StartError::Kek(format!("VAULT_KEK: {e}")))?;
        if cfg.kek.file.is_some() {
            tracing::warn!(
                kek = %kek.id(),
                "KEK taken from VAULT_KEK in the environment, not the configured kek.file"
            );
        }
        return Ok(Arc::new(kek));
    }
    let Some(path) = &cfg.kek.file else {
        return Err(StartError::Kek(
            "no KEK configured: set kek.file or VAULT_KEK".into(),
        ));
    };
    Ok(Arc::new(
        LocalKek::from_file(path).map_err(|e| StartError::Kek(e.to_string()))?,
    ))
}

/// The HSM settings of `cfg`, with the PIN from the environment.
pub fn hsm_settings(cfg: &Config, env: &dyn Env) -> Result<HsmSettings, StartError> {
    let Some(h) = &cfg.kek.hsm else {
        return Err(StartError::Kek("kek.hsm is not configured".into()));
    };
    let pin = env.get(&h.pin_env).map(Zeroizing::new).ok_or_else(|| {
        StartError::Kek(format!(
            "HSM PIN: environment variable {} is not set",
            h.pin_env
        ))
    })?;
    Ok(HsmSettings {
        module: h.module.clone(),
        token_label: h.token_label.clone(),
        key_label: h.key_label.clone(),
        pin,
    })
}

/// The core's settings from configuration.
pub fn vault_settings(cfg: &Config) -> VaultSettings {
    let k = &cfg.keys;
    VaultSettings {
        counter_block: cfg.storage.counter_block,
        rotate_after_uses: k.rotate_after_uses,
        max_uses: k.max_uses,
        crypto_period_ms: i64::try_from(k.crypto_period_days.saturating_mul(86_400_000))
            .unwrap_or(i64::MAX),
        auto_rotate: k.auto_rotate,
        reencrypt_batch: k.reencrypt_batch,
        reencrypt_pause_ms: k.reencrypt_pause_ms,
        unseal_threshold: match cfg.kek.source {
            KekSource::Shamir => cfg.kek.shamir.as_ref().map(|s| s.threshold),
            _ => None,
        },
        detokenize: cfg.detokenize_limits(),
    }
}

fn open_store(cfg: &Config) -> Result<Arc<SqliteStore>, StartError> {
    Ok(Arc::new(SqliteStore::open(
        &cfg.storage.path,
        SqliteOptions {
            readers: cfg.storage.readers,
            max_batch: cfg.storage.max_batch,
            ..SqliteOptions::default()
        },
    )?))
}

/// Opens the store and the vault with `kek`. Refuses to start with the
/// wrong KEK.
pub async fn open_vault(cfg: &Config, kek: Arc<dyn Kek>) -> Result<Arc<Vault>, StartError> {
    Ok(Vault::open(open_store(cfg)?, kek, vault_settings(cfg)).await?)
}

/// Opens the vault as configured: with its KEK loaded (file, environment,
/// HSM), able to reload it after an administrator seals; or sealed, for a
/// split-knowledge KEK that custodians must rebuild.
pub async fn open_configured(cfg: &Config, env: &dyn Env) -> Result<Arc<Vault>, StartError> {
    if cfg.kek.source == KekSource::Shamir {
        return Ok(Vault::open_sealed(open_store(cfg)?, vault_settings(cfg)).await?);
    }
    let kek = load_kek(cfg, env)?;
    let snapshot = ReloadEnv::capture(cfg, env);
    let reload_cfg = cfg.clone();
    let vault = Vault::open(open_store(cfg)?, kek, vault_settings(cfg)).await?;
    // An administrator can unseal it again by reloading its KEK.
    vault.set_reload(Some(Box::new(move || {
        load_kek(&reload_cfg, &snapshot).map_err(|e| e.to_string())
    })));
    Ok(vault)
}

/// The environment a KEK reload needs (`VAULT_KEK`, the HSM PIN), captured
/// at start and kept for the life of the process, since the environment
/// may change. The values are secrets: wiped when dropped, never printed.
/// (The key file itself is read again at reload.)
struct ReloadEnv(std::collections::HashMap<String, Zeroizing<String>>);

impl ReloadEnv {
    fn capture(cfg: &Config, env: &dyn Env) -> Self {
        let names = ["VAULT_KEK".to_owned()]
            .into_iter()
            .chain(cfg.kek.hsm.as_ref().map(|h| h.pin_env.clone()));
        Self(
            names
                .filter_map(|k| env.get(&k).map(|v| (k, Zeroizing::new(v))))
                .collect(),
        )
    }
}

impl Env for ReloadEnv {
    /// A copy for the caller to wrap at once (`load_kek`, `hsm_settings`).
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).map(|v| String::clone(v))
    }
}

impl std::fmt::Debug for ReloadEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Builds the new KEK named by a KEK-rotation request.
pub struct KekFactory {
    hsm: Option<HsmSettings>,
}

impl std::fmt::Debug for KekFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekFactory")
            .field("hsm", &self.hsm.is_some())
            .finish()
    }
}

impl KekFactory {
    pub fn new(cfg: &Config, env: &dyn Env) -> Self {
        Self {
            hsm: hsm_settings(cfg, env).ok(),
        }
    }

    /// A KEK from a key file on this host.
    pub fn file(&self, path: &std::path::Path) -> Result<Arc<dyn Kek>, String> {
        Ok(Arc::new(
            LocalKek::from_file(path).map_err(|e| e.to_string())?,
        ))
    }

    /// A key in the configured HSM token, generated first if asked.
    pub fn hsm(&self, key_label: &str, generate: bool) -> Result<Arc<dyn Kek>, String> {
        let Some(base) = &self.hsm else {
            return Err("no HSM is configured ([kek.hsm] and its PIN)".into());
        };
        let s = HsmSettings {
            module: base.module.clone(),
            token_label: base.token_label.clone(),
            key_label: key_label.to_owned(),
            pin: base.pin.clone(),
        };
        let kek = if generate {
            HsmKek::generate(&s)
        } else {
            HsmKek::open(&s)
        }
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(kek))
    }

    /// A new split-knowledge KEK: generated, split, and written one share
    /// per file (mode 0600) before it is used, so it is never lost.
    pub fn shamir(
        &self,
        out_dir: &std::path::Path,
        shares: u8,
        threshold: u8,
    ) -> Result<(Arc<dyn Kek>, Vec<std::path::PathBuf>), String> {
        let key = KeyBytes::generate().map_err(|e| e.to_string())?;
        let kek = LocalKek::from_key(&key);
        let parts = split(&key, kek.id(), threshold, shares).map_err(|e| e.to_string())?;
        let files = write_share_files(out_dir, &parts).map_err(|e| e.to_string())?;
        Ok((Arc::new(kek), files))
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Serves until `shutdown` resolves, then reports NOT_SERVING, stops
/// accepting, lets in-flight calls finish (up to the configured drain time)
/// and closes the store so every queued write is committed before
/// returning. The store is closed on every way out, a failed start
/// included, so its writer stops cleanly and its lock is released.
pub async fn serve(
    listener: TcpListener,
    cfg: &Config,
    vault: Arc<Vault>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let served = run(listener, cfg, &vault, shutdown).await;
    let closed = vault.store().close().await;
    if served.is_ok() && closed.is_ok() {
        info!("vault stopped; all acknowledged writes are committed");
    }
    served?;
    Ok(closed?)
}

/// Aborts a background task when dropped, whichever way `run` returns.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// HTTP/2 streams one connection may make the vault reset for protocol
/// errors before it is told to go away: hyper's own default, which tonic
/// 0.14 overrides with "no limit" unless it is set (the "MadeYouReset"
/// flood, CVE-2025-8671).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The server every listener of the vault is built on: the request
/// deadline, the stream limit, keepalive, the connection age and the reset
/// limit. TLS is not tonic's here: the vault's listener runs the handshake
/// (see [`tls_config`], [`incoming`]). `vault-load` builds its no-op server
/// on these too, so both are measured with the same setup.
pub fn server_builder(cfg: &Config) -> Server {
    Server::builder()
        .timeout(cfg.limits.request_timeout())
        .max_concurrent_streams(cfg.limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_connection_age(Duration::from_millis(cfg.limits.max_connection_age_ms))
        .max_connection_age_grace(Duration::from_millis(cfg.limits.connection_grace_ms))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
}

/// Mutual TLS with the configured certificate, key (which must be private
/// to the vault's user) and client CA: TLS 1.2 and 1.3 only, with ring; a
/// client certificate chaining to the CA is required; HTTP/2 by ALPN.
pub fn tls_config(cfg: &Config) -> Result<Arc<ServerConfig>, StartError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    check_private(&cfg.tls.key, "TLS private key").map_err(|e| StartError::Tls(e.to_string()))?;
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        StartError::Tls(format!("{what} ({}): {e}", path.display()))
    };
    let key_pem = Zeroizing::new(read(&cfg.tls.key)?);
    // The parser's own error may quote the file: never put it in a message.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        bad(
            "cannot read the TLS private key",
            &cfg.tls.key,
            &"not a PEM private key (PKCS#8, PKCS#1 or SEC1)",
        )
    })?;
    let certs = CertificateDer::pem_slice_iter(&read(&cfg.tls.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cannot read the TLS certificate", &cfg.tls.cert, &e))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate",
            &cfg.tls.cert,
            &"the file holds no PEM certificate",
        ));
    }
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&cfg.tls.client_ca)?) {
        let ca = ca.map_err(|e| bad("cannot read the client CA", &cfg.tls.client_ca, &e))?;
        roots
            .add(ca)
            .map_err(|e| bad("unusable client CA certificate", &cfg.tls.client_ca, &e))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "no client CA",
            &cfg.tls.client_ca,
            &"the file holds no PEM certificate",
        ));
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad("the TLS certificate and key do not fit", &cfg.tls.cert, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts on `listener` with `tls`, within the configured connection,
/// handshake and handshake-time limits.
pub fn incoming(listener: TcpListener, tls: Arc<ServerConfig>, cfg: &Config) -> Incoming {
    Incoming::new(
        listener,
        tls,
        Bounds {
            max_connections: cfg.limits.max_connections,
            max_handshakes: cfg.limits.max_handshakes,
            handshake_timeout: cfg.limits.handshake_timeout(),
        },
    )
}

/// gRPC server reflection over the vault's API and health, if configured.
pub fn reflection_service(
    cfg: &Config,
) -> Result<
    Option<
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    >,
    StartError,
> {
    if !cfg.server.reflection {
        return Ok(None);
    }
    let limit = cfg.limits.max_message_bytes;
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map(|svc| {
            // Requests are names; answers are descriptors, which may be
            // larger than any vault message (the whole API's is ~60 KiB).
            Some(
                svc.max_decoding_message_size(limit)
                    .max_encoding_message_size(REFLECTION_MAX_ANSWER),
            )
        })
        .map_err(|e| StartError::Serve(e.to_string()))
}

/// The largest reflection answer: the descriptors of every service.
const REFLECTION_MAX_ANSWER: usize = 1 << 20;

/// The standard `grpc.health.v1` service, with the vault's message limit
/// on what it reads (tonic's default would be 4 MiB), and its reporter.
pub fn health_service(
    cfg: &Config,
) -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, svc) = tonic_health::server::health_reporter();
    let limit = cfg.limits.max_message_bytes;
    (
        reporter,
        svc.max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
}

/// Everything of [`serve`] but closing the store. Whatever can fail (the
/// TLS material, reflection, the server settings) is done before any
/// background task or re-encryption job starts.
async fn run(
    listener: TcpListener,
    cfg: &Config,
    vault: &Arc<Vault>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let mut server = server_builder(cfg);
    let tls = tls_config(cfg)?;
    let auth = Arc::new(Authenticator::new(cfg.grants()?));
    let limit = cfg.limits.max_message_bytes;
    let svc = TokenServiceServer::new(TokenServiceImpl::new(vault.clone(), auth.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let keks = Arc::new(KekFactory::new(cfg, &ProcessEnv));
    let key_svc = KeyServiceServer::new(KeyServiceImpl::new(vault.clone(), auth.clone(), keks))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let audit_svc = AuditServiceServer::new(AuditServiceImpl::new(vault.clone(), auth))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(1 << 20);
    let reflection = reflection_service(cfg)?;
    let (health, health_svc) = health_service(cfg);
    let router = server
        .add_service(health_svc)
        .add_optional_service(reflection)
        .add_service(svc)
        .add_service(key_svc)
        .add_service(audit_svc);

    // Nothing below fails before serving starts.
    let checkpointer = AbortOnDrop(
        tokio::spawn(vault.clone().run_checkpointer(CheckpointPolicy {
            every_entries: cfg.audit.checkpoint_every_entries,
            every: Duration::from_secs(cfg.audit.checkpoint_every_seconds),
        }))
        .abort_handle(),
    );
    let follow_seal = tokio::spawn(follow_seal(vault.sealed_watch(), health.clone()));
    let _follow_guard = AbortOnDrop(follow_seal.abort_handle());
    if !vault.is_sealed() {
        vault.resume_jobs();
    }

    let incoming = incoming(listener, tls, cfg);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health.clone();
    let drain_began = Arc::new(std::sync::OnceLock::new());
    let began = drain_began.clone();
    let draining = vault.clone();
    let signal = async move {
        shutdown.await;
        // Before the drain, so load balancers stop sending new calls while
        // the in-flight ones finish. The seal follower is stopped (and
        // awaited) first, so it cannot report SERVING again.
        follow_seal.abort();
        let _ = follow_seal.await;
        report_not_serving(&reporter).await;
        info!("shutdown requested: reporting NOT_SERVING, draining in-flight calls");
        draining.begin_drain();
        let _ = began.set(tokio::time::Instant::now());
        let _ = stop_tx.send(());
    };
    let serving = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serving);
    let drain = Duration::from_secs(cfg.server.drain_seconds);
    let deadline = async move {
        if stop_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = &mut serving => r.map_err(|e| StartError::Serve(e.to_string())),
        () = deadline => {
            warn!("drain time exceeded; abandoning remaining calls");
            Ok(())
        }
    };
    drop(checkpointer);
    report_not_serving(&health).await;
    // Jobs pause, and key steps of calls that went away finish, before the
    // final checkpoint, so it covers everything this process wrote. They
    // get what is left of the drain time (at least a second, for a job to
    // finish its batch), so the whole shutdown stays near that time.
    let left = drain_began
        .get()
        .map_or(drain, |t| drain.saturating_sub(t.elapsed()))
        .max(Duration::from_secs(1));
    if !vault.stop_background(left).await {
        warn!(
            "background work still running after the drain time; rows it writes are covered by the next start's checkpoints"
        );
    }
    // The last word before stopping: a signed checkpoint of the final head.
    if !vault.is_sealed() {
        match vault.checkpoint_now().await {
            Ok(Some(cp)) => info!(seq = cp.seq, "audit checkpoint signed at shutdown"),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "audit checkpoint at shutdown failed"),
        }
    }
    result
}

/// Health follows the seal: a sealed vault is up but cannot serve data.
async fn follow_seal(mut sealed: tokio::sync::watch::Receiver<bool>, health: HealthReporter) {
    loop {
        let is_sealed = *sealed.borrow_and_update();
        if is_sealed {
            report_not_serving(&health).await;
        } else {
            health
                .set_serving::<TokenServiceServer<TokenServiceImpl>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        }
        if sealed.changed().await.is_err() {
            return;
        }
    }
}

async fn report_not_serving(health: &HealthReporter) {
    health
        .set_not_serving::<TokenServiceServer<TokenServiceImpl>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// Resolves on SIGTERM or SIGINT. Both handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// before serving begins (while keys load, say) still ends in a graceful
/// shutdown.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        match (term, int) {
            (Some(mut t), Some(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
                return;
            }
            (Some(mut t), None) => {
                t.recv().await;
                return;
            }
            (None, Some(mut i)) => {
                i.recv().await;
                return;
            }
            (None, None) => {}
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// [`shutdown_signal`], and after it, a second signal ends the process at
/// once instead of waiting out the drain: once a handler is installed the
/// default action is gone, so without this an operator's second Ctrl-C or
/// SIGTERM would do nothing. Safe: every answered write is already durable
/// (WAL, `synchronous=FULL`).
pub fn shutdown_signal_then_force() -> impl Future<Output = ()> + Send + 'static {
    let first = shutdown_signal();
    async move {
        first.await;
        let second = shutdown_signal();
        tokio::spawn(async move {
            second.await;
            warn!(
                "second signal: exiting now without finishing the drain; every answered write is already durable"
            );
            std::process::exit(1);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::collections::HashMap;

    fn hsm_config() -> Config {
        Config::parse(
            r#"
            listen = "127.0.0.1:7443"
            [tls]
            cert = "c"
            key = "k"
            client_ca = "ca"
            [storage]
            path = "v.db"
            [kek]
            source = "hsm"
            [kek.hsm]
            module = "m.so"
            token_label = "t"
            key_label = "k"
            pin_env = "PIN"
            "#,
        )
        .unwrap()
    }

    /// The reload snapshot holds `VAULT_KEK` and the HSM PIN for the life
    /// of the process: it used to keep them as plain `String`s, never
    /// wiped. Its values must be wiped on drop, and it must not print them.
    #[test]
    fn the_reload_snapshot_wipes_and_hides_its_secrets() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let env: HashMap<String, String> = [
            ("VAULT_KEK".to_owned(), "a2VrLWJhc2U2NA==".to_owned()),
            ("PIN".to_owned(), "pin-1234".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ]
        .into();
        let snap = ReloadEnv::capture(&hsm_config(), &env);
        for v in snap.0.values() {
            wiped_on_drop(v);
        }
        assert_eq!(snap.get("VAULT_KEK").as_deref(), Some("a2VrLWJhc2U2NA=="));
        assert_eq!(snap.get("PIN").as_deref(), Some("pin-1234"));
        assert_eq!(snap.get("OTHER"), None, "only what a reload needs is kept");
        let shown = format!("{snap:?}");
        assert!(
            !shown.contains("a2Vr") && !shown.contains("1234"),
            "{shown}"
        );
    }
}
