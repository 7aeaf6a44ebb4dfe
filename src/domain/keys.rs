//! Key lifecycle operations for administrators: status, data-key rotation,
//! KEK rotation (re-wrap every data key in one commit), destruction of an
//! unreferenced data key, and crypto-shredding of a tenant under dual
//! control. Every attempt — allowed, refused or failed — is audited with the
//! key id and version, actor, approvers and reason.

use std::sync::Arc;

use tracing::{error, info};

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, AuditEvent};
use super::data::contains_card_like_digits;
use super::error::VaultError;
use super::store::{DekState, KekCheck};
use super::unseal::SealStatus;
use super::vault::{KEK_CHECK_AAD, Vault, now_ms, storage};
use crate::crypto::kek::{Kek, KeyBytes};
use crate::crypto::keyring::dek_aad;

/// How long a request waits for its second administrator's approval.
pub const APPROVAL_TTL_MS: i64 = 60 * 60 * 1000;
const REASON_MAX_CHARS: usize = 512;
const TARGET_MAX_CHARS: usize = 1024;
/// What an audit record keeps of a reason that failed [`check_reason`]:
/// rejected text is never stored.
const REJECTED: &str = "(rejected)";
/// The answers for an id that names nothing the caller may see. The same
/// words whether the object is missing or another tenant's, and never the
/// id, which is caller input.
const NO_KEY: &str = "no such data key";
const NO_REQUEST: &str = "no such pending request of this kind (requests expire after one hour)";

