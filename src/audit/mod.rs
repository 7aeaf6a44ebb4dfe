//! The tamper-evident audit log: the hash chain over audit entries
//! ([`chain`]), Ed25519-signed checkpoints of its head ([`signer`]), the
//! JSONL export format ([`export`]), offline verification that needs only
//! an export and the public key ([`verify`]), and the key-lifecycle report
//! ([`report`]).

pub mod chain;
pub mod export;
pub mod report;

pub mod signer;
pub mod verify;
