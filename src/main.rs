//! The `vault` command: `dev` (run on a generated local setup), `serve`
//! (run from a config file), `client` (call a running vault), `keys`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokenvault::client::{ClientPki, connect};
use tokenvault::config::{Config, ProcessEnv};
use tokenvault::crypto::kek::LocalKek;
use tokenvault::devpki::{DEV_CLIENTS, ensure_dev_dir};
use tokenvault::proto;
use tokenvault::server::{StartError, open_configured, serve, shutdown_signal};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "vault", version, about = "Payment-card tokenization vault")]
struct Cli {
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
    /// Call a running vault with a development client certificate.
    Client {
        #[arg(long, env = "VAULT_DATA_DIR", default_value = "vault-data")]
        data_dir: PathBuf,
        /// Which example caller to be (see `pki/clients/`).
        #[arg(long = "as", default_value = "acme-checkout")]
        name: String,
        #[arg(long, env = "VAULT_URL", default_value = "https://127.0.0.1:7443")]
        server: String,
        #[command(subcommand)]
        call: Call,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
}

#[derive(Subcommand)]
enum Call {
    /// Tokenize the card number read from standard input (never from argv,
    /// which other users can see in the process list).
    Tokenize {
        #[arg(long, requires = "exp_year")]
        exp_month: Option<u32>,
        #[arg(long, requires = "exp_month")]
        exp_year: Option<u32>,
    },
    /// Print the card number behind a token.
    Detokenize {
        token: String,
        #[arg(long)]
        purpose: String,
    },
    /// Print a token's metadata.
    Metadata { token: String },
    /// Delete a token.
    Delete { token: String },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Generate a new 256-bit KEK into a file created with mode 0600.
    GenerateKek {
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a new non-extractable AES-256 KEK inside a PKCS#11 token.
    /// The user PIN is read from VAULT_HSM_PIN.
    HsmGenerate(HsmArgs),
    /// Show an HSM key's attributes (never its value): the HSM inventory
    /// entry PCI DSS 3.6.1.1 asks for. The PIN is read from VAULT_HSM_PIN.
    HsmInfo(HsmArgs),
}

#[derive(clap::Args)]
struct HsmArgs {
    /// PKCS#11 module.
    #[arg(
        long,
        env = "VAULT_HSM_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    module: PathBuf,
    #[arg(long)]
    token_label: String,
    #[arg(long)]
    key_label: String,
}

impl HsmArgs {
    fn settings(&self) -> Result<tokenvault::crypto::hsm::HsmSettings, String> {
        let pin = std::env::var("VAULT_HSM_PIN")
            .map(Zeroizing::new)
            .map_err(|_| "set the HSM user PIN in VAULT_HSM_PIN".to_string())?;
        Ok(tokenvault::crypto::hsm::HsmSettings {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            key_label: self.key_label.clone(),
            pin,
        })
    }
}

fn main() -> ExitCode {
    tokenvault::telemetry::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Dev { data_dir, listen } => {
            let layout = ensure_dev_dir(&data_dir, listen).map_err(|e| e.to_string())?;
            let mut cfg = Config::load(&layout.config(), &ProcessEnv).map_err(|e| e.to_string())?;
            cfg.listen = listen;
            let help = move |addr| print_dev_help(&data_dir, addr);
            run_server(cfg, help).await.map_err(|e| e.to_string())
        }
        Cmd::Serve { config } => {
            let cfg = Config::load(&config, &ProcessEnv).map_err(|e| e.to_string())?;
            run_server(cfg, |_| {}).await.map_err(|e| e.to_string())
        }
        Cmd::Client {
            data_dir,
            name,
            server,
            call,
        } => run_client(&data_dir, &name, &server, call).await,
        Cmd::Keys {
            cmd: KeysCmd::GenerateKek { out },
        } => {
            LocalKek::generate_file(&out).map_err(|e| e.to_string())?;
            println!("wrote a new KEK to {} (mode 0600)", out.display());
            Ok(())
        }
        Cmd::Keys {
            cmd: KeysCmd::HsmGenerate(args),
        } => {
            use tokenvault::crypto::kek::Kek;
            let kek = tokenvault::crypto::hsm::HsmKek::generate(&args.settings()?)
                .map_err(|e| e.to_string())?;
            println!(
                "generated HSM key {:?}: kek id {}",
                args.key_label,
                kek.id()
            );
            Ok(())
        }
        Cmd::Keys {
            cmd: KeysCmd::HsmInfo(args),
        } => {
            let i = tokenvault::crypto::hsm::HsmKek::describe(&args.settings()?)
                .map_err(|e| e.to_string())?;
            println!(
                "token: {}\nkey label: {}\nkey id: {}\nvalue length: {}\nsensitive: {}\nextractable: {}\nnever extractable: {}",
                i.token_label,
                i.key_label,
                i.key_id_hex,
                i.value_len,
                i.sensitive,
                i.extractable,
                i.never_extractable
            );
            Ok(())
        }
    }
}

/// Opens the vault, binds, announces the bound address on standard output
/// (`listening on ADDR`, one line, for scripts and tests using port 0), and
/// serves until SIGTERM or SIGINT.
async fn run_server(cfg: Config, announce: impl FnOnce(SocketAddr)) -> Result<(), StartError> {
    let vault = open_configured(&cfg, &ProcessEnv).await?;
    let shutdown = shutdown_signal();
    if vault.is_sealed() {
        tracing::warn!("vault is sealed: custodians must submit their shares (vault unseal)");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| StartError::Serve(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Serve(e.to_string()))?;
    tracing::info!(%addr, "vault serving (mutual TLS)");
    announce(addr);
    println!("listening on {addr}");
    serve(listener, &cfg, vault, shutdown).await
}

fn print_dev_help(data_dir: &std::path::Path, listen: SocketAddr) {
    let d = data_dir.display();
    let names: Vec<&str> = DEV_CLIENTS.iter().map(|c| c.name).collect();
    println!(
        "tokenvault development setup in {d}\n\
         \x20 listening on {listen} with mutual TLS; client certificates: {}\n\
         \x20 tokenize (card number on stdin):\n\
         \x20   vault client --data-dir {d} --server https://{listen} --as acme-checkout tokenize\n\
         \x20 detokenize:\n\
         \x20   vault client --data-dir {d} --server https://{listen} --as acme-payments detokenize TOKEN --purpose \"charge order 42\"\n\
         \x20 (with cargo: cargo run --release -- client ...)",
        names.join(", ")
    );
}

async fn run_client(
    data_dir: &std::path::Path,
    name: &str,
    server: &str,
    call: Call,
) -> Result<(), String> {
    let pki = ClientPki::from_dev_dir(data_dir, name).map_err(|e| {
        format!(
            "cannot read client certificate {name:?} in {}: {e}",
            data_dir.display()
        )
    })?;
    let mut client = connect(server, &pki)
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match call {
        Call::Tokenize {
            exp_month,
            exp_year,
        } => {
            let mut pan = Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut pan)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            let expiry = exp_month
                .zip(exp_year)
                .map(|(month, year)| proto::Expiry { month, year });
            let r = client
                .tokenize(proto::TokenizeRequest {
                    pan: pan.trim().to_owned(),
                    expiry,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.token);
            if let Some(m) = r.metadata {
                print_metadata(&m);
            }
        }
        Call::Detokenize { token, purpose } => {
            let r = client
                .detokenize(proto::DetokenizeRequest { token, purpose })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.pan);
            if let Some(e) = r.expiry {
                println!("expiry: {:02}/{}", e.month, e.year);
            }
        }
        Call::Metadata { token } => {
            let r = client
                .get_token_metadata(proto::GetTokenMetadataRequest { token })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(m) = r.metadata {
                print_metadata(&m);
            }
        }
        Call::Delete { token } => {
            client
                .delete_token(proto::DeleteTokenRequest { token })
                .await
                .map_err(status)?;
            println!("deleted");
        }
    }
    Ok(())
}

fn print_metadata(m: &proto::CardMetadata) {
    let brand = proto::CardBrand::try_from(m.brand)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("CARD_BRAND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "brand: {brand}\nbin: {}\nlast4: {}\nlength: {}",
        m.bin, m.last4, m.pan_length
    );
    if let Some(e) = &m.expiry {
        println!("expiry: {:02}/{}", e.month, e.year);
    }
    if let Some(t) = &m.created_at {
        println!("created: {} (unix seconds)", t.seconds);
    }
}
