//! The record envelope: how a card number is sealed at rest.
//!
//! Layout (all integers big-endian):
//! `format(1) = 0x01 | dek_id(4) | nonce(12) | ciphertext | tag(16)`.
//! The associated data binds the format, tenant, token and data-key id, so a
//! ciphertext copied to another row, tenant or key fails to open.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use zeroize::Zeroizing;

use super::{CryptoError, push_field, random_bytes};
use crate::domain::Token;

pub const FORMAT_V1: u8 = 0x01;
const HEADER_LEN: usize = 1 + 4 + 12;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"tokenvault/record/v1";

/// Where a ciphertext belongs. Everything here goes into the associated data.
#[derive(Debug, Clone, Copy)]
pub struct RecordContext<'a> {
    pub tenant: &'a str,
    pub token: &'a Token,
    pub dek_id: u32,
}

impl RecordContext<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + self.tenant.len() + 40);
        push_field(&mut aad, AAD_LABEL);
        aad.push(FORMAT_V1);
        push_field(&mut aad, self.tenant.as_bytes());
        push_field(&mut aad, self.token.as_bytes());
        aad.extend_from_slice(&self.dek_id.to_be_bytes());
        aad
    }
}

/// Seals `plaintext` under `key` with a fresh random 96-bit nonce.
pub fn seal(
    key: &Aes256Gcm,
    ctx: &RecordContext<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; 12];
    random_bytes(&mut nonce)?;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.push(FORMAT_V1);
    out.extend_from_slice(&ctx.dek_id.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &ctx.aad(),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| CryptoError::Key("encryption failed".into()))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// The data-key id named in an envelope's header, read before choosing a key.
pub fn dek_id_of(envelope: &[u8]) -> Result<u32, CryptoError> {
    if envelope.len() < HEADER_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("too short"));
    }
    if envelope[0] != FORMAT_V1 {
        return Err(CryptoError::Malformed("unknown format"));
    }
    let mut id = [0u8; 4];
    id.copy_from_slice(&envelope[1..5]);
    Ok(u32::from_be_bytes(id))
}

/// Opens an envelope. Any mismatch of key, context or bytes is an
/// authentication failure; no partial plaintext is ever returned.
pub fn open(
    key: &Aes256Gcm,
    ctx: &RecordContext<'_>,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if dek_id_of(envelope)? != ctx.dek_id {
        return Err(CryptoError::Authentication);
    }
    let (body, tag) = envelope.split_at(envelope.len() - TAG_LEN);
    let nonce = Nonce::from_slice(&body[5..HEADER_LEN]);
    let mut plain = Zeroizing::new(body[HEADER_LEN..].to_vec());
    key.decrypt_in_place_detached(nonce, &ctx.aad(), &mut plain, Tag::from_slice(tag))
        .map_err(|_| CryptoError::Authentication)?;
    Ok(plain)
}

/// Builds an AES-256-GCM cipher from 32 key bytes. Its AES key schedule and
/// GHASH key are zeroized on drop: the `zeroize` features of `aes`, `ghash`
/// and `polyval` (Cargo.toml; aes-gcm's own feature wipes only a temporary),
/// checked by `tests/freed_memory.rs`.
pub fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn token() -> Token {
        Token::from_bytes([7u8; 22])
    }

    fn ctx<'a>(tenant: &'a str, token: &'a Token, dek_id: u32) -> RecordContext<'a> {
        RecordContext {
            tenant,
            token,
            dek_id,
        }
    }

    #[test]
    fn round_trip() {
        let k = cipher(&[1u8; 32]);
        let t = token();
        let sealed = seal(&k, &ctx("acme", &t, 3), b"4111111111111111").unwrap();
        assert_eq!(sealed[0], FORMAT_V1);
        assert_eq!(dek_id_of(&sealed).unwrap(), 3);
        assert_eq!(sealed.len(), HEADER_LEN + 16 + TAG_LEN);
        let opened = open(&k, &ctx("acme", &t, 3), &sealed).unwrap();
        assert_eq!(&opened[..], b"4111111111111111");
    }

    /// REQUIREMENTS 2 (SP 800-38D 8.2.2): 10^6 encryptions under one key
    /// repeat no nonce.
    #[test]
    fn a_million_encryptions_repeat_no_nonce() {
        let k = cipher(&[1u8; 32]);
        let t = token();
        let c = ctx("acme", &t, 1);
        let mut seen = std::collections::HashSet::with_capacity(1_000_000);
        for _ in 0..1_000_000 {
            let s = seal(&k, &c, b"x").unwrap();
            let nonce: [u8; 12] = s[5..17].try_into().unwrap();
            assert!(seen.insert(nonce), "nonce reused");
        }
    }

    #[test]
    fn moved_ciphertext_fails() {
        let k = cipher(&[1u8; 32]);
        let t = token();
        let other = Token::from_bytes([8u8; 22]);
        let sealed = seal(&k, &ctx("acme", &t, 1), b"4111111111111111").unwrap();
        assert_eq!(
            open(&k, &ctx("acme", &other, 1), &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&k, &ctx("globex", &t, 1), &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&k, &ctx("acme", &t, 2), &sealed),
            Err(CryptoError::Authentication)
        );
        let wrong_key = cipher(&[2u8; 32]);
        assert_eq!(
            open(&wrong_key, &ctx("acme", &t, 1), &sealed),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn every_flipped_byte_fails() {
        let k = cipher(&[1u8; 32]);
        let t = token();
        let c = ctx("acme", &t, 1);
        let sealed = seal(&k, &c, b"4111111111111111").unwrap();
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                assert!(open(&k, &c, &bad).is_err(), "byte {i} bit {bit:#x}");
            }
        }
    }

    #[test]
    fn truncated_or_extended_fails() {
        let k = cipher(&[1u8; 32]);
        let t = token();
        let c = ctx("acme", &t, 1);
        let sealed = seal(&k, &c, b"4111111111111111").unwrap();
        for len in 0..sealed.len() {
            assert!(open(&k, &c, &sealed[..len]).is_err(), "len {len}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(open(&k, &c, &longer).is_err());
    }

    /// NIST GCM test vector (AES-256, 96-bit IV, with AAD) from the
    /// McGrew–Viega GCM spec, test case 16: proves the primitive is standard
    /// AES-256-GCM with a 128-bit tag.
    #[test]
    fn known_answer_aes256_gcm() {
        let key = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .unwrap();
        let iv = hex::decode("cafebabefacedbaddecaf888").unwrap();
        let pt = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let k = Aes256Gcm::new_from_slice(&key).unwrap();
        let mut buf = pt.clone();
        let tag = k
            .encrypt_in_place_detached(Nonce::from_slice(&iv), &aad, &mut buf)
            .unwrap();
        assert_eq!(
            hex::encode(&buf),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        );
        assert_eq!(hex::encode(tag), "76fc6ece0f4e1768cddf8853bb2d551b");
    }
}
