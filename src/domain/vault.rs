//! The vault: the store, the key ring (absent while sealed), and the
//! plumbing every operation shares — opening against a pinned KEK, sealing,
//! choosing (and when due, rotating) a tenant's active data key, counting
//! key uses, and writing audit events. The operations themselves live in
//! `data.rs` (tokenize, detokenize, …), `keys.rs` (key lifecycle),
//! `dual_control.rs` (two-administrator changes), `unseal.rs` and
//! `reencrypt.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::access::{Caller, TenantId};
use super::audit::{AuditAction, AuditEvent, Outcome};
use super::budget::{Budgets, DetokenizeLimits};
use super::dual_control::PendingChange;
use super::error::VaultError;
use super::store::{KekCheck, Store, StoreError, StoredSigningKey};
use super::token::Token;
use super::unseal::UnsealState;
use crate::audit::signer::AuditSigner;
use crate::crypto::CryptoError;
use crate::crypto::kek::{Kek, KeyBytes};
use crate::crypto::keyring::{DataKey, HARD_USE_LIMIT, KeyRing, Use};

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Encryptions reserved per durable counter write.
    pub counter_block: u64,
    /// Rotate a tenant's key automatically once it has encrypted this many
    /// times (NIST SP 800-38D: well before 2^32).
    pub rotate_after_uses: u64,
    /// Never encrypt under one key more than this (at most 2^32).
    pub max_uses: u64,
    /// Rotate a tenant's key automatically once it is this old.
    pub crypto_period_ms: i64,
    pub auto_rotate: bool,
    /// Tokens re-encrypted per commit by a re-encryption job.
    pub reencrypt_batch: usize,
    /// Pause between re-encryption batches, so serving continues.
    pub reencrypt_pause_ms: u64,
    /// For a split KEK: the shares (distinct custodians) needed to unseal,
    /// as configured. Shares from a set with another threshold are refused.
    pub unseal_threshold: Option<u8>,
    /// Per-caller detokenize budgets.
    pub detokenize: DetokenizeLimits,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            counter_block: 65_536,
            rotate_after_uses: 1 << 31,
            max_uses: HARD_USE_LIMIT,
            crypto_period_ms: 90 * 24 * 3600 * 1000,
            auto_rotate: true,
            reencrypt_batch: 256,
            reencrypt_pause_ms: 5,
            unseal_threshold: None,
            detokenize: DetokenizeLimits::default(),
        }
    }
}

/// Reloads a KEK from its configured source (file, HSM) to unseal a vault
/// that an administrator sealed. Absent for split-knowledge KEKs, which only
/// custodians' shares can rebuild.
pub type KekLoader = Box<dyn Fn() -> Result<Arc<dyn Kek>, String> + Send + Sync>;

pub(crate) const KEK_CHECK_AAD: &[u8] = b"tokenvault/kek-check/v1";
pub(crate) const SYSTEM_ACTOR: &str = "system";
/// What a key lifecycle step asked for during shutdown is told.
const STOPPING: &str = "vault is shutting down; retry on another instance or after restart";

