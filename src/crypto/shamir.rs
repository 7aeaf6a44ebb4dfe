//! Split knowledge of a key-encryption key: Shamir secret sharing of the
//! 256-bit KEK over GF(2^8), byte by byte, so that any `threshold` of
//! `total` custodians can rebuild it and fewer learn nothing about it.
//!
//! The field arithmetic and polynomial evaluation come from `vsss-rs`
//! (constant-time GF(256), no lookup tables); randomness comes from the
//! operating system's CSPRNG through [`crate::crypto::random_bytes`].
//!
//! # Limits
//!
//! `2 <= threshold <= total <= 16` ([`MAX_SHARES`]). GF(256) itself allows
//! 255 shares; 16 custodians is already more than a key ceremony can
//! manage, and a small bound keeps file names and headers short.
//!
//! # Share file format (v1)
//!
//! One share is six lines of ASCII, each ending in `\n`:
//!
//! ```text
//! tokenvault-kek-share v1
//! kek: local:0123abcd0123abcd
//! set: 9f3c2a1b7d4e5f60
//! share: 2 of 5, threshold 3
//! data: <base64 (standard, padded) of the 32 share bytes>
//! check: <first 8 hex digits of SHA-256 over the five lines above>
//! ```
//!
//! - `kek` is the id of the KEK that was split (for a Shamir KEK the caller
//!   passes `LocalKek::from_key(&key).id()`), so shares of different KEKs
//!   cannot be mixed.
//! - `set` is 64 random bits drawn once per [`split`]: two splits of the
//!   same KEK (a re-issue after a custodian leaves, say) have different
//!   sets, and their shares are refused together.
//! - `share` is the share's index (its x coordinate, `1..=total`), the
//!   number of shares made and the number needed.
//! - `check` is SHA-256 over the exact bytes of the first five lines,
//!   newlines included, as lowercase hex, first 8 digits.
//!
//! Parsing is strict: the exact header, the fields in this order with
//! single spaces, canonical numbers, canonical base64 of exactly 32 bytes,
//! lowercase hex, LF line endings (a single trailing newline is optional).
//! The check is verified before any field is read, so a mistyped or
//! flipped character anywhere in lines 2–6 fails as a checksum mismatch.
//!
//! # What the checksum does not do
//!
//! The check catches accidents (typos, a damaged file); it is not a MAC.
//! Shamir sharing cannot tell a wrong share from a right one: a share whose
//! data was altered and its check recomputed combines, with `threshold - 1`
//! good shares, into a different key. Callers must verify the rebuilt key
//! against the pinned KEK id / check value before using it. When more than
//! `threshold` shares are given, [`combine`] cross-checks every extra share
//! and refuses an inconsistent set, which detects (but cannot locate) a bad
//! share.
//!
//! Error messages never contain share bytes, base64 data or key material.

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand_core::{TryCryptoRng, TryRng};
use sha2::{Digest, Sha256};
use thiserror::Error;
use vsss_rs::subtle::ConstantTimeEq;
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::Zeroizing;

use super::kek::KeyBytes;
use super::random_bytes;

/// The most shares [`split`] makes (and the largest `total` a share file
/// may name).
pub const MAX_SHARES: u8 = 16;
/// The fewest shares a split may require.
pub const MIN_THRESHOLD: u8 = 2;

const KEY_LEN: usize = 32;
const HEADER: &str = "tokenvault-kek-share v1";
const MAX_KEK_ID_LEN: usize = 128;
const SET_ID_BYTES: usize = 8;
const CHECK_HEX_LEN: usize = 8;
const LINES: usize = 6;

