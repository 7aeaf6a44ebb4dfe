//! The checkpoint signing key: Ed25519 (ring), generated once per vault,
//! stored only wrapped by the KEK, its public key exportable so anyone can
//! verify checkpoints offline.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use super::chain::{Hash, checkpoint_message};
use crate::crypto::CryptoError;
use crate::crypto::kek::{Kek, KeyBytes};

/// Associated data binding the wrapped signing key to its purpose.
pub const SIGNING_KEY_AAD: &[u8] = b"tokenvault/audit-signing-key/v1";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The signing key, unwrapped. Holds only the 32-byte seed (zeroized on
/// drop); the ring key pair is rebuilt for each signature. ring does not
/// wipe that key pair (its expanded secret scalar) when it is dropped: a
/// known limit, as for other library buffers (SECURITY.md, "Memory").
pub struct AuditSigner {
    seed: KeyBytes,
    public: [u8; 32],
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("key_id", &key_id(&self.public))
            .finish_non_exhaustive()
    }
}

/// A short, stable name for a public key: hex of its SHA-256's first 8 bytes.
pub fn key_id(public: &[u8; 32]) -> String {
    let d = Sha256::digest(public);
    format!("ed25519:{}", hex::encode(&d[..8]))
}

impl AuditSigner {
    pub fn generate() -> Result<Self, CryptoError> {
        Self::from_seed(KeyBytes::generate()?)
    }

    fn from_seed(seed: KeyBytes) -> Result<Self, CryptoError> {
        let kp = Ed25519KeyPair::from_seed_unchecked(seed.expose())
            .map_err(|_| CryptoError::Key("invalid Ed25519 seed".into()))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(kp.public_key().as_ref());
        Ok(Self { seed, public })
    }

    /// Unwraps a stored signing key and checks it matches its public key.
    pub fn unwrap(kek: &dyn Kek, wrapped: &[u8], public: &[u8]) -> Result<Self, CryptoError> {
        let s = Self::from_seed(kek.unwrap(wrapped, SIGNING_KEY_AAD)?)?;
        if s.public[..] != *public {
            return Err(CryptoError::Key(
                "audit signing key does not match its public key".into(),
            ));
        }
        Ok(s)
    }

    pub fn wrap(&self, kek: &dyn Kek) -> Result<Vec<u8>, CryptoError> {
        kek.wrap(&self.seed, SIGNING_KEY_AAD)
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public)
    }

    /// Signs a checkpoint of the chain head.
    pub fn sign_checkpoint(
        &self,
        seq: u64,
        head: &Hash,
        time_ms: i64,
    ) -> Result<Vec<u8>, CryptoError> {
        let kp = Ed25519KeyPair::from_seed_unchecked(self.seed.expose())
            .map_err(|_| CryptoError::Key("invalid Ed25519 seed".into()))?;
        Ok(kp
            .sign(&checkpoint_message(seq, head, time_ms))
            .as_ref()
            .to_vec())
    }
}

/// Verifies a checkpoint signature with a public key.
pub fn verify_checkpoint(
    public: &[u8; 32],
    seq: u64,
    head: &Hash,
    time_ms: i64,
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&checkpoint_message(seq, head, time_ms), signature)
        .is_ok()
}

/// The public key as PEM (SubjectPublicKeyInfo), readable by OpenSSL.
pub fn public_key_pem(public: &[u8; 32]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        B64.encode(der)
    )
}

/// Parses a PEM public key written by [`public_key_pem`] (or OpenSSL).
pub fn parse_public_key_pem(pem: &str) -> Result<[u8; 32], String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let der = B64
        .decode(body)
        .map_err(|_| "public key is not valid PEM".to_string())?;
    if der.len() != SPKI_PREFIX.len() + 32 || der[..SPKI_PREFIX.len()] != SPKI_PREFIX {
        return Err("public key is not an Ed25519 SubjectPublicKeyInfo".into());
    }
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&der[SPKI_PREFIX.len()..]);
    Ok(pk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::kek::LocalKek;

    #[test]
    fn sign_verify_and_wrap_round_trip() {
        let s = AuditSigner::generate().unwrap();
        let head = [7u8; 32];
        let sig = s.sign_checkpoint(10, &head, 99).unwrap();
        assert!(verify_checkpoint(s.public(), 10, &head, 99, &sig));
        assert!(!verify_checkpoint(s.public(), 11, &head, 99, &sig));
        assert!(!verify_checkpoint(s.public(), 10, &[8u8; 32], 99, &sig));
        assert!(!verify_checkpoint(s.public(), 10, &head, 98, &sig));
        let other = AuditSigner::generate().unwrap();
        assert!(!verify_checkpoint(other.public(), 10, &head, 99, &sig));

        let kek = LocalKek::from_key(&KeyBytes::generate().unwrap());
        let w = s.wrap(&kek).unwrap();
        let back = AuditSigner::unwrap(&kek, &w, s.public()).unwrap();
        assert_eq!(back.public(), s.public());
        assert!(AuditSigner::unwrap(&kek, &w, other.public()).is_err());
        let wrong = LocalKek::from_key(&KeyBytes::generate().unwrap());
        assert!(AuditSigner::unwrap(&wrong, &w, s.public()).is_err());
    }

    #[test]
    fn pem_round_trip_and_debug_redacted() {
        let s = AuditSigner::generate().unwrap();
        let pem = public_key_pem(s.public());
        assert_eq!(&parse_public_key_pem(&pem).unwrap(), s.public());
        assert!(
            parse_public_key_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_err()
        );
        let d = format!("{s:?}");
        assert!(d.contains("ed25519:") && !d.contains("seed"), "{d}");
    }
}
