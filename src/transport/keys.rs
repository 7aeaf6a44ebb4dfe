//! `vault.v1.KeyService` over the domain's key lifecycle operations.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::auth::Authenticator;
use super::status::{fail, to_status};
use super::timestamp as ts;
use crate::crypto::kek::Kek;
use crate::domain::AuditAction;
use crate::domain::dual_control::{APPROVAL_TTL_MS, ChangeKind};
use crate::domain::keys::{DekStatus, KeyStatus};
use crate::domain::store::{DekState, JobRecord, JobState};
use crate::domain::unseal::SealStatus;
use crate::domain::vault::KekLoader;
use crate::domain::{Caller, Vault, VaultError};
use crate::proto;
use crate::proto::key_service_server::KeyService;
use crate::proto::rotate_kek_request::Target;
use crate::server::KekFactory;

pub struct KeyServiceImpl {
    vault: Arc<Vault>,
    auth: Arc<Authenticator>,
    keks: Arc<KekFactory>,
    /// Targets of KEK rotation requests awaiting approval, by request id.
    pending_targets: Mutex<HashMap<u64, Target>>,
}

impl KeyServiceImpl {
    pub fn new(vault: Arc<Vault>, auth: Arc<Authenticator>, keks: Arc<KekFactory>) -> Self {
        Self {
            vault,
            auth,
            keks,
            pending_targets: Mutex::default(),
        }
    }
}

fn dek(d: DekStatus) -> proto::DataKey {
    let state = match d.state {
        DekState::Active => proto::DataKeyState::Active,
        DekState::DecryptOnly => proto::DataKeyState::DecryptOnly,
        DekState::Destroyed => proto::DataKeyState::Destroyed,
    };
    proto::DataKey {
        id: d.id,
        tenant: d.tenant,
        version: d.version,
        state: state.into(),
        kek_id: d.kek_id,
        created_at: ts(d.created_ms),
        encryptions: d.used,
        encryption_limit: d.limit,
        tokens: d.tokens,
        rotation_due: d.rotation_due.unwrap_or_default(),
    }
}

fn job(j: JobRecord) -> proto::Job {
    let state = match j.state {
        JobState::Running => proto::JobState::Running,
        JobState::Completed => proto::JobState::Completed,
        JobState::Failed => proto::JobState::Failed,
    };
    proto::Job {
        job_id: j.id,
        tenant: j.tenant,
        state: state.into(),
        total: j.total,
        done: j.done,
        created_at: ts(j.created_ms),
        updated_at: ts(j.updated_ms),
        error: j.error.unwrap_or_default(),
        passes: j.passes,
    }
}

