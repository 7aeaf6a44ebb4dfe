//! Proves that a card number (or a data key) does not outlive its use in
//! freed heap memory:
//! a test allocator looks into every block as it is freed, on every thread
//! (tokio workers, the SQLite writer), while the real vault core tokenizes,
//! detokenizes, refuses a bad card number, and the gRPC codec encodes a
//! Detokenize response. Any freed block still holding the digits is a copy
//! that was not wiped.
//!
//! The gRPC transport itself (h2, rustls buffers) is out of this test's
//! reach and documented as a known limit (SECURITY.md, "Memory").
//!
//! The allocator is the one place in the project's tests that needs
//! `unsafe`: reading a block before handing it back to the system allocator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The project's one exception to `unsafe_code = "deny"` (Cargo.toml).
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use prost::Message;
use tokenvault::codec::Wipe;
use tokenvault::domain::access::{Caller, Grant, Role, RoleSet, TenantId, TenantScope};
use tokenvault::proto::DetokenizeResponse;
use tokenvault::server::{load_kek, open_vault};
use zeroize::{Zeroize, Zeroizing};

const MAX_NEEDLE: usize = 19;

/// The digits looked for, set before arming (no allocation in the allocator).
static NEEDLE: [AtomicU8; MAX_NEEDLE] = [const { AtomicU8::new(0) }; MAX_NEEDLE];
static NEEDLE_LEN: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
/// Freed blocks that held the needle while armed.
static HITS: AtomicUsize = AtomicUsize::new(0);

struct ScanOnFree;

// SAFETY: every call is forwarded to `System`, which upholds the
// `GlobalAlloc` contract; `dealloc` only reads the block before doing so.
unsafe impl GlobalAlloc for ScanOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) {
            // SAFETY: `ptr` was returned by `alloc` for `layout` (the
            // caller's contract) and is not yet freed, so its `size` bytes
            // are ours to read until `System.dealloc` below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if holds_needle(block) {
                HITS.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    // `realloc` keeps the default, which frees the old block through
    // `dealloc`, so a block that grew is scanned too.
}

#[global_allocator]
static ALLOC: ScanOnFree = ScanOnFree;

fn holds_needle(block: &[u8]) -> bool {
    let n = NEEDLE_LEN.load(Ordering::Relaxed);
    if n == 0 || block.len() < n {
        return false;
    }
    let first = NEEDLE[0].load(Ordering::Relaxed);
    (0..=block.len() - n).any(|i| {
        block[i] == first && (1..n).all(|j| block[i + j] == NEEDLE[j].load(Ordering::Relaxed))
    })
}

/// One scan at a time: the needle and the hit count are global, and
/// `cargo test` runs this file's tests on parallel threads (nextest runs
/// each in its own process). std's mutex does not allocate, so holding it
/// cannot disturb the scan.
static SCAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A scan in progress; `disarm` ends it.
struct Armed(std::sync::MutexGuard<'static, ()>);

/// Watches freed memory for `digits` until `disarm`; returns the hits.
fn arm(digits: &[u8]) -> Armed {
    let guard = SCAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(digits.len() <= MAX_NEEDLE);
    for (slot, b) in NEEDLE.iter().zip(digits) {
        slot.store(*b, Ordering::Relaxed);
    }
    NEEDLE_LEN.store(digits.len(), Ordering::Relaxed);
    HITS.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::SeqCst);
    Armed(guard)
}

fn disarm(scan: Armed) -> usize {
    ARMED.store(false, Ordering::SeqCst);
    let hits = HITS.load(Ordering::Relaxed);
    drop(scan.0);
    hits
}

/// A Luhn-valid 16-digit Visa number drawn at random, so that no constant
/// in the binary or its data can match it by chance.
fn random_pan() -> Zeroizing<String> {
    let mut raw = [0u8; 14];
    getrandom::fill(&mut raw).unwrap();
    let mut pan = Zeroizing::new(String::with_capacity(16));
    pan.push('4');
    for b in raw {
        pan.push(char::from(b'0' + b % 10));
    }
    let check = common::cards::luhn_check_digit(&pan);
    pan.push(char::from_digit(check, 10).unwrap());
    pan
}

