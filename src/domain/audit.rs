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
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Tokenize,
            Self::Detokenize,
            Self::GetMetadata,
            Self::DeleteToken,
            Self::DekCreate,
            Self::KekInit,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }

    /// Key lifecycle events, as opposed to data access.
    pub fn is_key_event(self) -> bool {
        matches!(self, Self::DekCreate | Self::KekInit)
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
    /// Free-form vault-written detail, e.g. a key id and version.
    pub detail: Option<String>,
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
}
