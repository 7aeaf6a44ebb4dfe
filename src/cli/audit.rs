//! `vault audit …`: export the log (from a running vault as an auditor, or
//! straight from a database file), verify an export offline with only the
//! public key, fetch the public key, list events, render the key-lifecycle
//! report.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use tokenvault::audit::export::{self, Line};
use tokenvault::audit::signer::{parse_public_key_pem, public_key_pem};
use tokenvault::audit::verify::{Options, parse_point, verify_export_with, verify_records_with};
use tokenvault::proto;
use tokenvault::proto::audit_service_client::AuditServiceClient;

use super::{Conn, status};

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Write the audit log as JSON Lines (entries and signed checkpoints).
    Export {
        #[command(flatten)]
        conn: Conn,
        /// Read this database file directly instead of calling the vault.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Output file (standard output if absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify an export offline: every hash, link and checkpoint signature.
    /// Needs no database and no KEK. Exits non-zero on any problem.
    Verify {
        /// The vault's checkpoint public key (PEM, from `vault audit public-key`).
        #[arg(long)]
        public_key: PathBuf,
        /// The export to check.
        file: PathBuf,
        #[command(flatten)]
        trust: Trust,
    },
    /// Verify the audit log inside a database file directly.
    VerifyDb {
        #[arg(long)]
        public_key: PathBuf,
        db: PathBuf,
        #[command(flatten)]
        trust: Trust,
    },
    /// Print the checkpoint public key (PEM).
    PublicKey {
        #[command(flatten)]
        conn: Conn,
        /// Read it from this database file instead of calling the vault.
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List events (as an auditor).
    List {
        #[command(flatten)]
        conn: Conn,
        /// key (lifecycle) or data (access).
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show the latest signed checkpoint.
    Checkpoint {
        #[command(flatten)]
        conn: Conn,
    },
    /// Render the key-lifecycle report from an export, as HTML and/or
    /// Markdown.
    Report {
        /// The export (from `vault audit export`).
        #[arg(long = "in")]
        input: PathBuf,
        /// Verify the export with this public key and show the verdict.
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long)]
        md: Option<PathBuf>,
        /// Data-key crypto-period to flag keys against.
        #[arg(long, default_value_t = 90)]
        crypto_period_days: u64,
        #[command(flatten)]
        trust: Trust,
    },
}

/// What a verification trusts besides the public key.
#[derive(clap::Args)]
pub struct Trust {
    /// A checkpoint seen earlier, SEQ:HEAD (repeatable): the log must still
    /// reach it with that head. Catches a log rewritten by a KEK holder or
    /// truncated together with its later checkpoints.
    #[arg(long = "expect-checkpoint", value_name = "SEQ:HEAD")]
    expect: Vec<String>,
    /// Verify an export that starts after SEQ from this trusted head.
    #[arg(long, value_name = "SEQ:HEAD")]
    anchor: Option<String>,
    /// Accept a log that no signed checkpoint covers.
    #[arg(long)]
    allow_unsigned: bool,
    /// Accept entries after the last signed checkpoint on internal
    /// consistency alone (an export ends on a checkpoint; a database's
    /// newest entries, checked by verify-db, always may).
    #[arg(long)]
    allow_unsigned_tail: bool,
}

impl Trust {
    fn options(&self) -> Result<Options, String> {
        Ok(Options {
            anchor: self.anchor.as_deref().map(parse_point).transpose()?,
            expect: self
                .expect
                .iter()
                .map(|p| parse_point(p))
                .collect::<Result<_, _>>()?,
            allow_unsigned: self.allow_unsigned,
            allow_unsigned_tail: self.allow_unsigned_tail,
        })
    }
}

const AUDITOR: &str = "auditor";

/// Text from the log, for a terminal: control characters and invisible
/// formatting ones (bidirectional overrides and isolates, zero-width
/// characters) are written as `\u{…}` escapes, so a name a certificate
/// carries cannot drive the auditor's terminal or hide text.
fn shown(s: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c,
                '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}')
    };
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if hidden(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn output(out: Option<&Path>) -> Result<Box<dyn Write>, String> {
    Ok(match out {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout())),
    })
}

