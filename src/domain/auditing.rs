//! The audit log as a product: signed checkpoints of the chain head
//! (periodically, and at shutdown), and the auditor's reads — filtered
//! listing, the latest checkpoint, export, the public key. Only the `audit`
//! role reads the log, and every read is itself audited (PCI DSS 10.2.1.3),
//! durably, before anything is returned.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::access::{Action, Caller};
use super::audit::{AuditAction, AuditRecord, Checkpoint, Outcome};
use super::error::VaultError;
use super::store::{AuditFilter, StoreError};
use super::vault::{Vault, now_ms, storage};
use crate::audit::signer::{key_id, public_key_pem};

/// Most records one list or export page returns.
pub const MAX_PAGE: usize = 1000;

/// When to sign a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many new entries…
    pub every_entries: u64,
    /// …or this long after the last checkpoint, whichever first.
    pub every: Duration,
}

/// The public half of the checkpoint signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key_id: String,
    pub raw: [u8; 32],
    pub pem: String,
}

impl Vault {
    /// Signs a checkpoint of the current chain head, unless the head is
    /// already checkpointed. Needs the signing key, so not while sealed.
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, VaultError> {
        let Some(signer) = self.signer() else {
            return Err(VaultError::Sealed);
        };
        let (seq, head) = self.store.audit_head().await.map_err(storage)?;
        if seq == 0 {
            return Ok(None);
        }
        let latest = self.store.latest_checkpoint().await.map_err(storage)?;
        if latest.is_some_and(|c| c.seq >= seq) {
            return Ok(None);
        }
        let time_ms = now_ms();
        let signature = signer
            .sign_checkpoint(seq, &head, time_ms)
            .map_err(|_| VaultError::Internal)?;
        let cp = Checkpoint {
            seq,
            chain_hash: head,
            time_ms,
            signature,
            key_id: signer.key_id(),
        };
        match self.store.insert_checkpoint(&cp).await {
            Ok(()) => {
                debug!(seq, "audit checkpoint signed");
                Ok(Some(cp))
            }
            // Another checkpointer got there first.
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Signs checkpoints by `policy` until the task is dropped.
    pub async fn run_checkpointer(self: Arc<Self>, policy: CheckpointPolicy) {
        let tick = policy
            .every
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            if self.is_sealed() {
                continue;
            }
            let due = async {
                let (seq, _) = self.store.audit_head().await?;
                let last = self.store.latest_checkpoint().await?;
                let (last_seq, last_ms) = last.map_or((0, 0), |c| (c.seq, c.time_ms));
                let elapsed = u64::try_from(now_ms().saturating_sub(last_ms)).unwrap_or(0);
                Ok::<bool, StoreError>(
                    seq > last_seq
                        && (seq - last_seq >= policy.every_entries
                            || elapsed
                                >= u64::try_from(policy.every.as_millis()).unwrap_or(u64::MAX)),
                )
            }
            .await;
            match due {
                Ok(true) => {
                    if let Err(e) = self.checkpoint_now().await {
                        warn!(error = %e, "audit checkpoint failed");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "audit checkpoint check failed"),
            }
        }
    }

    /// Serves a read of key state (`read`, described by `what`) and records
    /// it with its outcome before answering; a read `allowed` refused is
    /// recorded as denied and never runs.
    pub(crate) async fn audited_key_read<A, T>(
        &self,
        caller: &Caller,
        allowed: Result<A, VaultError>,
        what: String,
        read: impl Future<Output = Result<T, VaultError>>,
    ) -> Result<T, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::KeyRead, "");
        if let Err(e) = allowed {
            self.audit_error(&e, ev).await?;
            return Err(e);
        }
        let res = read.await;
        match &res {
            Ok(_) => ev.detail = Some(what),
            Err(e) => {
                ev.outcome = Outcome::failed(e.code());
                ev.detail = Some(format!("{what}: {e}"));
            }
        }
        self.store.append_audit(ev).await.map_err(storage)?;
        res
    }

    /// Records an auditor's read of the log before it is served.
    async fn audit_read(&self, caller: &Caller, what: String) -> Result<(), VaultError> {
        let mut ev = self.key_event(caller, AuditAction::AuditRead, "");
        if let Err(e) = caller.authorize(Action::ReadAudit) {
            self.audit_error(&e, ev).await?;
            return Err(e);
        }
        ev.detail = Some(what);
        self.store.append_audit(ev).await.map_err(storage)?;
        Ok(())
    }

    /// Audit records matching `filter` after `after`, at most `limit`.
    pub async fn list_audit(
        &self,
        caller: &Caller,
        filter: &AuditFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, VaultError> {
        self.audit_read(caller, format!("list after={after} filter={filter:?}"))
            .await?;
        self.store
            .query_audit(filter, after, limit.clamp(1, MAX_PAGE))
            .await
            .map_err(storage)
    }

    pub async fn latest_checkpoint(
        &self,
        caller: &Caller,
    ) -> Result<Option<Checkpoint>, VaultError> {
        self.audit_read(caller, "latest checkpoint".into()).await?;
        self.store.latest_checkpoint().await.map_err(storage)
    }

    pub async fn audit_public_key(&self, caller: &Caller) -> Result<PublicKey, VaultError> {
        self.audit_read(caller, "public key".into()).await?;
        let stored = self
            .store
            .signing_key()
            .await
            .map_err(storage)?
            .ok_or_else(|| {
                VaultError::FailedPrecondition("no audit signing key yet: unseal the vault".into())
            })?;
        let raw: [u8; 32] = stored
            .public
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Internal)?;
        Ok(PublicKey {
            key_id: key_id(&raw),
            pem: public_key_pem(&raw),
            raw,
        })
    }

    /// Starts an export: audits it once, then signs a checkpoint of the
    /// head (which includes that audit record), so the export is covered to
    /// its end; pages follow from [`Vault::export_page`].
    pub async fn begin_export(&self, caller: &Caller, after: u64) -> Result<(), VaultError> {
        self.audit_read(caller, format!("export after={after}"))
            .await?;
        match self.checkpoint_now().await {
            Ok(_) | Err(VaultError::Sealed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One page of an export (see [`crate::domain::Store::export_page`]).
    pub async fn export_page(
        &self,
        caller: &Caller,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Vec<Checkpoint>), VaultError> {
        caller.authorize(Action::ReadAudit)?;
        self.store
            .export_page(after, limit.clamp(1, MAX_PAGE))
            .await
            .map_err(storage)
    }
}
