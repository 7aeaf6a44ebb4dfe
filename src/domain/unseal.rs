//! Sealing and unsealing. A vault whose KEK is split among custodians
//! (Shamir) starts sealed and answers every data call UNAVAILABLE until the
//! threshold number of *distinct* custodians have each submitted a share; the
//! rebuilt KEK must match the pinned one, or every submitted share is
//! discarded. `seal` drops all key material from memory.

use std::sync::{Arc, PoisonError};

use tracing::{info, warn};

use super::access::{Action, Caller};
use super::audit::AuditAction;
use super::error::VaultError;
use super::vault::{OpenError, Vault};
use crate::crypto::kek::{Kek, LocalKek};
use crate::crypto::shamir::{Share, combine};

/// Shares submitted so far, at most one per custodian identity.
#[derive(Default)]
pub struct UnsealState {
    shares: Vec<Submitted>,
}

/// One custodian's share. It counts toward the threshold only once its
/// submission is on record (`audited`): a share whose audit record could
/// not be written is withdrawn, and no other custodian's submission can
/// combine it meanwhile.
struct Submitted {
    custodian: String,
    share: Share,
    audited: bool,
}

impl UnsealState {
    fn counted(&self) -> impl Iterator<Item = &Share> {
        self.shares.iter().filter(|s| s.audited).map(|s| &s.share)
    }
}