/// Why splitting, parsing, combining or writing shares failed. No variant
/// carries share bytes or key material.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShareError {
    /// Threshold or total out of bounds.
    #[error("invalid share parameters: {0}")]
    Parameters(String),
    /// The KEK id cannot go in a share header.
    #[error("invalid KEK id: {0}")]
    KekId(&'static str),
    #[error("random number generator failed")]
    Rng,
    /// The secret-sharing library refused (should not happen for valid
    /// parameters).
    #[error("secret sharing failed: {0}")]
    Sharing(String),
    /// The text is not a well-formed v1 share file.
    #[error("malformed share file: {0}")]
    Malformed(String),
    /// The text's `check:` line does not match its contents.
    #[error("share file check value mismatch: the share is corrupted or mistyped")]
    Checksum,
    #[error("no shares given")]
    NoShares,
    /// Fewer distinct shares than the threshold.
    #[error("not enough shares: {have} distinct given, {need} needed")]
    NotEnoughShares { have: usize, need: u8 },
    /// Shares from different KEKs, splits or parameters.
    #[error("shares are from different share sets: {0} differ")]
    MixedSets(&'static str),
    /// Two shares with the same index but different data.
    #[error("two different shares both claim index {0}")]
    ConflictingShares(u8),
    /// More than `threshold` shares were given and they do not all lie on
    /// one polynomial: at least one is corrupted or forged.
    #[error("shares are inconsistent: at least one share is corrupted")]
    Inconsistent,
    #[error("cannot write share file {path}: {reason}")]
    Io { path: String, reason: String },
}

/// One custodian's share of a KEK. The share bytes are zeroized on drop
/// and never printed.
#[derive(Clone)]
pub struct Share {
    index: u8,
    threshold: u8,
    total: u8,
    kek_id: String,
    set_id: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .field("total", &self.total)
            .field("threshold", &self.threshold)
            .field("kek_id", &self.kek_id)
            .field("set_id", &self.set_id)
            .finish_non_exhaustive()
    }
}

impl Share {
    /// The share's x coordinate, `1..=total`.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// How many distinct shares rebuild the key.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// How many shares the split made.
    pub fn total(&self) -> u8 {
        self.total
    }

    /// The id of the KEK this is a share of.
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// The random id of the split this share came from (16 hex digits).
    pub fn set_id(&self) -> &str {
        &self.set_id
    }