fn read_public_key(path: &Path) -> Result<[u8; 32], String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_public_key_pem(&pem)
}

pub async fn run(cmd: AuditCmd) -> Result<(), String> {
    match cmd {
        AuditCmd::Export { conn, db, out } => {
            let mut w = output(out.as_deref())?;
            if let Some(db) = db {
                let (entries, cps, public) = tokenvault::storage::sqlite::read_audit_offline(&db)
                    .map_err(|e| e.to_string())?;
                let key_id = public
                    .and_then(|p| <[u8; 32]>::try_from(p).ok())
                    .map(|p| tokenvault::audit::signer::key_id(&p));
                let now = tokenvault::domain::vault::now_ms();
                export::write_line(&mut w, &export::header(now, key_id))
                    .map_err(|e| e.to_string())?;
                for line in export::interleave(&entries, &cps) {
                    export::write_line(&mut w, &line).map_err(|e| e.to_string())?;
                }
            } else {
                let mut c = AuditServiceClient::new(conn.channel(AUDITOR).await?);
                let mut stream = c
                    .export_log(proto::ExportLogRequest { after_seq: 0 })
                    .await
                    .map_err(status)?
                    .into_inner();
                while let Some(line) = stream.message().await.map_err(status)? {
                    w.write_all(line.json.as_bytes())
                        .and_then(|()| w.write_all(b"\n"))
                        .map_err(|e| e.to_string())?;
                }
            }
            w.flush().map_err(|e| e.to_string())
        }
        AuditCmd::Verify {
            public_key,
            file,
            trust,
        } => {
            let pk = read_public_key(&public_key)?;
            let opts = trust.options()?;
            let f = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let verdict = verify_export_with(BufReader::new(f), &pk, &opts);
            println!("{}", verdict.summary());
            if verdict.ok() {
                Ok(())
            } else {
                Err("the audit log failed verification".into())
            }
        }
        AuditCmd::VerifyDb {
            public_key,
            db,
            trust,
        } => {
            let pk = read_public_key(&public_key)?;
            // A live database's newest entries await their checkpoint.
            let opts = Options {
                allow_unsigned_tail: true,
                ..trust.options()?
            };
            let (entries, cps, _) =
                tokenvault::storage::sqlite::read_audit_offline(&db).map_err(|e| e.to_string())?;
            let verdict = verify_records_with(&entries, &cps, &pk, &opts);
            println!("{}", verdict.summary());
            if verdict.ok() {
                Ok(())
            } else {
                Err("the audit log failed verification".into())
            }
        }
        AuditCmd::PublicKey { conn, db, out } => {
            let pem = if let Some(db) = db {
                let (_, _, public) = tokenvault::storage::sqlite::read_audit_offline(&db)
                    .map_err(|e| e.to_string())?;
                let pk: [u8; 32] = public
                    .and_then(|p| p.try_into().ok())
                    .ok_or("this database has no audit signing key yet")?;
                public_key_pem(&pk)
            } else {
                let mut c = AuditServiceClient::new(conn.channel(AUDITOR).await?);
                c.get_public_key(proto::GetPublicKeyRequest {})
                    .await
                    .map_err(status)?
                    .into_inner()
                    .pem
            };
            let mut w = output(out.as_deref())?;
            w.write_all(pem.as_bytes()).map_err(|e| e.to_string())?;
            w.flush().map_err(|e| e.to_string())
        }
        AuditCmd::List {
            conn,
            kind,
            tenant,
            actor,
            outcome,
            limit,
        } => {
            let kind = match kind.as_deref() {
                None => proto::EventKind::Unspecified,
                Some("key") => proto::EventKind::KeyLifecycle,
                Some("data") => proto::EventKind::DataAccess,
                Some(other) => return Err(format!("--kind is key or data, not {other:?}")),
            };
            let mut c = AuditServiceClient::new(conn.channel(AUDITOR).await?);
            let r = c
                .list_events(proto::ListEventsRequest {
                    kind: kind.into(),
                    tenant: tenant.unwrap_or_default(),
                    actor: actor.unwrap_or_default(),
                    outcome: outcome.unwrap_or_default(),
                    page_size: limit,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            for e in r.events {
                let key = e
                    .key_id
                    .map(|k| format!(" key={k}v{}", e.key_version.unwrap_or(0)))
                    .unwrap_or_default();
                println!(
                    "{:>6} {} {:<18} {:<10} {}{}{}{}",
                    e.seq,
                    e.time.map(|t| t.seconds).unwrap_or_default(),
                    shown(&e.action),
                    shown(&e.outcome),
                    shown(&e.actor),
                    key,
                    if e.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" reason={:?}", e.reason)
                    },
                    if e.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", shown(&e.detail))
                    },
                );
            }
            Ok(())
        }
        AuditCmd::Checkpoint { conn } => {
            let mut c = AuditServiceClient::new(conn.channel(AUDITOR).await?);
            match c
                .get_latest_checkpoint(proto::GetLatestCheckpointRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .checkpoint
            {
                None => println!("no checkpoint signed yet"),
                Some(cp) => println!(
                    "checkpoint at seq {}: head {} signed by {} at {}\nkeep it, and check later exports with --expect-checkpoint {}:{}",
                    cp.seq,
                    cp.chain_hash,
                    cp.key_id,
                    cp.time.map(|t| t.seconds).unwrap_or_default(),
                    cp.seq,
                    cp.chain_hash
                ),
            }
            Ok(())
        }
        AuditCmd::Report {
            input,
            public_key,
            html,
            md,
            crypto_period_days,
            trust,
        } => report(
            &input,
            public_key.as_deref(),
            (html.as_deref(), md.as_deref()),
            crypto_period_days,
            &trust.options()?,
        ),
    }
}

