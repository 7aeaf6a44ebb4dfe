//! Audit events: what the vault records about every access and every key
//! lifecycle step. Events are appended by the store's single writer, which
//! gives them gapless sequence numbers; the hash chain over them is computed
//! in that same ordered path.

use super::token::Token;

/// What was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    Tokenize,
    Detokenize,
    GetMetadata,
    DeleteToken,
    /// A data key was generated and stored wrapped.
    DekCreate,
    /// The KEK was first pinned to this database.
    KekInit,
    /// A tenant's data key was replaced; the old one became decrypt-only.
    DekRotate,
    /// Every data key was re-wrapped under a new KEK.
    KekRotate,
    /// An administrator asked for a KEK rotation (a second must approve).
    KekRotateRequest,
    /// A decrypt-only data key nothing references was destroyed.
    DekDestroy,
    /// An administrator asked for a tenant's keys to be destroyed.
    ShredRequest,
    /// A second administrator approved, and the tenant's keys were destroyed.
    TenantShred,
    ReencryptStart,
    ReencryptComplete,
    ReencryptFail,
    /// A custodian submitted an unseal share.
    UnsealShare,
    Unseal,
    Seal,
    /// The checkpoint signing key was generated and stored wrapped.
    AuditKeyCreate,
    /// An auditor read the audit log (PCI DSS 10.2.1.3).
    AuditRead,
    /// An administrator, auditor or custodian read key state: key status, a
    /// re-encryption job, the seal status (PCI DSS 10.2.1.2).
    KeyRead,
    /// The first start after the database was restored from a backup: every
    /// data key that was active was retired.
    Restore,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::GetMetadata => "get_metadata",
            Self::DeleteToken => "delete_token",
            Self::DekCreate => "dek_create",
            Self::KekInit => "kek_init",
            Self::DekRotate => "dek_rotate",
            Self::KekRotate => "kek_rotate",
            Self::KekRotateRequest => "kek_rotate_request",
            Self::DekDestroy => "dek_destroy",
            Self::ShredRequest => "shred_request",
            Self::TenantShred => "tenant_shred",
            Self::ReencryptStart => "reencrypt_start",
            Self::ReencryptComplete => "reencrypt_complete",
            Self::ReencryptFail => "reencrypt_fail",
            Self::UnsealShare => "unseal_share",
            Self::Unseal => "unseal",
            Self::Seal => "seal",
            Self::AuditKeyCreate => "audit_key_create",
            Self::AuditRead => "audit_read",
            Self::KeyRead => "key_read",
            Self::Restore => "restore",
        }
    }

    pub const ALL: [AuditAction; 22] = [
        Self::Tokenize,
        Self::Detokenize,
        Self::GetMetadata,
        Self::DeleteToken,
        Self::DekCreate,
        Self::KekInit,
        Self::DekRotate,
        Self::KekRotate,
        Self::KekRotateRequest,
        Self::DekDestroy,
        Self::ShredRequest,
        Self::TenantShred,
        Self::ReencryptStart,
        Self::ReencryptComplete,
        Self::ReencryptFail,
        Self::UnsealShare,
        Self::Unseal,
        Self::Seal,
        Self::AuditKeyCreate,
        Self::AuditRead,
        Self::KeyRead,
        Self::Restore,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Key lifecycle events, as opposed to data access and reads (of the
    /// audit log, of key state).
    pub fn is_key_event(self) -> bool {
        !matches!(
            self,
            Self::Tokenize
                | Self::Detokenize
                | Self::GetMetadata
                | Self::DeleteToken
                | Self::AuditRead
                | Self::KeyRead
        )
    }
}

/// How it ended: `success`, `denied`, or the error code of the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(&'static str);

impl Outcome {
    pub const SUCCESS: Outcome = Outcome("success");
    pub const DENIED: Outcome = Outcome("denied");

    pub fn failed(code: &'static str) -> Self {
        if code == "permission_denied" || code == "unauthenticated" {
            Self::DENIED
        } else {
            Outcome(code)
        }
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// An event about to be appended. Holds no card data: at most a token, key
/// identifiers and caller-supplied purpose text screened for card numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub time_ms: i64,
    pub actor: String,
    pub tenant: Option<String>,
    pub action: AuditAction,
    pub token: Option<Token>,
    pub outcome: Outcome,
    pub peer: Option<String>,
    pub purpose: Option<String>,
    /// Free-form vault-written detail.
    pub detail: Option<String>,
    /// The data key concerned, for key lifecycle events.
    pub key_id: Option<u32>,
    pub key_version: Option<u32>,
    /// Why an administrator acted (required for key lifecycle actions).
    pub reason: Option<String>,
    /// Identities that approved the action (dual control).
    pub approvers: Option<String>,
}

impl AuditEvent {
    /// An event with every optional field empty and outcome success.
    pub fn new(time_ms: i64, actor: &str, action: AuditAction) -> Self {
        Self {
            time_ms,
            actor: actor.to_owned(),
            tenant: None,
            action,
            token: None,
            outcome: Outcome::SUCCESS,
            peer: None,
            purpose: None,
            detail: None,
            key_id: None,
            key_version: None,
            reason: None,
            approvers: None,
        }
    }
}

/// An event as stored, with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: i64,
    pub actor: String,
    pub tenant: Option<String>,
    pub action: String,
    pub token: Option<Token>,
    pub outcome: String,
    pub peer: Option<String>,
    pub purpose: Option<String>,
    pub detail: Option<String>,
    pub key_id: Option<u32>,
    pub key_version: Option<u32>,
    pub reason: Option<String>,
    pub approvers: Option<String>,
    /// The entry's hash and the chain head after it, as stored.
    pub entry_hash: Option<[u8; 32]>,
    pub chain_hash: Option<[u8; 32]>,
}

/// A signed statement of the audit chain's head at `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub chain_hash: [u8; 32],
    pub time_ms: i64,
    pub signature: Vec<u8>,
    /// Which signing key (see `audit::signer::key_id`).
    pub key_id: String,
}
