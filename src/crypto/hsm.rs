//! PKCS#11 HSM as KEK source (placeholder until the HSM adapter lands: every
//! call fails closed with a clear error).

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use super::CryptoError;
use super::kek::{Kek, KeyBytes};

/// Where the KEK lives in the HSM and how to log in.
pub struct HsmSettings {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token (slot) holding the key.
    pub token_label: String,
    /// Label of the AES-256 key object.
    pub key_label: String,
    /// User PIN.
    pub pin: Zeroizing<String>,
}

impl fmt::Debug for HsmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSettings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

/// What the HSM reports about a key object (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmKeyInfo {
    pub key_label: String,
    pub key_id_hex: String,
    pub value_len: u64,
    pub sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub token_label: String,
}

pub struct HsmKek {
    id: String,
}

impl fmt::Debug for HsmKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKek").field("id", &self.id).finish()
    }
}

fn unavailable() -> CryptoError {
    CryptoError::Key("HSM support is not built yet".into())
}

impl HsmKek {
    /// Opens an existing, non-extractable AES-256 key.
    pub fn open(_s: &HsmSettings) -> Result<Self, CryptoError> {
        Err(unavailable())
    }

    /// Generates a new non-extractable AES-256 key in the token.
    pub fn generate(_s: &HsmSettings) -> Result<Self, CryptoError> {
        Err(unavailable())
    }

    /// Describes the key object's attributes.
    pub fn describe(_s: &HsmSettings) -> Result<HsmKeyInfo, CryptoError> {
        Err(unavailable())
    }
}

impl Kek for HsmKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, _key: &KeyBytes, _aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Err(unavailable())
    }

    fn unwrap(&self, _wrapped: &[u8], _aad: &[u8]) -> Result<KeyBytes, CryptoError> {
        Err(unavailable())
    }
}
