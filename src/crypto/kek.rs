//! Key-encryption keys: the root of the key hierarchy. A KEK wraps and
//! unwraps data keys and is never stored in the database. Sources differ (a
//! local key file or environment variable today; an HSM or Shamir shares
//! later); the rest of the vault sees only the [`Kek`] trait.

use std::fmt;
use std::path::Path;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInPlace, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CryptoError, random_bytes};

/// 256-bit key material, zeroized on drop, never printed.
pub struct KeyBytes(Zeroizing<[u8; 32]>);

impl KeyBytes {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn from_slice(b: &[u8]) -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; 32]);
        if b.len() != 32 {
            return Err(CryptoError::Key(format!(
                "key must be 32 bytes (256 bits), got {}",
                b.len()
            )));
        }
        k.copy_from_slice(b);
        Ok(Self(k))
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes(<redacted>)")
    }
}

/// A key-encryption key, wherever it lives.
pub trait Kek: Send + Sync {
    /// A stable, non-secret identifier, pinned in the database so a
    /// substituted KEK is refused.
    fn id(&self) -> &str;
    /// Wraps a data key, binding `aad` (the key's identity).
    fn wrap(&self, key: &KeyBytes, aad: &[u8]) -> Result<Vec<u8>, CryptoError>;
    /// Unwraps a data key. Fails, returning no key bytes, if the KEK, the
    /// wrapped bytes or `aad` differ from wrapping time.
    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<KeyBytes, CryptoError>;
}

const WRAP_FORMAT: u8 = 0x01;
const WRAP_LEN: usize = 1 + 12 + 32 + 16;

/// A KEK held in process memory, loaded from a key file or an environment
/// variable holding base64 of 32 bytes. Wraps with AES-256-GCM so the data
/// key's identity can be bound as associated data (AES-KWP has none).
pub struct LocalKek {
    cipher: Aes256Gcm,
    id: String,
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek").field("id", &self.id).finish()
    }
}

impl LocalKek {
    pub fn from_key(key: &KeyBytes) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose())
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(b"tokenvault/kek-id/v1");
        let fp = mac.finalize().into_bytes();
        Self {
            cipher: Aes256Gcm::new(key.expose().into()),
            id: format!("local:{}", hex::encode(&fp[..8])),
        }
    }

    /// Parses base64 text (surrounding whitespace ignored) of exactly 32
    /// bytes. Error messages never include the text.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let raw = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|_| CryptoError::Key("KEK is not valid base64".into()))?,
        );
        Ok(Self::from_key(&KeyBytes::from_slice(&raw)?))
    }

    /// Loads a key file, refusing one that others can read.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        check_private(path, "KEK file")?;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            CryptoError::Key(format!("cannot read KEK file {}: {e}", path.display()))
        })?);
        Self::from_base64(&text)
    }

    /// Generates a new KEK into `path` (mode 0600, refusing to overwrite).
    pub fn generate_file(path: &Path) -> Result<Self, CryptoError> {
        let key = KeyBytes::generate()?;
        // Sized up front, so no unwiped partial copy is left by a regrow.
        let mut text = Zeroizing::new(String::with_capacity(45));
        B64.encode_string(key.expose(), &mut text);
        text.push('\n');
        crate::fsutil::write_private(path, text.as_bytes())
            .map_err(|e| CryptoError::Key(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self::from_key(&key))
    }
}

/// HMAC accepts keys of any length, so construction cannot fail.
fn unreachable_hmac() -> Hmac<Sha256> {
    unreachable!("HMAC-SHA256 accepts any key length")
}

