//! Key lifecycle operations for administrators: status, data-key rotation,
//! KEK rotation once approved (re-wrap every data key in one commit), and
//! destruction of an unreferenced data key; the checks every reason and
//! caller-named value pass before they reach an audit record. Requests that
//! need a second administrator are in `dual_control.rs`. Every attempt —
//! allowed, refused or failed — is audited with the key id and version,
//! actor, approvers and reason.

use std::sync::Arc;

use tracing::{error, info};

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, AuditEvent};
use super::data::{contains_card_like_digits, unprintable};
use super::dual_control::{PendingChange, approved_event};
use super::error::VaultError;
use super::store::{DekState, KekCheck};
use super::vault::{KEK_CHECK_AAD, Vault, now_ms, storage};
use crate::crypto::kek::{Kek, KeyBytes};
use crate::crypto::keyring::dek_aad;

const REASON_MAX_CHARS: usize = 512;
const TARGET_MAX_CHARS: usize = 1024;
/// What an audit record keeps of a reason that failed [`check_reason`]:
/// rejected text is never stored.
const REJECTED: &str = "(rejected)";
/// The answers for an id that names nothing the caller may see. The same
/// words whether the object is missing or another tenant's, and never the
/// id, which is caller input.
const NO_KEY: &str = "no such data key";

/// One data key as an administrator or auditor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekStatus {
    pub id: u32,
    pub tenant: String,
    pub version: u32,
    pub state: DekState,
    pub kek_id: String,
    pub created_ms: i64,
    /// Encryptions spent (reserved blocks count as spent after a restart).
    pub used: u64,
    pub limit: u64,
    /// Tokens whose ciphertext is under this key.
    pub tokens: u64,
    /// Why it is due for rotation, if it is.
    pub rotation_due: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub sealed: bool,
    /// The KEK the database is pinned to.
    pub kek_id: Option<String>,
    pub deks: Vec<DekStatus>,
}

/// A reason is required for every key lifecycle action and lands in the
/// audit log: bounded, printable, and screened for card numbers.
pub(crate) fn check_reason(reason: &str) -> Result<&str, VaultError> {
    let r = reason.trim();
    if r.is_empty() {
        return Err(VaultError::InvalidArgument(
            "a reason is required for key lifecycle actions".into(),
        ));
    }
    if r.chars().count() > REASON_MAX_CHARS || r.chars().any(unprintable) {
        return Err(VaultError::InvalidArgument(format!(
            "reason must be at most {REASON_MAX_CHARS} printable characters"
        )));
    }
    if contains_card_like_digits(r) {
        return Err(VaultError::InvalidArgument(
            "reason must not contain a card number".into(),
        ));
    }
    Ok(r)
}

/// A KEK rotation target's description (a path, an HSM label) is caller
/// text that lands in the audit log: bounded, printable, and screened for
/// card numbers like a reason.
pub(crate) fn check_target(target: &str) -> Result<&str, VaultError> {
    let t = target.trim();
    if t.is_empty()
        || t.chars().count() > TARGET_MAX_CHARS
        || t.chars().any(unprintable)
        || contains_card_like_digits(t)
    {
        return Err(VaultError::InvalidArgument(format!(
            "a KEK target must be at most {TARGET_MAX_CHARS} printable characters and hold no card number"
        )));
    }
    Ok(t)
}

/// What an audit record keeps of a caller's reason: the reason if it would
/// be accepted, else a marker (or nothing, for none given).
fn reason_note(reason: &str) -> Option<String> {
    match check_reason(reason) {
        Ok(r) => Some(r.to_owned()),
        Err(_) if reason.trim().is_empty() => None,
        Err(_) => Some(REJECTED.to_owned()),
    }
}

/// What an audit record keeps of a tenant named by a caller: the name if it
/// is one; anything else is caller text and is not stored.
pub(crate) fn tenant_note(tenant: &str) -> Option<String> {
    TenantId::parse(tenant).ok().map(|t| t.as_str().to_owned())
}

/// A caller-supplied id or number for an audit record. Ids the vault
/// issued are recorded as they are; one that names nothing is caller input,
/// and a 12–19 digit number may be a card number, so such a one is
/// withheld.
pub(crate) fn shown_id(id: impl std::fmt::Display) -> String {
    let s = id.to_string();
    if contains_card_like_digits(&s) {
        "(withheld)".to_owned()
    } else {
        s
    }
}

