//! Command-line interface: `dev` and `serve` run the vault; `client` calls
//! its token service; `keys`, `unseal`, `seal` manage keys; `backup` and
//! `restore` handle the database file; all remote calls go over mutual TLS
//! with a development client certificate.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tokenvault::client::ClientPki;
use tonic::transport::Channel;

mod audit;
mod backup;
mod data;
mod keys;
mod serve;

#[derive(Parser)]
#[command(name = "vault", version, about = "Payment-card tokenization vault")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create (once) a local development setup — CA, server and client
    /// certificates, KEK file, config, SQLite database — and serve it.
    Dev {
        #[arg(long, env = "VAULT_DATA_DIR", default_value = "vault-data")]
        data_dir: PathBuf,
        #[arg(long, env = "VAULT_LISTEN", default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
    },
    /// Serve from a configuration file.
    Serve {
        #[arg(long, env = "VAULT_CONFIG")]
        config: PathBuf,
    },
    /// Call the token service.
    Client {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        call: data::Call,
    },
    /// Key management: local key generation, and the key service.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// The audit log: export, offline verification, key-lifecycle report.
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Submit a custodian's share of a split KEK (`--share-file`), or, with
    /// no share, reload a file or HSM KEK after an administrator sealed.
    Unseal {
        #[command(flatten)]
        conn: Conn,
        /// A share file written by `vault keys init` or a KEK rotation.
        #[arg(long)]
        share_file: Option<PathBuf>,
    },
    /// Write a consistent snapshot of the database (the vault may be
    /// running). It never holds the KEK.
    Backup {
        #[command(flatten)]
        target: backup::Target,
        /// The backup file to create (must not exist; made mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backup in place of the database. The vault must be stopped.
    /// The next start retires every active data key.
    Restore {
        #[command(flatten)]
        target: backup::Target,
        /// The backup file, as written by `vault backup`.
        #[arg(long)]
        from: PathBuf,
        /// Move an existing database aside (it is kept, renamed) instead of
        /// refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Drop all key material from the vault's memory.
    Seal {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        reason: String,
    },
    /// Whether the vault is sealed and how many shares are in.
    SealStatus {
        #[command(flatten)]
        conn: Conn,
    },
}

/// Where the vault is and who to be.
#[derive(Args, Clone)]
pub struct Conn {
    /// Development data directory holding `pki/` (see `vault dev`).
    #[arg(long, env = "VAULT_DATA_DIR", default_value = "vault-data")]
    data_dir: PathBuf,
    /// Which example caller to be (a name under `pki/clients/`).
    #[arg(long = "as", env = "VAULT_AS")]
    name: Option<String>,
    #[arg(long, env = "VAULT_URL", default_value = "https://127.0.0.1:7443")]
    server: String,
}

impl Conn {
    /// A channel authenticated as `--as`, or as `default` if not given.
    async fn channel(&self, default: &str) -> Result<Channel, String> {
        let name = self.name.as_deref().unwrap_or(default);
        let pki = ClientPki::from_dev_dir(&self.data_dir, name).map_err(|e| {
            format!(
                "cannot read client certificate {name:?} in {}: {e}",
                self.data_dir.display()
            )
        })?;
        tokenvault::client::channel(&self.server, &pki)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.server))
    }
}

/// How a failed call is shown: its code and the vault's message.
fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

pub async fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Dev { data_dir, listen } => serve::dev(&data_dir, listen).await,
        Cmd::Serve { config } => serve::serve(&config).await,
        Cmd::Client { conn, call } => data::run(&conn, call).await,
        Cmd::Keys { cmd } => keys::run(cmd).await,
        Cmd::Audit { cmd } => audit::run(cmd).await,
        Cmd::Unseal { conn, share_file } => keys::unseal(&conn, share_file.as_deref()).await,
        Cmd::Seal { conn, reason } => keys::seal(&conn, reason).await,
        Cmd::Backup { target, out } => backup::backup(&target, &out),
        Cmd::Restore {
            target,
            from,
            replace,
        } => backup::restore(&target, &from, replace),
        Cmd::SealStatus { conn } => keys::seal_status(&conn).await,
    }
}
