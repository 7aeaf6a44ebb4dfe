//! Versioned schema migrations, tracked in `PRAGMA user_version`.
//!
//! Indexes are deliberately few: each one is another B-tree to update on
//! every tokenize. Tokens are the primary key of a `WITHOUT ROWID` table, and
//! since a token starts with its creation time, new rows append at the right
//! edge of the tree instead of landing on random pages.

use rusqlite::{Connection, Transaction};

const MIGRATIONS: &[&str] = &[
    // v1: the foundation.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE deks (
        id         INTEGER PRIMARY KEY,
        tenant     TEXT NOT NULL,
        version    INTEGER NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('active', 'decrypt-only', 'destroyed')),
        wrapped    BLOB,
        kek_id     TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        reserved   INTEGER NOT NULL DEFAULT 0,
        UNIQUE (tenant, version)
    );

    CREATE TABLE tokens (
        token      BLOB PRIMARY KEY,
        tenant     TEXT NOT NULL,
        dek_id     INTEGER NOT NULL,
        ciphertext BLOB NOT NULL,
        brand      TEXT NOT NULL,
        bin        TEXT NOT NULL,
        last4      TEXT NOT NULL,
        pan_len    INTEGER NOT NULL,
        exp_month  INTEGER,
        exp_year   INTEGER,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Append-only: seq is assigned by the single writer, gapless; entry_hash
    -- is reserved for the hash chain.
    CREATE TABLE audit (
        seq        INTEGER PRIMARY KEY,
        time_ms    INTEGER NOT NULL,
        actor      TEXT NOT NULL,
        tenant     TEXT,
        action     TEXT NOT NULL,
        token      BLOB,
        outcome    TEXT NOT NULL,
        peer       TEXT,
        purpose    TEXT,
        detail     TEXT,
        entry_hash BLOB
    );

    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;",
    // v2: key lifecycle. Each key counts the tokens under it (kept by the
    // writer, per batch), so "destroy only when nothing references it" needs
    // no index on the hot insert path; re-encryption jobs resume from a
    // checkpoint.
    "ALTER TABLE deks ADD COLUMN token_count INTEGER NOT NULL DEFAULT 0;
    UPDATE deks SET token_count = (SELECT count(*) FROM tokens t WHERE t.dek_id = deks.id);

    CREATE TABLE jobs (
        id         INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL,
        tenant     TEXT NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('running', 'completed', 'failed')),
        total      INTEGER NOT NULL,
        done       INTEGER NOT NULL DEFAULT 0,
        checkpoint BLOB,
        passes     INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        actor      TEXT NOT NULL,
        reason     TEXT NOT NULL,
        error      TEXT
    );

    ALTER TABLE audit ADD COLUMN key_id INTEGER;
    ALTER TABLE audit ADD COLUMN key_version INTEGER;
    ALTER TABLE audit ADD COLUMN reason TEXT;
    ALTER TABLE audit ADD COLUMN approvers TEXT;",
    // v3: the hash chain (entry_hash, chain_hash per row, computed by the
    // single writer) and signed checkpoints of its head, append-only too.
    "ALTER TABLE audit ADD COLUMN chain_hash BLOB;

    CREATE TABLE checkpoints (
        seq        INTEGER PRIMARY KEY,
        chain_hash BLOB NOT NULL,
        time_ms    INTEGER NOT NULL,
        signature  BLOB NOT NULL,
        key_id     TEXT NOT NULL
    );
    CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
    CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;",
    // v4: the per-key token count is gone. Keeping it exact cost an UPDATE
    // of the deks page in every commit (measured: the largest single cost
    // on the tokenize path); the rare questions it answered (may this key
    // be destroyed, how many tokens does a job have to move) are now
    // answered by a scan, guarded by the writer (see ops.rs `destroy_dek`).
    "ALTER TABLE deks DROP COLUMN token_count;",
    // v5: at most one active data key per tenant, enforced by the database
    // too, not only by the vault's lifecycle lock. Rotation retires the old
    // key before inserting the new one, so it never trips this. The deks
    // table is tiny and off the tokenize path: the index costs nothing there.
    // An older version could leave a second active key behind (a first-use
    // key creation cut short after its commit); every such key but the
    // newest, which is the one the key ring used, becomes decrypt-only
    // first: it still opens its tokens, and re-encryption can move them.
    "UPDATE deks SET state = 'decrypt-only'
     WHERE state = 'active'
       AND id < (SELECT MAX(n.id) FROM deks n WHERE n.tenant = deks.tenant AND n.state = 'active');
    CREATE UNIQUE INDEX deks_one_active_per_tenant ON deks (tenant) WHERE state = 'active';",
];

