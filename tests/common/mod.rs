//! Test harness: a real vault on 127.0.0.1:0 with freshly generated
//! development certificates, KEK and SQLite file in a temp directory, and
//! mTLS clients for each example caller.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod calls;
pub mod cards;
pub mod process;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;
use tokenvault::client::{ClientPki, channel, connect};
use tokenvault::config::Config;
use tokenvault::devpki::{DevLayout, ensure_dev_dir};
use tokenvault::proto::key_service_client::KeyServiceClient;
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::server::{StartError, open_configured, serve};
use tonic::transport::Channel;

pub type Client = TokenServiceClient<Channel>;
pub type KeysClient = KeyServiceClient<Channel>;

/// A TokenService client for caller `name` of the development data
/// directory `root`, connected to a vault at `url` (a `vault` child
/// process, say), bounded by `CALL_TIMEOUT`.
pub async fn client_at(url: &str, root: &Path, name: &str) -> Client {
    let pki = ClientPki::from_dev_dir(root, name).unwrap();
    tokio::time::timeout(calls::CALL_TIMEOUT, connect(url, &pki))
        .await
        .unwrap()
        .unwrap()
}

/// Creates the development setup in `root` (if missing) with
/// `server.drain_seconds` set to `secs`, for tests that hold a drain open.
pub fn with_drain_seconds(root: &Path, secs: u64) {
    let l = ensure_dev_dir(root, "127.0.0.1:0".parse().unwrap()).unwrap();
    let text = std::fs::read_to_string(l.config()).unwrap();
    std::fs::write(
        l.config(),
        text.replace("[server]\n", &format!("[server]\ndrain_seconds = {secs}\n")),
    )
    .unwrap();
}

/// The example callers of the development setup.
pub const ACME_CHECKOUT: &str = "acme-checkout";
pub const ACME_PAYMENTS: &str = "acme-payments";
pub const GLOBEX_CHECKOUT: &str = "globex-checkout";
pub const GLOBEX_PAYMENTS: &str = "globex-payments";
pub const AUDITOR: &str = "auditor";
pub const ADMIN: &str = "admin";
pub const ADMIN_2: &str = "admin-2";
pub const CUSTODIANS: [&str; 3] = ["custodian-1", "custodian-2", "custodian-3"];

/// Tenant-scoped callers that `TestVault::start_scoped` adds to the dev
/// setup: (name, tenant, roles). Their identity is `spiffe://tokenvault.dev/`
/// followed by the name.
pub const ACME_ADMIN: &str = "acme-admin";
pub const ACME_AUDITOR: &str = "acme-auditor";
pub const SCOPED_CALLERS: [(&str, &str, &str); 2] = [
    (ACME_ADMIN, "acme", "admin"),
    (ACME_AUDITOR, "acme", "audit"),
];

/// The identity URI of a caller added by `TestVault::start_scoped`.
pub fn scoped_identity(name: &str) -> String {
    format!("spiffe://tokenvault.dev/{name}")
}

/// Writes a development PKI into `root` with certificates for every dev
/// caller plus `extra` names, and grants the extras in the config. The dev
/// CA's key is not kept on disk, so extra callers must be issued here,
/// before `ensure_dev_dir` would make a PKI of its own.
fn write_pki_with(root: &Path, extra: &[(&str, &str, &str)]) {
    use tokenvault::devpki::{DEV_CLIENTS, DevCa};
    use tokenvault::fsutil::{write_private, write_public};
    let l = DevLayout::new(root);
    std::fs::create_dir_all(root.join("pki/clients")).unwrap();
    let ca = DevCa::generate("tokenvault development CA").unwrap();
    let server = ca.server().unwrap();
    write_public(&root.join("pki/server.pem"), server.cert_pem.as_bytes()).unwrap();
    write_private(&root.join("pki/server.key"), server.key_pem.as_bytes()).unwrap();
    let names = DEV_CLIENTS
        .iter()
        .map(|c| (c.name, c.identity.to_owned()))
        .chain(extra.iter().map(|(n, _, _)| (*n, scoped_identity(n))));
    for (name, id) in names {
        let issued = ca.client(&id).unwrap();
        write_public(&l.client_cert(name), issued.cert_pem.as_bytes()).unwrap();
        write_private(&l.client_key(name), issued.key_pem.as_bytes()).unwrap();
    }
    write_public(&l.ca(), ca.cert_pem().as_bytes()).unwrap();
    let grants: String = extra
        .iter()
        .map(|(name, tenant, role)| {
            format!(
                "[[clients]]\nidentity = \"{}\"\ntenant = \"{tenant}\"\nroles = [\"{role}\"]\n",
                scoped_identity(name)
            )
        })
        .collect();
    append_config(root, &grants);
}

