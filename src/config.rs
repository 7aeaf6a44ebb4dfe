//! Typed configuration: a TOML file, then environment overrides, validated as
//! a whole at load so a bad setting stops the vault at start with a message
//! naming it. Relative paths are resolved against the config file's folder.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use governor::Quota;

use crate::domain::access::{Grant, Role, RoleSet, TenantId, TenantScope};
use crate::domain::budget::DetokenizeLimits;

/// The highest detokenize rate or burst a budget may be given.
pub const MAX_DETOKENIZE_RATE: u32 = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    #[serde(default)]
    pub kek: KekConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub keys: KeyPolicy,
    #[serde(default)]
    pub audit: AuditPolicy,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub server: ServerOptions,
    #[serde(default)]
    pub clients: Vec<ClientGrant>,
    /// The environment variables that overrode the file (names only), so
    /// that the start can say so: a setting that differs from the reviewed
    /// file must not do so silently.
    #[serde(skip)]
    pub env_overrides: Vec<&'static str>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Where the KEK comes from.
///
/// - `file` (default): a key file; the environment variable `VAULT_KEK`
///   (base64) wins over it when set, so the key need never touch disk.
/// - `hsm`: a non-extractable AES-256 key in a PKCS#11 token; the PIN is read
///   from the environment variable named by `kek.hsm.pin_env`.
/// - `shamir`: split knowledge. The vault starts sealed and opens once
///   `kek.shamir.threshold` custodians have each submitted a share.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    #[serde(default)]
    pub source: KekSource,
    pub file: Option<PathBuf>,
    pub hsm: Option<HsmConfig>,
    pub shamir: Option<ShamirConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KekSource {
    #[default]
    File,
    Hsm,
    Shamir,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    /// Name of the environment variable holding the user PIN.
    #[serde(default = "default_pin_env")]
    pub pin_env: String,
}

fn default_pin_env() -> String {
    "VAULT_HSM_PIN".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShamirConfig {
    /// Shares needed to reconstruct the KEK.
    pub threshold: u8,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// SQLite database file.
    pub path: PathBuf,
    #[serde(default = "default_readers")]
    pub readers: usize,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Encryptions reserved per durable counter write.
    #[serde(default = "default_counter_block")]
    pub counter_block: u64,
}

fn default_readers() -> usize {
    4
}
fn default_max_batch() -> usize {
    2048
}
fn default_counter_block() -> u64 {
    65_536
}

/// When the audit chain's head is signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditPolicy {
    /// Sign a checkpoint after this many new entries…
    pub checkpoint_every_entries: u64,
    /// …or this many seconds after the last one, whichever comes first.
    pub checkpoint_every_seconds: u64,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self {
            checkpoint_every_entries: 10_000,
            checkpoint_every_seconds: 60,
        }
    }
}

