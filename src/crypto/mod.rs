//! Cryptography: the self-describing record envelope (AES-256-GCM), the KEK
//! sources that wrap data keys, and the in-memory key ring of unwrapped data
//! keys. All key material lives in zeroizing types and never prints.

pub mod envelope;
pub mod hsm;
pub mod kek;
pub mod keyring;
pub mod shamir;

use thiserror::Error;

/// Crypto failures. None carries key bytes or plaintext.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// Authentication failed: wrong key, tampered or truncated input.
    #[error("authentication failed")]
    Authentication,
    #[error("malformed ciphertext: {0}")]
    Malformed(&'static str),
    #[error("random number generator failed")]
    Rng,
    #[error("key error: {0}")]
    Key(String),
}

/// Fills a buffer from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Rng)
}

/// Appends `bytes` with a 2-byte big-endian length prefix, so concatenated
/// associated-data fields cannot be re-split into a different meaning.
pub(crate) fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}
