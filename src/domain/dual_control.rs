//! Dual control (PCI DSS 3.6.1.2, 3.7.6, 3.7.7): the key changes that take
//! two administrators, crypto-shredding a tenant and rotating the KEK. One
//! records a request; a different one approves it within an hour. Pending
//! requests live in memory only, so a restart cancels them, which errs on
//! the side of not changing keys. Every request, approval and refusal is
//! audited like any key lifecycle event.

use tracing::info;

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, AuditEvent};
use super::error::VaultError;
use super::keys::{check_reason, check_target, tenant_note};
use super::vault::{Vault, now_ms, storage};

/// How long a request waits for its second administrator's approval.
pub const APPROVAL_TTL_MS: i64 = 60 * 60 * 1000;
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

impl Vault {
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
        let (caller, reason) = (caller.clone(), reason.to_owned());
        self.to_completion(move |v| async move {
            v.approve_shred_now(&caller, request_id, &reason).await
        })
        .await
    }

    async fn approve_shred_now(
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
pub(crate) fn approved_event(
    ev: &AuditEvent,
    req: &PendingChange,
    approver: &Caller,
) -> AuditEvent {
    let mut done = ev.clone();
    done.actor = req.requester.clone();
    done.approvers = Some(approver.identity.clone());
    done.reason = Some(req.reason.clone());
    done
}