fn seal_status(s: SealStatus) -> proto::SealStatus {
    proto::SealStatus {
        sealed: s.sealed,
        threshold: u32::from(s.threshold),
        submitted: u32::from(s.submitted),
        kek_id: s.kek_id.unwrap_or_default(),
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<proto::Job, Status>> + Send>>;

/// Validates a target's shape before it is recorded.
fn checked_target(t: Option<Target>) -> Result<Target, VaultError> {
    match t {
        Some(Target::FilePath(p)) if !p.trim().is_empty() => Ok(Target::FilePath(p)),
        Some(Target::Hsm(h)) if !h.key_label.trim().is_empty() => Ok(Target::Hsm(h)),
        Some(Target::Shamir(s))
            if !s.out_dir.trim().is_empty()
                && (2..=16).contains(&s.threshold)
                && (s.threshold..=16).contains(&s.shares) =>
        {
            Ok(Target::Shamir(s))
        }
        _ => Err(VaultError::InvalidArgument(
            "a target KEK is required: file_path, hsm, or shamir with 2 <= threshold <= shares <= 16".into(),
        )),
    }
}

/// What a KEK rotation target is, for the audit log and the approver (the
/// core screens it before it is recorded).
fn describe(t: &Target) -> String {
    match t {
        Target::FilePath(p) => format!("file:{p}"),
        Target::Hsm(h) => format!(
            "hsm:{}{}",
            h.key_label,
            if h.generate { " (generate)" } else { "" }
        ),
        Target::Shamir(s) => format!("shamir:{}-of-{} into {}", s.threshold, s.shares, s.out_dir),
    }
}

impl KeyServiceImpl {
    fn targets(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Target>> {
        self.pending_targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Builds the target KEK of an approved rotation. Failures are the
    /// operator's to fix (a path, a label), so they are reported as such.
    async fn build_kek(&self, target: Target) -> Result<(Arc<dyn Kek>, Vec<String>), VaultError> {
        let keks = self.keks.clone();
        let bad = |e: String| VaultError::FailedPrecondition(format!("new KEK: {e}"));
        let built = tokio::task::spawn_blocking(move || match target {
            Target::FilePath(p) => keks.file(Path::new(&p)).map(|k| (k, Vec::new())),
            Target::Hsm(h) => keks.hsm(&h.key_label, h.generate).map(|k| (k, Vec::new())),
            Target::Shamir(s) => {
                let shares = u8::try_from(s.shares).map_err(|_| "too many shares".to_owned())?;
                let threshold =
                    u8::try_from(s.threshold).map_err(|_| "threshold too large".to_owned())?;
                keks.shamir(Path::new(&s.out_dir), shares, threshold)
                    .map(|(k, files)| {
                        (
                            k,
                            files.into_iter().map(|f| f.display().to_string()).collect(),
                        )
                    })
            }
        })
        .await
        .map_err(|_| VaultError::Internal)?;
        built.map_err(bad)
    }

    /// How an administrator's `Unseal` reloads the KEK after this rotation:
    /// from the new file or HSM key; a split KEK needs its custodians.
    fn loader_for(&self, target: &Target) -> Option<KekLoader> {
        let keks = self.keks.clone();
        match target.clone() {
            Target::FilePath(p) => Some(Box::new(move || keks.file(Path::new(&p)))),
            Target::Hsm(h) => Some(Box::new(move || keks.hsm(&h.key_label, false))),
            Target::Shamir(_) => None,
        }
    }
}

#[tonic::async_trait]
impl KeyService for KeyServiceImpl {
    async fn get_key_status(
        &self,
        request: Request<proto::GetKeyStatusRequest>,
    ) -> Result<Response<proto::GetKeyStatusResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("GetKeyStatus", &caller, e);
        let KeyStatus {
            sealed,
            kek_id,
            deks,
        } = self.vault.key_status(&caller).await.map_err(st)?;
        Ok(Response::new(proto::GetKeyStatusResponse {
            sealed,
            kek_id: kek_id.unwrap_or_default(),
            data_keys: deks.into_iter().map(dek).collect(),
        }))
    }

    async fn rotate_data_key(
        &self,
        request: Request<proto::RotateDataKeyRequest>,
    ) -> Result<Response<proto::RotateDataKeyResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("RotateDataKey", &caller, e);
        let r = request.into_inner();
        let d = self
            .vault
            .rotate_dek(&caller, &r.tenant, &r.reason)
            .await
            .map_err(st)?;
        Ok(Response::new(proto::RotateDataKeyResponse {
            data_key: Some(dek(d)),
        }))
    }

    async fn request_kek_rotation(
        &self,
        request: Request<proto::RotateKekRequest>,
    ) -> Result<Response<proto::PendingApproval>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("RequestKekRotation", &caller, e);
        let r = request.into_inner();
        // The target is decoded only once the core has authorized the caller.
        let mut decoded = None;
        let req = self
            .vault
            .request_kek_rotation(&caller, &r.reason, || {
                let t = checked_target(r.target)?;
                let d = describe(&t);
                decoded = Some(t);
                Ok(d)
            })
            .await
            .map_err(st)?;
        let Some(target) = decoded else {
            return Err(st(VaultError::Internal));
        };
        let description = describe(&target);
        self.targets().insert(req.id, target);
        Ok(Response::new(proto::PendingApproval {
            request_id: req.id,
            requested_by: req.requester,
            expires_at: ts(req.created_ms + APPROVAL_TTL_MS),
            description,
        }))
    }

    async fn approve_kek_rotation(
        &self,
        request: Request<proto::ApproveKekRotationRequest>,
    ) -> Result<Response<proto::RotateKekResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("ApproveKekRotation", &caller, e);
        let r = request.into_inner();
        let req = self
            .vault
            .take_kek_rotation(&caller, r.request_id, &r.reason)
            .await
            .map_err(st)?;
        let Some(target) = self.targets().remove(&req.id) else {
            return Err(st(VaultError::Internal));
        };
        // The new KEK is built only now, after the second approval: a
        // refused request never writes share files or creates HSM keys.
        let (kek, share_files) = match self.build_kek(target.clone()).await {
            Ok(k) => k,
            Err(e) => {
                self.vault
                    .audit_key_refusal(&caller, AuditAction::KekRotate, &r.reason, &e)
                    .await
                    .map_err(st)?;
                return Err(st(e));
            }
        };
        let reload = self.loader_for(&target);
        match self
            .vault
            .rotate_kek_approved(&caller, &req, kek, &r.reason, reload)
            .await
        {
            Ok(kek_id) => Ok(Response::new(proto::RotateKekResponse {
                kek_id,
                share_files,
            })),
            Err(e) => {
                self.targets().insert(req.id, target);
                self.vault.restore_change(req);
                Err(st(e))
            }
        }
    }

    async fn start_reencryption(
        &self,
        request: Request<proto::StartReencryptionRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("StartReencryption", &caller, e);
        let r = request.into_inner();
        let j = self
            .vault
            .start_reencryption(&caller, &r.tenant, &r.reason)
            .await
            .map_err(st)?;
        Ok(Response::new(job(j)))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("GetJob", &caller, e);
        let j = self
            .vault
            .job(&caller, request.into_inner().job_id)
            .await
            .map_err(st)?;
        Ok(Response::new(job(j)))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("WatchJob", &caller, e);
        let id = request.into_inner().job_id;
        let first = self.vault.job(&caller, id).await.map_err(st)?;
        let vault = self.vault.clone();
        let stream = async_stream(vault, caller, first);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn destroy_data_key(
        &self,
        request: Request<proto::DestroyDataKeyRequest>,
    ) -> Result<Response<proto::DestroyDataKeyResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("DestroyDataKey", &caller, e);
        let r = request.into_inner();
        self.vault
            .destroy_dek(&caller, r.data_key_id, &r.reason)
            .await
            .map_err(st)?;
        Ok(Response::new(proto::DestroyDataKeyResponse {}))
    }

    async fn request_tenant_shred(
        &self,
        request: Request<proto::RequestTenantShredRequest>,
    ) -> Result<Response<proto::ShredRequest>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("RequestTenantShred", &caller, e);
        let r = request.into_inner();
        let req = self
            .vault
            .request_shred(&caller, &r.tenant, &r.reason)
            .await
            .map_err(st)?;
        Ok(Response::new(proto::ShredRequest {
            request_id: req.id,
            tenant: match &req.kind {
                ChangeKind::Shred(t) => t.as_str().to_owned(),
                ChangeKind::KekRotation(_) => String::new(),
            },
            requested_by: req.requester,
            expires_at: ts(req.created_ms + APPROVAL_TTL_MS),
        }))
    }

    async fn approve_tenant_shred(
        &self,
        request: Request<proto::ApproveTenantShredRequest>,
    ) -> Result<Response<proto::ApproveTenantShredResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("ApproveTenantShred", &caller, e);
        let r = request.into_inner();
        let ids = self
            .vault
            .approve_shred(&caller, r.request_id, &r.reason)
            .await
            .map_err(st)?;
        Ok(Response::new(proto::ApproveTenantShredResponse {
            data_key_ids: ids,
        }))
    }

    async fn unseal(
        &self,
        mut request: Request<proto::UnsealRequest>,
    ) -> Result<Response<proto::SealStatus>, Status> {
        // The share is moved into a wiping buffer before anything can return
        // early or the call be cancelled at an await: either would free the
        // decoded request with the share still in it.
        let share = Zeroizing::new(std::mem::take(&mut request.get_mut().share));
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("Unseal", &caller, e);
        let res = self.vault.unseal_with_share(&caller, &share).await;
        Ok(Response::new(seal_status(res.map_err(st)?)))
    }

    async fn seal(
        &self,
        request: Request<proto::SealRequest>,
    ) -> Result<Response<proto::SealStatus>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("Seal", &caller, e);
        let r = request.into_inner();
        let s = self.vault.seal(&caller, &r.reason).await.map_err(st)?;
        Ok(Response::new(seal_status(s)))
    }

    async fn get_seal_status(
        &self,
        request: Request<proto::GetSealStatusRequest>,
    ) -> Result<Response<proto::SealStatus>, Status> {
        let caller = self.auth.caller(&request)?;
        let st = |e: VaultError| fail("GetSealStatus", &caller, e);
        let s = self.vault.seal_status(&caller).await.map_err(st)?;
        Ok(Response::new(seal_status(s)))
    }
}