/// A dual-control request awaiting a second administrator: destroying a
/// tenant's keys, or rotating the KEK. Held in memory only: a restart
/// cancels it, which errs on the side of not changing keys.
#[derive(Debug, Clone)]
pub struct PendingChange {
    pub id: u64,
    pub kind: ChangeKind,
    pub requester: String,
    pub reason: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// Destroy every data key of this tenant.
    Shred(TenantId),
    /// Move to the KEK described here.
    KekRotation(String),
}

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
    if r.chars().count() > REASON_MAX_CHARS || r.chars().any(char::is_control) {
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
fn check_target(target: &str) -> Result<&str, VaultError> {
    let t = target.trim();
    if t.is_empty()
        || t.chars().count() > TARGET_MAX_CHARS
        || t.chars().any(char::is_control)
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

/// A caller-supplied id for an audit record. Ids the vault issued are
/// recorded as they are; one that names nothing is caller input, and a
/// 12–19 digit number may be a card number, so such a one is withheld.
pub(crate) fn shown_id(id: u64) -> String {
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
    pub async fn rotate_kek_approved(
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

    /// First half of crypto-shredding: records a request to destroy every
    /// key of `tenant`, which a different administrator must approve.
    pub async fn request_shred(
        &self,
        caller: &Caller,
        tenant: &str,
        reason: &str,
    ) -> Result<PendingChange, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::ShredRequest, reason);
        ev.tenant = tenant_note(tenant);
        let res = async {
            let tenant = caller.authorize_tenant(Action::ManageKeys, tenant)?;
            let reason = check_reason(reason)?;
            self.request_change(caller, reason, ChangeKind::Shred(tenant), ev.clone())
                .await
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// Second half: a different administrator approves, and every key of
    /// the tenant is destroyed. Its tokens can never be opened again. A
    /// request for a tenant the approver's grant does not reach is, to the
    /// approver, a missing one.
    pub async fn approve_shred(
        &self,
        caller: &Caller,
        request_id: u64,
        reason: &str,
    ) -> Result<Vec<u32>, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::TenantShred, reason);
        let res = async {
            caller.authorize(Action::ManageKeys)?;
            check_reason(reason)?;
            let _guard = self.lifecycle.lock().await;
            let req = self.take_change(
                caller,
                request_id,
                |k| matches!(k, ChangeKind::Shred(_)),
                &mut ev,
            )?;
            let ChangeKind::Shred(tenant) = &req.kind else {
                return Err(VaultError::Internal);
            };
            let done = approved_event(&ev, &req, caller);
            match self.store.shred_tenant(tenant.as_str(), done).await {
                Ok(ids) => {
                    if let Ok(ring) = self.ring() {
                        for id in &ids {
                            ring.remove(*id);
                        }
                    }
                    info!(tenant = %tenant, keys = ids.len(), "tenant crypto-shredded");
                    Ok(ids)
                }
                Err(e) => {
                    self.restore_change(req);
                    Err(storage(e))
                }
            }
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// First half of a KEK rotation: records the request (the new KEK is
    /// described by what `target` decodes, built only once approved). The
    /// KEK wraps every tenant's keys, so only a grant for every tenant may
    /// ask; `target` is decoded only once the caller is authorized. PCI DSS
    /// 3.7.7: a KEK change needs two administrators.
    pub async fn request_kek_rotation(
        &self,
        caller: &Caller,
        reason: &str,
        target: impl FnOnce() -> Result<String, VaultError>,
    ) -> Result<PendingChange, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::KekRotateRequest, reason);
        let res = async {
            caller.authorize_all(Action::ManageKeys)?;
            let reason = check_reason(reason)?;
            let target = target()?;
            let target = check_target(&target)?;
            ev.detail = Some(format!("target={target}"));
            let kind = ChangeKind::KekRotation(target.to_owned());
            self.request_change(caller, reason, kind, ev.clone()).await
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// Takes a pending KEK rotation for approval by `caller`, who must not
    /// be its requester. The caller then builds the new KEK and completes
    /// with [`Vault::rotate_kek_approved`], or puts it back with
    /// [`Vault::restore_change`].
    pub async fn take_kek_rotation(
        &self,
        caller: &Caller,
        request_id: u64,
        reason: &str,
    ) -> Result<PendingChange, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::KekRotate, reason);
        let res = caller
            .authorize_all(Action::ManageKeys)
            .and_then(|_| check_reason(reason))
            .and_then(|_| {
                self.take_change(
                    caller,
                    request_id,
                    |k| matches!(k, ChangeKind::KekRotation(_)),
                    &mut ev,
                )
            });
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// Records a request for `kind`, by an authorized `caller` for a
    /// checked `reason`, with its audit event `ev`.
    async fn request_change(
        &self,
        caller: &Caller,
        reason: &str,
        kind: ChangeKind,
        ev: AuditEvent,
    ) -> Result<PendingChange, VaultError> {
        let mut raw = [0u8; 8];
        crate::crypto::random_bytes(&mut raw).map_err(|_| VaultError::Internal)?;
        let req = PendingChange {
            id: u64::from_be_bytes(raw) >> 1,
            kind,
            requester: caller.identity.clone(),
            reason: reason.to_owned(),
            created_ms: now_ms(),
        };
        let mut ok = ev;
        let note = format!("request_id={}", req.id);
        ok.detail = Some(match ok.detail.take() {
            Some(d) => format!("{note} {d}"),
            None => note,
        });
        self.store.append_audit(ok).await.map_err(storage)?;
        self.pending().insert(req.id, req.clone());
        Ok(req)
    }

    /// Removes a pending request for approval by an authorized `caller`,
    /// atomically, so one request is carried out at most once however many
    /// approvals race. Notes on `ev` what the request concerns. A request
    /// for a tenant the caller's grant does not reach stays pending and is
    /// reported exactly like a missing one.
    fn take_change(
        &self,
        caller: &Caller,
        request_id: u64,
        kind: impl Fn(&ChangeKind) -> bool,
        ev: &mut AuditEvent,
    ) -> Result<PendingChange, VaultError> {
        let mut pending = self.pending();
        pending.retain(|_, r| now_ms() - r.created_ms < APPROVAL_TTL_MS);
        let missing = || VaultError::NoSuch(NO_REQUEST.into());
        let req = pending
            .get(&request_id)
            .filter(|r| kind(&r.kind))
            .ok_or_else(missing)?;
        ev.detail = Some(format!("request_id={request_id}"));
        if let ChangeKind::Shred(tenant) = &req.kind {
            ev.tenant = Some(tenant.as_str().to_owned());
            if !caller.reaches(tenant) {
                return Err(VaultError::OutOfScope(NO_REQUEST.into()));
            }
        }
        if req.requester == caller.identity {
            return Err(VaultError::PermissionDenied(
                "dual control: a different administrator must approve this request".into(),
            ));
        }
        pending.remove(&request_id).ok_or_else(missing)
    }

    /// An `Unseal` call: a share from a custodian, or (no share) an
    /// administrator's reload of the KEK from its configured source. A
    /// custodian who sends no share has made a malformed submission, not
    /// asked for a reload it may not do.
    pub async fn unseal_with_share(
        self: &Arc<Self>,
        caller: &Caller,
        share: &str,
    ) -> Result<SealStatus, VaultError> {
        if !share.trim().is_empty() {
            return self.submit_share(caller, share).await;
        }
        let custodian_only = caller.authorize(Action::ManageKeys).is_err()
            && caller.authorize(Action::Unseal).is_ok();
        if !custodian_only {
            return self.unseal_from_source(caller).await;
        }
        let e = VaultError::InvalidArgument("share is empty".into());
        self.audit_error(&e, self.key_event(caller, AuditAction::UnsealShare, ""))
            .await?;
        Err(e)
    }

    /// Puts back a request whose approved action failed, so it can be
    /// approved again.
    pub fn restore_change(&self, req: PendingChange) {
        self.pending().insert(req.id, req);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, PendingChange>> {
        self.pending_changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The audit event of an approved change: the requester's act, approved by
/// the caller, for the requester's reason.
fn approved_event(ev: &AuditEvent, req: &PendingChange, approver: &Caller) -> AuditEvent {
    let mut done = ev.clone();
    done.actor = req.requester.clone();
    done.approvers = Some(approver.identity.clone());
    done.reason = Some(req.reason.clone());
    done
}