/// Data-key lifecycle policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyPolicy {
    /// Rotate automatically when a key is due (by use or age).
    pub auto_rotate: bool,
    /// Rotate after this many encryptions under one key.
    pub rotate_after_uses: u64,
    /// Never encrypt more than this under one key (at most 2^32).
    pub max_uses: u64,
    /// Rotate keys older than this (the crypto-period).
    pub crypto_period_days: u64,
    /// Tokens per re-encryption commit.
    pub reencrypt_batch: usize,
    /// Pause between re-encryption commits, so serving continues.
    pub reencrypt_pause_ms: u64,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            auto_rotate: true,
            rotate_after_uses: 1 << 31,
            max_uses: 1 << 32,
            crypto_period_days: 90,
            reencrypt_batch: 256,
            reencrypt_pause_ms: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deadline for one request, unless the client asks for less.
    pub request_timeout_ms: u64,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// How long a new connection may take to complete its TLS handshake;
    /// one that sends nothing is closed then, so idle sockets cannot pile
    /// up before anyone is authenticated.
    pub handshake_timeout_ms: u64,
    /// Authenticated connections open at once. When all are taken the
    /// vault stops accepting until one closes, so a flood of connections
    /// waits in the kernel's backlog instead of using the vault's memory.
    pub max_connections: usize,
    /// How long an authenticated connection may live: then it is asked to
    /// close (HTTP/2 GOAWAY; clients reconnect) and closed for good
    /// `connection_grace_ms` later, whatever its state. Without it, a
    /// client holding a certificate could keep connections (and their
    /// slots) forever by never speaking, or hold streams it never reads.
    pub max_connection_age_ms: u64,
    /// After `max_connection_age_ms`, how long a connection has to finish
    /// its calls before it is closed.
    pub connection_grace_ms: u64,
    /// TLS handshakes in progress at once. A new connection beyond this
    /// closes a pending one: a stalled one first, then one of a source
    /// flooding the budget, else the oldest (see `transport::listener`).
    pub max_handshakes: usize,
    /// Detokenize calls per second one caller identity may make, sustained
    /// (each identity has its own budget; see `domain::budget`). A client
    /// entry may set its own.
    pub detokenize_per_second: u32,
    /// Detokenize calls one identity may make at once after a quiet spell.
    pub detokenize_burst: u32,
    /// What a detokenize for a malformed, unknown or other tenant's token
    /// costs, in calls: guessing tokens spends a budget this much faster.
    pub detokenize_miss_cost: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout_ms: 5_000,
            max_message_bytes: 16 * 1024,
            max_concurrent_streams: 256,
            handshake_timeout_ms: 10_000,
            max_connections: 1024,
            max_connection_age_ms: 30 * 60 * 1000,
            connection_grace_ms: 30_000,
            max_handshakes: 256,
            detokenize_per_second: 1000,
            detokenize_burst: 2000,
            detokenize_miss_cost: 10,
        }
    }
}

impl Limits {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerOptions {
    /// gRPC server reflection. Handy in development; turn off in production.
    pub reflection: bool,
    /// Seconds to wait for in-flight calls at shutdown.
    pub drain_seconds: u64,
    /// Lock all memory (`mlockall`) so keys and card numbers never reach
    /// swap. Needs `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`; when set,
    /// the vault refuses to start if the lock fails.
    pub lock_memory: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            reflection: false,
            drain_seconds: 10,
            lock_memory: false,
        }
    }
}

/// One caller identity and what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGrant {
    /// As named by the client certificate: URI SAN, DNS SAN or CN.
    pub identity: String,
    /// A tenant name, or `*` for auditors and administrators of all tenants.
    pub tenant: String,
    pub roles: Vec<String>,
    /// This identity's own detokenize budget (calls per second), instead of
    /// `limits.detokenize_per_second`. Only for an identity that may
    /// detokenize.
    #[serde(default)]
    pub detokenize_per_second: Option<u32>,
    /// Its burst; twice its rate if not given.
    #[serde(default)]
    pub detokenize_burst: Option<u32>,
}