/// Refuses a secret file (`what` names it in the error) that another
/// account could read or change: one with any group or other permission
/// bit, or one not owned by the user this process runs as (its owner could
/// widen the mode, or replace the key, at any time).
#[cfg(unix)]
pub fn check_private(path: &Path, what: &str) -> Result<(), CryptoError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path)
        .map_err(|e| CryptoError::Key(format!("cannot read {what} {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CryptoError::Key(format!(
            "{what} {} is readable by group or others; chmod 600 it",
            path.display()
        )));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(CryptoError::Key(format!(
            "{what} {} is owned by uid {}, not by the vault's user (uid {euid}); chown it",
            path.display(),
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check_private(_: &Path, _: &str) -> Result<(), CryptoError> {
    Ok(())
}

impl Kek for LocalKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, key: &KeyBytes, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce)?;
        let mut out = Vec::with_capacity(WRAP_LEN);
        out.push(WRAP_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.expose());
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::<Aes256Gcm>::from_slice(&nonce), aad, &mut out[13..])
            .map_err(|_| CryptoError::Key("wrap failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<KeyBytes, CryptoError> {
        if wrapped.len() != WRAP_LEN || wrapped[0] != WRAP_FORMAT {
            return Err(CryptoError::Malformed("wrapped key"));
        }
        let mut buf = Zeroizing::new([0u8; 32]);
        buf.copy_from_slice(&wrapped[13..45]);
        self.cipher
            .decrypt_in_place_detached(
                Nonce::<Aes256Gcm>::from_slice(&wrapped[1..13]),
                aad,
                buf.as_mut(),
                wrapped[45..].into(),
            )
            .map_err(|_| CryptoError::Authentication)?;
        Ok(KeyBytes(buf))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn wrap_round_trip_binds_aad() {
        let kek = LocalKek::from_key(&KeyBytes::generate().unwrap());
        let dek = KeyBytes::generate().unwrap();
        let w = kek.wrap(&dek, b"acme/1").unwrap();
        assert_eq!(kek.unwrap(&w, b"acme/1").unwrap().expose(), dek.expose());
        assert!(matches!(
            kek.unwrap(&w, b"acme/2"),
            Err(CryptoError::Authentication)
        ));
        let other = LocalKek::from_key(&KeyBytes::generate().unwrap());
        assert!(other.unwrap(&w, b"acme/1").is_err());
        assert_ne!(kek.id(), other.id());
        for i in 0..w.len() {
            let mut bad = w.clone();
            bad[i] ^= 1;
            assert!(kek.unwrap(&bad, b"acme/1").is_err());
        }
    }

    #[test]
    fn base64_errors_do_not_echo_input() {
        let e = LocalKek::from_base64("c2VjcmV0LWJ1dC1zaG9ydA==").unwrap_err();
        assert!(!e.to_string().contains("c2Vj"));
        let e = LocalKek::from_base64("not base64 !!!").unwrap_err();
        assert!(!e.to_string().contains("!!!"));
    }

    #[test]
    fn id_is_stable_for_same_key() {
        let k = KeyBytes::generate().unwrap();
        let text = B64.encode(k.expose());
        assert_eq!(
            LocalKek::from_base64(&text).unwrap().id(),
            LocalKek::from_key(&k).id()
        );
    }

    #[test]
    fn debug_shows_no_key() {
        let k = KeyBytes::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "KeyBytes(<redacted>)");
        let kek = LocalKek::from_key(&k);
        let d = format!("{kek:?}");
        assert!(!d.to_lowercase().contains("abab"), "{d}");
        assert!(d.contains("local:"));
    }

    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        let a = LocalKek::generate_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(LocalKek::from_file(&p).unwrap().id(), a.id());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(LocalKek::from_file(&p).is_err());
        assert!(LocalKek::generate_file(&p).is_err(), "must not overwrite");
    }

    #[test]
    fn a_secret_file_must_be_owned_by_the_vault_user() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.key");
        crate::fsutil::write_private(&p, b"x").unwrap();
        check_private(&p, "TLS key").unwrap();
        // Hand it to another user (possible here only as root, as in CI).
        if rustix::process::geteuid().is_root() {
            let nobody = rustix::process::Uid::from_raw(65534);
            rustix::fs::chown(&p, Some(nobody), None).unwrap();
            let e = check_private(&p, "TLS key").unwrap_err().to_string();
            assert!(
                e.contains("owned by uid 65534") && e.contains("TLS key"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_refusal_names_the_file_and_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.key");
        crate::fsutil::write_private(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_private(&p, "TLS key").unwrap_err().to_string();
        assert!(
            e.contains("TLS key") && e.contains("server.key") && e.contains("chmod 600"),
            "{e}"
        );
    }
}