impl Vault {
    /// A vault-wide event by `caller` (no tenant unless set later), with
    /// the reason if one was given and it passes [`check_reason`]: the
    /// record is written on failure paths too, so a rejected reason must
    /// never be copied into it.
    pub(crate) fn key_event(
        &self,
        caller: &Caller,
        action: AuditAction,
        reason: &str,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(now_ms(), &caller.identity, action);
        e.peer = caller.peer.clone();
        e.reason = reason_note(reason);
        e
    }

    /// Audits a key action refused before it reached the core (e.g. its new
    /// KEK could not be built).
    pub async fn audit_key_refusal(
        &self,
        caller: &Caller,
        action: AuditAction,
        reason: &str,
        e: &VaultError,
    ) -> Result<(), VaultError> {
        self.audit_error(e, self.key_event(caller, action, reason))
            .await
    }

    /// Status of the KEK and of every data key the caller's grant reaches:
    /// a tenant-scoped caller sees its own tenant's keys and nothing of any
    /// other tenant. Works while sealed (counters then come from the store).
    pub async fn key_status(&self, caller: &Caller) -> Result<KeyStatus, VaultError> {
        let allowed = caller.authorize(Action::ReadKeys);
        let read = self.key_status_now(caller);
        self.audited_key_read(caller, allowed, "key status".into(), read)
            .await
    }

    async fn key_status_now(&self, caller: &Caller) -> Result<KeyStatus, VaultError> {
        let pin = self.store.kek_check().await.map_err(storage)?;
        let ring = self.ring().ok();
        let deks = self.store.load_deks().await.map_err(storage)?;
        let counts = self.store.token_counts().await.map_err(storage)?;
        let deks = deks
            .into_iter()
            .filter(|w| caller.reaches_name(&w.tenant))
            .map(|w| {
                let live = ring.as_ref().and_then(|r| r.get(w.id));
                DekStatus {
                    rotation_due: live
                        .as_ref()
                        .filter(|d| d.state() == DekState::Active)
                        .and_then(|d| self.rotation_due(d)),
                    used: live.as_ref().map_or(w.reserved, |d| d.used()),
                    limit: live.as_ref().map_or(self.settings.max_uses, |d| d.limit()),
                    id: w.id,
                    tenant: w.tenant,
                    version: w.version,
                    state: w.state,
                    kek_id: w.kek_id,
                    created_ms: w.created_ms,
                    tokens: counts.get(&w.id).copied().unwrap_or(0),
                }
            })
            .collect();
        Ok(KeyStatus {
            sealed: ring.is_none(),
            kek_id: pin.map(|p| p.kek_id),
            deks,
        })
    }

    /// Rotates `tenant`'s data key now: new writes use the new key at once;
    /// the old one becomes decrypt-only.
    pub async fn rotate_dek(
        &self,
        caller: &Caller,
        tenant: &str,
        reason: &str,
    ) -> Result<DekStatus, VaultError> {
        let (caller, tenant, reason) = (caller.clone(), tenant.to_owned(), reason.to_owned());
        self.to_completion(
            move |v| async move { v.rotate_dek_now(&caller, &tenant, &reason).await },
        )
        .await
    }