pub struct TestVault {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub layout: DevLayout,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), StartError>>>,
}

/// Loads the dev config of `root` with `overrides` applied as environment.
pub fn dev_config(root: &Path, overrides: &[(&str, &str)]) -> Config {
    try_dev_config(root, overrides).unwrap()
}

pub fn try_dev_config(root: &Path, overrides: &[(&str, &str)]) -> Result<Config, StartError> {
    let l = ensure_dev_dir(root, "127.0.0.1:0".parse().unwrap()).unwrap();
    let env: HashMap<String, String> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(Config::load(&l.config(), &env)?)
}

/// Appends TOML to the dev config of `root` (creating the dev directory
/// first), e.g. a `[keys]` section.
pub fn append_config(root: &Path, toml: &str) {
    let l = ensure_dev_dir(root, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(l.config()).unwrap();
    text.push('\n');
    text.push_str(toml);
    std::fs::write(l.config(), text).unwrap();
}

impl TestVault {
    pub async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    /// Starts a vault whose dev setup also has the `SCOPED_CALLERS`.
    pub async fn start_scoped() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_pki_with(dir.path(), &SCOPED_CALLERS);
        Self::start_in(dir).await
    }

    /// Starts (or restarts) a vault on an existing data directory.
    pub async fn start_in(dir: TempDir) -> Self {
        Self::try_start_in(dir, &[])
            .await
            .map_err(|(_, e)| e)
            .unwrap()
    }

    /// Like `start_in`, with environment overrides (e.g. `VAULT_KEK`), and
    /// returning the start error (and the directory) instead of panicking.
    pub async fn try_start_in(
        dir: TempDir,
        env: &[(&str, &str)],
    ) -> Result<Self, (TempDir, StartError)> {
        let cfg = match try_dev_config(dir.path(), env) {
            Ok(c) => c,
            Err(e) => return Err((dir, e)),
        };
        let envmap: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // As `vault serve` does: KEK loaded, or sealed for a split KEK.
        let vault = match open_configured(&cfg, &envmap).await {
            Ok(v) => v,
            Err(e) => return Err((dir, e)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, &cfg, vault, async move {
                let _ = rx.await;
            })
            .await
        });
        let layout = DevLayout::new(dir.path());
        Ok(Self {
            dir,
            addr,
            layout,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn pki(&self, name: &str) -> ClientPki {
        ClientPki::from_dev_dir(self.dir.path(), name).unwrap()
    }

    pub async fn client(&self, name: &str) -> Client {
        connect(&self.url(), &self.pki(name)).await.unwrap()
    }

    /// A KeyService client for caller `name`.
    pub async fn keys(&self, name: &str) -> KeysClient {
        KeysClient::new(channel(&self.url(), &self.pki(name)).await.unwrap())
    }

    pub fn db_path(&self) -> PathBuf {
        self.layout.db()
    }

    /// Graceful stop: drains, flushes the writer, returns the data directory
    /// for a restart.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Audit rows as (actor, action, outcome, token, purpose), oldest first,
    /// read straight from the database.
    pub fn audit_rows(&self) -> Vec<AuditRow> {
        audit_rows(&self.db_path())
    }
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub actor: String,
    pub tenant: Option<String>,
    pub action: String,
    pub outcome: String,
    pub token: Option<Vec<u8>>,
    pub purpose: Option<String>,
    pub peer: Option<String>,
    pub detail: Option<String>,
}

pub fn audit_rows(db: &Path) -> Vec<AuditRow> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare(
            "SELECT seq, actor, tenant, action, outcome, token, purpose, peer, detail FROM audit ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(AuditRow {
            seq: r.get(0)?,
            actor: r.get(1)?,
            tenant: r.get(2)?,
            action: r.get(3)?,
            outcome: r.get(4)?,
            token: r.get(5)?,
            purpose: r.get(6)?,
            peer: r.get(7)?,
            detail: r.get(8)?,
        })
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

/// The identity URI of an example caller.
pub fn identity(name: &str) -> &'static str {
    tokenvault::devpki::DEV_CLIENTS
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.identity)
        .unwrap()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}