/// Reads environment variables; tests pass a map instead of the process env.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path`, applies environment overrides and validates.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        cfg.apply_env(env)?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        for name in [
            "VAULT_LISTEN",
            "VAULT_DB",
            "VAULT_KEK_FILE",
            "VAULT_REFLECTION",
        ] {
            if env.get(name).is_some() {
                self.env_overrides.push(name);
            }
        }
        if let Some(v) = env.get("VAULT_LISTEN") {
            self.listen = v.parse().map_err(|_| ConfigError::Env {
                name: "VAULT_LISTEN",
                message: format!("{v:?} is not an address like 127.0.0.1:7443"),
            })?;
        }
        if let Some(v) = env.get("VAULT_DB") {
            self.storage.path = v.into();
        }
        if let Some(v) = env.get("VAULT_KEK_FILE") {
            self.kek.file = Some(v.into());
        }
        if let Some(v) = env.get("VAULT_REFLECTION") {
            self.server.reflection = match v.as_str() {
                "1" | "true" | "on" => true,
                "0" | "false" | "off" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "VAULT_REFLECTION",
                        message: format!("{v:?} is not true or false"),
                    });
                }
            };
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.tls.cert);
        abs(&mut self.tls.key);
        abs(&mut self.tls.client_ca);
        abs(&mut self.storage.path);
        if let Some(f) = self.kek.file.as_mut() {
            abs(f);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (what, p) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if !p.is_file() {
                return bad(format!("{what}: {} does not exist", p.display()));
            }
        }
        if let Some(dir) = self.storage.path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return bad(format!(
                "storage.path: folder {} does not exist",
                dir.display()
            ));
        }
        if self.storage.readers == 0 || self.storage.readers > 64 {
            return bad("storage.readers must be 1 to 64".into());
        }
        if self.storage.max_batch == 0 {
            return bad("storage.max_batch must be at least 1".into());
        }
        if self.storage.counter_block == 0 {
            return bad("storage.counter_block must be at least 1".into());
        }
        let k = &self.keys;
        if k.max_uses == 0 || k.max_uses > 1 << 32 {
            return bad("keys.max_uses must be 1 to 4294967296 (2^32, NIST SP 800-38D)".into());
        }
        if k.rotate_after_uses == 0 || k.rotate_after_uses > k.max_uses {
            return bad("keys.rotate_after_uses must be 1 to keys.max_uses".into());
        }
        if k.crypto_period_days == 0 || k.crypto_period_days > 730 {
            return bad(
                "keys.crypto_period_days must be 1 to 730 (SP 800-57: at most two years)".into(),
            );
        }
        if k.auto_rotate && k.rotate_after_uses >= k.max_uses {
            // At the limit itself, calls that already picked the key would
            // be refused instead of moving to its successor.
            return bad(format!(
                "keys.rotate_after_uses ({}) must be below keys.max_uses ({}) so that a key is rotated before it is exhausted",
                k.rotate_after_uses, k.max_uses
            ));
        }
        if k.reencrypt_batch == 0 {
            return bad("keys.reencrypt_batch must be at least 1".into());
        }
        if self.audit.checkpoint_every_entries == 0 || self.audit.checkpoint_every_seconds == 0 {
            return bad("audit.checkpoint_every_entries and _seconds must be at least 1".into());
        }
        if self.limits.max_message_bytes < 1024 {
            return bad("limits.max_message_bytes must be at least 1024".into());
        }
        if self.limits.request_timeout_ms == 0 {
            return bad("limits.request_timeout_ms must be at least 1".into());
        }
        if self.limits.max_connection_age_ms == 0 || self.limits.connection_grace_ms == 0 {
            return bad(
                "limits.max_connection_age_ms and limits.connection_grace_ms must be at least 1"
                    .into(),
            );
        }
        if self.limits.handshake_timeout_ms == 0 {
            return bad("limits.handshake_timeout_ms must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.limits.max_connections) {
            return bad("limits.max_connections must be between 1 and 1000000".into());
        }
        if !(1..=100_000).contains(&self.limits.max_handshakes) {
            return bad("limits.max_handshakes must be between 1 and 100000".into());
        }
        // Zero streams would admit no call at all; zero drain seconds would
        // abandon every in-flight call at the first signal.
        if self.limits.max_concurrent_streams == 0 {
            return bad("limits.max_concurrent_streams must be at least 1".into());
        }
        self.validate_detokenize_limits()?;
        if self.server.drain_seconds == 0 {
            return bad("server.drain_seconds must be at least 1".into());
        }
        match self.kek.source {
            KekSource::File => {}
            KekSource::Hsm => {
                let Some(h) = &self.kek.hsm else {
                    return bad("kek.source = \"hsm\" needs a [kek.hsm] section".into());
                };
                if h.token_label.is_empty() || h.key_label.is_empty() {
                    return bad("kek.hsm: token_label and key_label must not be empty".into());
                }
            }
            KekSource::Shamir => match &self.kek.shamir {
                Some(s) if s.threshold >= 2 => {}
                Some(_) => return bad("kek.shamir.threshold must be at least 2".into()),
                None => {
                    return bad("kek.source = \"shamir\" needs a [kek.shamir] section".into());
                }
            },
        }
        self.grants()?;
        Ok(())
    }

    fn validate_detokenize_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let rate = |what: &str, v: u32| {
            if (1..=MAX_DETOKENIZE_RATE).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{what} must be 1 to {MAX_DETOKENIZE_RATE}"
                )))
            }
        };
        rate("limits.detokenize_per_second", l.detokenize_per_second)?;
        rate("limits.detokenize_burst", l.detokenize_burst)?;
        if !(1..=1000).contains(&l.detokenize_miss_cost) {
            return Err(ConfigError::Invalid(
                "limits.detokenize_miss_cost must be 1 to 1000".into(),
            ));
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.detokenize_per_second.is_none() && c.detokenize_burst.is_none() {
                continue;
            }
            let at = format!("clients[{i}] ({})", c.identity);
            if !c.roles.iter().any(|r| r == "detokenize") {
                return Err(ConfigError::Invalid(format!(
                    "{at}: a detokenize budget is set but the identity has no detokenize role"
                )));
            }
            if let Some(v) = c.detokenize_per_second {
                rate(&format!("{at}: detokenize_per_second"), v)?;
            }
            if let Some(v) = c.detokenize_burst {
                rate(&format!("{at}: detokenize_burst"), v)?;
            }
        }
        Ok(())
    }

    /// The detokenize budgets: one per identity that may detokenize, its
    /// own if configured, else the `[limits]` one.
    pub fn detokenize_limits(&self) -> DetokenizeLimits {
        let nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        let l = &self.limits;
        let default =
            Quota::per_second(nz(l.detokenize_per_second)).allow_burst(nz(l.detokenize_burst));
        let per_identity = self
            .clients
            .iter()
            .filter(|c| c.roles.iter().any(|r| r == "detokenize"))
            .map(|c| {
                let quota = match (c.detokenize_per_second, c.detokenize_burst) {
                    (None, None) => default,
                    (None, Some(burst)) => default.allow_burst(nz(burst)),
                    (Some(rate), burst) => Quota::per_second(nz(rate))
                        .allow_burst(nz(burst.unwrap_or(rate.saturating_mul(2)))),
                };
                (c.identity.clone(), quota)
            })
            .collect();
        DetokenizeLimits {
            default,
            per_identity,
            miss_cost: nz(l.detokenize_miss_cost),
        }
    }

    /// The identity → grant map. Deny by default: an identity absent here
    /// may do nothing.
    pub fn grants(&self) -> Result<HashMap<String, Grant>, ConfigError> {
        let mut out = HashMap::new();
        let mut seen = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}] ({})", c.identity);
            if c.identity.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "clients[{i}]: identity is empty"
                )));
            }
            if !seen.insert(c.identity.clone()) {
                return Err(ConfigError::Invalid(format!("{at}: identity listed twice")));
            }
            let mut roles = Vec::new();
            for r in &c.roles {
                roles.push(Role::parse(r).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{at}: unknown role {r:?} (tokenize, detokenize, audit, admin, custodian)"
                    ))
                })?);
            }
            if roles.is_empty() {
                return Err(ConfigError::Invalid(format!("{at}: no roles")));
            }
            let scope = if c.tenant == "*" {
                if roles
                    .iter()
                    .any(|r| matches!(r, Role::Tokenize | Role::Detokenize))
                {
                    return Err(ConfigError::Invalid(format!(
                        "{at}: tokenize and detokenize need a single tenant, not \"*\""
                    )));
                }
                TenantScope::All
            } else {
                TenantScope::One(
                    TenantId::parse(&c.tenant)
                        .map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?,
                )
            };
            out.insert(
                c.identity.clone(),
                Grant {
                    scope,
                    roles: RoleSet::new(roles),
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const BASE: &str = r#"
        listen = "127.0.0.1:7443"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        [storage]
        path = "vault.db"
        [[clients]]
        identity = "spiffe://x/acme/checkout"
        tenant = "acme"
        roles = ["tokenize"]
    "#;

    fn with_files() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        for f in ["server.pem", "server.key", "ca.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let p = d.path().join("vault.toml");
        std::fs::write(&p, BASE).unwrap();
        (d, p)
    }

    #[test]
    fn loads_and_resolves_relative_paths() {
        let (d, p) = with_files();
        let c = Config::load(&p, &HashMap::new()).unwrap();
        assert_eq!(c.storage.path, d.path().join("vault.db"));
        assert!(!c.server.reflection);
        assert!(!c.server.lock_memory);
        assert_eq!(c.grants().unwrap().len(), 1);
    }

    #[test]
    fn a_key_must_rotate_before_it_is_exhausted() {
        let (_d, p) = with_files();
        std::fs::write(
            &p,
            format!("{BASE}\n[keys]\nmax_uses = 100\nrotate_after_uses = 100\n"),
        )
        .unwrap();
        let e = Config::load(&p, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("must be below keys.max_uses"), "{e}");
        std::fs::write(
            &p,
            format!("{BASE}\n[keys]\nmax_uses = 100\nrotate_after_uses = 99\n"),
        )
        .unwrap();
        Config::load(&p, &HashMap::new()).unwrap();
    }

    #[test]
    fn environment_overrides_are_named() {
        let (_d, p) = with_files();
        let c = Config::load(&p, &HashMap::new()).unwrap();
        assert!(c.env_overrides.is_empty());
        let env: HashMap<String, String> = [("VAULT_REFLECTION", "on"), ("VAULT_DB", "/tmp/x.db")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let c = Config::load(&p, &env).unwrap();
        assert_eq!(c.env_overrides, ["VAULT_DB", "VAULT_REFLECTION"]);
        assert!(c.server.reflection);
    }

    #[test]
    fn memory_locking_is_opt_in() {
        let (d, p) = with_files();
        std::fs::write(&p, format!("{BASE}\n[server]\nlock_memory = true\n")).unwrap();
        assert!(
            Config::load(&p, &HashMap::new())
                .unwrap()
                .server
                .lock_memory
        );
        std::fs::write(&p, format!("{BASE}\n[server]\nlock_memory = \"yes\"\n")).unwrap();
        assert!(Config::load(&p, &HashMap::new()).is_err());
        drop(d);
    }

    #[test]
    fn env_overrides() {
        let (_d, p) = with_files();
        let env: HashMap<String, String> = [
            ("VAULT_LISTEN".to_string(), "127.0.0.1:9000".to_string()),
            ("VAULT_REFLECTION".to_string(), "true".to_string()),
        ]
        .into();
        let c = Config::load(&p, &env).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(c.server.reflection);
        let env: HashMap<String, String> =
            [("VAULT_LISTEN".to_string(), "nope".to_string())].into();
        let e = Config::load(&p, &env).unwrap_err().to_string();
        assert!(e.contains("VAULT_LISTEN"), "{e}");
    }

    #[test]
    fn rejects_bad_settings_with_a_named_reason() {
        let (_d, p) = with_files();
        let cases = [
            (
                "roles = [\"tokenize\"]",
                "roles = [\"superuser\"]",
                "unknown role",
            ),
            ("tenant = \"acme\"", "tenant = \"*\"", "single tenant"),
            ("tenant = \"acme\"", "tenant = \"Acme Corp\"", "tenant"),
            (
                "cert = \"server.pem\"",
                "cert = \"missing.pem\"",
                "tls.cert",
            ),
            ("listen = \"127.0.0.1:7443\"", "listen = \"x\"", "invalid"),
            ("[storage]", "[storage]\nbogus = 1", "bogus"),
        ];
        for (from, to, needle) in cases {
            std::fs::write(&p, BASE.replace(from, to)).unwrap();
            let e = Config::load(&p, &HashMap::new()).unwrap_err().to_string();
            assert!(e.contains(needle), "{to}: {e}");
        }
    }

    #[test]
    fn zero_streams_drain_seconds_or_connection_limits_are_refused_by_name() {
        let (_d, p) = with_files();
        for (section, needle) in [
            (
                "[limits]\nmax_concurrent_streams = 0",
                "limits.max_concurrent_streams must be at least 1",
            ),
            (
                "[server]\ndrain_seconds = 0",
                "server.drain_seconds must be at least 1",
            ),
            (
                "[limits]\nmax_connections = 0",
                "limits.max_connections must be between 1 and 1000000",
            ),
            (
                "[limits]\nmax_connections = 2000000",
                "limits.max_connections must be between 1 and 1000000",
            ),
            (
                "[limits]\nmax_handshakes = 0",
                "limits.max_handshakes must be between 1 and 100000",
            ),
        ] {
            std::fs::write(&p, format!("{BASE}\n{section}\n")).unwrap();
            let e = Config::load(&p, &HashMap::new()).unwrap_err().to_string();
            assert!(e.contains(needle), "{section}: {e}");
        }
        std::fs::write(
            &p,
            format!("{BASE}\n[limits]\nmax_concurrent_streams = 1\n[server]\ndrain_seconds = 1\n"),
        )
        .unwrap();
        Config::load(&p, &HashMap::new()).unwrap();
    }

    const WORKERS: &str = r#"
        [[clients]]
        identity = "spiffe://x/acme/worker"
        tenant = "acme"
        roles = ["detokenize"]
        [[clients]]
        identity = "spiffe://x/acme/busy"
        tenant = "acme"
        roles = ["detokenize"]
        detokenize_per_second = 5000
        [[clients]]
        identity = "spiffe://x/acme/bursty"
        tenant = "acme"
        roles = ["detokenize"]
        detokenize_burst = 50
    "#;

    #[test]
    fn every_identity_that_may_detokenize_gets_a_budget() {
        use governor::Quota;
        let (_d, p) = with_files();
        std::fs::write(&p, format!("{BASE}{WORKERS}")).unwrap();
        let l = Config::load(&p, &HashMap::new())
            .unwrap()
            .detokenize_limits();
        let nz = |n| NonZeroU32::new(n).unwrap();
        let default = Quota::per_second(nz(1000)).allow_burst(nz(2000));
        assert_eq!(l.default, default);
        assert_eq!(l.miss_cost, nz(10));
        assert_eq!(
            l.per_identity.len(),
            3,
            "the tokenize-only identity has none"
        );
        assert_eq!(l.per_identity["spiffe://x/acme/worker"], default);
        assert_eq!(
            l.per_identity["spiffe://x/acme/busy"],
            Quota::per_second(nz(5000)).allow_burst(nz(10_000)),
            "an own rate with twice it as burst"
        );
        assert_eq!(
            l.per_identity["spiffe://x/acme/bursty"],
            default.allow_burst(nz(50))
        );
    }

    #[test]
    fn bad_detokenize_budgets_are_refused_by_name() {
        let (_d, p) = with_files();
        for (extra, needle) in [
            (
                "[limits]\ndetokenize_per_second = 0".to_owned(),
                "limits.detokenize_per_second must be 1 to 1000000",
            ),
            (
                "[limits]\ndetokenize_burst = 2000000".to_owned(),
                "limits.detokenize_burst must be 1 to 1000000",
            ),
            (
                "[limits]\ndetokenize_miss_cost = 0".to_owned(),
                "limits.detokenize_miss_cost must be 1 to 1000",
            ),
            (
                WORKERS.replace("= 5000", "= 0"),
                "clients[2] (spiffe://x/acme/busy): detokenize_per_second must be 1 to 1000000",
            ),
            (
                "[[clients]]\nidentity = \"c\"\ntenant = \"acme\"\nroles = [\"tokenize\"]\ndetokenize_per_second = 10".to_owned(),
                "clients[1] (c): a detokenize budget is set but the identity has no detokenize role",
            ),
        ] {
            std::fs::write(&p, format!("{BASE}\n{extra}\n")).unwrap();
            let e = Config::load(&p, &HashMap::new()).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn duplicate_identity_rejected() {
        let (_d, p) = with_files();
        let dup = format!(
            "{BASE}\n[[clients]]\nidentity = \"spiffe://x/acme/checkout\"\ntenant = \"acme\"\nroles = [\"admin\"]\n"
        );
        std::fs::write(&p, dup).unwrap();
        let e = Config::load(&p, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }
}
