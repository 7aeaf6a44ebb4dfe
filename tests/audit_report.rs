//! The key-lifecycle report built from a real vault's audit log lists every
//! key event of a scripted rotation / re-encryption / destruction / KEK
//! rotation / shred scenario against the right key, and the export behind
//! it verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::calls::{call, tokenize_many};
use common::*;
use tokenvault::audit::report::{KeyEventKind, KeyState, ReportInput, build, render_markdown};
use tokenvault::audit::verify::verify_records;
use tokenvault::crypto::kek::{Kek, LocalKek};
use tokenvault::proto::rotate_kek_request::Target;
use tokenvault::proto::{
    ApproveKekRotationRequest, ApproveTenantShredRequest, DestroyDataKeyRequest, GetJobRequest,
    JobState, RequestTenantShredRequest, RotateDataKeyRequest, RotateKekRequest,
    StartReencryptionRequest,
};

#[tokio::test(flavor = "multi_thread")]
async fn report_lists_every_key_event_of_a_scripted_scenario() {
    let v = TestVault::start().await;
    let acme = v.client(ACME_CHECKOUT).await;
    let globex = v.client(GLOBEX_CHECKOUT).await;
    let mut admin = v.keys(ADMIN).await;
    let mut admin2 = v.keys(ADMIN_2).await;

    // acme: key 1 created on first use, rotated to key 3, re-encrypted,
    // key 1 destroyed. globex: key 2, shredded under dual control.
    tokenize_many(&acme, 30_000_000, 20).await;
    tokenize_many(&globex, 31_000_000, 5).await;
    call(admin.rotate_data_key(RotateDataKeyRequest {
        tenant: "acme".into(),
        reason: "quarterly rotation".into(),
    }))
    .await
    .unwrap();
    let job = call(admin.start_reencryption(StartReencryptionRequest {
        tenant: "acme".into(),
        reason: "retire v1".into(),
    }))
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = call(admin.get_job(GetJobRequest { job_id: job.job_id }))
            .await
            .unwrap();
        if j.state() == JobState::Completed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "job stuck: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    call(admin.destroy_data_key(DestroyDataKeyRequest {
        data_key_id: 1,
        reason: "retired after re-encryption".into(),
    }))
    .await
    .unwrap();
    let path = v.dir.path().join("kek-new.b64");
    let new_kek = LocalKek::generate_file(&path).unwrap();
    let pending = call(admin.request_kek_rotation(RotateKekRequest {
        reason: "yearly KEK rotation".into(),
        target: Some(Target::FilePath(path.display().to_string())),
    }))
    .await
    .unwrap();
    call(admin2.approve_kek_rotation(ApproveKekRotationRequest {
        request_id: pending.request_id,
        reason: "approved".into(),
    }))
    .await
    .unwrap();
    let shred = call(admin.request_tenant_shred(RequestTenantShredRequest {
        tenant: "globex".into(),
        reason: "tenant offboarded".into(),
    }))
    .await
    .unwrap();
    call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
        request_id: shred.request_id,
        reason: "confirmed".into(),
    }))
    .await
    .unwrap();
    drop((acme, globex, admin, admin2));
    let dir = v.stop().await;

    let (entries, cps, public) =
        tokenvault::storage::sqlite::read_audit_offline(&dir.path().join("vault.db")).unwrap();
    let pk: [u8; 32] = public.unwrap().try_into().unwrap();
    let verdict = verify_records(&entries, &cps, &pk);
    assert!(verdict.ok(), "{}", verdict.summary());
    let report = build(&ReportInput {
        entries: &entries,
        checkpoints: &cps,
        verdict: Some(&verdict),
        crypto_period_ms: 90 * 86_400_000,
        generated_ms: now_ms(),
    });

    let kinds = |id: u32| -> Vec<KeyEventKind> {
        report
            .key(id)
            .unwrap_or_else(|| panic!("key {id} missing from the report"))
            .timeline
            .iter()
            .map(|e| e.kind)
            .collect()
    };
    let k1 = kinds(1);
    for want in [
        KeyEventKind::Created,
        KeyEventKind::Retired,
        KeyEventKind::ReencryptStart,
        KeyEventKind::ReencryptComplete,
        KeyEventKind::Destroyed,
    ] {
        assert!(k1.contains(&want), "acme key 1 lacks {want:?}: {k1:?}");
    }
    assert_eq!(report.key(1).unwrap().state, KeyState::Destroyed);
    let k3 = kinds(3);
    assert!(k3.contains(&KeyEventKind::Activated), "{k3:?}");
    assert!(k3.contains(&KeyEventKind::Rewrapped), "{k3:?}");
    assert_eq!(report.key(3).unwrap().state, KeyState::Active);
    let k2 = kinds(2);
    assert!(k2.contains(&KeyEventKind::Created), "{k2:?}");
    assert!(k2.contains(&KeyEventKind::Rewrapped), "{k2:?}");
    assert!(k2.contains(&KeyEventKind::Shredded), "{k2:?}");
    assert_eq!(report.key(2).unwrap().state, KeyState::Destroyed);
    assert_eq!(report.tenant("acme").unwrap().keys.len(), 2);
    assert_eq!(report.tenant("globex").unwrap().keys.len(), 1);

    // Actors, approvers and reasons are carried through.
    let shredded = report
        .key(2)
        .unwrap()
        .timeline
        .iter()
        .find(|e| e.kind == KeyEventKind::Shredded)
        .unwrap();
    assert_eq!(shredded.event.actor, identity(ADMIN));
    assert_eq!(shredded.event.approvers.as_deref(), Some(identity(ADMIN_2)));
    assert_eq!(shredded.event.reason.as_deref(), Some("tenant offboarded"));
    // Every lifecycle event is covered by a checkpoint (one was signed at
    // shutdown), and the single-admin destroy is flagged.
    let destroyed = report
        .key(1)
        .unwrap()
        .timeline
        .iter()
        .find(|e| e.kind == KeyEventKind::Destroyed)
        .unwrap();
    assert!(destroyed.event.covered_by.is_some(), "{destroyed:?}");
    assert!(
        report
            .flags
            .iter()
            .any(|f| f.key_id == 1 && f.kind.text() == "destroyed without dual control")
    );
    assert!(
        !report
            .flags
            .iter()
            .any(|f| f.kind.text() == "outlived its crypto-period")
    );

    // The KEK section names the new KEK.
    let md = render_markdown(&report);
    assert!(
        md.contains(new_kek.id()),
        "report does not name the new KEK"
    );
    assert!(md.contains("quarterly rotation") && md.contains("retire v1"));
}
