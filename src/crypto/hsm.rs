//! PKCS#11 HSM as KEK source. The KEK is a non-extractable, sensitive
//! AES-256 secret key object inside the token; data keys are wrapped and
//! unwrapped by the HSM itself (`C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`,
//! the data key's identity bound as GCM associated data), so the KEK never
//! enters process memory (PCI DSS 3.6.1.2).
//!
//! Wrapped format: `0x02 | iv (12) | ciphertext (32) | tag (16)`. The format
//! byte differs from [`LocalKek`](super::kek::LocalKek)'s `0x01`, so a key
//! wrapped by one source is never mistaken for the other's.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroizing;

use super::kek::{Kek, KeyBytes};
use super::{CryptoError, random_bytes};

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
    /// Usable only in a logged-in session (CKA_PRIVATE).
    pub private: bool,
    pub token_label: String,
}

const WRAP_FORMAT: u8 = 0x02;
const IV_LEN: usize = 12;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const WRAP_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
/// Length of the random `CKA_ID` given to generated keys.
const KEY_ID_LEN: usize = 16;

/// A KEK held in a PKCS#11 token. One logged-in session, used under a mutex:
/// sessions are not thread-safe, and wraps and unwraps are rare (once per
/// data key at start and on rotation).
pub struct HsmKek {
    id: String,
    key: ObjectHandle,
    session: Mutex<Session>,
    // The module's context (the session holds a handle to it as well).
    // C_Finalize is never called: PKCS#11 state is process-global and another
    // context in the process may still use it; process exit releases it.
    _ctx: Pkcs11,
}

impl fmt::Debug for HsmKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKek").field("id", &self.id).finish()
    }
}

/// A PKCS#11 failure as a crypto error: the function and return code only
/// (never a PIN, never key material).
fn p11(what: &str, e: P11Error) -> CryptoError {
    match e {
        P11Error::Pkcs11(rv, func) => {
            CryptoError::Key(format!("PKCS#11: {what}: C_{func:?} returned {rv:?}"))
        }
        other => CryptoError::Key(format!("PKCS#11: {what}: {other}")),
    }
}

/// A token, found by label, with a logged-in user session.
struct Conn {
    ctx: Pkcs11,
    session: Session,
    token_label: String,
}

impl Conn {
    fn open(s: &HsmSettings, read_write: bool) -> Result<Self, CryptoError> {
        let ctx = Pkcs11::new(&s.module).map_err(|e| {
            CryptoError::Key(format!(
                "cannot load PKCS#11 module {}: {e}",
                s.module.display()
            ))
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another context in this process initialised the module already;
            // PKCS#11 state is per process, so that one serves us too.
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(p11("cannot initialise the module", e)),
        }
        let want = s.token_label.trim();
        let mut found = Vec::new();
        for slot in ctx
            .get_slots_with_initialized_token()
            .map_err(|e| p11("cannot list slots", e))?
        {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| p11("cannot read token info", e))?;
            if info.label().trim() == want {
                found.push(slot);
            }
        }
        let slot = match found.as_slice() {
            [slot] => *slot,
            [] => {
                return Err(CryptoError::Key(format!(
                    "no initialised PKCS#11 token labelled {want:?}"
                )));
            }
            _ => {
                return Err(CryptoError::Key(format!(
                    "{} PKCS#11 tokens are labelled {want:?}; token labels must be unique",
                    found.len()
                )));
            }
        };
        let session = if read_write {
            ctx.open_rw_session(slot)
        } else {
            ctx.open_ro_session(slot)
        }
        .map_err(|e| p11("cannot open a session", e))?;
        let pin = AuthPin::from(s.pin.as_str());
        match session.login(UserType::User, Some(&pin)) {
            // Login state is per application and token in PKCS#11.
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(CryptoError::Key(format!(
                    "login to HSM token {want:?} failed: incorrect user PIN"
                )));
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(CryptoError::Key(format!(
                    "the user PIN of HSM token {want:?} is locked"
                )));
            }
            Err(e) => return Err(p11("login failed", e)),
        }
        Ok(Self {
            ctx,
            session,
            token_label: want.to_owned(),
        })
    }

    /// Secret-key objects labelled `label`.
    fn find(&self, label: &str) -> Result<Vec<ObjectHandle>, CryptoError> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| p11("cannot search for the key", e))
    }

    /// The single secret key labelled `label`.
    fn find_one(&self, label: &str) -> Result<ObjectHandle, CryptoError> {
        match self.find(label)?.as_slice() {
            [h] => Ok(*h),
            [] => Err(CryptoError::Key(format!(
                "no secret key labelled {label:?} in HSM token {:?}",
                self.token_label
            ))),
            many => Err(CryptoError::Key(format!(
                "{} secret keys are labelled {label:?} in HSM token {:?}; the KEK label must be unique",
                many.len(),
                self.token_label
            ))),
        }
    }

    fn attrs(&self, key: ObjectHandle) -> Result<KeyAttrs, CryptoError> {
        let list = self
            .session
            .get_attributes(
                key,
                &[
                    AttributeType::Id,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Private,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Derive,
                ],
            )
            .map_err(|e| p11("cannot read the key's attributes", e))?;
        let mut a = KeyAttrs::default();
        for attr in list {
            match attr {
                Attribute::Id(v) => a.id = v,
                Attribute::KeyType(t) => a.aes = t == KeyType::AES,
                Attribute::ValueLen(n) => {
                    a.value_len = u64::try_from(usize::from(n)).unwrap_or(u64::MAX);
                }
                Attribute::Sensitive(b) => a.sensitive = b,
                Attribute::Extractable(b) => a.extractable = b,
                Attribute::NeverExtractable(b) => a.never_extractable = b,
                Attribute::Private(b) => a.private = b,
                Attribute::Encrypt(b) => a.encrypt = b,
                Attribute::Decrypt(b) => a.decrypt = b,
                Attribute::Derive(b) => a.derive = b,
                _ => {}
            }
        }
        Ok(a)
    }

    fn into_kek(self, key: ObjectHandle, attrs: &KeyAttrs) -> HsmKek {
        HsmKek {
            id: kek_id(&self.token_label, &attrs.id),
            key,
            session: Mutex::new(self.session),
            _ctx: self.ctx,
        }
    }
}

