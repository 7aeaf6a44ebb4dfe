//! The key ring: unwrapped data keys (DEKs) held in memory, one active per
//! tenant, each with its encryption counter.
//!
//! Counters are reserved in blocks: before a DEK encrypts past its persisted
//! reservation, the vault persists a higher one. After a crash every reserved
//! use counts as spent, so a DEK can never exceed its limit however often the
//! process dies (NIST SP 800-38D §8.3: at most 2^32 random-nonce encryptions).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aes_gcm::Aes256Gcm;

use super::CryptoError;
use super::envelope;
use super::kek::{Kek, KeyBytes};
use crate::crypto::push_field;
use crate::domain::store::{DekState, WrappedDek};

/// Encryptions a single DEK may ever perform with random nonces.
pub const HARD_USE_LIMIT: u64 = 1 << 32;

/// A data key, unwrapped. The cipher's key schedule is zeroized on drop.
pub struct DataKey {
    pub id: u32,
    pub tenant: String,
    pub version: u32,
    pub created_ms: i64,
    state: AtomicU8,
    cipher: Aes256Gcm,
    used: AtomicU64,
    reserved: AtomicU64,
    /// Encryptions this key may ever perform (at most [`HARD_USE_LIMIT`]).
    limit: u64,
    /// Serialises reservation writes so concurrent encryptions that all hit
    /// the end of a block persist one new reservation, not many.
    pub reserve_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("version", &self.version)
            .field("state", &self.state())
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Whether a DEK may encrypt once more.
#[derive(Debug, PartialEq, Eq)]
pub enum Use {
    /// One use taken; go ahead.
    Granted,
    /// The persisted reservation is spent: reserve more, then retry.
    NeedReservation,
    /// The hard limit is reached: this key must never encrypt again.
    Exhausted,
    /// The key is no longer active (retired, destroyed, or its ring was
    /// dropped by a seal): it may decrypt, never encrypt. Fetch the
    /// tenant's active key again.
    Retired,
}

fn state_code(s: DekState) -> u8 {
    match s {
        DekState::Active => 0,
        DekState::DecryptOnly => 1,
        DekState::Destroyed => 2,
    }
}

impl DataKey {
    fn new(w: &WrappedDek, key: &KeyBytes, used: u64, limit: u64) -> Self {
        Self {
            id: w.id,
            tenant: w.tenant.clone(),
            version: w.version,
            created_ms: w.created_ms,
            state: AtomicU8::new(state_code(w.state)),
            cipher: envelope::cipher(key.expose()),
            used: AtomicU64::new(used),
            reserved: AtomicU64::new(w.reserved),
            limit,
            reserve_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }

    pub fn state(&self) -> DekState {
        match self.state.load(Ordering::Acquire) {
            0 => DekState::Active,
            1 => DekState::DecryptOnly,
            _ => DekState::Destroyed,
        }
    }

    fn set_state(&self, s: DekState) {
        self.state.store(state_code(s), Ordering::Release);
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes one encryption from the reservation, if the key may still
    /// encrypt. Checked on every attempt, so a call that waited for a
    /// reservation while its key was retired does not encrypt under it.
    pub fn take_use(&self) -> Use {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if self.state() != DekState::Active {
                return Use::Retired;
            }
            if cur >= self.limit {
                return Use::Exhausted;
            }
            if cur >= self.reserved.load(Ordering::Acquire) {
                return Use::NeedReservation;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Use::Granted,
                Err(now) => cur = now,
            }
        }
    }

    /// The reservation to persist next: one block more, capped at the limit.
    pub fn next_reservation(&self, block: u64) -> u64 {
        self.reserved().saturating_add(block).min(self.limit)
    }

    /// Records that `reserved` is now durable.
    pub fn set_reserved(&self, reserved: u64) {
        self.reserved.fetch_max(reserved, Ordering::AcqRel);
    }
}

/// Associated data binding a wrapped DEK to its identity, so a wrapped key
/// cannot be swapped to another tenant, id or version.
pub fn dek_aad(tenant: &str, id: u32, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    push_field(&mut aad, b"tokenvault/dek/v1");
    push_field(&mut aad, tenant.as_bytes());
    aad.extend_from_slice(&id.to_be_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// The maps' locks are never given up on: a panic elsewhere while one was
/// held (which poisons it) must not stop a destroyed key from being removed
/// or a retired key from leaving the active map, and each change below is
/// a single map operation, so the maps stay coherent through a panic.
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// All unwrapped DEKs, by id, and which one is active per tenant.
pub struct KeyRing {
    kek: RwLock<Arc<dyn Kek>>,
    by_id: RwLock<HashMap<u32, Arc<DataKey>>>,
    active: RwLock<HashMap<String, Arc<DataKey>>>,
    /// Ids of keys known to be destroyed, so that a record naming a key
    /// the ring never held (a tampered row) is told apart from one whose
    /// key was destroyed on purpose.
    destroyed: RwLock<HashSet<u32>>,
    use_limit: u64,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = read(&self.by_id).len();
        f.debug_struct("KeyRing")
            .field("kek", &self.kek().id())
            .field("deks", &n)
            .finish()
    }
}

impl KeyRing {
    /// A ring whose keys may each encrypt at most `use_limit` times
    /// (capped at [`HARD_USE_LIMIT`]).
    pub fn new(kek: Arc<dyn Kek>, use_limit: u64) -> Self {
        Self {
            kek: RwLock::new(kek),
            by_id: RwLock::default(),
            active: RwLock::default(),
            destroyed: RwLock::default(),
            use_limit: use_limit.clamp(1, HARD_USE_LIMIT),
        }
    }

    /// The current KEK.
    pub fn kek(&self) -> Arc<dyn Kek> {
        read(&self.kek).clone()
    }

    /// Switches to a new KEK after every DEK was re-wrapped under it.
    pub fn set_kek(&self, kek: Arc<dyn Kek>) {
        *write(&self.kek) = kek;
    }

    /// Unwraps a stored DEK's key bytes (for re-wrapping under a new KEK).
    pub fn unwrap_stored(&self, w: &WrappedDek) -> Result<KeyBytes, CryptoError> {
        self.kek()
            .unwrap(&w.wrapped, &dek_aad(&w.tenant, w.id, w.version))
    }

    /// Unwraps a stored DEK and adds it. A destroyed DEK is skipped; one that
    /// fails to unwrap is an error (wrong KEK or tampered row), never ignored.
    pub fn load(&self, w: &WrappedDek) -> Result<(), CryptoError> {
        if w.state == DekState::Destroyed {
            write(&self.destroyed).insert(w.id);
            return Ok(());
        }
        let key = self.unwrap_stored(w)?;
        // Every use reserved before a restart counts as spent.
        self.install(DataKey::new(w, &key, w.reserved, self.use_limit));
        Ok(())
    }

    /// Generates a new active DEK for `tenant` and returns it with its wrapped
    /// form. It is not in the ring until [`KeyRing::install`] is called, which
    /// the vault does only after the wrapped form is durable.
    pub fn generate(
        &self,
        tenant: &str,
        id: u32,
        version: u32,
        now_ms: i64,
    ) -> Result<(DataKey, WrappedDek), CryptoError> {
        let key = KeyBytes::generate()?;
        let kek = self.kek();
        let wrapped = kek.wrap(&key, &dek_aad(tenant, id, version))?;
        let w = WrappedDek {
            id,
            tenant: tenant.to_owned(),
            version,
            state: DekState::Active,
            wrapped,
            kek_id: kek.id().to_owned(),
            created_ms: now_ms,
            reserved: 0,
        };
        let dk = DataKey::new(&w, &key, 0, self.use_limit);
        Ok((dk, w))
    }

    pub fn install(&self, dk: DataKey) -> Arc<DataKey> {
        let dk = Arc::new(dk);
        write(&self.by_id).insert(dk.id, dk.clone());
        if dk.state() == DekState::Active {
            write(&self.active).insert(dk.tenant.clone(), dk.clone());
        }
        dk
    }

    /// Makes a key decrypt-only: it stays available to open old records but
    /// is no longer any tenant's active key.
    pub fn retire(&self, id: u32) {
        let Some(dk) = self.get(id) else { return };
        dk.set_state(DekState::DecryptOnly);
        self.deactivate(&dk);
    }

    /// Drops a destroyed key. The cipher's key schedule is wiped when the
    /// last in-flight user lets go of it.
    pub fn remove(&self, id: u32) {
        write(&self.destroyed).insert(id);
        let removed = write(&self.by_id).remove(&id);
        if let Some(dk) = removed {
            dk.set_state(DekState::Destroyed);
            self.deactivate(&dk);
        }
    }

    /// Makes every key of this ring decrypt-only, as the ring is dropped at
    /// a seal: calls still holding one of its keys cannot take uses that
    /// the next unseal's fresh key objects would count again.
    pub fn stop_encrypting(&self) {
        for dk in read(&self.by_id).values() {
            if dk.state() == DekState::Active {
                dk.set_state(DekState::DecryptOnly);
            }
        }
        write(&self.active).clear();
    }

    /// Removes `dk` from the active map if it is its tenant's active key.
    fn deactivate(&self, dk: &DataKey) {
        let mut m = write(&self.active);
        if m.get(&dk.tenant).is_some_and(|a| a.id == dk.id) {
            m.remove(&dk.tenant);
        }
    }

    pub fn active_for(&self, tenant: &str) -> Option<Arc<DataKey>> {
        read(&self.active).get(tenant).cloned()
    }

    pub fn get(&self, id: u32) -> Option<Arc<DataKey>> {
        read(&self.by_id).get(&id).cloned()
    }

    /// Whether the key `id` was destroyed (loaded as destroyed, or removed
    /// since). A key the ring does not hold and that was not destroyed was
    /// never the vault's.
    pub fn was_destroyed(&self, id: u32) -> bool {
        read(&self.destroyed).contains(&id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::crypto::kek::LocalKek;

    fn ring() -> KeyRing {
        KeyRing::new(
            Arc::new(LocalKek::from_key(&KeyBytes::generate().unwrap())),
            HARD_USE_LIMIT,
        )
    }

    #[test]
    fn counter_needs_reservation_then_grants_up_to_it() {
        let r = ring();
        let (dk, _) = r.generate("acme", 1, 1, 0).unwrap();
        assert_eq!(dk.take_use(), Use::NeedReservation);
        dk.set_reserved(dk.next_reservation(2));
        assert_eq!(dk.take_use(), Use::Granted);
        assert_eq!(dk.take_use(), Use::Granted);
        assert_eq!(dk.take_use(), Use::NeedReservation);
    }

    #[test]
    fn counter_refuses_at_hard_limit() {
        let r = ring();
        let (dk, _) = r.generate("acme", 1, 1, 0).unwrap();
        dk.used.store(HARD_USE_LIMIT - 1, Ordering::Relaxed);
        dk.set_reserved(dk.next_reservation(u64::MAX));
        assert_eq!(dk.reserved(), HARD_USE_LIMIT);
        assert_eq!(dk.take_use(), Use::Granted);
        assert_eq!(dk.take_use(), Use::Exhausted);
    }

    /// A key held by a call in flight stops encrypting the moment it is
    /// retired, or its ring is dropped at a seal, even with uses reserved.
    #[test]
    fn a_retired_or_sealed_away_key_grants_no_use() {
        let r = ring();
        for (id, tenant) in [(1, "acme"), (2, "globex")] {
            let (dk, _) = r.generate(tenant, id, 1, 0).unwrap();
            dk.set_reserved(dk.next_reservation(100));
            r.install(dk);
        }
        let acme = r.active_for("acme").unwrap();
        let globex = r.active_for("globex").unwrap();
        assert_eq!(acme.take_use(), Use::Granted);
        r.retire(1);
        assert_eq!(acme.take_use(), Use::Retired);
        assert_eq!(globex.take_use(), Use::Granted);
        r.stop_encrypting();
        assert_eq!(globex.take_use(), Use::Retired);
        assert!(r.active_for("globex").is_none());
        // Decryption is untouched.
        assert!(r.get(2).is_some());
    }

    #[test]
    fn reload_counts_reserved_as_spent() {
        let r = ring();
        let (_, mut w) = r.generate("acme", 1, 1, 0).unwrap();
        w.reserved = 1000;
        r.load(&w).unwrap();
        let dk = r.get(1).unwrap();
        assert_eq!(dk.used(), 1000);
        assert_eq!(dk.take_use(), Use::NeedReservation);
    }

    #[test]
    fn wrapped_dek_bound_to_identity() {
        let r = ring();
        let (_, w) = r.generate("acme", 1, 1, 0).unwrap();
        let mut moved = w.clone();
        moved.tenant = "globex".into();
        assert!(r.load(&moved).is_err());
        let mut bumped = w.clone();
        bumped.version = 2;
        assert!(r.load(&bumped).is_err());
        r.load(&w).unwrap();
        assert!(r.active_for("acme").is_some());
    }

    /// Poisons `l` by panicking on another thread while holding it.
    fn poison<T: Send + Sync>(l: &RwLock<T>) {
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _held = l.write().unwrap();
                    panic!("poisoning the lock on purpose");
                })
                .join();
        });
        assert!(l.is_poisoned());
    }

