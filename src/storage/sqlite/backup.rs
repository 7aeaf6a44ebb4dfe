//! Backup and restore of the database file. A backup is a consistent
//! snapshot taken while the vault serves (`VACUUM INTO`: a compact copy
//! holding no free pages, so deleted rows stay deleted), mode 0600, synced,
//! and checked before it is reported done. It holds what the database
//! holds — ciphertext, wrapped data keys, truncated metadata, the audit log
//! — and never the KEK, which lives apart (PCI DSS 3.5.1, 3.6.1).
//!
//! A restore puts a checked backup in place of the database while no vault
//! runs on it, and marks it restored. The data keys' use counters in a
//! backup are behind the keys' real use, so the next start retires every
//! key that was active (see `Store::finish_restore`) before anything is
//! encrypted: no key continues from a rolled-back counter (SP 800-38D 8.3).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{lock_exclusive, unavailable};
use crate::audit::verify::{Options, verify_records_with};
use crate::domain::store::StoreError;
use crate::fsutil::sync_dir;

/// The meta key a restore leaves for the next start.
pub const RESTORE_MARKER: &str = "restored_from";

/// What a backup holds, as checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub tokens: u64,
    pub data_keys: u64,
    /// The last audit sequence number in it.
    pub audit_head: u64,
    pub bytes: u64,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens, {} data keys, audit log to seq {} ({} bytes)",
            self.tokens, self.data_keys, self.audit_head, self.bytes
        )
    }
}

/// Writes a consistent snapshot of the database at `db` to `out`, which
/// must not exist. The vault may be running. A snapshot that fails its
/// check is removed.
pub fn backup(db: &Path, out: &Path) -> Result<Snapshot, StoreError> {
    if !db.is_file() {
        return Err(unavailable(format!("no database at {}", db.display())));
    }
    // Created empty and 0600 first: `VACUUM INTO` accepts an empty file
    // and keeps its mode, so the copy is never readable by others.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", out.display())))?;
    let result = (|| {
        super::create_private(out).map_err(unavailable)?;
        let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(unavailable)?;
        c.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        let target = out
            .to_str()
            .ok_or_else(|| unavailable("the backup path is not valid UTF-8"))?;
        c.execute("VACUUM INTO ?1", [target]).map_err(unavailable)?;
        drop(c);
        std::fs::File::open(out)
            .and_then(|f| f.sync_all())
            .map_err(unavailable)?;
        sync_dir(parent(out)).map_err(unavailable)?;
        check(out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

/// Puts the backup `from` in place of the database at `db` and marks it
/// restored. No vault may be running on `db` (its lock is taken). An
/// existing database is moved aside, never deleted, and only with
/// `replace`; the paths it was moved to are returned.
pub fn restore(
    from: &Path,
    db: &Path,
    replace: bool,
) -> Result<(Snapshot, Vec<PathBuf>), StoreError> {
    let snapshot = check(from)?;
    let _lock = lock_exclusive(db)?;
    let siblings: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|s| with_suffix(db, s))
        .filter(|p| p.exists())
        .collect();
    if !siblings.is_empty() && !replace {
        return Err(unavailable(format!(
            "a database already exists at {}; pass --replace to move it aside",
            db.display()
        )));
    }
    let stamp = crate::domain::vault::now_ms();
    let mut moved = Vec::new();
    for p in siblings {
        let to = with_suffix(&p, &format!(".replaced-{stamp}"));
        std::fs::rename(&p, &to).map_err(unavailable)?;
        moved.push(to);
    }
    let tmp = with_suffix(db, ".restoring");
    let _ = std::fs::remove_file(&tmp);
    super::create_private(&tmp).map_err(unavailable)?;
    let result = (|| {
        std::fs::copy(from, &tmp).map_err(unavailable)?;
        let c = Connection::open(&tmp).map_err(unavailable)?;
        let note = format!(
            "backup={} audit_head={} restored_ms={stamp}",
            audit_safe_name(from),
            snapshot.audit_head
        );
        c.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![RESTORE_MARKER, note.as_bytes()],
        )
        .map_err(unavailable)?;
        drop(c);
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(unavailable)?;
        std::fs::rename(&tmp, db).map_err(unavailable)?;
        sync_dir(parent(db)).map_err(unavailable)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| (snapshot, moved))
}

/// Checks a backup (or any database file) without changing it: SQLite's
/// integrity check, a schema this vault knows, and an unbroken audit chain
/// whose checkpoints verify under the file's own signing key.
pub fn check(path: &Path) -> Result<Snapshot, StoreError> {
    let bad = |m: String| StoreError::Corrupt(format!("{}: {m}", path.display()));
    let c =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(unavailable)?;
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| bad(e.to_string()))?;
    if integrity != "ok" {
        return Err(bad(format!("integrity check failed: {integrity}")));
    }
    let version: usize = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| bad(e.to_string()))?;
    if version == 0 || version > super::schema::version() {
        return Err(bad(format!(
            "schema v{version} is not one this vault reads (v1 to v{})",
            super::schema::version()
        )));
    }
    let count = |sql: &str| -> Result<u64, StoreError> {
        c.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| bad(e.to_string()))
    };
    let tokens = count("SELECT count(*) FROM tokens")?;
    let data_keys = count("SELECT count(*) FROM deks")?;
    let public: Option<Vec<u8>> = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'audit_public_key'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| bad(e.to_string()))?;
    drop(c);
    let (entries, checkpoints, _) = super::read_audit_offline(path)?;
    match public.and_then(|p| <[u8; 32]>::try_from(p).ok()) {
        Some(pk) => {
            let opts = Options {
                allow_unsigned: true,
                ..Options::default()
            };
            let verdict = verify_records_with(&entries, &checkpoints, &pk, &opts);
            if !verdict.ok() {
                return Err(bad(format!("audit log: {}", verdict.summary())));
            }
        }
        None if entries.is_empty() => {}
        None => return Err(bad("audit records but no signing key".into())),
    }
    Ok(Snapshot {
        tokens,
        data_keys,
        audit_head: entries.last().map_or(0, |e| e.seq),
        bytes: std::fs::metadata(path).map_err(unavailable)?.len(),
    })
}