pub struct Vault {
    pub(crate) store: Arc<dyn Store>,
    /// `None` while sealed.
    ring: RwLock<Option<Arc<KeyRing>>>,
    /// The checkpoint signing key; `None` while sealed.
    signer: RwLock<Option<Arc<AuditSigner>>>,
    pub(crate) settings: VaultSettings,
    /// Live detokenize budgets, one per caller identity.
    pub(crate) budgets: Budgets,
    /// Serialises key lifecycle changes (creation, rotation, destruction,
    /// KEK rotation), so no two race on one tenant's keys.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    sealed_tx: watch::Sender<bool>,
    pub(crate) unseal: Mutex<UnsealState>,
    pub(crate) pending_changes: Mutex<HashMap<u64, PendingChange>>,
    pub(crate) running_jobs: Mutex<HashSet<u64>>,
    pub(crate) reload: RwLock<Option<Arc<KekLoader>>>,
    /// Work that outlives the call that began it: key lifecycle steps run
    /// [to completion](Vault::to_completion) and re-encryption jobs.
    /// [`Vault::stop_background`] waits for it, so nothing is written after
    /// the final checkpoint of a shutdown.
    pub(crate) background: TaskTracker,
    /// Set once by [`Vault::stop_background`]: no new background work.
    /// A mutex, not an atomic: background work is spawned while it is
    /// held (see [`Vault::spawn_background`]), so a spawn is either seen by
    /// the shutdown's wait or refused, never slipped in between.
    stopping: Mutex<bool>,
    /// Set when the server begins draining, so that open-ended streams
    /// (job watches) end instead of holding the drain to its deadline.
    draining: std::sync::atomic::AtomicBool,
    /// The `Arc` this vault lives in (see [`Vault::shared`]), so that a
    /// step which commits to the store and then updates memory can run as
    /// its own task, to completion, whatever happens to the call.
    me: Weak<Vault>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("sealed", &self.is_sealed())
            .finish_non_exhaustive()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Maps a store failure to what the caller is told. The store's own text
/// is logged, never sent: a precondition is the one message written for
/// callers. A row that fails to decode is tampering or corruption, which no
/// retry fixes, so it is DATA_LOSS, not "unavailable".
pub(crate) fn storage(e: StoreError) -> VaultError {
    match e {
        StoreError::Precondition(m) => VaultError::FailedPrecondition(m),
        // Only after the caller's own retries: the key kept changing.
        StoreError::KeyRetired => {
            VaultError::Unavailable("the tenant's data key changed; retry".into())
        }
        StoreError::Corrupt(_) => {
            error!(error = %e, "stored data is corrupt");
            VaultError::DataLoss
        }
        e => {
            error!(error = %e, "storage operation failed");
            VaultError::Unavailable("storage unavailable; retry later".into())
        }
    }
}

/// Errors of opening: shown to the operator at start, never to callers.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the configured KEK ({configured}) is not the one this database is pinned to ({pinned}); refusing to start"
    )]
    KekMismatch { pinned: String, configured: String },
    #[error("the configured KEK fails the database's key check value; refusing to start")]
    KekCheckFailed,
    #[error("data key {id} cannot be unwrapped ({reason}); refusing to start")]
    DekUnwrap { id: u32, reason: CryptoError },
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    #[error("audit signing key: {0}; refusing to start")]
    SigningKey(CryptoError),
}

/// What unsealing loads: the key ring and the checkpoint signing key.
pub(crate) type Unsealed = (Arc<KeyRing>, Arc<AuditSigner>);

impl Vault {
    fn new(store: Arc<dyn Store>, settings: VaultSettings) -> Self {
        let (sealed_tx, _) = watch::channel(true);
        Self {
            store,
            ring: RwLock::new(None),
            signer: RwLock::new(None),
            budgets: Budgets::new(&settings.detokenize),
            settings,
            lifecycle: tokio::sync::Mutex::new(()),
            sealed_tx,
            unseal: Mutex::default(),
            pending_changes: Mutex::default(),
            running_jobs: Mutex::default(),
            reload: RwLock::new(None),
            background: TaskTracker::new(),
            stopping: Mutex::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            me: Weak::new(),
        }
    }

