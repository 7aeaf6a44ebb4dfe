//! `vault keys …`, `vault unseal`, `vault seal`: key generation on this
//! host, and the key service of a running vault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tokenvault::crypto::hsm::{HsmKek, HsmSettings};
use tokenvault::crypto::kek::{Kek, KeyBytes, LocalKek};
use tokenvault::crypto::shamir::{split, write_share_files};
use tokenvault::proto;
use tokenvault::proto::key_service_client::KeyServiceClient;
use tokenvault::proto::rotate_kek_request::Target;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::{Conn, status};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Generate a new 256-bit KEK into a file created with mode 0600.
    GenerateKek {
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a new KEK and split it into custodian share files (Shamir):
    /// any THRESHOLD of the SHARES files rebuild it; fewer reveal nothing.
    /// The whole key is never written anywhere.
    Init {
        #[arg(long)]
        shares: u8,
        #[arg(long)]
        threshold: u8,
        /// Folder for the share files (one per custodian, mode 0600).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Generate a new non-extractable AES-256 KEK inside a PKCS#11 token.
    /// The user PIN is read from VAULT_HSM_PIN.
    HsmGenerate(HsmArgs),
    /// Show an HSM key's attributes (never its value): the HSM inventory
    /// entry PCI DSS 3.6.1.1 asks for. The PIN is read from VAULT_HSM_PIN.
    HsmInfo(HsmArgs),
    /// KEK and data-key status of a running vault.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Rotate a tenant's data key now.
    RotateDek {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: String,
    },
    /// Ask to re-wrap every data key under a new KEK (one of --file,
    /// --hsm-label, --shamir-out-dir). A second administrator must approve
    /// with `approve-kek` (dual control).
    RotateKek {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        reason: String,
        /// A KEK file on the vault host.
        #[arg(long, conflicts_with_all = ["hsm_label", "shamir_out_dir"])]
        file: Option<PathBuf>,
        /// A key in the vault's HSM token.
        #[arg(long, conflicts_with = "shamir_out_dir")]
        hsm_label: Option<String>,
        /// Generate the HSM key first.
        #[arg(long, requires = "hsm_label")]
        generate: bool,
        /// A new split KEK; share files are written to this folder on the
        /// vault host.
        #[arg(long, requires_all = ["shares", "threshold"])]
        shamir_out_dir: Option<PathBuf>,
        #[arg(long)]
        shares: Option<u32>,
        #[arg(long)]
        threshold: Option<u32>,
    },
    /// Re-encrypt a tenant's tokens still under decrypt-only keys, showing
    /// progress until done.
    Reencrypt {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: String,
        /// Start the job and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show (and with --watch, follow) a re-encryption job.
    Job {
        #[command(flatten)]
        conn: Conn,
        id: u64,
        #[arg(long)]
        watch: bool,
    },
    /// Approve another administrator's KEK rotation request; it takes
    /// effect now.
    ApproveKek {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        request: u64,
        #[arg(long)]
        reason: String,
    },
    /// Destroy a decrypt-only data key that no token references.
    Destroy {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        dek: u32,
        #[arg(long)]
        reason: String,
    },
    /// Ask for every key of a tenant to be destroyed (crypto-shredding); a
    /// second administrator must approve.
    ShredRequest {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        reason: String,
    },
    /// Approve another administrator's shred request.
    ShredApprove {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        request: u64,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Args)]
pub struct HsmArgs {
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
    fn settings(&self) -> Result<HsmSettings, String> {
        let pin = std::env::var("VAULT_HSM_PIN")
            .map(Zeroizing::new)
            .map_err(|_| "set the HSM user PIN in VAULT_HSM_PIN".to_string())?;
        Ok(HsmSettings {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            key_label: self.key_label.clone(),
            pin,
        })
    }
}

const ADMIN: &str = "admin";

async fn keys_client(conn: &Conn, default: &str) -> Result<KeyServiceClient<Channel>, String> {
    Ok(KeyServiceClient::new(conn.channel(default).await?))
}

pub async fn run(cmd: KeysCmd) -> Result<(), String> {
    match cmd {
        KeysCmd::GenerateKek { out } => {
            LocalKek::generate_file(&out).map_err(|e| e.to_string())?;
            println!("wrote a new KEK to {} (mode 0600)", out.display());
        }
        KeysCmd::Init {
            shares,
            threshold,
            out_dir,
        } => init(shares, threshold, &out_dir)?,
        KeysCmd::HsmGenerate(args) => {
            let kek = HsmKek::generate(&args.settings()?).map_err(|e| e.to_string())?;
            println!(
                "generated HSM key {:?}: kek id {}",
                args.key_label,
                kek.id()
            );
        }
        KeysCmd::HsmInfo(args) => {
            let i = HsmKek::describe(&args.settings()?).map_err(|e| e.to_string())?;
            println!(
                "token: {}\nkey label: {}\nkey id: {}\nvalue length: {}\nsensitive: {}\nextractable: {}\nnever extractable: {}\nprivate: {}",
                i.token_label,
                i.key_label,
                i.key_id_hex,
                i.value_len,
                i.sensitive,
                i.extractable,
                i.never_extractable,
                i.private
            );
        }
        KeysCmd::Status { conn } => key_status(&conn).await?,
        KeysCmd::RotateDek {
            conn,
            tenant,
            reason,
        } => {
            let r = keys_client(&conn, ADMIN)
                .await?
                .rotate_data_key(proto::RotateDataKeyRequest { tenant, reason })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(d) = r.data_key {
                println!(
                    "tenant {} now encrypts with data key {} (version {})",
                    d.tenant, d.id, d.version
                );
            }
        }
        KeysCmd::RotateKek {
            conn,
            reason,
            file,
            hsm_label,
            generate,
            shamir_out_dir,
            shares,
            threshold,
        } => {
            let target = if let Some(f) = file {
                Target::FilePath(f.display().to_string())
            } else if let Some(key_label) = hsm_label {
                Target::Hsm(proto::HsmKeyTarget {
                    key_label,
                    generate,
                })
            } else if let Some(d) = shamir_out_dir {
                Target::Shamir(proto::ShamirTarget {
                    out_dir: d.display().to_string(),
                    shares: shares.unwrap_or_default(),
                    threshold: threshold.unwrap_or_default(),
                })
            } else {
                return Err("name the new KEK: --file, --hsm-label or --shamir-out-dir".into());
            };
            let r = keys_client(&conn, ADMIN)
                .await?
                .request_kek_rotation(proto::RotateKekRequest {
                    reason,
                    target: Some(target),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "KEK rotation request {} ({}) recorded; a different administrator must approve it within an hour:\n  vault keys approve-kek --as admin-2 --request {} --reason ...",
                r.request_id, r.description, r.request_id
            );
        }
        KeysCmd::ApproveKek {
            conn,
            request,
            reason,
        } => {
            let r = keys_client(&conn, "admin-2")
                .await?
                .approve_kek_rotation(proto::ApproveKekRotationRequest {
                    request_id: request,
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "every data key is now wrapped under {}; point the configuration at the new KEK before the next start",
                r.kek_id
            );
            for f in r.share_files {
                println!("  share file: {f}");
            }
        }
        KeysCmd::Reencrypt {
            conn,
            tenant,
            reason,
            no_wait,
        } => {
            let mut c = keys_client(&conn, ADMIN).await?;
            let job = c
                .start_reencryption(proto::StartReencryptionRequest { tenant, reason })
                .await
                .map_err(status)?
                .into_inner();
            println!("re-encryption job {} started", job.job_id);
            if !no_wait {
                follow(&mut c, job.job_id).await?;
            }
        }
        KeysCmd::Job { conn, id, watch } => {
            let mut c = keys_client(&conn, ADMIN).await?;
            if watch {
                follow(&mut c, id).await?;
            } else {
                let j = c
                    .get_job(proto::GetJobRequest { job_id: id })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_job(&j);
            }
        }
        KeysCmd::Destroy { conn, dek, reason } => {
            keys_client(&conn, ADMIN)
                .await?
                .destroy_data_key(proto::DestroyDataKeyRequest {
                    data_key_id: dek,
                    reason,
                })
                .await
                .map_err(status)?;
            println!("data key {dek} destroyed");
        }
        KeysCmd::ShredRequest {
            conn,
            tenant,
            reason,
        } => {
            let r = keys_client(&conn, ADMIN)
                .await?
                .request_tenant_shred(proto::RequestTenantShredRequest { tenant, reason })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "shred request {} for tenant {} recorded; a different administrator must approve it within an hour:\n  vault keys shred-approve --as admin-2 --request {} --reason ...",
                r.request_id, r.tenant, r.request_id
            );
        }
        KeysCmd::ShredApprove {
            conn,
            request,
            reason,
        } => {
            let r = keys_client(&conn, "admin-2")
                .await?
                .approve_tenant_shred(proto::ApproveTenantShredRequest {
                    request_id: request,
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("destroyed data keys {:?}", r.data_key_ids);
        }
    }
    Ok(())
}

/// Generates a split KEK. The key exists only in memory here; what leaves
/// is one share per file.
fn init(shares: u8, threshold: u8, out_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let key = KeyBytes::generate().map_err(|e| e.to_string())?;
    let kek = LocalKek::from_key(&key);
    let parts = split(&key, kek.id(), threshold, shares).map_err(|e| e.to_string())?;
    let files = write_share_files(out_dir, &parts).map_err(|e| e.to_string())?;
    println!(
        "new KEK {} split into {shares} shares, any {threshold} of which rebuild it:",
        kek.id()
    );
    for f in files {
        println!("  {}", f.display());
    }
    println!(
        "hand each file to one custodian and delete it here; configure\n  [kek]\n  source = \"shamir\"\n  [kek.shamir]\n  threshold = {threshold}"
    );
    Ok(())
}

async fn key_status(conn: &Conn) -> Result<(), String> {
    let r = keys_client(conn, ADMIN)
        .await?
        .get_key_status(proto::GetKeyStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "KEK {} ({})",
        r.kek_id,
        if r.sealed { "SEALED" } else { "unsealed" }
    );
    println!(
        "{:>4}  {:<12} {:>3}  {:<12} {:>12} {:>10}  {:<10} rotation",
        "id", "tenant", "ver", "state", "encryptions", "tokens", "created"
    );
    for d in r.data_keys {
        let state = proto::DataKeyState::try_from(d.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("DATA_KEY_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let created = d.created_at.map(|t| t.seconds).unwrap_or_default();
        println!(
            "{:>4}  {:<12} {:>3}  {:<12} {:>12} {:>10}  {:<10} {}",
            d.id, d.tenant, d.version, state, d.encryptions, d.tokens, created, d.rotation_due
        );
    }
    Ok(())
}

fn print_job(j: &proto::Job) {
    let state = proto::JobState::try_from(j.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    println!(
        "job {} tenant {}: {state}, {}/{} tokens moved, pass {}{}",
        j.job_id,
        j.tenant,
        j.done,
        j.total,
        j.passes + 1,
        if j.error.is_empty() {
            String::new()
        } else {
            format!(", error: {}", j.error)
        }
    );
}

/// Follows a job with a progress bar (records done/total and rate).
async fn follow(c: &mut KeyServiceClient<Channel>, id: u64) -> Result<(), String> {
    let mut stream = c
        .watch_job(proto::GetJobRequest { job_id: id })
        .await
        .map_err(status)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tokens ({per_sec}) {msg}",
        )
        .map_err(|e| e.to_string())?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last = None;
    while let Some(j) = stream.message().await.map_err(status)? {
        bar.set_length(j.total.max(j.done));
        bar.set_position(j.done);
        bar.set_message(format!("pass {}", j.passes + 1));
        last = Some(j);
    }
    bar.finish_and_clear();
    let Some(j) = last else {
        return Err("the job stream ended without a report".into());
    };
    print_job(&j);
    if j.state == proto::JobState::Failed as i32 {
        return Err(format!("job {id} failed"));
    }
    Ok(())
}

/// Reads a custodian's share file: refused, like the KEK file, if another
/// account could read or change it, and read into a buffer sized from the
/// file up front, so no regrown copy of the share is left unwiped.
fn read_share_file(p: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read as _;
    tokenvault::crypto::kek::check_private(p, "share file").map_err(|e| e.to_string())?;
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", p.display()))?
        .len();
    // A share file is a few hundred bytes; anything far larger is not one.
    if len > 64 * 1024 {
        return Err(format!("{} is too large to be a share file", p.display()));
    }
    let mut text = Zeroizing::new(String::with_capacity(
        usize::try_from(len).unwrap_or(0).saturating_add(1),
    ));
    f.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(text)
}

pub async fn unseal(conn: &Conn, share_file: Option<&Path>) -> Result<(), String> {
    let (mut share, default) = match share_file {
        Some(p) => (read_share_file(p)?, "custodian-1"),
        None => (Zeroizing::new(String::new()), ADMIN),
    };
    let r = keys_client(conn, default)
        .await?
        .unseal(proto::UnsealRequest {
            // Moved, not copied; the request wipes it once sent.
            share: std::mem::take(&mut *share),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_seal(&r);
    Ok(())
}

pub async fn seal(conn: &Conn, reason: String) -> Result<(), String> {
    let r = keys_client(conn, ADMIN)
        .await?
        .seal(proto::SealRequest { reason })
        .await
        .map_err(status)?
        .into_inner();
    print_seal(&r);
    Ok(())
}

pub async fn seal_status(conn: &Conn) -> Result<(), String> {
    let r = keys_client(conn, ADMIN)
        .await?
        .get_seal_status(proto::GetSealStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    print_seal(&r);
    Ok(())
}

fn print_seal(s: &proto::SealStatus) {
    if s.sealed && s.threshold == 0 && s.submitted == 0 {
        println!(
            "sealed (KEK {}): custodians submit shares with `vault unseal --share-file`, or an administrator reloads a file or HSM KEK with `vault unseal`",
            s.kek_id
        );
    } else if s.sealed {
        println!(
            "sealed: {} of {} shares submitted (KEK {})",
            s.submitted, s.threshold, s.kek_id
        );
    } else {
        println!("unsealed (KEK {})", s.kek_id);
    }
}
