//! `vault backup` and `vault restore`: a consistent snapshot of the
//! database while the vault serves, and putting one back while it does not
//! (see `storage::sqlite::backup`). The KEK is never part of a backup: keep
//! it, or its custodians' shares, in a separate place.

use std::path::{Path, PathBuf};

use clap::Args;
use tokenvault::config::{Config, ProcessEnv};

/// Which database: the one a config file names.
#[derive(Args)]
pub struct Target {
    #[arg(long, env = "VAULT_CONFIG")]
    config: PathBuf,
}

impl Target {
    fn db(&self) -> Result<PathBuf, String> {
        Ok(Config::load(&self.config, &ProcessEnv)
            .map_err(|e| e.to_string())?
            .storage
            .path)
    }
}

pub fn backup(target: &Target, out: &Path) -> Result<(), String> {
    let db = target.db()?;
    let s = tokenvault::storage::sqlite::backup(&db, out).map_err(|e| e.to_string())?;
    println!("backup written to {} (mode 0600): {s}", out.display());
    println!("it holds no KEK: the KEK (or its shares) must be kept apart from it");
    Ok(())
}

pub fn restore(target: &Target, from: &Path, replace: bool) -> Result<(), String> {
    let db = target.db()?;
    let r = tokenvault::storage::sqlite::restore(from, &db, replace).map_err(|e| e.to_string())?;
    println!(
        "restored {} from {}: {}",
        db.display(),
        from.display(),
        r.snapshot
    );
    match &r.replaced {
        Some(kept) => {
            println!(
                "the database it replaced is kept, complete, as {} (with the audit records made after the backup: export them before deleting it)",
                kept.display()
            );
            println!(
                "carried over from it: {} key destructions, {} token deletions",
                r.keys_destroyed, r.tokens_deleted
            );
        }
        None => println!(
            "no database was replaced, so nothing was carried over: destroy again any key, and delete again any token, destroyed or deleted after the backup was taken"
        ),
    }
    println!(
        "tokens made after the backup are gone; at the next start every active data key is retired (audited), so no key continues from the backup's use counter"
    );
    Ok(())
}
