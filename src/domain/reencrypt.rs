//! Re-encryption jobs: move every token of a tenant that is still sealed
//! under a decrypt-only key onto the tenant's active key, in batches,
//! throttled, and resumable from the checkpoint stored with each batch.
//!
//! The scan walks the tenant's tokens in token order (tokens start with
//! their creation time, so late arrivals land at the end). Each batch
//! re-seals rows in memory and commits them with the new checkpoint; a row
//! changed meanwhile (deleted, or re-encrypted by someone else) is skipped by
//! the store's compare-and-swap. At the end of a pass the job counts what is
//! still under decrypt-only keys; a token written under an old key by a call
//! that raced the rotation is caught by the next pass.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tracing::{error, info, warn};
use zeroize::Zeroizing;

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, AuditEvent};
use super::error::VaultError;
use super::keys::{check_reason, shown_id, tenant_note};
use super::store::{DekState, JobRecord, JobState, Reencrypted};
use super::vault::{SYSTEM_ACTOR, Vault, now_ms, storage};
use crate::crypto::envelope::{self, RecordContext};

/// Passes over the table before a job gives up on rows it cannot move.
const MAX_PASSES: u32 = 5;
/// The answer for a job id that names nothing the caller may see, whether
/// missing or another tenant's.
const NO_JOB: &str = "no such re-encryption job";

