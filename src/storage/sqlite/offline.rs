//! Reading the audit log straight from a database file, for offline export
//! and verification (the vault need not run, and may be running).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::rows::{AUDIT_COLUMNS, audit_from_row, checkpoint_from_row};
use super::unavailable;
use crate::domain::audit::{AuditRecord, Checkpoint};
use crate::domain::store::StoreError;

/// Audit records, checkpoints and the checkpoint public key, if any.
pub type OfflineAudit = (Vec<AuditRecord>, Vec<Checkpoint>, Option<Vec<u8>>);

/// Everything an offline audit export needs, read straight from a database
/// file through a read-only connection (the vault may be running): every
/// audit record, every checkpoint, and the checkpoint public key.
pub fn read_audit_offline(path: &Path) -> Result<OfflineAudit, StoreError> {
    let c =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(unavailable)?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unavailable)?;
    let tx = c.unchecked_transaction().map_err(unavailable)?;
    let entries = {
        let mut st = tx
            .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))
            .map_err(unavailable)?;
        let rows = st.query_map([], audit_from_row).map_err(unavailable)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)?
    };
    let checkpoints = {
        let mut st = tx
            .prepare(
                "SELECT seq, chain_hash, time_ms, signature, key_id FROM checkpoints ORDER BY seq",
            )
            .map_err(unavailable)?;
        let rows = st.query_map([], checkpoint_from_row).map_err(unavailable)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)?
    };
    let public: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'audit_public_key'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    Ok((entries, checkpoints, public))
}