    /// Text form for a custodian file: the v1 format in the module docs,
    /// newline-terminated.
    pub fn to_text(&self) -> Zeroizing<String> {
        let data = Zeroizing::new(B64.encode(self.bytes.as_slice()));
        // Sized for the whole text up front, so it never regrows and leaves
        // an unwiped copy of the share behind.
        let mut text = Zeroizing::new(String::with_capacity(
            256 + self.kek_id.len() + self.set_id.len() + data.len(),
        ));
        for line in [
            HEADER,
            &format!("kek: {}", self.kek_id),
            &format!("set: {}", self.set_id),
            &format!(
                "share: {} of {}, threshold {}",
                self.index, self.total, self.threshold
            ),
        ] {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("data: ");
        text.push_str(&data);
        text.push('\n');
        let check = check_value(&text);
        text.push_str("check: ");
        text.push_str(&check);
        text.push('\n');
        text
    }

    /// Parses the text form strictly (see the module docs). Errors say
    /// which line is wrong, never what it holds.
    pub fn parse(text: &str) -> Result<Share, ShareError> {
        if text.contains('\r') {
            return Err(malformed("carriage return found; use LF line endings"));
        }
        let body = text.strip_suffix('\n').unwrap_or(text);
        let lines: Vec<&str> = body.split('\n').collect();
        if lines.len() != LINES {
            return Err(malformed(format!(
                "expected {LINES} lines, found {}",
                lines.len()
            )));
        }
        if lines[0] != HEADER {
            return Err(malformed(format!(
                "line 1 is not the header `{HEADER}` (not a KEK share file, or another version)"
            )));
        }
        let check = lines[5]
            .strip_prefix("check: ")
            .ok_or_else(|| malformed("line 6 must be `check: <8 hex digits>`"))?;
        if check.len() != CHECK_HEX_LEN || !is_lower_hex(check) {
            return Err(malformed("line 6 must be `check: <8 hex digits>`"));
        }
        // Verify before reading any field, so that any single corrupted
        // character is reported as what it is.
        let mut signed = Zeroizing::new(String::with_capacity(body.len()));
        for line in &lines[..5] {
            signed.push_str(line);
            signed.push('\n');
        }
        if check_value(&signed) != check {
            return Err(ShareError::Checksum);
        }

        let kek_id = lines[1]
            .strip_prefix("kek: ")
            .ok_or_else(|| malformed("line 2 must be `kek: <KEK id>`"))?;
        validate_kek_id(kek_id).map_err(|why| malformed(format!("line 2: {why}")))?;

        let set_id = lines[2]
            .strip_prefix("set: ")
            .ok_or_else(|| malformed("line 3 must be `set: <16 hex digits>`"))?;
        if set_id.len() != 2 * SET_ID_BYTES || !is_lower_hex(set_id) {
            return Err(malformed("line 3 must be `set: <16 hex digits>`"));
        }

        let (index, total, threshold) = parse_share_line(lines[3]).ok_or_else(|| {
            malformed("line 4 must be `share: <index> of <total>, threshold <threshold>`")
        })?;
        check_params(threshold, total).map_err(|e| malformed(format!("line 4: {e}")))?;
        if index == 0 || index > total {
            return Err(malformed(format!(
                "line 4: index {index} is outside 1..={total}"
            )));
        }

        let data = lines[4]
            .strip_prefix("data: ")
            .ok_or_else(|| malformed("line 5 must be `data: <base64>`"))?;
        let bytes = Zeroizing::new(
            B64.decode(data)
                .map_err(|_| malformed("line 5: data is not valid base64"))?,
        );
        if bytes.len() != KEY_LEN {
            return Err(malformed(format!(
                "line 5: data must be {KEY_LEN} bytes, found {}",
                bytes.len()
            )));
        }
        if Zeroizing::new(B64.encode(bytes.as_slice())).as_str() != data {
            return Err(malformed("line 5: data is not canonical base64"));
        }

        Ok(Share {
            index,
            threshold,
            total,
            kek_id: kek_id.to_owned(),
            set_id: set_id.to_owned(),
            bytes,
        })
    }
}

/// Splits `key` into `total` shares any `threshold` of which rebuild it.
/// Requires `2 <= threshold <= total <= 16` ([`MAX_SHARES`]). Shares are
/// numbered `1..=total`; all carry `kek_id` and one fresh random set id.
pub fn split(
    key: &KeyBytes,
    kek_id: &str,
    threshold: u8,
    total: u8,
) -> Result<Vec<Share>, ShareError> {
    check_params(threshold, total)?;
    validate_kek_id(kek_id).map_err(ShareError::KekId)?;

    let mut set = [0u8; SET_ID_BYTES];
    random_bytes(&mut set).map_err(|_| ShareError::Rng)?;
    let set_id = hex::encode(set);

    let mut rng = OsCsprng { failed: false };
    let ids = (1..=total).map(|i| IdentifierGf256(Gf256(i)));
    let raw = Zeroizing::new(
        Gf256::split_bytes_with_participant_ids_iter(
            usize::from(threshold),
            usize::from(total),
            key.expose(),
            &mut rng,
            ids,
        )
        .map_err(|e| ShareError::Sharing(e.to_string()))?,
    );
    if rng.failed {
        return Err(ShareError::Rng);
    }
    if raw.len() != usize::from(total) {
        return Err(ShareError::Sharing(
            "wrong number of shares returned".into(),
        ));
    }

    let mut shares = Vec::with_capacity(raw.len());
    for (index, s) in (1..=total).zip(raw.iter()) {
        // vsss-rs lays a byte share out as [x, y_0, .., y_31].
        match s.split_first() {
            Some((&x, ys)) if x == index && ys.len() == KEY_LEN => shares.push(Share {
                index,
                threshold,
                total,
                kek_id: kek_id.to_owned(),
                set_id: set_id.clone(),
                bytes: Zeroizing::new(ys.to_vec()),
            }),
            _ => return Err(ShareError::Sharing("unexpected share layout".into())),
        }
    }
    Ok(shares)
}

/// Rebuilds the key from at least `threshold` distinct shares of one split
/// (same KEK id, set, threshold and total). A share given twice counts
/// once; fewer than `threshold` distinct shares, two different shares with
/// one index, or shares of different splits are refused.
///
/// With exactly `threshold` shares a corrupted share cannot be detected
/// here: it yields a different key, so the caller must verify the result
/// against the pinned KEK id / check value. With more, every extra share
/// is cross-checked and an inconsistent set is refused.
pub fn combine(shares: &[Share]) -> Result<KeyBytes, ShareError> {
    let first = shares.first().ok_or(ShareError::NoShares)?;
    for s in shares {
        if s.kek_id != first.kek_id {
            return Err(ShareError::MixedSets("KEK ids"));
        }
        if s.set_id != first.set_id {
            return Err(ShareError::MixedSets("split set ids"));
        }
        if s.threshold != first.threshold || s.total != first.total {
            return Err(ShareError::MixedSets("thresholds or totals"));
        }
    }
    check_params(first.threshold, first.total)?;
    for s in shares {
        if s.index == 0 || s.index > s.total || s.bytes.len() != KEY_LEN {
            return Err(ShareError::Sharing(format!("share {} is invalid", s.index)));
        }
    }

    let mut distinct: Vec<&Share> = Vec::with_capacity(shares.len());
    for s in shares {
        match distinct.iter().find(|d| d.index == s.index) {
            Some(d) if bool::from(d.bytes.as_slice().ct_eq(s.bytes.as_slice())) => {}
            Some(_) => return Err(ShareError::ConflictingShares(s.index)),
            None => distinct.push(s),
        }
    }
    let need = usize::from(first.threshold);
    if distinct.len() < need {
        return Err(ShareError::NotEnoughShares {
            have: distinct.len(),
            need: first.threshold,
        });
    }
    distinct.sort_by_key(|s| s.index);

    let (base, extra) = distinct.split_at(need);
    let key = interpolate(base.iter().copied())?;
    if let Some((_, others)) = base.split_last() {
        for e in extra {
            let alt = interpolate(others.iter().copied().chain(std::iter::once(*e)))?;
            if !bool::from(alt.expose().ct_eq(key.expose())) {
                return Err(ShareError::Inconsistent);
            }
        }
    }
    Ok(key)
}

/// Writes each share to `dir/share-<index>-of-<total>.txt`, mode 0600,
/// refusing to overwrite any file. Returns the paths written, in order.
/// Every target is checked first, so an existing file stops the whole
/// batch before anything is written.
pub fn write_share_files(dir: &Path, shares: &[Share]) -> Result<Vec<PathBuf>, ShareError> {
    let paths: Vec<PathBuf> = shares
        .iter()
        .map(|s| dir.join(format!("share-{}-of-{}.txt", s.index, s.total)))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        if p.exists() || paths[..i].contains(p) {
            return Err(ShareError::Io {
                path: p.display().to_string(),
                reason: "file already exists; refusing to overwrite".into(),
            });
        }
    }
    for (s, p) in shares.iter().zip(&paths) {
        crate::fsutil::write_private(p, s.to_text().as_bytes()).map_err(|e| ShareError::Io {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(paths)
}

/// Lagrange interpolation at 0 of exactly `threshold` distinct shares.
fn interpolate<'a>(shares: impl Iterator<Item = &'a Share>) -> Result<KeyBytes, ShareError> {
    let raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(
        shares
            .map(|s| {
                let mut v = Vec::with_capacity(1 + KEY_LEN);
                v.push(s.index);
                v.extend_from_slice(&s.bytes);
                v
            })
            .collect(),
    );
    let secret = Zeroizing::new(
        Gf256::combine_bytes(raw.as_slice()).map_err(|e| ShareError::Sharing(e.to_string()))?,
    );
    KeyBytes::from_slice(&secret)
        .map_err(|_| ShareError::Sharing("combined secret has the wrong length".into()))
}

fn check_params(threshold: u8, total: u8) -> Result<(), ShareError> {
    if threshold < MIN_THRESHOLD {
        return Err(ShareError::Parameters(format!(
            "threshold {threshold} is below {MIN_THRESHOLD}"
        )));
    }
    if total > MAX_SHARES {
        return Err(ShareError::Parameters(format!(
            "total {total} is above the maximum of {MAX_SHARES}"
        )));
    }
    if threshold > total {
        return Err(ShareError::Parameters(format!(
            "threshold {threshold} is above total {total}"
        )));
    }
    Ok(())
}

fn validate_kek_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("KEK id is empty");
    }
    if id.len() > MAX_KEK_ID_LEN {
        return Err("KEK id is longer than 128 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("KEK id must be printable ASCII without spaces");
    }
    Ok(())
}

/// Parses `share: <i> of <n>, threshold <k>` with canonical decimals.
fn parse_share_line(line: &str) -> Option<(u8, u8, u8)> {
    let rest = line.strip_prefix("share: ")?;
    let (index, rest) = rest.split_once(" of ")?;
    let (total, threshold) = rest.split_once(", threshold ")?;
    Some((
        canonical_u8(index)?,
        canonical_u8(total)?,
        canonical_u8(threshold)?,
    ))
}

fn canonical_u8(s: &str) -> Option<u8> {
    let n: u8 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_value(signed: &str) -> String {
    let digest = Sha256::digest(signed.as_bytes());
    hex::encode(&digest[..CHECK_HEX_LEN / 2])
}

fn malformed(why: impl Into<String>) -> ShareError {
    ShareError::Malformed(why.into())
}

/// The OS CSPRNG in the shape vsss-rs wants: rand_core 0.10's infallible
/// `CryptoRng`. rand_core's own adapter for a fallible source
/// (`UnwrapErr`) panics on failure; this one records the failure instead,
/// and [`split`] then discards everything computed and returns
/// [`ShareError::Rng`]. The zeros written after a failure never leave
/// `split`.
struct OsCsprng {
    failed: bool,
}

impl OsCsprng {
    fn fill(&mut self, dst: &mut [u8]) {
        if self.failed || random_bytes(dst).is_err() {
            self.failed = true;
            dst.fill(0);
        }
    }
}

impl TryRng for OsCsprng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

impl TryCryptoRng for OsCsprng {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::crypto::kek::{Kek, LocalKek};
    use proptest::prelude::*;

    fn key() -> KeyBytes {
        KeyBytes::generate().unwrap()
    }

    fn kek_id(k: &KeyBytes) -> String {
        LocalKek::from_key(k).id().to_owned()
    }

    /// All `k`-element subsets of `0..n`, as index lists.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|m| m.count_ones() as usize == k)
            .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
            .collect()
    }

    fn pick(shares: &[Share], idx: &[usize]) -> Vec<Share> {
        idx.iter().map(|&i| shares[i].clone()).collect()
    }

    /// Replaces the base64 data of a share text and recomputes the check.
    fn reforge(text: &str, new_bytes: &[u8]) -> String {
        let lines: Vec<&str> = text.lines().collect();
        let mut signed = String::new();
        for (i, l) in lines[..5].iter().enumerate() {
            if i == 4 {
                signed.push_str(&format!("data: {}\n", B64.encode(new_bytes)));
            } else {
                signed.push_str(l);
                signed.push('\n');
            }
        }
        let check = check_value(&signed);
        format!("{signed}check: {check}\n")
    }

    #[test]
    fn every_k_subset_of_3_of_5_rebuilds_the_key() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        for (i, s) in shares.iter().enumerate() {
            assert_eq!(usize::from(s.index()), i + 1);
            assert_eq!((s.threshold(), s.total()), (3, 5));
            assert_eq!(s.kek_id(), kek_id(&k));
            assert_eq!(s.set_id(), shares[0].set_id());
        }
        for size in 3..=5 {
            for idx in subsets(5, size) {
                let mut set = pick(&shares, &idx);
                assert_eq!(combine(&set).unwrap().expose(), k.expose(), "{idx:?}");
                set.reverse();
                assert_eq!(combine(&set).unwrap().expose(), k.expose(), "{idx:?}");
            }
        }
    }