impl std::fmt::Debug for UnsealState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnsealState")
            .field("submitted", &self.shares.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealStatus {
    pub sealed: bool,
    /// Shares needed (0 when the KEK is not split).
    pub threshold: u8,
    /// Distinct custodians who have submitted a share.
    pub submitted: u8,
    pub kek_id: Option<String>,
}

fn open_failed(e: OpenError) -> VaultError {
    match e {
        OpenError::KekMismatch { .. } | OpenError::KekCheckFailed => VaultError::FailedPrecondition(
            "unseal failed: the KEK does not match the one this vault is pinned to; all submitted shares were discarded".into(),
        ),
        OpenError::Storage(e) => super::vault::storage(e),
        // A wrapped data key that the right KEK cannot open was altered or
        // corrupted in storage: fail closed, as for tampered ciphertext.
        e @ OpenError::DekUnwrap { .. } => {
            tracing::error!(error = %e, "unseal failed");
            VaultError::DataLoss
        }
        e => {
            tracing::error!(error = %e, "unseal failed");
            VaultError::Internal
        }
    }
}

impl Vault {
    fn unseal_state(&self) -> std::sync::MutexGuard<'_, UnsealState> {
        self.unseal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn seal_status(&self, caller: &Caller) -> Result<SealStatus, VaultError> {
        let allowed = caller
            .authorize(Action::Unseal)
            .or_else(|_| caller.authorize(Action::ReadKeys));
        self.audited_key_read(caller, allowed, "seal status".into(), self.status_now())
            .await
    }

    async fn status_now(&self) -> Result<SealStatus, VaultError> {
        let (threshold, submitted) = {
            let st = self.unseal_state();
            (
                self.settings
                    .unseal_threshold
                    .or_else(|| st.counted().next().map(Share::threshold))
                    .unwrap_or(0),
                u8::try_from(st.counted().count()).unwrap_or(u8::MAX),
            )
        };
        let kek_id = match self.ring() {
            Ok(r) => Some(r.kek().id().to_owned()),
            Err(_) => self
                .store
                .kek_check()
                .await
                .map_err(super::vault::storage)?
                .map(|p| p.kek_id),
        };
        Ok(SealStatus {
            sealed: self.is_sealed(),
            threshold,
            submitted,
            kek_id,
        })
    }

    /// A custodian submits one share. When enough distinct custodians have,
    /// the KEK is rebuilt, checked against the pin, and the vault unseals.
    pub async fn submit_share(
        self: &Arc<Self>,
        caller: &Caller,
        share_text: &str,
    ) -> Result<SealStatus, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::UnsealShare, "");
        let res = self.submit_share_inner(caller, share_text, &mut ev).await;
        match &res {
            Ok(_) => {}
            Err(e) => self.audit_error(e, ev).await?,
        }
        res
    }

    async fn submit_share_inner(
        self: &Arc<Self>,
        caller: &Caller,
        share_text: &str,
        ev: &mut super::audit::AuditEvent,
    ) -> Result<SealStatus, VaultError> {
        caller.authorize(Action::Unseal)?;
        if !self.is_sealed() {
            return Err(VaultError::FailedPrecondition("vault is not sealed".into()));
        }
        let share = Share::parse(share_text)
            .map_err(|e| VaultError::InvalidArgument(format!("share rejected: {e}")))?;
        ev.detail = Some(format!(
            "share {} of {}, threshold {}, kek={}",
            share.index(),
            share.total(),
            share.threshold(),
            share.kek_id()
        ));
        if let Some(t) = self.settings.unseal_threshold
            && share.threshold() != t
        {
            return Err(VaultError::InvalidArgument(format!(
                "share is from a {}-of-{} set, but this vault is configured for a threshold of {t}",
                share.threshold(),
                share.total()
            )));
        }
        if let Some(pin) = self
            .store
            .kek_check()
            .await
            .map_err(super::vault::storage)?
            && pin.kek_id != share.kek_id()
        {
            return Err(VaultError::InvalidArgument(
                "share belongs to a different KEK than the one this vault is pinned to".into(),
            ));
        }
        {
            let mut st = self.unseal_state();
            if let Some(first) = st.shares.first().map(|s| &s.share)
                && (first.kek_id() != share.kek_id() || first.set_id() != share.set_id())
            {
                return Err(VaultError::InvalidArgument(
                    "share is from a different share set than those already submitted".into(),
                ));
            }
            // One share per custodian: a second submission replaces the first.
            st.shares.retain(|s| s.custodian != caller.identity);
            st.shares.push(Submitted {
                custodian: caller.identity.clone(),
                share: share.clone(),
                audited: false,
            });
        }
        // Audit first: the share counts only once its submission is on
        // record, and is withdrawn if that record cannot be written.
        let recorded = self.store.append_audit(ev.clone()).await;
        let ready = {
            let mut st = self.unseal_state();
            let mine = |s: &Submitted| s.custodian == caller.identity && !s.audited;
            if recorded.is_err() {
                st.shares.retain(|s| !mine(s));
            } else if let Some(s) = st.shares.iter_mut().find(|s| mine(s)) {
                s.audited = true;
            }
            let distinct: std::collections::HashSet<u8> = st.counted().map(Share::index).collect();
            (recorded.is_ok() && distinct.len() >= usize::from(share.threshold()))
                .then(|| st.counted().cloned().collect::<Vec<_>>())
        };
        recorded.map_err(super::vault::storage)?;
        if let Some(shares) = ready {
            let rebuilt = combine(&shares);
            self.unseal_state().shares.clear();
            let key = rebuilt.map_err(|e| {
                warn!(error = %e, "shares did not combine");
                VaultError::FailedPrecondition(
                    "unseal failed: the submitted shares do not combine; all submitted shares were discarded".into(),
                )
            })?;
            let kek: Arc<dyn Kek> = Arc::new(LocalKek::from_key(&key));
            self.unseal_with(caller, kek).await?;
        }
        self.status_now().await
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

    /// Unseals a vault whose KEK comes from a file or an HSM, by reloading
    /// it from its configured source (after an administrator sealed it).
    pub async fn unseal_from_source(
        self: &Arc<Self>,
        caller: &Caller,
    ) -> Result<SealStatus, VaultError> {
        let ev = self.key_event(caller, AuditAction::Unseal, "");
        let res = async {
            // Unsealing opens every tenant's keys: a one-tenant grant may not.
            caller.authorize_all(Action::ManageKeys)?;
            if !self.is_sealed() {
                return Err(VaultError::FailedPrecondition("vault is not sealed".into()));
            }
            let Some(reload) = self.reloader() else {
                return Err(VaultError::FailedPrecondition(
                    "this vault's KEK is split: custodians must submit their shares".into(),
                ));
            };
            let kek = reload().map_err(|e| {
                warn!(error = %e, "KEK reload failed");
                VaultError::FailedPrecondition("the configured KEK could not be loaded".into())
            })?;
            self.unseal_with(caller, kek).await?;
            self.status_now().await
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }

    /// Opens the key ring with `kek`, audits, installs it, and resumes any
    /// interrupted background jobs.
    ///
    /// Does nothing if the vault is already unsealed. Holds the key
    /// lifecycle lock throughout, so a data key destroyed or
    /// shredded while the vault was sealed cannot come back in a ring read
    /// before that change and installed after it. The unseal record is
    /// written before the keys are installed: if it cannot be, the vault
    /// stays sealed.
    pub(crate) async fn unseal_with(
        self: &Arc<Self>,
        caller: &Caller,
        kek: Arc<dyn Kek>,
    ) -> Result<(), VaultError> {
        let caller = caller.clone();
        self.to_completion(move |v| async move { v.unseal_with_now(&caller, kek).await })
            .await
    }

    async fn unseal_with_now(
        self: &Arc<Self>,
        caller: &Caller,
        kek: Arc<dyn Kek>,
    ) -> Result<(), VaultError> {
        let guard = self.lifecycle.lock().await;
        if !self.is_sealed() {
            // Another caller got there first (two custodians' final shares
            // at once): the outcome asked for holds, and that caller wrote
            // the unseal record.
            return Ok(());
        }
        let keys = self.open_ring(kek).await.map_err(open_failed)?;
        let kek_id = keys.0.kek().id().to_owned();
        let mut ev = self.key_event(caller, AuditAction::Unseal, "");
        ev.detail = Some(format!("kek={kek_id}"));
        self.store
            .append_audit(ev)
            .await
            .map_err(super::vault::storage)?;
        self.install_ring(Some(keys));
        drop(guard);
        info!(kek = %kek_id, "vault unsealed");
        self.resume_jobs();
        Ok(())
    }

    /// Drops every key from memory; data calls answer "vault is sealed"
    /// until it is unsealed again.
    pub async fn seal(&self, caller: &Caller, reason: &str) -> Result<SealStatus, VaultError> {
        // Its record is committed and then the keys dropped: one step,
        // never cut short by a cancelled call.
        let (caller, reason) = (caller.clone(), reason.to_owned());
        self.to_completion(move |v| async move { v.seal_now(&caller, &reason).await })
            .await
    }

    async fn seal_now(&self, caller: &Caller, reason: &str) -> Result<SealStatus, VaultError> {
        // A refused reason (one holding a card number, say) is recorded only
        // as refused (`key_event`): the audit table is append-only.
        let ev = self.key_event(caller, AuditAction::Seal, reason);
        let res = async {
            // Sealing stops every tenant: a one-tenant grant may not.
            caller.authorize_all(Action::ManageKeys)?;
            super::keys::check_reason(reason)?;
            if self.is_sealed() {
                return Err(VaultError::FailedPrecondition(
                    "vault is already sealed".into(),
                ));
            }
            let _guard = self.lifecycle.lock().await;
            self.store
                .append_audit(ev.clone())
                .await
                .map_err(super::vault::storage)?;
            // Sign the log up to the Seal record while the signing key is
            // still here: sealed, no checkpoint can be made, and rows left
            // unsigned for the whole sealed period could be cut unseen.
            if let Err(e) = self.checkpoint_now().await {
                warn!(error = %e, "no checkpoint at seal: the tail stays unsigned until unseal");
            }
            self.install_ring(None);
            self.unseal_state().shares.clear();
            info!("vault sealed");
            self.status_now().await
        }
        .await;
        if let Err(e) = &res {
            self.audit_error(e, ev).await?;
        }
        res
    }
}