/// The attributes the adapter checks. Absent ones read as the unsafe value
/// (`extractable` defaults to `true`), so a token that hides them is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyAttrs {
    id: Vec<u8>,
    aes: bool,
    value_len: u64,
    sensitive: bool,
    extractable: bool,
    never_extractable: bool,
    private: bool,
    encrypt: bool,
    decrypt: bool,
    derive: bool,
}

impl Default for KeyAttrs {
    fn default() -> Self {
        Self {
            id: Vec::new(),
            aes: false,
            value_len: 0,
            sensitive: false,
            extractable: true,
            never_extractable: false,
            private: false,
            encrypt: false,
            decrypt: false,
            derive: true,
        }
    }
}

/// Refuses a key that could leave the HSM or is not usable as the KEK.
fn check_acceptable(label: &str, a: &KeyAttrs) -> Result<(), CryptoError> {
    const WHY: &str = "PCI DSS 3.6.1.2: the KEK must stay inside the secure cryptographic device";
    let refuse = |what: String| {
        Err(CryptoError::Key(format!(
            "HSM key {label:?} {what}; refusing it"
        )))
    };
    if a.extractable {
        return refuse(format!("is extractable (CKA_EXTRACTABLE=true) — {WHY}"));
    }
    if !a.sensitive {
        return refuse(format!("is not sensitive (CKA_SENSITIVE=false) — {WHY}"));
    }
    if !a.private {
        // A public object can be used by any process that opens the token,
        // without the PIN: it could unwrap every data key.
        return refuse(format!(
            "is not private (CKA_PRIVATE=false): it is usable without logging in — {WHY}"
        ));
    }
    if !a.aes || a.value_len != KEY_LEN as u64 {
        return refuse(format!(
            "is not an AES-256 key (key type {}, {} bytes)",
            if a.aes { "AES" } else { "not AES" },
            a.value_len
        ));
    }
    if !a.encrypt || !a.decrypt {
        return refuse("does not allow both encryption and decryption".into());
    }
    if a.derive {
        // Key derivation from the KEK (XOR or concatenation with chosen
        // data, say) can produce an extractable key that reveals it.
        return refuse(format!(
            "allows key derivation (CKA_DERIVE=true), which can turn it into an extractable key — {WHY}"
        ));
    }
    if a.id.is_empty() {
        return refuse(
            "has no CKA_ID, which the vault pins to tell keys apart; give it a unique one".into(),
        );
    }
    Ok(())
}

fn kek_id(token_label: &str, key_id: &[u8]) -> String {
    format!("hsm:{token_label}:{}", hex::encode(key_id))
}

/// Splits a wrapped key into IV and ciphertext-with-tag.
fn parse_wrapped(wrapped: &[u8]) -> Result<([u8; IV_LEN], &[u8]), CryptoError> {
    if wrapped.len() != WRAP_LEN || wrapped[0] != WRAP_FORMAT {
        return Err(CryptoError::Malformed("HSM-wrapped key"));
    }
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&wrapped[1..=IV_LEN]);
    Ok((iv, &wrapped[1 + IV_LEN..]))
}