    #[test]
    fn fewer_than_threshold_is_refused() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 3, 5).unwrap();
        for idx in subsets(5, 2) {
            assert_eq!(
                combine(&pick(&shares, &idx)).unwrap_err(),
                ShareError::NotEnoughShares { have: 2, need: 3 }
            );
        }
        assert_eq!(combine(&[]).unwrap_err(), ShareError::NoShares);
    }

    #[test]
    fn duplicate_share_counts_once() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 3, 5).unwrap();
        let dup = vec![shares[0].clone(), shares[1].clone(), shares[0].clone()];
        assert_eq!(
            combine(&dup).unwrap_err(),
            ShareError::NotEnoughShares { have: 2, need: 3 }
        );
        // A duplicate re-read from its file is the same share too.
        let reread = Share::parse(&shares[1].to_text()).unwrap();
        let ok = vec![
            shares[0].clone(),
            shares[1].clone(),
            reread,
            shares[4].clone(),
        ];
        assert_eq!(combine(&ok).unwrap().expose(), k.expose());
    }

    #[test]
    fn same_index_different_data_is_refused() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let mut forged = shares[0].clone();
        forged.bytes[0] ^= 1;
        assert_eq!(
            combine(&[shares[0].clone(), forged, shares[1].clone()]).unwrap_err(),
            ShareError::ConflictingShares(1)
        );
    }

    #[test]
    fn shares_of_different_splits_are_refused() {
        let k = key();
        let id = kek_id(&k);
        let a = split(&k, &id, 2, 3).unwrap();
        let b = split(&k, &id, 2, 3).unwrap();
        assert_ne!(a[0].set_id(), b[0].set_id());
        assert_eq!(
            combine(&[a[0].clone(), b[1].clone()]).unwrap_err(),
            ShareError::MixedSets("split set ids")
        );
        let other = key();
        let c = split(&other, &kek_id(&other), 2, 3).unwrap();
        assert_eq!(
            combine(&[a[0].clone(), c[1].clone()]).unwrap_err(),
            ShareError::MixedSets("KEK ids")
        );
        let d = split(&k, &id, 2, 4).unwrap();
        let mut d1 = d[1].clone();
        d1.set_id = a[0].set_id.clone();
        assert_eq!(
            combine(&[a[0].clone(), d1]).unwrap_err(),
            ShareError::MixedSets("thresholds or totals")
        );
    }

    #[test]
    fn flipped_base64_character_fails_the_check() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let text = shares[0].to_text();
        let data_start = text.find("data: ").unwrap() + "data: ".len();
        let mut bytes = text.as_bytes().to_vec();
        bytes[data_start + 3] = if bytes[data_start + 3] == b'A' {
            b'B'
        } else {
            b'A'
        };
        let bad = String::from_utf8(bytes).unwrap();
        let err = Share::parse(&bad).unwrap_err();
        assert_eq!(err, ShareError::Checksum);
        assert!(err.to_string().contains("check"), "{err}");
    }

    #[test]
    fn any_single_character_change_is_refused() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let text = shares[1].to_text();
        for i in 0..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
            let bad = String::from_utf8(bytes).unwrap();
            assert!(Share::parse(&bad).is_err(), "change at {i} accepted");
        }
    }

    #[test]
    fn consistently_altered_share_yields_a_different_key() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let text = shares[0].to_text();
        let mut data = shares[0].bytes.to_vec();
        data[7] ^= 0x5a;
        let forged = Share::parse(&reforge(&text, &data)).unwrap();
        // The check passes and Shamir cannot tell: a different key comes out,
        // which is why the caller verifies against the pinned KEK id.
        let rebuilt = combine(&[forged.clone(), shares[1].clone()]).unwrap();
        assert_ne!(rebuilt.expose(), k.expose());
        assert_ne!(LocalKek::from_key(&rebuilt).id(), kek_id(&k));
        // With a share more than the threshold, the bad one is noticed.
        assert_eq!(
            combine(&[forged, shares[1].clone(), shares[2].clone()]).unwrap_err(),
            ShareError::Inconsistent
        );
    }

    #[test]
    fn debug_and_errors_never_show_share_data() {
        let k = KeyBytes::from_slice(&[0xAB; 32]).unwrap();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        for s in &shares {
            let b64 = B64.encode(s.bytes.as_slice());
            let d = format!("{s:?}");
            assert!(!d.contains(&b64), "{d}");
            assert!(!d.contains(&b64[..8]), "{d}");
            assert!(
                !d.to_lowercase().contains(&hex::encode(&s.bytes[..4])),
                "{d}"
            );
            assert!(d.contains("index") && d.contains("kek_id"), "{d}");

            let text = s.to_text();
            let mut errors = Vec::new();
            let mut flipped = text.as_bytes().to_vec();
            let pos = text.find("data: ").unwrap() + 10;
            flipped[pos] = if flipped[pos] == b'z' { b'y' } else { b'z' };
            errors.push(Share::parse(&String::from_utf8(flipped).unwrap()).unwrap_err());
            errors.push(Share::parse(&reforge(&text, &s.bytes[..31])).unwrap_err());
            errors.push(Share::parse(&text.replace("data: ", "data: !")).unwrap_err());
            errors.push(Share::parse(&text.replace("\n", "\r\n")).unwrap_err());
            errors.push(Share::parse(&text[..text.len() - 12]).unwrap_err());
            for e in errors {
                for shown in [format!("{e}"), format!("{e:?}")] {
                    assert!(!shown.contains(&b64[..8]), "{shown}");
                }
            }
        }
    }

    #[test]
    fn text_round_trip() {
        let k = key();
        let id = kek_id(&k);
        let shares = split(&k, &id, 3, 5).unwrap();
        let text = shares[3].to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0], "tokenvault-kek-share v1");
        assert_eq!(lines[1], format!("kek: {id}"));
        assert_eq!(lines[2], format!("set: {}", shares[3].set_id()));
        assert_eq!(lines[3], "share: 4 of 5, threshold 3");
        assert!(lines[4].starts_with("data: "));
        assert!(lines[5].starts_with("check: ") && lines[5].len() == 15);
        assert!(text.ends_with('\n'));

        let parsed = Share::parse(&text).unwrap();
        assert_eq!(parsed.index(), 4);
        assert_eq!((parsed.threshold(), parsed.total()), (3, 5));
        assert_eq!(parsed.kek_id(), id);
        assert_eq!(parsed.set_id(), shares[3].set_id());
        assert_eq!(parsed.bytes.as_slice(), shares[3].bytes.as_slice());
        assert_eq!(parsed.to_text().as_str(), text.as_str());
        // The final newline is optional; nothing else is.
        assert!(Share::parse(text.trim_end_matches('\n')).is_ok());
        assert!(Share::parse(&format!("{}\n", text.as_str())).is_err());
        assert!(Share::parse(&format!(" {}", text.as_str())).is_err());

        let texts: Vec<_> = shares.iter().map(|s| s.to_text()).collect();
        let back: Vec<Share> = texts[1..4]
            .iter()
            .map(|t| Share::parse(t).unwrap())
            .collect();
        assert_eq!(combine(&back).unwrap().expose(), k.expose());
    }

    #[test]
    fn parse_rejects_well_checked_but_invalid_fields() {
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let text = shares[0].to_text();
        let resign = |edit: &dyn Fn(&str) -> String| {
            let body: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
            let body = edit(&body);
            format!("{body}check: {}\n", check_value(&body))
        };
        let cases: Vec<(String, &str)> = vec![
            (
                resign(&|b| b.replace("share: 1 of 3", "share: 01 of 3")),
                "line 4",
            ),
            (
                resign(&|b| b.replace("share: 1 of 3", "share: 4 of 3")),
                "index 4",
            ),
            (
                resign(&|b| b.replace("share: 1 of 3", "share: 0 of 3")),
                "index 0",
            ),
            (
                resign(&|b| b.replace("of 3, threshold 2", "of 17, threshold 2")),
                "maximum",
            ),
            (
                resign(&|b| b.replace("threshold 2", "threshold 1")),
                "below 2",
            ),
            (
                resign(&|b| b.replace("threshold 2", "threshold  2")),
                "line 4",
            ),
            (resign(&|b| b.replace("kek: ", "kek:  ")), "line 2"),
            (resign(&|b| b.replace("kek: ", "KEK: ")), "line 2"),
            (resign(&|b| b.replace("set: ", "set: 00")), "line 3"),
            (resign(&|b| b.replace("data: ", "data: AAAA")), "line 5"),
            (resign(&|b| b.replace("=\n", "\n")), "line 5"),
        ];
        for (bad, want) in cases {
            let e = Share::parse(&bad).unwrap_err();
            assert!(
                matches!(e, ShareError::Malformed(_)) && e.to_string().contains(want),
                "{want}: {e}"
            );
        }
        assert!(matches!(
            Share::parse(&text.replace("v1", "v2")).unwrap_err(),
            ShareError::Malformed(m) if m.contains("header")
        ));
        let mut upper = text.to_string();
        let at = upper.find("check: ").unwrap() + 7;
        upper.replace_range(at..at + 8, &text[at..at + 8].to_uppercase());
        if upper != *text {
            assert!(Share::parse(&upper).is_err());
        }
        assert!(Share::parse("").is_err());
    }

    #[test]
    fn share_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let k = key();
        let shares = split(&k, &kek_id(&k), 2, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = write_share_files(dir.path(), &shares).unwrap();
        assert_eq!(paths.len(), 3);
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(
                p.file_name().unwrap().to_str().unwrap(),
                format!("share-{}-of-3.txt", i + 1)
            );
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
            let text = std::fs::read_to_string(p).unwrap();
            assert_eq!(text, *shares[i].to_text());
        }
        let before = std::fs::read_to_string(&paths[0]).unwrap();
        let again = split(&k, &kek_id(&k), 2, 3).unwrap();
        let e = write_share_files(dir.path(), &again).unwrap_err();
        assert!(matches!(e, ShareError::Io { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&paths[0]).unwrap(), before);

        let read: Vec<Share> = paths
            .iter()
            .map(|p| Share::parse(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect();
        assert_eq!(combine(&read[..2]).unwrap().expose(), k.expose());

        // Nothing is written when any target exists.
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::write(dir2.path().join("share-3-of-3.txt"), "x").unwrap();
        assert!(write_share_files(dir2.path(), &shares).is_err());
        assert!(!dir2.path().join("share-1-of-3.txt").exists());
    }

    #[test]
    fn bounds_are_enforced() {
        let k = key();
        let id = kek_id(&k);
        for (t, n) in [(1, 3), (0, 3), (4, 3), (2, 0), (2, 17), (17, 17), (2, 255)] {
            assert!(
                matches!(split(&k, &id, t, n), Err(ShareError::Parameters(_))),
                "{t} of {n}"
            );
        }
        assert_eq!(split(&k, &id, 2, 2).unwrap().len(), 2);
        assert_eq!(split(&k, &id, 16, 16).unwrap().len(), 16);
        assert_eq!(split(&k, &id, 2, 16).unwrap().len(), 16);
        for bad in ["", "has space", "new\nline", &"x".repeat(129)] {
            assert!(
                matches!(split(&k, bad, 2, 3), Err(ShareError::KekId(_))),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_round_trip(
            raw in proptest::array::uniform32(any::<u8>()),
            total in 2u8..=MAX_SHARES,
            t_seed in any::<u8>(),
            order_seed in any::<u64>(),
        ) {
            let threshold = 2 + t_seed % (total - 1);
            let k = KeyBytes::from_slice(&raw).unwrap();
            let shares = split(&k, &kek_id(&k), threshold, total).unwrap();
            prop_assert_eq!(shares.len(), usize::from(total));
            // A pseudo-random choice of `threshold` shares, through text.
            let mut order: Vec<usize> = (0..shares.len()).collect();
            let mut s = order_seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let chosen: Vec<Share> = order[..usize::from(threshold)]
                .iter()
                .map(|&i| Share::parse(&shares[i].to_text()).unwrap())
                .collect();
            let rebuilt = combine(&chosen).unwrap();
            prop_assert_eq!(rebuilt.expose(), k.expose());
            let from_all = combine(&shares).unwrap();
            prop_assert_eq!(from_all.expose(), k.expose());
            prop_assert!(combine(&chosen[1..]).is_err());
        }
    }
}