impl Vault {
    /// Starts re-encrypting `tenant`'s tokens that are under decrypt-only
    /// keys. Returns the job; its progress is read with [`Vault::job`].
    pub async fn start_reencryption(
        self: &Arc<Self>,
        caller: &Caller,
        tenant: &str,
        reason: &str,
    ) -> Result<JobRecord, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::ReencryptStart, reason);
        ev.tenant = tenant_note(tenant);
        let res = async {
            let t = caller.authorize_tenant(Action::ManageKeys, tenant)?;
            let reason = check_reason(reason)?;
            self.ring()?;
            let _guard = self.lifecycle.lock().await;
            if let Some(j) = self
                .store
                .running_jobs()
                .await
                .map_err(storage)?
                .into_iter()
                .find(|j| j.tenant == t.as_str())
            {
                return Err(VaultError::FailedPrecondition(format!(
                    "re-encryption job {} is already running for this tenant",
                    j.id
                )));
            }
            let total = self.tokens_under_retired_keys(t.as_str()).await?;
            let now = now_ms();
            let mut job = JobRecord {
                id: 0,
                tenant: t.as_str().to_owned(),
                state: JobState::Running,
                total,
                done: 0,
                checkpoint: None,
                passes: 0,
                created_ms: now,
                updated_ms: now,
                actor: caller.identity.clone(),
                reason: reason.to_owned(),
                error: None,
            };
            let mut ok = ev.clone();
            ok.detail = Some(format!("tokens_to_move={total}"));
            job.id = self.store.create_job(&job, ok).await.map_err(storage)?;
            Ok(job)
        }
        .await;
        match &res {
            Ok(job) => self.spawn_job(job.id),
            Err(e) => self.audit_error(e, ev).await?,
        }
        res
    }

    /// A job's progress. Another tenant's job is, to a tenant-scoped
    /// caller, a missing one.
    pub async fn job(&self, caller: &Caller, id: u64) -> Result<JobRecord, VaultError> {
        let allowed = caller.authorize(Action::ReadKeys);
        let what = format!("job {}", shown_id(id));
        self.audited_key_read(caller, allowed, what, self.job_now(caller, id))
            .await
    }

    /// A job's progress again, for a watch whose first read (`job`) is on
    /// the record: authorized, but not recorded once more per poll.
    pub async fn job_again(&self, caller: &Caller, id: u64) -> Result<JobRecord, VaultError> {
        caller.authorize(Action::ReadKeys)?;
        self.job_now(caller, id).await
    }

    async fn job_now(&self, caller: &Caller, id: u64) -> Result<JobRecord, VaultError> {
        let job = self
            .store
            .get_job(id)
            .await
            .map_err(storage)?
            .ok_or_else(|| VaultError::NoSuch(NO_JOB.into()))?;
        if !caller.reaches_name(&job.tenant) {
            return Err(VaultError::OutOfScope(NO_JOB.into()));
        }
        Ok(job)
    }

    /// Resumes every job left running by a previous process.
    pub fn resume_jobs(self: &Arc<Self>) {
        let this = self.clone();
        self.spawn_background(async move {
            match this.store.running_jobs().await {
                Ok(jobs) => {
                    for j in jobs {
                        info!(
                            job = j.id,
                            done = j.done,
                            total = j.total,
                            "resuming re-encryption job"
                        );
                        this.spawn_job(j.id);
                    }
                }
                Err(e) => error!(error = %e, "cannot list jobs to resume"),
            }
        });
    }

    fn spawn_job(self: &Arc<Self>, id: u64) {
        {
            let mut running = self
                .running_jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !running.insert(id) {
                return;
            }
        }
        let this = self.clone();
        let spawned = self.spawn_background(async move {
            let res = loop {
                match this.drive_job(id).await {
                    // Shutting down: the job stays running in the store
                    // and resumes at the next start.
                    _ if this.is_stopping() => {
                        info!(job = id, "vault stopping: re-encryption paused");
                        break Ok(());
                    }
                    // Sealed mid-batch: keys are gone, so the job pauses. If
                    // the vault was unsealed meanwhile, carry on at once
                    // (resume_jobs skipped it while it was still marked
                    // running); otherwise resume_jobs restarts it at unseal.
                    Err(VaultError::Sealed) => {
                        if this.is_sealed() {
                            info!(job = id, "vault sealed: re-encryption paused");
                            break Ok(());
                        }
                    }
                    other => break other,
                }
            };
            this.running_jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            if !this.is_sealed()
                && !this.is_stopping()
                && matches!(res, Ok(()))
                && let Ok(Some(j)) = this.store.get_job(id).await
                && j.state == JobState::Running
            {
                // Unsealed between the pause and here: resume now.
                this.spawn_job(id);
                return;
            }
            if let Err(e) = res {
                warn!(job = id, error = %e, "re-encryption job failed");
                let mut ev = AuditEvent::new(now_ms(), SYSTEM_ACTOR, AuditAction::ReencryptFail);
                ev.detail = Some(format!("job={id} error={e}"));
                if let Err(e) = this
                    .store
                    .finish_job(id, JobState::Failed, Some(e.to_string()), ev)
                    .await
                {
                    error!(job = id, error = %e, "cannot record job failure");
                }
            }
        });
        if spawned.is_none() {
            // Stopping: the job stays running in the store for the next start.
            self.running_jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }

    /// Tokens of `tenant` whose key is decrypt-only.
    async fn tokens_under_retired_keys(&self, tenant: &str) -> Result<u64, VaultError> {
        let counts = self.store.token_counts().await.map_err(storage)?;
        Ok(self
            .store
            .load_deks()
            .await
            .map_err(storage)?
            .iter()
            .filter(|d| d.tenant == tenant && d.state == DekState::DecryptOnly)
            .map(|d| counts.get(&d.id).copied().unwrap_or(0))
            .sum())
    }

    async fn drive_job(&self, id: u64) -> Result<(), VaultError> {
        loop {
            let job = self
                .store
                .get_job(id)
                .await
                .map_err(storage)?
                .ok_or(VaultError::Internal)?;
            if job.state != JobState::Running || self.is_stopping() {
                return Ok(());
            }
            if self.is_sealed() {
                return Err(VaultError::Sealed);
            }
            let tenant = TenantId::parse(&job.tenant).map_err(|_| VaultError::Internal)?;
            let batch = self
                .store
                .scan_tokens(
                    tenant.as_str(),
                    job.checkpoint,
                    self.settings.reencrypt_batch.max(1),
                )
                .await
                .map_err(storage)?;
            let Some(last) = batch.last().map(|r| r.token) else {
                let remaining = self.tokens_under_retired_keys(tenant.as_str()).await?;
                if remaining == 0 {
                    let mut ev =
                        AuditEvent::new(now_ms(), SYSTEM_ACTOR, AuditAction::ReencryptComplete);
                    ev.tenant = Some(job.tenant.clone());
                    ev.detail = Some(format!(
                        "job={id} moved={} of {} passes={}",
                        job.done,
                        job.total,
                        job.passes + 1
                    ));
                    self.store
                        .finish_job(id, JobState::Completed, None, ev)
                        .await
                        .map_err(storage)?;
                    info!(job = id, moved = job.done, "re-encryption complete");
                    return Ok(());
                }
                if job.passes + 1 >= MAX_PASSES {
                    return Err(VaultError::FailedPrecondition(format!(
                        "{remaining} tokens could not be re-encrypted"
                    )));
                }
                self.store
                    .reencrypt_batch(id, Vec::new(), None)
                    .await
                    .map_err(storage)?;
                continue;
            };
            let ring = self.ring()?;
            let mut rows = Vec::new();
            for rec in batch {
                let Some(old) = ring.get(rec.dek_id) else {
                    continue; // destroyed: nothing can open it
                };
                if old.state() != DekState::DecryptOnly {
                    continue;
                }
                let plain: Zeroizing<Vec<u8>> = match envelope::open(
                    old.cipher(),
                    &RecordContext {
                        tenant: &rec.tenant,
                        token: &rec.token,
                        dek_id: old.id,
                    },
                    &rec.ciphertext,
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        error!(token = %rec.token, dek = old.id, error = %e, "cannot re-encrypt: ciphertext failed to open");
                        continue;
                    }
                };
                let target = self.active_use(&tenant).await?;
                let ciphertext = envelope::seal(
                    target.cipher(),
                    &RecordContext {
                        tenant: &rec.tenant,
                        token: &rec.token,
                        dek_id: target.id,
                    },
                    &plain,
                )
                .map_err(|_| VaultError::Internal)?;
                rows.push(Reencrypted {
                    token: rec.token,
                    old_dek: old.id,
                    new_dek: target.id,
                    ciphertext,
                });
            }
            self.store
                .reencrypt_batch(id, rows, Some(last))
                .await
                .map_err(storage)?;
            tokio::time::sleep(Duration::from_millis(self.settings.reencrypt_pause_ms)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::crypto::kek::{KeyBytes, LocalKek};
    use crate::domain::access::{Grant, Role, RoleSet, TenantScope};
    use crate::domain::pan::luhn_valid;
    use crate::domain::vault::VaultSettings;
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};

    fn caller(scope: TenantScope, role: Role) -> Caller {
        Caller {
            identity: "spiffe://test/caller".into(),
            peer: None,
            grant: Some(Grant {
                scope,
                roles: RoleSet::new([role]),
            }),
        }
    }

    /// The `n`th stand-in card number, made at run time.
    fn card(n: u64) -> String {
        let body = format!("4{:014}", 930_000_000 + n);
        (0..=9)
            .map(|d| format!("{body}{d}"))
            .find(|c| luhn_valid(c.as_bytes()))
            .unwrap()
    }

    /// Shutdown pauses a running job with the store still open: once
    /// `stop_background` returns, the job writes nothing more, it is no
    /// longer running in this process, and it stays `running` in the store
    /// for the next start (not failed, not finished).
    #[tokio::test(flavor = "multi_thread")]
    async fn stopping_pauses_a_running_job_which_then_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("v.db"), SqliteOptions::default()).unwrap();
        let kek = Arc::new(LocalKek::from_key(&KeyBytes::generate().unwrap()));
        let settings = VaultSettings {
            reencrypt_batch: 5,
            reencrypt_pause_ms: 10,
            ..VaultSettings::default()
        };
        let vault = Vault::open(Arc::new(store), kek, settings).await.unwrap();
        let admin = caller(TenantScope::All, Role::Admin);
        let checkout = caller(
            TenantScope::One(TenantId::parse("acme").unwrap()),
            Role::Tokenize,
        );
        for n in 0..100 {
            vault.tokenize(&checkout, &card(n), None).await.unwrap();
        }
        vault
            .rotate_dek(&admin, "acme", "before re-encryption")
            .await
            .unwrap();
        let job = vault
            .start_reencryption(&admin, "acme", "move the tokens")
            .await
            .unwrap();
        while vault.job(&admin, job.id).await.unwrap().done == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        assert!(vault.stop_background(Duration::from_secs(30)).await);
        assert!(
            vault.running_jobs.lock().unwrap().is_empty(),
            "the job still counts as running in this process"
        );
        let paused = vault.store.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(paused.state, JobState::Running);
        assert!(paused.done < 100, "the job finished before the stop");
        let seq = vault.store.audit_head().await.unwrap().0;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let later = vault.store.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(
            later.done, paused.done,
            "the job moved tokens after the stop"
        );
        assert_eq!(vault.store.audit_head().await.unwrap().0, seq);
        vault.store.close().await.unwrap();
    }
}
