//! The domain core: card numbers, tokens, callers and roles, audit events, the
//! storage port and the vault operations that compose them. Nothing here knows
//! about gRPC or SQL.

pub mod access;
pub mod audit;
pub mod auditing;
pub mod budget;
pub mod data;
pub mod dual_control;
pub mod error;
pub mod keys;
pub mod pan;
pub mod reencrypt;
pub mod store;
pub mod token;
pub mod unseal;
pub mod vault;

pub use access::{Action, Caller, Grant, Role, TenantId};
pub use audit::{AuditAction, AuditEvent, AuditRecord, Outcome};
pub use data::{CardMetadata, Detokenized, Expiry};
pub use error::VaultError;
pub use pan::{CardBrand, Pan, PanError};
pub use store::{Store, StoreError, TokenRecord};
pub use token::{Token, TokenError};
pub use vault::{Vault, VaultSettings};