fn encode_wrapped(iv: &[u8; IV_LEN], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() != KEY_LEN + TAG_LEN {
        return Err(CryptoError::Key(format!(
            "HSM AES-GCM returned {} bytes, expected {}",
            sealed.len(),
            KEY_LEN + TAG_LEN
        )));
    }
    let mut out = Vec::with_capacity(WRAP_LEN);
    out.push(WRAP_FORMAT);
    out.extend_from_slice(iv);
    out.extend_from_slice(sealed);
    Ok(out)
}

/// Classifies a `C_Decrypt` failure. The HSM being unreachable or refusing
/// the operation is reported as such, so an outage is not mistaken for
/// tampering; anything else is a failed tag check (wrong key, tampered bytes
/// or a different `aad`) — tokens differ in the code they return for it
/// (SoftHSM2: `CKR_GENERAL_ERROR`, others `CKR_ENCRYPTED_DATA_INVALID`).
fn unwrap_error(e: P11Error) -> CryptoError {
    match e {
        P11Error::Pkcs11(
            RvError::CryptokiNotInitialized
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::HostMemory
            | RvError::KeyHandleInvalid
            | RvError::KeyFunctionNotPermitted
            | RvError::KeyTypeInconsistent
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::OperationActive
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn,
            _,
        )
        | P11Error::NullFunctionPointer
        | P11Error::LibraryLoading(_) => p11("unwrap (C_Decrypt, AES-GCM) failed", e),
        _ => CryptoError::Authentication,
    }
}

fn gcm<'a>(iv: &'a mut [u8; IV_LEN], aad: &'a [u8]) -> Result<Mechanism<'a>, CryptoError> {
    let bits = Ulong::try_from(TAG_LEN * 8).map_err(|e| p11("bad AES-GCM tag length", e))?;
    GcmParams::new(iv, aad, bits)
        .map(Mechanism::AesGcm)
        .map_err(|e| p11("bad AES-GCM parameters", e))
}

impl HsmKek {
    /// Opens an existing, non-extractable, sensitive AES-256 key, refusing
    /// any other.
    pub fn open(s: &HsmSettings) -> Result<Self, CryptoError> {
        let conn = Conn::open(s, false)?;
        let key = conn.find_one(&s.key_label)?;
        let attrs = conn.attrs(key)?;
        check_acceptable(&s.key_label, &attrs)?;
        if !attrs.never_extractable {
            tracing::warn!(
                key_label = %s.key_label,
                "HSM KEK was extractable at some point (CKA_NEVER_EXTRACTABLE=false); \
                 make sure no copy exists outside the HSM"
            );
        }
        Ok(conn.into_kek(key, &attrs))
    }

    /// Generates a new non-extractable AES-256 key in the token, refusing if
    /// a key with that label exists.
    pub fn generate(s: &HsmSettings) -> Result<Self, CryptoError> {
        let conn = Conn::open(s, true)?;
        if !conn.find(&s.key_label)?.is_empty() {
            return Err(CryptoError::Key(format!(
                "a secret key labelled {:?} already exists in HSM token {:?}; refusing to create another",
                s.key_label, conn.token_label
            )));
        }
        let value_len = Ulong::try_from(KEY_LEN).map_err(|e| p11("bad key length", e))?;
        let mut id = [0u8; KEY_ID_LEN];
        random_bytes(&mut id)?;
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(value_len),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(s.key_label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let restricted = Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]);
        template.push(restricted);
        let key = match conn.session.generate_key(&Mechanism::AesKeyGen, &template) {
            Ok(k) => k,
            // CKA_ALLOWED_MECHANISMS is optional in PKCS#11; a token that does
            // not know it still gets every other restriction.
            Err(P11Error::Pkcs11(RvError::AttributeTypeInvalid, _)) => {
                template.pop();
                conn.session
                    .generate_key(&Mechanism::AesKeyGen, &template)
                    .map_err(|e| p11("cannot generate the key", e))?
            }
            Err(e) => return Err(p11("cannot generate the key", e)),
        };
        let attrs = conn.attrs(key)?;
        check_acceptable(&s.key_label, &attrs)?;
        Ok(conn.into_kek(key, &attrs))
    }

    /// Describes the key object's attributes (never its value).
    pub fn describe(s: &HsmSettings) -> Result<HsmKeyInfo, CryptoError> {
        let conn = Conn::open(s, false)?;
        let key = conn.find_one(&s.key_label)?;
        let a = conn.attrs(key)?;
        Ok(HsmKeyInfo {
            key_label: s.key_label.clone(),
            key_id_hex: hex::encode(&a.id),
            value_len: a.value_len,
            sensitive: a.sensitive,
            extractable: a.extractable,
            never_extractable: a.never_extractable,
            private: a.private,
            token_label: conn.token_label,
        })
    }

    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>, CryptoError> {
        self.session
            .lock()
            .map_err(|_| CryptoError::Key("HSM session lock poisoned".into()))
    }
}