/// Brings the database to the newest schema, one transaction per version.
/// A database newer than this binary is refused rather than guessed at.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
            Some(format!(
                "database schema v{current} is newer than this vault (v{})",
                MIGRATIONS.len()
            )),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        apply(&tx, sql, i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn apply(tx: &Transaction<'_>, sql: &str, version: usize) -> rusqlite::Result<()> {
    tx.execute_batch(sql)?;
    if version == 3 {
        backfill_chain(tx)?;
    }
    tx.pragma_update(None, "user_version", version)
}

/// Chains audit rows written before v3. The append-only trigger is lifted
/// for this one update, inside the migration's transaction, and restored.
fn backfill_chain(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let rows = {
        let mut st = tx.prepare(
            "SELECT seq, time_ms, actor, tenant, action, token, outcome, peer, purpose, detail,
                    key_id, key_version, reason, approvers, NULL, NULL
             FROM audit ORDER BY seq",
        )?;
        let rows = st.query_map([], super::audit_from_row)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    if rows.is_empty() {
        return Ok(());
    }
    tx.execute_batch("DROP TRIGGER audit_no_update;")?;
    {
        let mut up =
            tx.prepare("UPDATE audit SET entry_hash = ?2, chain_hash = ?3 WHERE seq = ?1")?;
        for (r, (eh, ch)) in rows.iter().zip(crate::audit::verify::chain_of(&rows)) {
            up.execute(rusqlite::params![
                i64::try_from(r.seq).unwrap_or(i64::MAX),
                &eh[..],
                &ch[..]
            ])?;
        }
    }
    tx.execute_batch(
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
         BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;",
    )
}

/// The newest schema version this vault writes.
pub const fn version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
pub const fn current_version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn migrates_once_and_is_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap();
        let v: usize = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, current_version());
    }

    #[test]
    fn refuses_newer_schema() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        assert!(migrate(&mut c).is_err());
    }

    #[test]
    fn a_tenant_has_at_most_one_active_data_key() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let add = |c: &Connection, id: u32, version: u32, state: &str| {
            c.execute(
                "INSERT INTO deks (id, tenant, version, state, wrapped, kek_id, created_ms)
                 VALUES (?1, 'acme', ?2, ?3, x'00', 'k', 0)",
                rusqlite::params![id, version, state],
            )
        };
        add(&c, 1, 1, "active").unwrap();
        assert!(add(&c, 2, 2, "active").is_err(), "two active keys for acme");
        add(&c, 2, 2, "decrypt-only").unwrap();
        c.execute("UPDATE deks SET state = 'decrypt-only' WHERE id = 1", [])
            .unwrap();
        add(&c, 3, 3, "active").unwrap();

        // A database an older version left with two active keys for acme
        // migrates, keeping the newest active.
        c.execute_batch(
            "DROP INDEX deks_one_active_per_tenant;
             UPDATE deks SET state = 'active' WHERE id = 2;
             PRAGMA user_version = 4;",
        )
        .unwrap();
        migrate(&mut c).unwrap();
        let active: Vec<u32> = c
            .prepare("SELECT id FROM deks WHERE state = 'active' ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(active, [3]);
    }

    /// With `recursive_triggers` (set on the writer's connection),
    /// `INSERT OR REPLACE` cannot overwrite an audit row or checkpoint: its
    /// implicit delete fires the delete trigger.
    #[test]
    fn replace_cannot_overwrite_audit_rows() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        c.pragma_update(None, "recursive_triggers", "ON").unwrap();
        c.execute(
            "INSERT INTO audit (seq, time_ms, actor, action, outcome) VALUES (1, 0, 'a', 'x', 'success')",
            [],
        )
        .unwrap();
        assert!(
            c.execute(
                "INSERT OR REPLACE INTO audit (seq, time_ms, actor, action, outcome) VALUES (1, 0, 'b', 'x', 'success')",
                [],
            )
            .is_err()
        );
        let actor: String = c
            .query_row("SELECT actor FROM audit WHERE seq = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(actor, "a");
    }

    #[test]
    fn audit_rows_cannot_be_changed() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        c.execute(
            "INSERT INTO audit (seq, time_ms, actor, action, outcome) VALUES (1, 0, 'a', 'x', 'success')",
            [],
        )
        .unwrap();
        assert!(c.execute("UPDATE audit SET actor = 'b'", []).is_err());
        assert!(c.execute("DELETE FROM audit", []).is_err());
    }
}
