//! Mapping rows of the SQLite schema to domain records.

use rusqlite::Row;

use crate::domain::audit::{AuditRecord, Checkpoint};
use crate::domain::pan::CardBrand;
use crate::domain::store::{JobRecord, JobState, TokenRecord};
use crate::domain::token::Token;

pub(super) fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let token: Vec<u8> = r.get(0)?;
    let token: [u8; 22] = token.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "token".into(), rusqlite::types::Type::Blob)
    })?;
    let brand: String = r.get(4)?;
    Ok(TokenRecord {
        token: Token::from_bytes(token),
        tenant: r.get(1)?,
        dek_id: r.get(2)?,
        ciphertext: r.get(3)?,
        brand: CardBrand::from_str_opt(&brand).unwrap_or(CardBrand::Unknown),
        bin: r.get(5)?,
        last4: r.get(6)?,
        pan_len: r.get(7)?,
        exp_month: r.get(8)?,
        exp_year: r.get(9)?,
        created_ms: r.get(10)?,
    })
}

pub(super) const JOB_COLUMNS: &str =
    "SELECT id, tenant, state, total, done, checkpoint, passes, created_ms,
            updated_ms, actor, reason, error FROM jobs";

pub(super) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = r.get(2)?;
    let checkpoint: Option<Vec<u8>> = r.get(5)?;
    let u =
        |i: usize| -> rusqlite::Result<u64> { Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0)) };
    Ok(JobRecord {
        id: u(0)?,
        tenant: r.get(1)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        total: u(3)?,
        done: u(4)?,
        checkpoint: checkpoint
            .and_then(|t| <[u8; 22]>::try_from(t).ok())
            .map(Token::from_bytes),
        passes: r.get(6)?,
        created_ms: r.get(7)?,
        updated_ms: r.get(8)?,
        actor: r.get(9)?,
        reason: r.get(10)?,
        error: r.get(11)?,
    })
}

pub(super) fn checkpoint_from_row(r: &Row<'_>) -> rusqlite::Result<Checkpoint> {
    let h: Vec<u8> = r.get(1)?;
    Ok(Checkpoint {
        seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        chain_hash: h.try_into().map_err(|_| {
            rusqlite::Error::InvalidColumnType(1, "chain_hash".into(), rusqlite::types::Type::Blob)
        })?,
        time_ms: r.get(2)?,
        signature: r.get(3)?,
        key_id: r.get(4)?,
    })
}

/// Columns for [`audit_from_row`], in order.
pub(crate) const AUDIT_COLUMNS: &str = "seq, time_ms, actor, tenant, action, token, outcome, peer, purpose, detail, key_id, key_version, reason, approvers, entry_hash, chain_hash";

pub(super) fn hash_col(v: Option<Vec<u8>>) -> Option<[u8; 32]> {
    v.and_then(|b| <[u8; 32]>::try_from(b).ok())
}

pub(crate) fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let token: Option<Vec<u8>> = r.get(5)?;
    Ok(AuditRecord {
        seq: r.get::<_, i64>(0)?.try_into().unwrap_or(0),
        time_ms: r.get(1)?,
        actor: r.get(2)?,
        tenant: r.get(3)?,
        action: r.get(4)?,
        token: token
            .and_then(|t| <[u8; 22]>::try_from(t).ok())
            .map(Token::from_bytes),
        outcome: r.get(6)?,
        peer: r.get(7)?,
        purpose: r.get(8)?,
        detail: r.get(9)?,
        key_id: r.get(10)?,
        key_version: r.get(11)?,
        reason: r.get(12)?,
        approvers: r.get(13)?,
        entry_hash: hash_col(r.get(14)?),
        chain_hash: hash_col(r.get(15)?),
    })
}