impl Kek for HsmKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, key: &KeyBytes, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut iv = [0u8; IV_LEN];
        random_bytes(&mut iv)?;
        let mut iv_param = iv;
        let mech = gcm(&mut iv_param, aad)?;
        let sealed = self
            .session()?
            .encrypt(&mech, self.key, key.expose())
            .map_err(|e| p11("wrap (C_Encrypt, AES-GCM) failed", e))?;
        drop(mech);
        // A token that makes its own IV (FIPS mode) writes it back into the
        // parameter: keep the IV it used, or the blob could never be opened.
        let wrapped = encode_wrapped(&iv_param, &sealed)?;
        // Prove the blob opens before anything stores it: a KEK rotation
        // commits these, and an unopenable one would lose its data key.
        let back = self.unwrap(&wrapped, aad)?;
        if back.expose() != key.expose() {
            return Err(CryptoError::Key(
                "the HSM's wrapped key did not unwrap to the same key".into(),
            ));
        }
        Ok(wrapped)
    }

    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<KeyBytes, CryptoError> {
        let (mut iv, sealed) = parse_wrapped(wrapped)?;
        let mech = gcm(&mut iv, aad)?;
        let plain = self
            .session()?
            .decrypt(&mech, self.key, sealed)
            .map(Zeroizing::new)
            .map_err(unwrap_error)?;
        if plain.len() != KEY_LEN {
            return Err(CryptoError::Authentication);
        }
        KeyBytes::from_slice(&plain)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn good() -> KeyAttrs {
        KeyAttrs {
            id: vec![0xA5; KEY_ID_LEN],
            aes: true,
            value_len: 32,
            sensitive: true,
            extractable: false,
            never_extractable: true,
            private: true,
            encrypt: true,
            decrypt: true,
            derive: false,
        }
    }

    #[test]
    fn wrapped_format_round_trips_and_rejects_bad_input() {
        let iv = [7u8; IV_LEN];
        let sealed = [9u8; KEY_LEN + TAG_LEN];
        let w = encode_wrapped(&iv, &sealed).unwrap();
        assert_eq!(w.len(), WRAP_LEN);
        assert_eq!(w[0], 0x02);
        let (iv2, body) = parse_wrapped(&w).unwrap();
        assert_eq!(iv2, iv);
        assert_eq!(body, &sealed[..]);

        let mut local = w.clone();
        local[0] = 0x01;
        assert!(matches!(
            parse_wrapped(&local),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(
            parse_wrapped(&w[..WRAP_LEN - 1]),
            Err(CryptoError::Malformed(_))
        ));
        let mut long = w.clone();
        long.push(0);
        assert!(matches!(
            parse_wrapped(&long),
            Err(CryptoError::Malformed(_))
        ));
        assert!(matches!(parse_wrapped(&[]), Err(CryptoError::Malformed(_))));
        assert!(encode_wrapped(&iv, &sealed[..40]).is_err());
    }

    #[test]
    fn only_sensitive_non_extractable_aes256_is_accepted() {
        check_acceptable("k", &good()).unwrap();

        let e = check_acceptable(
            "k",
            &KeyAttrs {
                extractable: true,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("extractable"), "{e}");
        assert!(e.to_string().contains("3.6.1.2"), "{e}");

        let e = check_acceptable(
            "k",
            &KeyAttrs {
                sensitive: false,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("not sensitive"), "{e}");
        assert!(e.to_string().contains("3.6.1.2"), "{e}");

        let e = check_acceptable(
            "k",
            &KeyAttrs {
                derive: true,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("CKA_DERIVE"), "{e}");

        let e = check_acceptable(
            "k",
            &KeyAttrs {
                private: false,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("CKA_PRIVATE=false"), "{e}");

        let e = check_acceptable(
            "k",
            &KeyAttrs {
                value_len: 16,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("AES-256"), "{e}");
        let e = check_acceptable(
            "k",
            &KeyAttrs {
                aes: false,
                ..good()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("AES-256"), "{e}");
        assert!(
            check_acceptable(
                "k",
                &KeyAttrs {
                    decrypt: false,
                    ..good()
                }
            )
            .is_err()
        );
        assert!(
            check_acceptable(
                "k",
                &KeyAttrs {
                    id: vec![],
                    ..good()
                }
            )
            .is_err()
        );
        // Attributes the token did not report read as unsafe.
        assert!(check_acceptable("k", &KeyAttrs::default()).is_err());
    }

    #[test]
    fn id_names_token_and_key_id() {
        assert_eq!(kek_id("vault", &[0xde, 0xad]), "hsm:vault:dead");
        assert_ne!(kek_id("vault", &[1]), kek_id("vault", &[2]));
    }

    #[test]
    fn settings_debug_hides_pin() {
        let s = HsmSettings {
            module: "/x.so".into(),
            token_label: "t".into(),
            key_label: "k".into(),
            pin: Zeroizing::new("s3cret-pin".into()),
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
