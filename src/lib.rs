//! # tokenvault
//!
//! A payment-card tokenization vault: the one service in a payment stack
//! allowed to see card numbers (PANs). Everything else holds opaque tokens.
//!
//! # Layout
//!
//! - [`domain`]: the core. [`domain::Pan`] (only made by parsing),
//!   [`domain::Token`], callers and roles ([`domain::access`]), audit events,
//!   the [`domain::Store`] port, and [`domain::Vault`], which sequences every
//!   operation: the data plane (`data`), key lifecycle (`keys`: rotation,
//!   KEK rotation, destruction), the two-administrator changes
//!   (`dual_control`: crypto-shredding, KEK rotation requests), sealing
//!   (`unseal`),
//!   re-encryption jobs (`reencrypt`) and the audit log's reads and
//!   checkpoints (`auditing`); per-caller detokenize budgets (`budget`).
//!   Knows nothing of gRPC or SQL.
//! - [`crypto`]: the AES-256-GCM record envelope, KEK sources ([`crypto::kek`]
//!   file/env, [`crypto::hsm`] PKCS#11, [`crypto::shamir`] split knowledge)
//!   and the key ring of unwrapped data keys with their use counters.
//! - [`audit`]: the hash chain, Ed25519 checkpoints, the JSONL export, the
//!   offline verifier and the key-lifecycle report.
//! - [`storage`]: adapters for the store port, and the conformance suite
//!   every adapter runs. SQLite with a group-commit writer is the default.
//! - [`transport`]: gRPC services (`TokenService`, `KeyService`,
//!   `AuditService`), caller identity from the mTLS client certificate, and
//!   the single error → status mapping.
//! - [`server`]: assembles config, KEK, store, vault and the TLS listener;
//!   graceful shutdown. [`config`]: typed, validated configuration.
//! - [`devpki`]: development CA, certificates, KEK and config; [`client`]:
//!   an mTLS client for the CLI, load generator and tests.
//!
//! # A tokenize call
//!
//! TLS handshake (client certificate verified against the configured CA) →
//! [`transport::auth`] reads the identity and looks up its grant →
//! [`domain::Vault::tokenize`] checks the role, parses the PAN, takes one use
//! from the tenant's data key (reserving a new block durably if needed),
//! generates a random token, seals the PAN with the token, tenant and key id
//! as associated data → the store commits token row and audit record in one
//! group commit → only then is the token returned.
//!
//! # A detokenize call
//!
//! Identity and role as above → one call taken from the caller's detokenize
//! budget (RESOURCE_EXHAUSTED when spent; a call for a token the caller
//! cannot read costs more) → non-empty purpose → the token row is read and
//! its tenant checked (another tenant's token is NOT_FOUND) → the envelope
//! is opened with its data key (any mismatch is DATA_LOSS, never a wrong
//! PAN) → the audit record with the purpose is committed → only then is the
//! PAN returned. If the audit record cannot be written the call fails.

pub mod audit;
pub mod client;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod devpki;
pub mod domain;
pub mod fsutil;
pub mod hardening;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod transport;

/// Code generated from `proto/vault/v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("vault.v1");
}