/// Reads an export into records and checkpoints.
fn read_export(
    text: &[u8],
) -> Result<
    (
        Vec<tokenvault::domain::AuditRecord>,
        Vec<tokenvault::domain::audit::Checkpoint>,
    ),
    String,
> {
    let mut entries = Vec::new();
    let mut cps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(&line).map_err(|e| format!("line {}: {e}", i + 1))? {
            Line::Header(_) => {}
            Line::Entry(e) => entries.push(e.record().map_err(|e| format!("line {}: {e}", i + 1))?),
            Line::Checkpoint(c) => {
                cps.push(c.checkpoint().map_err(|e| format!("line {}: {e}", i + 1))?)
            }
        }
    }
    Ok((entries, cps))
}

/// Renders the report. The export is read once, and the report and its
/// verdict are both made from that one copy, so the verdict shown is the
/// verdict of what is shown.
fn report(
    input: &Path,
    public_key: Option<&Path>,
    (html, md): (Option<&Path>, Option<&Path>),
    crypto_period_days: u64,
    trust: &Options,
) -> Result<(), String> {
    use tokenvault::audit::report::{ReportInput, build, render_html, render_markdown};
    if html.is_none() && md.is_none() {
        return Err("name an output: --html FILE and/or --md FILE".into());
    }
    let text = std::fs::read(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let (entries, cps) = read_export(&text)?;
    let verdict = match public_key {
        Some(pk) => {
            let pk = read_public_key(pk)?;
            Some(verify_export_with(text.as_slice(), &pk, trust))
        }
        None => None,
    };
    let report = build(&ReportInput {
        entries: &entries,
        checkpoints: &cps,
        verdict: verdict.as_ref(),
        crypto_period_ms: i64::try_from(crypto_period_days.saturating_mul(86_400_000))
            .unwrap_or(i64::MAX),
        generated_ms: tokenvault::domain::vault::now_ms(),
    });
    if let Some(p) = html {
        std::fs::write(p, render_html(&report)).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = md {
        std::fs::write(p, render_markdown(&report)).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(v) = verdict {
        println!("{}", v.summary());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn listed_text_cannot_drive_the_terminal() {
        assert_eq!(shown("spiffe://t/acme-worker"), "spiffe://t/acme-worker");
        assert_eq!(shown("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(shown("x\u{202E}y\nz"), "x\\u{202e}y\\u{a}z");
        assert_eq!(shown("café — ok"), "café — ok");
    }
}
