//! The vault's error vocabulary: one variant per outcome a caller must be able
//! to tell apart, each carrying only text that is safe to show a caller.

use thiserror::Error;

/// What went wrong in a vault operation.
///
/// Every message is written by the vault itself: no variant carries caller
/// input, card digits, key bytes or plaintext, so the transport may pass the
/// `Display` text to the caller unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VaultError {
    #[error("{0}")]
    InvalidArgument(String),
    /// The token does not exist for the caller's tenant. Deliberately silent
    /// about whether it exists for another tenant.
    #[error("token not found")]
    NotFound,
    /// A data key, job or pending request named by id does not exist (or
    /// no longer does). The message names the kind of object, never the id.
    #[error("{0}")]
    NoSuch(String),
    /// The object named by id exists but belongs to a tenant outside the
    /// caller's grant. The caller is answered exactly as for
    /// [`VaultError::NoSuch`] with the same message, so an id never reveals
    /// another tenant's object; the audit log records the truth (denied).
    #[error("{0}")]
    OutOfScope(String),
    #[error("caller has no identity the vault recognises")]
    Unauthenticated,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Stored data failed an integrity check: ciphertext that does not
    /// authenticate, or a row the store cannot decode. Tampered or corrupted.
    #[error("stored data failed an integrity check")]
    DataLoss,
    #[error("{0}")]
    Unavailable(String),
    /// No key material is loaded: custodians must unseal the vault first.
    #[error("vault is sealed")]
    Sealed,
    #[error("internal error")]
    Internal,
}

impl VaultError {
    /// A stable short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "invalid_argument",
            Self::NotFound | Self::NoSuch(_) => "not_found",
            // Recorded as a denial: the caller only sees "not found".
            Self::OutOfScope(_) => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::DataLoss => "data_loss",
            Self::Unavailable(_) => "unavailable",
            Self::Sealed => "sealed",
            Self::Internal => "internal",
        }
    }

    /// The text an audit record keeps of this error: its message, except
    /// for an out-of-scope refusal, which the record names for what it was.
    pub fn audit_detail(&self) -> String {
        match self {
            Self::OutOfScope(_) => "outside the caller's tenant scope".into(),
            e => e.to_string(),
        }
    }
}
