//! The storage port. The core defines it; adapters (SQLite, later PostgreSQL)
//! implement it. Every backend runs the same conformance suite
//! (`tests/storage_conformance.rs`).
//!
//! Invariants every implementation must keep:
//! - A write method returns `Ok` only once its effect is durable (committed
//!   and flushed to stable storage). Callers answer clients only after that.
//! - A data change and the audit event passed with it commit atomically.
//! - Audit events get strictly increasing, gapless sequence numbers in commit
//!   order, and are never updated or deleted.
//! - Stored values are opaque bytes to the store: it never sees plaintext.

use async_trait::async_trait;
use thiserror::Error;

use super::audit::{AuditEvent, AuditRecord};
use super::pan::CardBrand;
use super::token::Token;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The row to insert already exists (token or key id collision).
    #[error("already exists")]
    Conflict,
    /// Storage is unusable (I/O error, disk full, writer gone). The text is
    /// the backend's message, which never contains plaintext since the store
    /// sees none; it is logged, not sent to callers.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A tokenized card as stored: ciphertext plus the metadata PCI DSS 3.4.1
/// allows in clear (brand, BIN, last four, length, expiry).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub token: Token,
    pub tenant: String,
    pub dek_id: u32,
    pub ciphertext: Vec<u8>,
    pub brand: CardBrand,
    pub bin: String,
    pub last4: String,
    pub pan_len: u8,
    pub exp_month: Option<u8>,
    pub exp_year: Option<u16>,
    pub created_ms: i64,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("token", &self.token)
            .field("tenant", &self.tenant)
            .field("dek_id", &self.dek_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .field("brand", &self.brand)
            .finish_non_exhaustive()
    }
}

/// A data key as stored: wrapped by the KEK, never in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek {
    pub id: u32,
    pub tenant: String,
    pub version: u32,
    pub state: DekState,
    pub wrapped: Vec<u8>,
    pub kek_id: String,
    pub created_ms: i64,
    /// Encryptions reserved so far; every one up to this may have been used.
    pub reserved: u64,
}

impl std::fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedDek")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("kek_id", &self.kek_id)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DekState {
    Active,
    DecryptOnly,
    Destroyed,
}

impl DekState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::DecryptOnly => "decrypt-only",
            Self::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "decrypt-only" => Some(Self::DecryptOnly),
            "destroyed" => Some(Self::Destroyed),
            _ => None,
        }
    }
}

/// What pins the KEK to a database: its identifier and a check blob (a known
/// value wrapped under it) that only the right KEK can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekCheck {
    pub kek_id: String,
    pub check_blob: Vec<u8>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The pinned KEK, if the database has been initialised.
    async fn kek_check(&self) -> Result<Option<KekCheck>, StoreError>;
    /// Pins the KEK. `Conflict` if one is already pinned.
    async fn pin_kek(&self, check: &KekCheck, audit: AuditEvent) -> Result<(), StoreError>;

    async fn load_deks(&self) -> Result<Vec<WrappedDek>, StoreError>;
    /// Stores a new wrapped DEK. `Conflict` if its id, or its tenant and
    /// version, is taken.
    async fn insert_dek(&self, dek: &WrappedDek, audit: AuditEvent) -> Result<(), StoreError>;
    /// Raises a DEK's reserved-use counter. Never lowers it.
    async fn reserve_dek_uses(&self, dek_id: u32, reserved: u64) -> Result<(), StoreError>;

    /// Inserts a token and its audit event in one commit. `Conflict` if the
    /// token exists.
    async fn insert_token(&self, rec: TokenRecord, audit: AuditEvent) -> Result<(), StoreError>;
    async fn get_token(&self, token: &Token) -> Result<Option<TokenRecord>, StoreError>;
    /// Deletes the token if it belongs to `tenant`, committing `audit` with
    /// it; when nothing was deleted the audit outcome is rewritten to
    /// `not_found`. Returns whether a row was deleted.
    async fn delete_token(
        &self,
        token: &Token,
        tenant: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError>;

    /// Appends an audit event durably and returns its sequence number.
    async fn append_audit(&self, event: AuditEvent) -> Result<u64, StoreError>;
    /// Audit records with `seq > after`, oldest first, at most `limit`.
    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// Finishes queued writes and flushes. Later writes fail.
    async fn close(&self) -> Result<(), StoreError>;
}
