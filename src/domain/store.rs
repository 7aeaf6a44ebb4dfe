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

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use super::audit::{AuditEvent, AuditRecord, Checkpoint};
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
    /// The request is refused as the data stands (e.g. destroying a key
    /// that tokens still reference). Nothing was written.
    #[error("{0}")]
    Precondition(String),
    /// A token was to be stored under a data key retired meanwhile: it
    /// must be encrypted again under the tenant's active key. Nothing was
    /// written.
    #[error("the data key was retired")]
    KeyRetired,
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

/// A background job's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "completed" => Some(Self::Completed),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A re-encryption job as stored: enough to show progress and to resume
/// from its checkpoint after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: u64,
    pub tenant: String,
    pub state: JobState,
    /// Tokens under decrypt-only keys when the job started.
    pub total: u64,
    /// Tokens re-encrypted so far.
    pub done: u64,
    /// The last token examined; the scan resumes after it.
    pub checkpoint: Option<Token>,
    /// Completed passes over the table (a pass may find late arrivals).
    pub passes: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub actor: String,
    pub reason: String,
    pub error: Option<String>,
}

/// One token re-sealed under a new key; applied only if the row still has
/// its old key (a concurrent delete or re-encryption wins).
#[derive(Clone, PartialEq, Eq)]
pub struct Reencrypted {
    pub token: Token,
    pub old_dek: u32,
    pub new_dek: u32,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Reencrypted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reencrypted")
            .field("token", &self.token)
            .field("old_dek", &self.old_dek)
            .field("new_dek", &self.new_dek)
            .finish_non_exhaustive()
    }
}

/// Which audit records an auditor wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// `Some(true)`: key lifecycle events only; `Some(false)`: data access
    /// only.
    pub key_events: Option<bool>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub tenant: Option<String>,
    pub actor: Option<String>,
    pub outcome: Option<String>,
}

/// The checkpoint signing key as stored: the private half wrapped by the
/// KEK, the public half in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSigningKey {
    pub wrapped: Vec<u8>,
    pub public: Vec<u8>,
}

impl std::fmt::Debug for StoredSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSigningKey").finish_non_exhaustive()
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
    /// How many tokens are under each data key (keys with none may be
    /// absent). Counted when asked, for key status and re-encryption jobs:
    /// not cheap, not on any per-request path.
    async fn token_counts(&self) -> Result<std::collections::HashMap<u32, u64>, StoreError>;
    /// Stores a new wrapped DEK. `Conflict` if its id, or its tenant and
    /// version, is taken.
    async fn insert_dek(&self, dek: &WrappedDek, audit: AuditEvent) -> Result<(), StoreError>;
    /// Raises a DEK's reserved-use counter. Never lowers it.
    async fn reserve_dek_uses(&self, dek_id: u32, reserved: u64) -> Result<(), StoreError>;

    /// Inserts a token and its audit event in one commit. `Conflict` if the
    /// token exists; `KeyRetired` if its data key is no longer active (the
    /// caller encrypts again under the active key); `Precondition` if that
    /// key was destroyed.
    async fn insert_token(&self, rec: TokenRecord, audit: AuditEvent) -> Result<(), StoreError>;
    /// The token's row. Shared, not copied: a backend may hand out the row
    /// it caches.
    async fn get_token(&self, token: &Token) -> Result<Option<Arc<TokenRecord>>, StoreError>;
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

    /// Adds `new` as its tenant's active DEK and turns `retire` (if any) to
    /// decrypt-only, in one commit with `audit`.
    async fn rotate_dek(
        &self,
        new: &WrappedDek,
        retire: Option<u32>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;
    /// Destroys a decrypt-only DEK: its wrapped key is erased and its state
    /// becomes `destroyed`. `Precondition` if any token still references it
    /// or it is active.
    async fn destroy_dek(&self, id: u32, audit: AuditEvent) -> Result<(), StoreError>;
    /// Crypto-shredding: destroys every DEK of `tenant`, referenced or not.
    /// Returns the ids destroyed.
    async fn shred_tenant(&self, tenant: &str, audit: AuditEvent) -> Result<Vec<u32>, StoreError>;
    /// What a restore from backup left for the next start (a note naming
    /// the backup), if this database was restored and the start after it
    /// has not finished the restore yet.
    async fn restore_marker(&self) -> Result<Option<String>, StoreError>;

    /// Finishes a restore in one commit: every active data key becomes
    /// decrypt-only (their use counters came from the backup and may be
    /// behind), the marker is cleared, and `audit`, with the retired ids
    /// added to its detail, is appended. Returns the retired ids.
    async fn finish_restore(&self, audit: AuditEvent) -> Result<Vec<u32>, StoreError>;

    /// KEK rotation: replaces the wrapped form of the listed DEKs, of the
    /// audit signing key (if given) and the KEK pin in one commit.
    /// `Precondition` unless the list covers every undestroyed DEK.
    async fn rewrap_deks(
        &self,
        pin: &KekCheck,
        rewrapped: Vec<(u32, Vec<u8>)>,
        signing_key: Option<Vec<u8>>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// The audit chain's head: the last sequence number and chain hash
    /// (0 and the genesis hash when empty).
    async fn audit_head(&self) -> Result<(u64, [u8; 32]), StoreError>;
    /// Audit records matching `filter` with `seq > after`, oldest first.
    async fn query_audit(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Appends a checkpoint. `Conflict` if one exists for its seq.
    async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError>;
    async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Checkpoints with `seq > after`, oldest first, at most `limit`.
    async fn checkpoints_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    /// One page of an export, read in a single snapshot: audit records
    /// after `after` (at most `limit`), and the checkpoints covering them —
    /// on the last page (fewer than `limit` records), every remaining
    /// checkpoint, since one beyond the last record reveals a truncation.
    async fn export_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Vec<Checkpoint>), StoreError>;
    async fn signing_key(&self) -> Result<Option<StoredSigningKey>, StoreError>;
    /// Stores the signing key once, with its audit event. `Conflict` if one
    /// exists.
    async fn init_signing_key(
        &self,
        key: &StoredSigningKey,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Tokens of `tenant` after `after`, in token order, at most `limit`.
    async fn scan_tokens(
        &self,
        tenant: &str,
        after: Option<Token>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError>;

    /// Starts a job, in one commit with its audit event; returns its id.
    async fn create_job(&self, job: &JobRecord, audit: AuditEvent) -> Result<u64, StoreError>;
    async fn get_job(&self, id: u64) -> Result<Option<JobRecord>, StoreError>;
    async fn running_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Applies re-encrypted rows (each only if still under its old key) and
    /// advances the job's checkpoint and counters, in one commit. Returns
    /// how many rows were applied. `checkpoint: None` starts a new pass.
    async fn reencrypt_batch(
        &self,
        job_id: u64,
        rows: Vec<Reencrypted>,
        checkpoint: Option<Token>,
    ) -> Result<u64, StoreError>;
    /// Ends a job, in one commit with its audit event.
    async fn finish_job(
        &self,
        id: u64,
        state: JobState,
        error: Option<String>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Finishes queued writes and flushes. Later writes fail.
    async fn close(&self) -> Result<(), StoreError>;
}