    /// Puts the vault in the `Arc` it is served from, which it knows (see
    /// [`Vault::to_completion`]). Every way to open a vault ends here.
    fn shared(self) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ..self
        })
    }

    /// Runs `step` as a task of its own and waits for it. A gRPC handler's
    /// future is dropped when its client hangs up or its deadline passes;
    /// a step that commits a key change to the store and then updates the
    /// key ring must never stop between the two (the store would say a key
    /// is destroyed, or rotated, while memory still used it). As a task it
    /// runs to its end even if the caller stops waiting.
    pub(crate) async fn to_completion<T, F>(
        &self,
        step: impl FnOnce(Arc<Vault>) -> F,
    ) -> Result<T, VaultError>
    where
        F: Future<Output = Result<T, VaultError>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(me) = self.me.upgrade() else {
            error!("a key lifecycle step was asked of a vault that is not shared");
            return Err(VaultError::Internal);
        };
        let Some(task) = self.spawn_background(step(me)) else {
            return Err(VaultError::Unavailable(STOPPING.into()));
        };
        task.await.map_err(|e| {
            error!(error = %e, "a key lifecycle step panicked");
            VaultError::Internal
        })?
    }

    /// The id of `tenant`'s active data key as held in memory (what the
    /// next tokenize uses), if the vault is unsealed and has one. The
    /// store can be a moment ahead of memory after a key change commits.
    pub fn active_key_id(&self, tenant: &str) -> Option<u32> {
        self.ring().ok()?.active_for(tenant).map(|k| k.id)
    }

    /// Marks the start of a shutdown's drain (see `draining`).
    pub fn begin_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the server is draining its calls before it stops.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the vault is shutting down (see [`Vault::stop_background`]).
    pub fn is_stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns work that [`Vault::stop_background`] waits for; `None` once
    /// the vault is stopping.
    pub(crate) fn spawn_background<F>(&self, work: F) -> Option<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
        (!*stopping).then(|| self.background.spawn(work))
    }

    /// Shutdown, after the last call has been answered and before the final
    /// checkpoint: starts no new background work, pauses re-encryption jobs
    /// at their next batch (they stay `running` and resume at the next
    /// start) and waits, up to `within`, for key lifecycle steps still
    /// running for calls that went away. Returns whether everything ended
    /// in time; what did not may still write after the final checkpoint
    /// (the next start's checkpoints cover it).
    pub async fn stop_background(&self, within: std::time::Duration) -> bool {
        *self.stopping.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.background.close();
        tokio::time::timeout(within, self.background.wait())
            .await
            .is_ok()
    }

    /// Opens the vault over `store` with `kek`. On a new database the KEK is
    /// pinned; on an existing one a different or wrong KEK is refused before
    /// any key is used, so the vault never serves garbage.
    pub async fn open(
        store: Arc<dyn Store>,
        kek: Arc<dyn Kek>,
        settings: VaultSettings,
    ) -> Result<Arc<Self>, OpenError> {
        let v = Self::new(store, settings);
        v.finish_restore().await?;
        let keys = v.open_ring(kek).await?;
        v.install_ring(Some(keys));
        Ok(v.shared())
    }

    /// Opens the vault sealed: it answers every data call UNAVAILABLE until
    /// custodians unseal it.
    pub async fn open_sealed(
        store: Arc<dyn Store>,
        settings: VaultSettings,
    ) -> Result<Arc<Self>, OpenError> {
        let v = Self::new(store, settings);
        v.finish_restore().await?;
        Ok(v.shared())
    }

    /// On the first start after a restore from backup, before any key is
    /// loaded: retires every data key that was active. Their use counters
    /// came from the backup and may be behind their real use, so none may
    /// encrypt again (SP 800-38D 8.3); each tenant's next tokenize makes a
    /// fresh key. Needs no KEK, so a sealed start does it too.
    async fn finish_restore(&self) -> Result<(), OpenError> {
        let Some(note) = self.store.restore_marker().await? else {
            return Ok(());
        };
        let mut audit = AuditEvent::new(now_ms(), SYSTEM_ACTOR, AuditAction::Restore);
        audit.detail = Some(note);
        let retired = self.store.finish_restore(audit).await?;
        warn!(
            retired = ?retired,
            "database restored from a backup: every active data key retired; tokens made after the backup are gone"
        );
        Ok(())
    }

    /// Replaces how the KEK is reloaded (after a KEK rotation), or removes
    /// it (a split KEK can only be rebuilt by custodians).
    pub fn set_reload(&self, loader: Option<KekLoader>) {
        let loader = loader.map(Arc::new);
        match self.reload.write() {
            Ok(mut r) => *r = loader,
            Err(p) => *p.into_inner() = loader,
        }
    }

    pub(crate) fn reloader(&self) -> Option<Arc<KekLoader>> {
        self.reload
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks `kek` against the pin (pinning it on a new database), unwraps
    /// every live data key with it, and unwraps (or on a new database
    /// creates) the checkpoint signing key.
    pub(crate) async fn open_ring(&self, kek: Arc<dyn Kek>) -> Result<Unsealed, OpenError> {
        match self.store.kek_check().await? {
            None => {
                let probe = KeyBytes::generate()?;
                let check = KekCheck {
                    kek_id: kek.id().to_owned(),
                    check_blob: kek.wrap(&probe, KEK_CHECK_AAD)?,
                };
                let mut audit = AuditEvent::new(now_ms(), SYSTEM_ACTOR, AuditAction::KekInit);
                audit.detail = Some(format!("kek={}", kek.id()));
                self.store.pin_kek(&check, audit).await?;
            }
            Some(pinned) => {
                if pinned.kek_id != kek.id() {
                    return Err(OpenError::KekMismatch {
                        pinned: pinned.kek_id,
                        configured: kek.id().to_owned(),
                    });
                }
                kek.unwrap(&pinned.check_blob, KEK_CHECK_AAD)
                    .map_err(|_| OpenError::KekCheckFailed)?;
            }
        }
        let ring = KeyRing::new(kek.clone(), self.settings.max_uses);
        for w in self.store.load_deks().await? {
            ring.load(&w)
                .map_err(|reason| OpenError::DekUnwrap { id: w.id, reason })?;
        }
        let signer = match self.store.signing_key().await? {
            Some(k) => {
                AuditSigner::unwrap(&*kek, &k.wrapped, &k.public).map_err(OpenError::SigningKey)?
            }
            None => {
                let s = AuditSigner::generate()?;
                let stored = StoredSigningKey {
                    wrapped: s.wrap(&*kek)?,
                    public: s.public().to_vec(),
                };
                let mut audit =
                    AuditEvent::new(now_ms(), SYSTEM_ACTOR, AuditAction::AuditKeyCreate);
                audit.detail = Some(format!("key={} kek={}", s.key_id(), kek.id()));
                self.store.init_signing_key(&stored, audit).await?;
                s
            }
        };
        Ok((Arc::new(ring), Arc::new(signer)))
    }

    /// Installs (unseal) or drops (seal) the key ring and signing key.
    /// Dropping them wipes the keys once in-flight calls let go of them.
    pub(crate) fn install_ring(&self, keys: Option<Unsealed>) {
        let sealed = keys.is_none();
        let (ring, signer) = match keys {
            Some((r, s)) => (Some(r), Some(s)),
            None => (None, None),
        };
        let old = match self.ring.write() {
            Ok(mut r) => std::mem::replace(&mut *r, ring),
            Err(p) => std::mem::replace(&mut *p.into_inner(), ring),
        };
        // Calls in flight may still hold the old ring's keys: they must not
        // encrypt with them, or the uses they take would be counted again
        // by the key objects the next unseal loads from the store.
        if let Some(old) = old {
            old.stop_encrypting();
        }
        match self.signer.write() {
            Ok(mut r) => *r = signer,
            Err(p) => *p.into_inner() = signer,
        }
        self.sealed_tx.send_replace(sealed);
        info!(sealed, "vault seal state changed");
    }

    /// The key ring, or `Sealed`.
    pub fn ring(&self) -> Result<Arc<KeyRing>, VaultError> {
        let r = self.ring.read().unwrap_or_else(PoisonError::into_inner);
        r.clone().ok_or(VaultError::Sealed)
    }

    /// The checkpoint signing key, unless sealed.
    pub fn signer(&self) -> Option<Arc<AuditSigner>> {
        self.signer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn is_sealed(&self) -> bool {
        *self.sealed_tx.borrow()
    }

    /// Follows the seal state (true = sealed), e.g. to drive health checks.
    pub fn sealed_watch(&self) -> watch::Receiver<bool> {
        self.sealed_tx.subscribe()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The tenant's active DEK. Creates the first one on first use, and
    /// rotates automatically when the current one has reached its use count
    /// or crypto-period: new writes move to the new key at once, with no
    /// restart and no failed request.
    pub(crate) async fn active_dek(&self, tenant: &TenantId) -> Result<Arc<DataKey>, VaultError> {
        if let Some(dk) = self.ring()?.active_for(tenant.as_str())
            && self.rotation_due(&dk).is_none()
        {
            return Ok(dk);
        }
        // Creating or rotating the key commits it and then installs it in
        // the ring: one step, never cut short by a cancelled call.
        let tenant = tenant.clone();
        self.to_completion(move |v| async move { v.create_or_rotate_due(&tenant).await })
            .await
    }

    async fn create_or_rotate_due(&self, tenant: &TenantId) -> Result<Arc<DataKey>, VaultError> {
        let _guard = self.lifecycle.lock().await;
        let ring = self.ring()?;
        let current = ring.active_for(tenant.as_str());
        let reason = match &current {
            None => "first use of tenant".to_owned(),
            Some(dk) => match self.rotation_due(dk) {
                None => return Ok(dk.clone()),
                Some(why) => why,
            },
        };
        self.rotate_locked(
            &ring,
            tenant,
            current.as_deref(),
            SYSTEM_ACTOR,
            &reason,
            None,
        )
        .await
    }

    /// Why `dk` should be rotated now, if it should.
    pub(crate) fn rotation_due(&self, dk: &DataKey) -> Option<String> {
        if !self.settings.auto_rotate {
            return None;
        }
        if dk.used() >= self.settings.rotate_after_uses {
            return Some(format!(
                "automatic: {} encryptions reached (threshold {})",
                dk.used(),
                self.settings.rotate_after_uses
            ));
        }
        if now_ms().saturating_sub(dk.created_ms) >= self.settings.crypto_period_ms {
            return Some("automatic: crypto-period elapsed".into());
        }
        None
    }

    /// Creates a new active DEK for `tenant`, retiring `current` to
    /// decrypt-only, durably and audited. Caller holds `lifecycle`.
    pub(crate) async fn rotate_locked(
        &self,
        ring: &KeyRing,
        tenant: &TenantId,
        current: Option<&DataKey>,
        actor: &str,
        reason: &str,
        peer: Option<String>,
    ) -> Result<Arc<DataKey>, VaultError> {
        // Ids come from the store, which also remembers destroyed keys.
        let deks = self.store.load_deks().await.map_err(storage)?;
        let id = deks.iter().map(|d| d.id).max().map_or(1, |m| m + 1);
        let version = deks
            .iter()
            .filter(|d| d.tenant == tenant.as_str())
            .map(|d| d.version)
            .max()
            .map_or(1, |v| v + 1);
        let now = now_ms();
        let (dk, wrapped) = ring
            .generate(tenant.as_str(), id, version, now)
            .map_err(|e| {
                error!(error = %e, "data key generation failed");
                VaultError::Internal
            })?;
        let action = if current.is_some() {
            AuditAction::DekRotate
        } else {
            AuditAction::DekCreate
        };
        let mut audit = AuditEvent::new(now, actor, action);
        audit.tenant = Some(tenant.as_str().to_owned());
        audit.key_id = Some(id);
        audit.key_version = Some(version);
        audit.reason = Some(reason.to_owned());
        audit.peer = peer;
        audit.detail = Some(match current {
            Some(old) => format!(
                "retired dek_id={} version={} after {} encryptions; kek={}",
                old.id,
                old.version,
                old.used(),
                ring.kek().id()
            ),
            None => format!("kek={}", ring.kek().id()),
        });
        self.store
            .rotate_dek(&wrapped, current.map(|c| c.id), audit)
            .await
            .map_err(storage)?;
        let new = ring.install(dk);
        if let Some(old) = current {
            ring.retire(old.id);
            info!(tenant = %tenant, old = old.id, new = id, reason, "data key rotated");
        }
        Ok(new)
    }

    /// The tenant's active key, with one encryption taken from it. A key
    /// retired while this waited (a rotation, a seal) is never used: the
    /// active key is fetched again, a few times at most.
    pub(crate) async fn active_use(&self, tenant: &TenantId) -> Result<Arc<DataKey>, VaultError> {
        for _ in 0..4 {
            let dk = self.active_dek(tenant).await?;
            if self.take_use(&dk).await? {
                return Ok(dk);
            }
        }
        Err(VaultError::Unavailable(
            "the tenant's data key kept changing; retry".into(),
        ))
    }

    /// Takes one encryption from `dk`'s counter, durably reserving a new
    /// block first when the current one is spent; false if the key is no
    /// longer active.
    async fn take_use(&self, dk: &DataKey) -> Result<bool, VaultError> {
        loop {
            match dk.take_use() {
                Use::Granted => return Ok(true),
                Use::Retired => return Ok(false),
                Use::Exhausted => {
                    warn!(dek = dk.id, "data key reached its encryption limit");
                    return Err(VaultError::ResourceExhausted(
                        "the tenant's data key has reached its encryption limit; rotate it".into(),
                    ));
                }
                Use::NeedReservation => {
                    let _guard = dk.reserve_lock.lock().await;
                    if dk.used() < dk.reserved() {
                        continue;
                    }
                    let next = dk.next_reservation(self.settings.counter_block.max(1));
                    if next <= dk.reserved() {
                        continue; // at the limit: take_use reports it
                    }
                    self.store
                        .reserve_dek_uses(dk.id, next)
                        .await
                        .map_err(storage)?;
                    dk.set_reserved(next);
                }
            }
        }
    }

    pub(crate) fn event(
        &self,
        caller: &Caller,
        action: AuditAction,
        tenant: Option<&str>,
        token: Option<Token>,
        outcome: Outcome,
        purpose: Option<&str>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(now_ms(), &caller.identity, action);
        e.tenant = tenant
            .map(str::to_owned)
            .or_else(|| caller.home_tenant().map(|t| t.as_str().to_owned()));
        e.token = token;
        e.outcome = outcome;
        e.peer = caller.peer.clone();
        e.purpose = purpose.map(str::to_owned);
        e
    }

    /// Audits a failed operation. Successes were audited inside the
    /// operation, in the same commit as their effect. If even this audit
    /// cannot be written the caller gets UNAVAILABLE, not the original error:
    /// nothing is answered that is not on the record.
    pub(crate) async fn audit_failure<T>(
        &self,
        res: &Result<T, VaultError>,
        caller: &Caller,
        action: AuditAction,
        token: Option<Token>,
        tenant: Option<&str>,
        purpose: Option<&str>,
    ) -> Result<(), VaultError> {
        let Err(e) = res else { return Ok(()) };
        self.audit_error(
            e,
            self.event(caller, action, tenant, token, Outcome::SUCCESS, purpose),
        )
        .await
    }

    /// Records `e` as the outcome of `ev` and appends it.
    pub(crate) async fn audit_error(
        &self,
        e: &VaultError,
        mut ev: AuditEvent,
    ) -> Result<(), VaultError> {
        ev.outcome = Outcome::failed(e.code());
        ev.detail = Some(
            if ev.outcome == Outcome::DENIED || ev.outcome.as_str() == e.code() {
                e.audit_detail()
            } else {
                e.code().to_owned()
            },
        );
        self.store.append_audit(ev).await.map_err(storage)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};
    use std::time::Duration;
    use tokio::sync::oneshot;

    async fn sealed_vault(dir: &tempfile::TempDir) -> Arc<Vault> {
        let store = SqliteStore::open(&dir.path().join("v.db"), SqliteOptions::default()).unwrap();
        Vault::open_sealed(Arc::new(store), VaultSettings::default())
            .await
            .unwrap()
    }

    /// A step whose caller went away still runs; shutdown waits for it
    /// before its final checkpoint, and no new step starts meanwhile.
    #[tokio::test(flavor = "multi_thread")]
    async fn stopping_waits_for_running_steps_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let vault = sealed_vault(&dir).await;
        let (started_tx, started_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let v = vault.clone();
        let call = tokio::spawn(async move {
            v.to_completion(move |_| async move {
                started_tx.send(()).unwrap();
                go_rx.await.unwrap();
                Ok(())
            })
            .await
        });
        started_rx.await.unwrap();
        call.abort();

        let v = vault.clone();
        let mut stop =
            tokio::spawn(async move { v.stop_background(Duration::from_secs(60)).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut stop)
                .await
                .is_err(),
            "shutdown went on while a key step was still running"
        );
        let refused = vault.to_completion(|_| async { Ok(()) }).await;
        assert!(
            matches!(&refused, Err(VaultError::Unavailable(m)) if m.contains("shutting down")),
            "{refused:?}"
        );
        go_tx.send(()).unwrap();
        assert!(
            stop.await.unwrap(),
            "the step ended, so shutdown should go on"
        );
    }

    /// A step that never ends does not hold shutdown beyond its bound.
    #[tokio::test(flavor = "multi_thread")]
    async fn stopping_gives_up_after_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let vault = sealed_vault(&dir).await;
        let v = vault.clone();
        let call = tokio::spawn(async move {
            v.to_completion(|_| std::future::pending::<Result<(), VaultError>>())
                .await
        });
        while vault.background.is_empty() {
            tokio::task::yield_now().await;
        }
        assert!(!vault.stop_background(Duration::from_millis(50)).await);
        call.abort();
    }

    #[test]
    fn corrupt_rows_are_data_loss_and_do_not_echo_the_row() {
        let e = storage(StoreError::Corrupt("dek 7 state 'x41x'".into()));
        assert_eq!(e, VaultError::DataLoss);
        assert!(!e.to_string().contains("x41x"), "{e}");
        assert!(matches!(
            storage(StoreError::Unavailable("disk full".into())),
            VaultError::Unavailable(_)
        ));
        assert_eq!(
            storage(StoreError::Precondition("key is active".into())),
            VaultError::FailedPrecondition("key is active".into())
        );
    }
}
