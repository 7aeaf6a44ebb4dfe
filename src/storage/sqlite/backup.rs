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
    // Created empty and 0600 from the start: `VACUUM INTO` accepts an
    // empty file and keeps its mode, so the copy is never readable by
    // others, not even for a moment.
    create_new_private(out)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", out.display())))?;
    let result = (|| {
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

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub snapshot: Snapshot,
    /// Where the database it replaced was kept, if there was one.
    pub replaced: Option<PathBuf>,
    /// Data keys destroyed in the replaced database that the backup still
    /// held: destroyed in the restored one too.
    pub keys_destroyed: u64,
    /// Tokens the backup held that the replaced database no longer did
    /// (deleted or shredded since): deleted from the restored one too.
    pub tokens_deleted: u64,
}

/// Puts the backup `from` in place of the database at `db`, marked
/// restored. No vault may be running on `db` (its lock is held throughout).
///
/// The copy is built and checked beside the database first; only then is
/// it renamed into place, in one step, so a crash or an error at any point
/// leaves either the old database or the new one, complete.
///
/// An existing database is replaced only with `replace`. It must then
/// hold the backup's audit log as a prefix of its own (the backup is of
/// this database's history, and restoring it rewrites nothing before its
/// head), and what it destroyed or deleted since is carried into the copy:
/// a restore never brings back a destroyed key or a deleted card. It is
/// kept, complete, as `<db>.replaced-<ms>`, with the audit records made
/// after the backup. Without an existing database (disaster recovery)
/// nothing can be carried: keys destroyed and tokens deleted after the
/// backup come back, and the operator must destroy or delete them again.
pub fn restore(from: &Path, db: &Path, replace: bool) -> Result<Restored, StoreError> {
    let _lock = lock_exclusive(db)?;
    let current = db.exists();
    let orphan_wal = with_suffix(db, "-wal");
    if !current && orphan_wal.exists() {
        // SQLite would replay it into the restored file.
        return Err(unavailable(format!(
            "{} exists without its database; move it away first",
            orphan_wal.display()
        )));
    }
    if current && !replace {
        return Err(unavailable(format!(
            "a database already exists at {}; pass --replace to replace it (it is kept)",
            db.display()
        )));
    }
    let tmp = with_suffix(db, ".restoring");
    for leftover in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(&tmp, leftover));
    }
    let result = build_copy(from, &tmp, current.then_some(db)).and_then(|built| {
        let replaced = if current { Some(set_aside(db)?) } else { None };
        std::fs::rename(&tmp, db).map_err(unavailable)?;
        sync_dir(parent(db)).map_err(unavailable)?;
        Ok(Restored { replaced, ..built })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies the backup to `tmp` (0600), checks the copy itself, carries the
/// current database's destructions and deletions into it, and marks it.
fn build_copy(from: &Path, tmp: &Path, current: Option<&Path>) -> Result<Restored, StoreError> {
    {
        let mut src = std::fs::File::open(from)
            .map_err(|e| unavailable(format!("cannot read {}: {e}", from.display())))?;
        let mut dst = create_new_private(tmp).map_err(unavailable)?;
        std::io::copy(&mut src, &mut dst).map_err(unavailable)?;
        dst.sync_all().map_err(unavailable)?;
    }
    let snapshot = check(tmp)?;
    let c = Connection::open(tmp).map_err(unavailable)?;
    // The copy holds no WAL of its own: every change below goes into the
    // file itself, and secure_delete zeroes what is deleted.
    c.query_row("PRAGMA journal_mode=DELETE", [], |_| Ok(()))
        .map_err(unavailable)?;
    c.pragma_update(None, "secure_delete", "ON")
        .map_err(unavailable)?;
    c.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    let (mut keys_destroyed, mut tokens_deleted, mut replaced_head) = (0, 0, None);
    if let Some(cur) = current {
        let path = cur
            .to_str()
            .ok_or_else(|| unavailable("the database path is not valid UTF-8"))?;
        c.execute("ATTACH DATABASE ?1 AS cur", [path])
            .map_err(unavailable)?;
        (keys_destroyed, tokens_deleted, replaced_head) = carry_forward(&c, &snapshot)?;
        c.execute("DETACH DATABASE cur", []).map_err(unavailable)?;
    }
    let note = format!(
        "backup={} audit_head={} replaced_head={} carried_key_destructions={keys_destroyed} carried_token_deletions={tokens_deleted} restored_ms={}",
        audit_safe_name(from),
        snapshot.audit_head,
        replaced_head.map_or_else(|| "none".to_owned(), |h: u64| h.to_string()),
        crate::domain::vault::now_ms(),
    );
    c.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        rusqlite::params![RESTORE_MARKER, note.as_bytes()],
    )
    .map_err(unavailable)?;
    c.close().map_err(|(_, e)| unavailable(e))?;
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(unavailable)?;
    Ok(Restored {
        snapshot,
        replaced: None,
        keys_destroyed,
        tokens_deleted,
    })
}

/// With the current database attached as `cur`: refuses unless the
/// backup's audit log is a prefix of the current one, then destroys the
/// keys the current database destroyed and deletes the tokens it no
/// longer holds. Returns those counts and the current audit head.
fn carry_forward(
    c: &Connection,
    snapshot: &Snapshot,
) -> Result<(u64, u64, Option<u64>), StoreError> {
    let head = i64::try_from(snapshot.audit_head).unwrap_or(i64::MAX);
    let link = |db: &str| -> Result<Option<Vec<u8>>, StoreError> {
        c.query_row(
            &format!("SELECT chain_hash FROM {db}.audit WHERE seq = ?1"),
            [head],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)
    };
    let (ours, theirs) = (link("main")?, link("cur")?);
    if ours.is_none() || ours != theirs {
        return Err(StoreError::Precondition(format!(
            "the backup's audit log (to seq {}) is not a prefix of the current database's: \
             it is not a backup of this database's history, or the current log is damaged; \
             move the current database aside yourself to restore without it",
            snapshot.audit_head
        )));
    }
    let replaced_head: Option<i64> = c
        .query_row("SELECT max(seq) FROM cur.audit", [], |r| r.get(0))
        .map_err(unavailable)?;
    let keys = c
        .execute(
            "UPDATE main.deks SET state = 'destroyed', wrapped = NULL
             WHERE state != 'destroyed'
               AND id IN (SELECT id FROM cur.deks WHERE state = 'destroyed')",
            [],
        )
        .map_err(unavailable)?;
    // A card re-encrypted since the backup, whose backup-time key was then
    // destroyed, would come back under that destroyed key: unreadable. Its
    // new key is not in the backup to carry, so the restore is refused.
    let stranded: i64 = c
        .query_row(
            "SELECT count(*) FROM main.tokens m JOIN cur.tokens t ON t.token = m.token
             WHERE t.dek_id != m.dek_id
               AND m.dek_id IN (SELECT id FROM main.deks WHERE state = 'destroyed')",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if stranded > 0 {
        return Err(StoreError::Precondition(format!(
            "{stranded} card(s) in the backup were re-encrypted since under a newer key, and \
             the key the backup holds them under was destroyed: restored, they could never be \
             read; restore from a backup taken after the re-encryption"
        )));
    }
    let tokens = c
        .execute(
            "DELETE FROM main.tokens
             WHERE NOT EXISTS (SELECT 1 FROM cur.tokens t WHERE t.token = main.tokens.token)",
            [],
        )
        .map_err(unavailable)?;
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    Ok((
        n(keys),
        n(tokens),
        replaced_head.and_then(|h| u64::try_from(h).ok()),
    ))
}

/// Folds the current database's WAL into it, keeps it under a new name
/// (a hard link: it is never copied or half-moved) and removes its WAL
/// files, so the copy renamed over it next starts with none.
fn set_aside(db: &Path) -> Result<PathBuf, StoreError> {
    let c = Connection::open(db).map_err(unavailable)?;
    c.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    let busy: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(unavailable)?;
    if busy != 0 {
        return Err(unavailable(
            "the current database's WAL could not be checkpointed",
        ));
    }
    c.close().map_err(|(_, e)| unavailable(e))?;
    let kept = with_suffix(db, &format!(".replaced-{}", crate::domain::vault::now_ms()));
    std::fs::hard_link(db, &kept).map_err(unavailable)?;
    sync_dir(parent(db)).map_err(unavailable)?;
    for suffix in ["-wal", "-shm"] {
        match std::fs::remove_file(with_suffix(db, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(unavailable(e)),
            _ => {}
        }
    }
    // The removals must be on disk before the copy is renamed over the
    // database: else a crash could leave the old WAL beside the restored
    // file, and SQLite would replay it into the wrong database.
    sync_dir(parent(db)).map_err(unavailable)?;
    Ok(kept)
}

/// Creates `path`, which must not exist, with mode 0600 from the start.
fn create_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
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
    use crate::domain::AuditAction;
    use crate::domain::store::Store;
    use crate::domain::{Vault, VaultSettings};
    use crate::storage::conformance::{dek, event, record, token};
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};

    fn open(path: &Path) -> Arc<SqliteStore> {
        Arc::new(SqliteStore::open(path, SqliteOptions::default()).unwrap())
    }

    /// A database a vault has opened (KEK pinned, signing key, audit
    /// records) holding two keys and two tokens, then closed.
    async fn vault_db(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let store = open(&path);
        let kek = Arc::new(LocalKek::from_key(&KeyBytes::generate().unwrap()));
        let vault = Vault::open(store.clone(), kek, VaultSettings::default())
            .await
            .unwrap();
        drop(vault);
        for (id, tenant) in [(1, "acme"), (2, "globex")] {
            let ev = event(AuditAction::DekCreate, None);
            store.insert_dek(&dek(id, tenant, 1), ev).await.unwrap();
        }
        for n in [1, 2] {
            let ev = event(AuditAction::Tokenize, Some(token(n)));
            store
                .insert_token(record(token(n), "acme"), ev)
                .await
                .unwrap();
        }
        store.close().await.unwrap();
        path
    }

    fn count(db: &Path, sql: &str) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_backup_checks_out_and_a_tampered_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path(), "v.db").await;
        let out = dir.path().join("b.db");
        let snap = backup(&db, &out).unwrap();
        assert!(snap.audit_head >= 4 && snap.tokens == 2, "{snap}");
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
        assert!(!with_suffix(&target, ".restoring").exists());
    }

    #[tokio::test]
    async fn a_restore_into_an_empty_place_leaves_a_marker_naming_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path(), "v.db").await;
        let out = dir.path().join("b.db");
        backup(&db, &out).unwrap();
        let target = dir.path().join("r.db");
        let r = restore(&out, &target, false).unwrap();
        assert!(r.replaced.is_none());
        let store = open(&target);
        let note = store.restore_marker().await.unwrap().unwrap();
        assert!(
            note.starts_with("backup=b.db audit_head=") && note.contains("replaced_head=none"),
            "{note}"
        );
        store.close().await.unwrap();
    }

    /// What the current database destroyed or deleted after the backup
    /// stays destroyed and deleted; the replaced database is kept whole.
    #[tokio::test]
    async fn a_replacing_restore_carries_destructions_and_deletions_forward() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path(), "v.db").await;
        let out = dir.path().join("b.db");
        backup(&db, &out).unwrap();
        let store = open(&db);
        let ev = event(AuditAction::DeleteToken, Some(token(1)));
        assert!(store.delete_token(&token(1), "acme", ev).await.unwrap());
        let ev = event(AuditAction::DekRotate, None);
        store
            .rotate_dek(&dek(3, "globex", 2), Some(2), ev)
            .await
            .unwrap();
        let ev = event(AuditAction::DekDestroy, None);
        store.destroy_dek(2, ev).await.unwrap();
        store.close().await.unwrap();

        let r = restore(&out, &db, false);
        assert!(
            r.is_err(),
            "an existing database was replaced without --replace"
        );
        let r = restore(&out, &db, true).unwrap();
        assert_eq!((r.keys_destroyed, r.tokens_deleted), (1, 1));
        assert_eq!(count(&db, "SELECT count(*) FROM tokens"), 1);
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM deks WHERE id = 2 AND state = 'destroyed' AND wrapped IS NULL"
            ),
            1
        );
        assert_eq!(
            count(&db, "SELECT count(*) FROM deks WHERE id = 3"),
            0,
            "made after the backup"
        );
        let kept = r.replaced.unwrap();
        assert_eq!(count(&kept, "SELECT count(*) FROM deks WHERE id = 3"), 1);
        assert!(
            !with_suffix(&db, "-wal").exists()
                || std::fs::metadata(with_suffix(&db, "-wal")).unwrap().len() == 0
        );
        let store = open(&db);
        let note = store.restore_marker().await.unwrap().unwrap();
        assert!(
            note.contains("carried_key_destructions=1 carried_token_deletions=1"),
            "{note}"
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_backup_of_another_history_does_not_replace_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let a = vault_db(dir.path(), "a.db").await;
        let b = vault_db(dir.path(), "b.db").await;
        let out = dir.path().join("a-backup.db");
        backup(&a, &out).unwrap();
        let before = std::fs::read(&b).unwrap();
        let e = restore(&out, &b, true).unwrap_err().to_string();
        assert!(e.contains("not a prefix"), "{e}");
        assert_eq!(
            std::fs::read(&b).unwrap(),
            before,
            "the database was touched"
        );
        assert!(!with_suffix(&b, ".restoring").exists());
    }

    /// A card re-encrypted after the backup and whose old key was then
    /// destroyed would come back unreadable: such a restore is refused,
    /// and the database is left as it was.
    #[tokio::test]
    async fn a_restore_that_would_strand_re_encrypted_cards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = vault_db(dir.path(), "v.db").await;
        let out = dir.path().join("b.db");
        backup(&db, &out).unwrap();
        let store = open(&db);
        let ev = event(AuditAction::DekRotate, None);
        store
            .rotate_dek(&dek(3, "acme", 2), Some(1), ev)
            .await
            .unwrap();
        store.close().await.unwrap();
        // Both acme cards re-encrypted under key 3 (as a job would), then
        // key 1 destroyed.
        Connection::open(&db)
            .unwrap()
            .execute("UPDATE tokens SET dek_id = 3 WHERE dek_id = 1", [])
            .unwrap();
        let store = open(&db);
        let ev = event(AuditAction::DekDestroy, None);
        store.destroy_dek(1, ev).await.unwrap();
        store.close().await.unwrap();

        let before = std::fs::read(&db).unwrap();
        let e = restore(&out, &db, true).unwrap_err().to_string();
        assert!(e.contains("2 card(s)") && e.contains("re-encrypted"), "{e}");
        assert_eq!(
            std::fs::read(&db).unwrap(),
            before,
            "the database was touched"
        );
        assert!(!with_suffix(&db, ".restoring").exists());
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