    async fn rotate_dek_now(
        &self,
        caller: &Caller,
        tenant: &str,
        reason: &str,
    ) -> Result<DekStatus, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::DekRotate, reason);
        ev.tenant = tenant_note(tenant);
        let res = async {
            let tenant = caller.authorize_tenant(Action::ManageKeys, tenant)?;
            let reason = check_reason(reason)?;
            let _guard = self.lifecycle.lock().await;
            let ring = self.ring()?;
            let current = ring.active_for(tenant.as_str());
            let dk = self
                .rotate_locked(
                    &ring,
                    &tenant,
                    current.as_deref(),
                    &caller.identity,
                    reason,
                    caller.peer.clone(),
                )
                .await?;
            Ok(DekStatus {
                id: dk.id,
                tenant: dk.tenant.clone(),
                version: dk.version,
                state: dk.state(),
                kek_id: ring.kek().id().to_owned(),
                created_ms: dk.created_ms,
                used: dk.used(),
                limit: dk.limit(),
                tokens: 0,
                rotation_due: None,
            })
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// Completes an approved KEK rotation (see [`Vault::take_kek_rotation`]):
    /// re-wraps every live data key and the audit signing key under `new`
    /// and pins `new`, in one commit. Afterwards the old KEK is no longer
    /// needed, even to start. `approver` is the second administrator.
    ///
    /// `reload` (how to load `new` again after a seal) replaces the current
    /// one in the same step, so the two never disagree.
    pub async fn rotate_kek_approved(
        &self,
        approver: &Caller,
        req: &PendingChange,
        new: Arc<dyn Kek>,
        reason: &str,
        reload: Option<super::vault::KekLoader>,
    ) -> Result<String, VaultError> {
        let (approver, req, reason) = (approver.clone(), req.clone(), reason.to_owned());
        self.to_completion(move |v| async move {
            let id = v
                .rotate_kek_approved_now(&approver, &req, new, &reason)
                .await?;
            v.set_reload(reload);
            Ok(id)
        })
        .await
    }

    async fn rotate_kek_approved_now(
        &self,
        approver: &Caller,
        req: &PendingChange,
        new: Arc<dyn Kek>,
        reason: &str,
    ) -> Result<String, VaultError> {
        let mut ev = self.key_event(approver, AuditAction::KekRotate, reason);
        ev.detail = Some(format!("request_id={} to={}", req.id, new.id()));
        let ev = approved_event(&ev, req, approver);
        let res = self.rotate_kek_inner(approver, &new, ev.clone()).await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    async fn rotate_kek_inner(
        &self,
        caller: &Caller,
        new: &Arc<dyn Kek>,
        mut ev: AuditEvent,
    ) -> Result<String, VaultError> {
        caller.authorize(Action::ManageKeys)?;
        let _guard = self.lifecycle.lock().await;
        let ring = self.ring()?;
        let old = ring.kek();
        if old.id() == new.id() {
            return Err(VaultError::FailedPrecondition(
                "the new KEK is the current KEK".into(),
            ));
        }
        let internal = |what: &str, e: crate::crypto::CryptoError| {
            error!(error = %e, "KEK rotation: {what}");
            VaultError::Internal
        };
        let mut rows = Vec::new();
        for w in self.store.load_deks().await.map_err(storage)? {
            if w.state == DekState::Destroyed {
                continue;
            }
            let key = ring
                .unwrap_stored(&w)
                .map_err(|e| internal("unwrap under current KEK", e))?;
            let wrapped = new
                .wrap(&key, &dek_aad(&w.tenant, w.id, w.version))
                .map_err(|e| internal("wrap under new KEK", e))?;
            rows.push((w.id, wrapped));
        }
        let probe = KeyBytes::generate().map_err(|e| internal("probe", e))?;
        let pin = KekCheck {
            kek_id: new.id().to_owned(),
            check_blob: new
                .wrap(&probe, KEK_CHECK_AAD)
                .map_err(|e| internal("check value", e))?,
        };
        let n = rows.len();
        ev.detail = Some(format!(
            "{} from={} rewrapped_deks={n}",
            ev.detail.take().unwrap_or_default(),
            old.id()
        ));
        // The audit signing key is wrapped under the KEK too.
        let signing = match self.signer() {
            Some(s) => Some(
                s.wrap(&**new)
                    .map_err(|e| internal("re-wrap signing key", e))?,
            ),
            None => None,
        };
        self.store
            .rewrap_deks(&pin, rows, signing, ev)
            .await
            .map_err(storage)?;
        ring.set_kek(new.clone());
        info!(from = old.id(), to = new.id(), deks = n, "KEK rotated");
        Ok(new.id().to_owned())
    }

    /// Destroys a decrypt-only data key that no token references any more.
    /// Another tenant's key is, to a tenant-scoped caller, a missing one.
    pub async fn destroy_dek(
        &self,
        caller: &Caller,
        id: u32,
        reason: &str,
    ) -> Result<(), VaultError> {
        let (caller, reason) = (caller.clone(), reason.to_owned());
        self.to_completion(move |v| async move { v.destroy_dek_now(&caller, id, &reason).await })
            .await
    }

    async fn destroy_dek_now(
        &self,
        caller: &Caller,
        id: u32,
        reason: &str,
    ) -> Result<(), VaultError> {
        let mut ev = self.key_event(caller, AuditAction::DekDestroy, reason);
        ev.key_id = Some(id);
        let res = async {
            caller.authorize(Action::ManageKeys)?;
            check_reason(reason)?;
            let _guard = self.lifecycle.lock().await;
            let deks = self.store.load_deks().await.map_err(storage)?;
            let w = deks
                .iter()
                .find(|d| d.id == id)
                .ok_or_else(|| VaultError::NoSuch(NO_KEY.into()))?;
            ev.tenant = Some(w.tenant.clone());
            ev.key_version = Some(w.version);
            if !caller.reaches_name(&w.tenant) {
                return Err(VaultError::OutOfScope(NO_KEY.into()));
            }
            self.store
                .destroy_dek(id, ev.clone())
                .await
                .map_err(storage)?;
            if let Ok(ring) = self.ring() {
                ring.remove(id);
            }
            info!(dek = id, "data key destroyed");
            Ok(())
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }
}