    /// With a poisoned lock, `remove` used to do nothing (a destroyed key
    /// kept decrypting) and `retire` could leave the old key active.
    #[test]
    fn a_poisoned_lock_does_not_stop_removal_or_retirement() {
        let r = ring();
        let (dk, w) = r.generate("acme", 1, 1, 0).unwrap();
        drop(dk);
        r.load(&w).unwrap();
        let (dk2, w2) = r.generate("globex", 2, 1, 0).unwrap();
        drop(dk2);
        r.load(&w2).unwrap();
        poison(&r.by_id);
        poison(&r.active);

        let held = r
            .get(1)
            .expect("keys stay readable through a poisoned lock");
        r.remove(1);
        assert!(r.get(1).is_none(), "a destroyed key is still in the ring");
        assert_eq!(held.state(), DekState::Destroyed);
        assert!(r.active_for("acme").is_none());

        r.retire(2);
        assert!(
            r.active_for("globex").is_none(),
            "a retired key is still active"
        );
        assert_eq!(r.get(2).unwrap().state(), DekState::DecryptOnly);
    }

    #[test]
    fn debug_of_keys_shows_no_bytes() {
        let r = ring();
        let (dk, w) = r.generate("acme", 1, 1, 0).unwrap();
        let d = format!("{dk:?} {w:?} {r:?}");
        assert!(d.contains("DataKey") && !d.contains("wrapped:"), "{d}");
    }
}