/// Emits the job now and then every 500 ms until it is no longer running.
///
/// A watch is bounded: it ends (UNAVAILABLE) when the vault is sealed,
/// where a paused job would otherwise look "running" forever, or begins
/// to shut down, where it would hold the drain to its deadline, and
/// (DEADLINE_EXCEEDED) after `MAX_WATCH`; the caller may watch again.
fn async_stream(
    vault: Arc<Vault>,
    caller: Caller,
    first: JobRecord,
) -> impl Stream<Item = Result<proto::Job, Status>> + Send {
    const MAX_WATCH: Duration = Duration::from_secs(3600);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let id = first.id;
        let until = tokio::time::Instant::now() + MAX_WATCH;
        let mut current = first;
        loop {
            let running = current.state == JobState::Running;
            if tx.send(Ok(job(current))).await.is_err() || !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let end = if vault.is_sealed() {
                Some(Status::unavailable(
                    "vault is sealed: the job is paused until it is unsealed; watch again then",
                ))
            } else if vault.is_draining() {
                Some(Status::unavailable(
                    "vault is shutting down: watch again on another instance or after restart",
                ))
            } else if tokio::time::Instant::now() >= until {
                Some(Status::deadline_exceeded(
                    "a watch lasts at most an hour; watch again to follow the job",
                ))
            } else {
                None
            };
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
                return;
            }
            current = match vault.job_again(&caller, id).await {
                Ok(j) => j,
                Err(e) => {
                    let _ = tx.send(Err(to_status(&e))).await;
                    return;
                }
            };
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