/// The backup's file name as the audit record may hold it: one word of
/// printable characters, and never a run of digits that could be a card
/// number (the audit log holds no free text that could).
fn audit_safe_name(p: &Path) -> String {
    use crate::domain::data::{contains_card_like_digits, unprintable};
    let name: String = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_whitespace() || unprintable(c) {
                '_'
            } else {
                c
            }
        })
        .take(128)
        .collect();
    if name.is_empty() || contains_card_like_digits(&name) {
        "(name_withheld)".into()
    } else {
        name
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::sync::Arc;

    use super::*;
    use crate::crypto::kek::{KeyBytes, LocalKek};
    use crate::domain::store::Store;
    use crate::domain::{Vault, VaultSettings};
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};

    /// A database a vault has opened (KEK pinned, signing key, audit
    /// records), then closed.
    async fn vault_db(dir: &Path) -> PathBuf {
        let path = dir.join("v.db");
        let store = Arc::new(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
        let kek = Arc::new(LocalKek::from_key(&KeyBytes::generate().unwrap()));
        let vault = Vault::open(store.clone(), kek, VaultSettings::default())
            .await
            .unwrap();
        drop(vault);
        store.close().await.unwrap();
        path
    }

    #[tokio::test]
    async fn a_backup_checks_out_and_a_tampered_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path()).await;
        let out = dir.path().join("b.db");
        let snap = backup(&db, &out).unwrap();
        assert!(snap.audit_head >= 2, "{snap}");
        assert_eq!(check(&out).unwrap(), snap);

        let c = Connection::open(&out).unwrap();
        c.execute_batch(
            "DROP TRIGGER audit_no_update; UPDATE audit SET actor = 'mallory' WHERE seq = 1;",
        )
        .unwrap();
        drop(c);
        let e = check(&out).unwrap_err().to_string();
        assert!(e.contains("audit log"), "{e}");
        let target = dir.path().join("restored.db");
        assert!(restore(&out, &target, true).is_err());
        assert!(!target.exists(), "a refused backup was put in place");
    }

    #[tokio::test]
    async fn a_restored_database_says_so_until_a_start_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path()).await;
        let out = dir.path().join("b.db");
        backup(&db, &out).unwrap();
        let target = dir.path().join("r.db");
        let (_, moved) = restore(&out, &target, false).unwrap();
        assert!(moved.is_empty());
        let store = SqliteStore::open(&target, SqliteOptions::default()).unwrap();
        let note = store.restore_marker().await.unwrap().unwrap();
        assert!(note.starts_with("backup=b.db audit_head="), "{note}");
        store.close().await.unwrap();
    }

    #[test]
    fn names_that_could_hold_a_card_number_are_withheld() {
        assert_eq!(
            audit_safe_name(Path::new("/b/vault 2026.db")),
            "vault_2026.db"
        );
        assert_eq!(
            audit_safe_name(Path::new("/b/4111111111111111.db")),
            "(name_withheld)"
        );
    }
}
