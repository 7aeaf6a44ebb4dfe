//! Proves that a grant for one tenant reaches that tenant only, on the key and audit services: a tenant named out of scope is refused (PERMISSION_DENIED, the same answer for an unknown name), another tenant's key, job or request addressed by id reads exactly as a missing one (NOT_FOUND, same message), operations on every tenant at once need a grant for every tenant, and each refusal is on the record as denied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::calls::{call, key_status, tokenize_many};
use common::*;
use tokenvault::proto::audit_service_client::AuditServiceClient;
use tokenvault::proto::rotate_kek_request::Target;
use tokenvault::proto::{
    ApproveKekRotationRequest, ApproveTenantShredRequest, DataKeyState, DestroyDataKeyRequest,
    ExportLogRequest, GetJobRequest, GetKeyStatusRequest, GetLatestCheckpointRequest,
    GetPublicKeyRequest, ListEventsRequest, RequestTenantShredRequest, RotateDataKeyRequest,
    RotateKekRequest, SealRequest, StartReencryptionRequest, UnsealRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

type AuditClient = AuditServiceClient<Channel>;

async fn audit_client(v: &TestVault, name: &str) -> AuditClient {
    AuditServiceClient::new(
        tokenvault::client::channel(&v.url(), &v.pki(name))
            .await
            .unwrap(),
    )
}

/// The refusal of `res`, which must have code `code`.
fn refused<T: std::fmt::Debug>(res: Result<T, Status>, code: Code, what: &str) -> Status {
    let s = res.expect_err(what);
    assert_eq!(s.code(), code, "{what}: {s:?}");
    s
}

fn rotate_req(tenant: &str) -> RotateDataKeyRequest {
    RotateDataKeyRequest {
        tenant: tenant.into(),
        reason: "scoped rotation".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scoped_admin_manages_only_its_own_tenants_keys() {
    let v = TestVault::start_scoped().await;
    tokenize_many(&v.client(ACME_CHECKOUT).await, 30_000_000, 3).await;
    tokenize_many(&v.client(GLOBEX_CHECKOUT).await, 31_000_000, 3).await;
    let mut admin = v.keys(ADMIN).await;
    let mut admin2 = v.keys(ADMIN_2).await;
    let mut scoped = v.keys(ACME_ADMIN).await;

    // Key status: its own tenant's keys, and no trace of another tenant.
    let st = key_status(&mut scoped).await;
    assert!(!st.data_keys.is_empty(), "{st:?}");
    assert!(st.data_keys.iter().all(|d| d.tenant == "acme"), "{st:?}");

    // Its own tenant: allowed.
    call(scoped.rotate_data_key(rotate_req("acme")))
        .await
        .unwrap();
    call(scoped.start_reencryption(StartReencryptionRequest {
        tenant: "acme".into(),
        reason: "own tenant".into(),
    }))
    .await
    .unwrap();

    // Another tenant named in the request: refused, and an unknown or
    // malformed name gets the very same answer.
    let mut answers = Vec::new();
    for t in ["globex", "no-such-tenant", "Not A Tenant"] {
        let s = refused(
            call(scoped.rotate_data_key(rotate_req(t))).await,
            Code::PermissionDenied,
            t,
        );
        answers.push((s.code(), s.message().to_owned()));
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    refused(
        call(scoped.start_reencryption(StartReencryptionRequest {
            tenant: "globex".into(),
            reason: "not mine".into(),
        }))
        .await,
        Code::PermissionDenied,
        "re-encrypt globex",
    );
    refused(
        call(scoped.request_tenant_shred(RequestTenantShredRequest {
            tenant: "globex".into(),
            reason: "not mine".into(),
        }))
        .await,
        Code::PermissionDenied,
        "shred globex",
    );

    // Another tenant's objects by id read exactly as missing ones.
    let globex_old = key_status(&mut admin)
        .await
        .data_keys
        .into_iter()
        .find(|d| d.tenant == "globex")
        .unwrap();
    call(admin.rotate_data_key(rotate_req("globex")))
        .await
        .unwrap();
    let destroy = |id| DestroyDataKeyRequest {
        data_key_id: id,
        reason: "not mine".into(),
    };
    let theirs = refused(
        call(scoped.destroy_data_key(destroy(globex_old.id))).await,
        Code::NotFound,
        "destroy a globex key",
    );
    let missing = refused(
        call(scoped.destroy_data_key(destroy(999_999))).await,
        Code::NotFound,
        "destroy a missing key",
    );
    assert_eq!(theirs.message(), missing.message());
    assert!(!theirs.message().contains(&globex_old.id.to_string()));

    let job = call(admin.start_reencryption(StartReencryptionRequest {
        tenant: "globex".into(),
        reason: "move globex tokens".into(),
    }))
    .await
    .unwrap();
    let theirs = refused(
        call(scoped.get_job(GetJobRequest { job_id: job.job_id })).await,
        Code::NotFound,
        "read a globex job",
    );
    let missing = refused(
        call(scoped.get_job(GetJobRequest {
            job_id: job.job_id + 1000,
        }))
        .await,
        Code::NotFound,
        "read a missing job",
    );
    assert_eq!(theirs.message(), missing.message());
    let watched = refused(
        scoped
            .watch_job(GetJobRequest { job_id: job.job_id })
            .await
            .map(|_| ()),
        Code::NotFound,
        "watch a globex job",
    );
    assert_eq!(watched.message(), missing.message());

    let req = call(admin.request_tenant_shred(RequestTenantShredRequest {
        tenant: "globex".into(),
        reason: "globex contract ended".into(),
    }))
    .await
    .unwrap();
    let approve = |id| ApproveTenantShredRequest {
        request_id: id,
        reason: "not mine".into(),
    };
    let theirs = refused(
        call(scoped.approve_tenant_shred(approve(req.request_id))).await,
        Code::NotFound,
        "approve a globex shred",
    );
    let missing = refused(
        call(scoped.approve_tenant_shred(approve(req.request_id ^ 1))).await,
        Code::NotFound,
        "approve a missing request",
    );
    assert_eq!(theirs.message(), missing.message());

    // Operations on every tenant at once.
    let target = Some(Target::FilePath(
        v.dir.path().join("kek-2.b64").display().to_string(),
    ));
    refused(
        call(scoped.request_kek_rotation(RotateKekRequest {
            reason: "not mine".into(),
            target,
        }))
        .await,
        Code::PermissionDenied,
        "request a KEK rotation",
    );
    refused(
        call(scoped.approve_kek_rotation(ApproveKekRotationRequest {
            request_id: 1,
            reason: "not mine".into(),
        }))
        .await,
        Code::PermissionDenied,
        "approve a KEK rotation",
    );
    refused(
        call(scoped.seal(SealRequest {
            reason: "not mine".into(),
        }))
        .await,
        Code::PermissionDenied,
        "seal",
    );
    // Unsealing opens every tenant's keys: a scoped admin may not either.
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();
    refused(
        call(scoped.unseal(UnsealRequest::default())).await,
        Code::PermissionDenied,
        "unseal",
    );
    call(admin.unseal(UnsealRequest::default())).await.unwrap();

    // Nothing of globex changed; the refused request is still pending and a
    // global administrator can approve it.
    let st = key_status(&mut admin).await;
    assert!(!st.sealed);
    let old = st.data_keys.iter().find(|d| d.id == globex_old.id).unwrap();
    assert_eq!(old.state(), DataKeyState::DecryptOnly, "{old:?}");
    let shredded = call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
        request_id: req.request_id,
        reason: "second admin approves".into(),
    }))
    .await
    .unwrap();
    assert!(shredded.data_key_ids.contains(&globex_old.id));

    // Every refusal is on the record as denied; the missing ids as not
    // found. The record of a refused key names the key's real tenant.
    let me = scoped_identity(ACME_ADMIN);
    let rows: Vec<AuditRow> = v
        .audit_rows()
        .into_iter()
        .filter(|r| r.actor == me && r.outcome != "success")
        .collect();
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.action.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("dek_rotate", "denied"),
            ("dek_rotate", "denied"),
            ("dek_rotate", "denied"),
            ("reencrypt_start", "denied"),
            ("shred_request", "denied"),
            ("dek_destroy", "denied"),
            ("dek_destroy", "not_found"),
            ("key_read", "denied"),
            ("key_read", "not_found"),
            ("key_read", "denied"),
            ("tenant_shred", "denied"),
            ("tenant_shred", "not_found"),
            ("kek_rotate_request", "denied"),
            ("kek_rotate", "denied"),
            ("seal", "denied"),
            ("unseal", "denied"),
        ],
        "{rows:#?}"
    );
    assert_eq!(rows[0].tenant.as_deref(), Some("globex"));
    assert_eq!(rows[2].tenant, None, "a malformed name is not recorded");
    assert_eq!(rows[5].tenant.as_deref(), Some("globex"));
    assert_eq!(rows[10].tenant.as_deref(), Some("globex"));
    drop((admin, admin2, scoped));
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scoped_auditor_reads_only_its_own_tenants_records() {
    let v = TestVault::start_scoped().await;
    tokenize_many(&v.client(ACME_CHECKOUT).await, 32_000_000, 3).await;
    tokenize_many(&v.client(GLOBEX_CHECKOUT).await, 33_000_000, 3).await;
    let mut a = audit_client(&v, ACME_AUDITOR).await;

    // By default and when it names its own tenant: acme's records only,
    // none without a tenant (system and KEK events concern every tenant).
    for tenant in ["", "acme"] {
        let events = call(a.list_events(ListEventsRequest {
            tenant: tenant.into(),
            page_size: 1000,
            ..Default::default()
        }))
        .await
        .unwrap()
        .events;
        assert!(!events.is_empty(), "{tenant:?}");
        for e in &events {
            assert_eq!(e.tenant, "acme", "{tenant:?}: {e:?}");
        }
    }
    // Any other tenant, known or not: one refusal.
    let mut answers = Vec::new();
    for t in ["globex", "no-such-tenant", "Not A Tenant"] {
        let s = refused(
            call(a.list_events(ListEventsRequest {
                tenant: t.into(),
                ..Default::default()
            }))
            .await,
            Code::PermissionDenied,
            t,
        );
        answers.push((s.code(), s.message().to_owned()));
    }
    assert!(answers.iter().all(|x| *x == answers[0]), "{answers:?}");
    // The whole log is every tenant's.
    refused(
        call(a.export_log(ExportLogRequest { after_seq: 0 }))
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "export",
    );
    // Checkpoints and the public key describe the chain, not its records.
    call(a.get_latest_checkpoint(GetLatestCheckpointRequest {}))
        .await
        .unwrap();
    call(a.get_public_key(GetPublicKeyRequest {}))
        .await
        .unwrap();
    // Key status: its own tenant's keys only.
    let mut k = v.keys(ACME_AUDITOR).await;
    let st = call(k.get_key_status(GetKeyStatusRequest {}))
        .await
        .unwrap();
    assert!(!st.data_keys.is_empty());
    assert!(st.data_keys.iter().all(|d| d.tenant == "acme"), "{st:?}");

    // The refusals are on the record as denied reads.
    let mut global = audit_client(&v, AUDITOR).await;
    let mine = call(global.list_events(ListEventsRequest {
        actor: scoped_identity(ACME_AUDITOR),
        outcome: "denied".into(),
        page_size: 1000,
        ..Default::default()
    }))
    .await
    .unwrap()
    .events;
    assert_eq!(mine.len(), 4, "{mine:#?}");
    assert!(mine.iter().all(|e| e.action == "audit_read"), "{mine:#?}");
    drop((a, k, global));
    v.stop().await;
}
