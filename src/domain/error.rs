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
    #[error("caller has no identity the vault recognises")]
    Unauthenticated,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Stored ciphertext failed authentication: tampered or corrupted.
    #[error("stored card data failed integrity check")]
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
            Self::NotFound => "not_found",
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
}