fn caller(identity: &str, roles: &[Role]) -> Caller {
    Caller {
        identity: identity.into(),
        peer: Some("127.0.0.1:50000".into()),
        grant: Some(Grant {
            scope: TenantScope::One(TenantId::parse("acme").unwrap()),
            roles: RoleSet::new(roles.iter().copied()),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_unwiped_copy_of_a_card_number_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::dev_config(tmp.path(), &[]);
    let kek = load_kek(&cfg, &HashMap::<String, String>::new()).unwrap();
    let vault = open_vault(&cfg, kek).await.unwrap();
    let checkout = caller("acme-checkout", &[Role::Tokenize]);
    let payments = caller("acme-payments", &[Role::Detokenize]);

    let pan = random_pan();
    // The test's own copies live in buffers it wipes before freeing them.
    let mut spaced = Zeroizing::new(String::with_capacity(20));
    for (i, c) in pan.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            spaced.push(' ');
        }
        spaced.push(c);
    }
    let mut bad_checksum = pan.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == '9' { '0' } else { '9' });

    // The scanner finds what it must: a plain String freed unwiped.
    let scan = arm(pan.as_bytes());
    drop(std::hint::black_box(String::from(pan.as_str())));
    assert_eq!(disarm(scan), 1, "the scanner missed a planted copy");

    let scan = arm(pan.as_bytes());
    let (token, meta) = vault
        .tokenize(&checkout, &pan, Some((12, 2030)))
        .await
        .unwrap();
    assert_eq!(meta.last4, pan[12..]);
    let (token2, _) = vault.tokenize(&checkout, &spaced, None).await.unwrap();
    assert!(
        vault
            .tokenize(&checkout, &bad_checksum, None)
            .await
            .is_err()
    );
    let token = token.to_string();
    for t in [&token, &token2.to_string()] {
        let out = vault
            .detokenize(&payments, t, "charge order 42")
            .await
            .unwrap();
        assert!(out.pan.digits() == pan.as_str());
        // The server's answer: encoded, then wiped by the codec's rule.
        let mut response = DetokenizeResponse {
            pan: out.pan.digits().to_owned(),
            expiry: None,
        };
        let mut wire = Zeroizing::new(Vec::with_capacity(64));
        response.encode(&mut *wire).unwrap();
        response.wipe();
    }
    let hits = disarm(scan);

    spaced.zeroize();
    bad_checksum.zeroize();
    drop(vault);
    assert_eq!(
        hits, 0,
        "{hits} freed block(s) still held the card number in clear"
    );
}

/// The AES-256 key schedule begins with the raw key: a cipher dropped without
/// wiping it leaves the data key in freed memory. The `zeroize` features of
/// `aes`, `ghash` and `polyval` (Cargo.toml) make the drop wipe it.
#[test]
fn a_dropped_cipher_leaves_no_key_bytes_in_freed_memory() {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut *key).unwrap();

    // Control: an unwiped heap copy of the key is found.
    let scan = arm(&key[..16]);
    drop(std::hint::black_box(Box::new(*key)));
    assert_eq!(disarm(scan), 1, "the scanner missed a planted key copy");

    for half in [&key[..16], &key[16..]] {
        let scan = arm(half);
        let cipher = Box::new(tokenvault::crypto::envelope::cipher(&key));
        std::hint::black_box(&cipher);
        drop(cipher);
        let hits = disarm(scan);
        assert_eq!(hits, 0, "a dropped cipher left key bytes in freed memory");
    }
}

/// A decoded request that never reaches its handler's end (a refused caller,
/// a cancelled call) and a response dropped before it is encoded still wipe
/// their card number: the secret-bearing messages wipe on drop (codec.rs).
#[test]
fn messages_with_a_card_number_wipe_it_when_dropped() {
    let pan = random_pan();
    let mut wire = Zeroizing::new(Vec::with_capacity(64));
    let mut original = tokenvault::proto::TokenizeRequest::default();
    original.pan.push_str(&pan);
    original.encode(&mut *wire).unwrap();
    drop(original);

    let scan = arm(pan.as_bytes());
    let decoded = tokenvault::proto::TokenizeRequest::decode(&wire[..]).unwrap();
    assert_eq!(decoded.pan.len(), pan.len());
    drop(decoded);
    let mut unsent = DetokenizeResponse::default();
    unsent.pan.push_str(&pan);
    drop(std::hint::black_box(unsent));
    let hits = disarm(scan);
    assert_eq!(hits, 0, "a dropped message left the card number in memory");
}
