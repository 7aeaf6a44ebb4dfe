//! Proves the key lifecycle over mTLS: data-key rotation under load, automatic rotation and the hard use cap, re-encryption and destruction, dual-control crypto-shredding, split-knowledge sealing and unsealing, KEK rotation to a file or a share set, and the audit trail of each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::calls::{
    assert_all_detokenize, call, detokenize_failures, key_by_id, key_status, tokenize_many,
};
use common::cards::visa_pan;
use common::*;
use tokenvault::client::channel;
use tokenvault::crypto::kek::{Kek, KeyBytes, LocalKek};
use tokenvault::crypto::shamir::{Share, split};
use tokenvault::domain::vault::OpenError;
use tokenvault::proto::rotate_kek_request::Target;
use tokenvault::proto::{
    ApproveKekRotationRequest, ApproveTenantShredRequest, DataKey, DataKeyState,
    DestroyDataKeyRequest, DetokenizeRequest, GetJobRequest, GetKeyStatusResponse,
    GetSealStatusRequest, Job, JobState, RequestTenantShredRequest, RotateDataKeyRequest,
    RotateKekRequest, RotateKekResponse, SealRequest, SealStatus, ShamirTarget,
    StartReencryptionRequest, TokenizeRequest, UnsealRequest,
};
use tokenvault::server::StartError;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The purpose of every detokenize call.
const PURPOSE: &str = "key lifecycle test";

// ---------------------------------------------------------------------------
// Calls.

async fn tokenize(c: &mut Client, pan: &str) -> Result<String, Status> {
    call(c.tokenize(TokenizeRequest {
        pan: pan.into(),
        expiry: None,
    }))
    .await
    .map(|r| r.token)
}

async fn detokenize(c: &mut Client, token: &str) -> Result<String, Status> {
    call(c.detokenize(DetokenizeRequest {
        token: token.into(),
        purpose: PURPOSE.into(),
    }))
    .await
    .map(|mut r| std::mem::take(&mut r.pan))
}

fn assert_code<T: std::fmt::Debug>(res: Result<T, Status>, code: Code, what: &str) -> Status {
    match res {
        Ok(v) => panic!("{what}: expected {code:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

// ---------------------------------------------------------------------------
// Key service.

/// `tenant`'s data keys, oldest version first.
fn keys_of(s: &GetKeyStatusResponse, tenant: &str) -> Vec<DataKey> {
    let mut v: Vec<DataKey> = s
        .data_keys
        .iter()
        .filter(|d| d.tenant == tenant)
        .cloned()
        .collect();
    v.sort_by_key(|d| d.version);
    v
}

async fn rotate(k: &mut KeysClient, tenant: &str, reason: &str) -> DataKey {
    call(k.rotate_data_key(RotateDataKeyRequest {
        tenant: tenant.into(),
        reason: reason.into(),
    }))
    .await
    .unwrap_or_else(|s| panic!("rotate {tenant}: {s:?}"))
    .data_key
    .unwrap()
}

async fn destroy(k: &mut KeysClient, id: u32, reason: &str) -> Result<(), Status> {
    call(k.destroy_data_key(DestroyDataKeyRequest {
        data_key_id: id,
        reason: reason.into(),
    }))
    .await
    .map(|_| ())
}

async fn start_job(k: &mut KeysClient, tenant: &str) -> Job {
    call(k.start_reencryption(StartReencryptionRequest {
        tenant: tenant.into(),
        reason: format!("move {tenant} tokens onto the active key"),
    }))
    .await
    .unwrap_or_else(|s| panic!("start re-encryption for {tenant}: {s:?}"))
}

/// Polls a job until it is no longer running (at most `limit`).
async fn wait_job(k: &mut KeysClient, id: u64, limit: Duration) -> Job {
    let deadline = Instant::now() + limit;
    loop {
        let j = call(k.get_job(GetJobRequest { job_id: id })).await.unwrap();
        if j.state() != JobState::Running {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still running after {limit:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn seal_status(k: &mut KeysClient) -> SealStatus {
    call(k.get_seal_status(GetSealStatusRequest {}))
        .await
        .unwrap()
}

async fn unseal(k: &mut KeysClient, share: &str) -> Result<SealStatus, Status> {
    call(k.unseal(UnsealRequest {
        share: share.into(),
    }))
    .await
}

async fn seal(k: &mut KeysClient, reason: &str) -> Result<SealStatus, Status> {
    call(k.seal(SealRequest {
        reason: reason.into(),
    }))
    .await
}

// ---------------------------------------------------------------------------
// Health.

async fn health(v: &TestVault) -> Result<ServingStatus, Status> {
    let ch = channel(&v.url(), &v.pki(AUDITOR)).await.unwrap();
    let r = call(HealthClient::new(ch).check(HealthCheckRequest {
        service: "vault.v1.TokenService".into(),
    }))
    .await?;
    Ok(r.status())
}

/// Waits (at most 5 s) for the TokenService health to become `want`.
async fn wait_health(v: &TestVault, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = health(v).await;
        if got.as_ref().is_ok_and(|s| *s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of vault.v1.TokenService is {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Audit and files.

/// A key lifecycle audit record with its key columns.
#[derive(Debug, Clone)]
struct KeyAudit {
    action: String,
    actor: String,
    tenant: Option<String>,
    key_id: Option<u32>,
    key_version: Option<u32>,
    reason: Option<String>,
    approvers: Option<String>,
    outcome: String,
    detail: Option<String>,
}

/// Every audit record that is not a data access, oldest first.
fn key_audit(db: &Path) -> Vec<KeyAudit> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare(
            "SELECT action, actor, tenant, key_id, key_version, reason, approvers, outcome, detail
             FROM audit
             WHERE action NOT IN ('tokenize', 'detokenize', 'get_metadata', 'delete_token')
             ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(KeyAudit {
            action: r.get(0)?,
            actor: r.get(1)?,
            tenant: r.get(2)?,
            key_id: r.get(3)?,
            key_version: r.get(4)?,
            reason: r.get(5)?,
            approvers: r.get(6)?,
            outcome: r.get(7)?,
            detail: r.get(8)?,
        })
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

fn with_action<'a>(rows: &'a [KeyAudit], action: &str) -> Vec<&'a KeyAudit> {
    rows.iter().filter(|r| r.action == action).collect()
}

/// Replaces the `[kek]` table (and any `[kek.*]` sub-table) of the dev
/// config in `root` with `section`.
fn set_kek_config(root: &Path, section: &str) {
    let path = root.join("vault.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut in_kek = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_kek = t == "[kek]" || t.starts_with("[kek.");
        }
        if !in_kek {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(!out.contains("[kek"), "kek section not removed:\n{out}");
    out.push('\n');
    out.push_str(section);
    std::fs::write(&path, out).unwrap();
}

/// Whether `needle` occurs in the raw bytes of the database or its WAL.
fn on_disk(db: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for suffix in ["", "-wal", "-journal"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(p.display().to_string());
        }
    }
    found
}

/// Wrapped forms of `tenant`'s data keys, by id, read straight from the
/// database.
fn wrapped_deks(db: &Path, tenant: &str) -> Vec<(u32, Vec<u8>)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare("SELECT id, wrapped FROM deks WHERE tenant = ?1 AND wrapped IS NOT NULL")
        .unwrap();
    st.query_map([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

const SHAMIR_2_OF_3: &str = "[kek]\nsource = \"shamir\"\n\n[kek.shamir]\nthreshold = 2\n";

// ---------------------------------------------------------------------------
// 1. Rotation under load.

#[tokio::test(flavor = "multi_thread")]
async fn data_key_rotation_under_load_fails_no_request_and_every_token_opens() {
    // The load detokenizes faster than a payment worker's default budget
    // allows; the budget is not what this test is about.
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[limits]\ndetokenize_per_second = 1000000\ndetokenize_burst = 1000000\n",
    );
    let v = TestVault::start_in(dir).await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let mut all = tokenize_many(&checkout, 1_000_000, 40).await;

    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..16 {
        // Four connections per role, shared by the tasks.
        let (mut tok, mut det) = if i < 4 {
            (v.client(ACME_CHECKOUT).await, v.client(ACME_PAYMENTS).await)
        } else {
            (checkout.clone(), payments.clone())
        };
        let (stop, counter, errors) = (stop.clone(), counter.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for _ in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let p = visa_pan(2_000_000, counter.fetch_add(1, Ordering::SeqCst));
                let t = match tokenize(&mut tok, &p).await {
                    Ok(t) => t,
                    Err(s) => {
                        errors.lock().unwrap().push(format!("tokenize: {s:?}"));
                        continue;
                    }
                };
                match detokenize(&mut det, &t).await {
                    Ok(back) if back == p => {}
                    Ok(_) => errors.lock().unwrap().push(format!("{t}: wrong card")),
                    Err(s) => errors
                        .lock()
                        .unwrap()
                        .push(format!("detokenize {t}: {s:?}")),
                }
                made.push((t, p));
            }
            made
        }));
    }

    let t0 = Instant::now();
    for i in 0..3u32 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let dk = rotate(
            &mut admin,
            "acme",
            &format!("scheduled rotation #{i} under load"),
        )
        .await;
        assert_eq!(dk.version, i + 2);
        assert_eq!(dk.state(), DataKeyState::Active);
        assert_eq!(dk.tenant, "acme");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut during = Vec::new();
    for t in tasks {
        during.extend(
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("load task did not end")
                .unwrap(),
        );
    }
    let elapsed = t0.elapsed();
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} requests failed during rotation, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        during.len() >= 50,
        "only {} tokens made under load in {elapsed:?}; the test proves nothing",
        during.len()
    );
    all.extend(during);
    all.extend(tokenize_many(&checkout, 3_000_000, 40).await);
    let distinct: HashSet<&str> = all.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(distinct.len(), all.len(), "a token was handed out twice");

    assert_all_detokenize(&payments, &all, PURPOSE).await;

    let s = key_status(&mut admin).await;
    let acme = keys_of(&s, "acme");
    let versions: Vec<u32> = acme.iter().map(|d| d.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4], "{acme:?}");
    let active: Vec<&DataKey> = acme
        .iter()
        .filter(|d| d.state() == DataKeyState::Active)
        .collect();
    assert_eq!(active.len(), 1, "{acme:?}");
    assert_eq!(active[0].version, 4);
    for d in &acme[..3] {
        assert_eq!(d.state(), DataKeyState::DecryptOnly, "{d:?}");
    }
    let counted: u64 = acme.iter().map(|d| d.tokens).sum();
    assert_eq!(counted, u64::try_from(all.len()).unwrap(), "{acme:?}");
    assert!(acme[0].tokens >= 40 && acme[3].tokens >= 40, "{acme:?}");

    let audit = key_audit(&v.db_path());
    let rotations: Vec<_> = with_action(&audit, "dek_rotate")
        .into_iter()
        .filter(|r| r.outcome == "success")
        .collect();
    assert_eq!(rotations.len(), 3, "{rotations:?}");
    for (i, r) in rotations.iter().enumerate() {
        assert_eq!(r.actor, identity(ADMIN));
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert_eq!(r.key_version, Some(u32::try_from(i).unwrap() + 2));
        assert_eq!(r.key_id, Some(acme[i + 1].id));
        assert_eq!(
            r.reason.as_deref(),
            Some(format!("scheduled rotation #{i} under load").as_str())
        );
    }
    drop((checkout, payments, admin));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Automatic rotation by use.

#[tokio::test(flavor = "multi_thread")]
async fn data_key_rotates_automatically_after_the_configured_uses() {
    let dir = tempfile::tempdir().unwrap();
    append_config(dir.path(), "[keys]\nrotate_after_uses = 5\n");
    let v = TestVault::start_in(dir).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let mut made = Vec::new();
    for i in 0..12 {
        let p = visa_pan(4_000_000, i);
        made.push((tokenize(&mut checkout, &p).await.unwrap(), p));
    }

    let s = key_status(&mut admin).await;
    let acme = keys_of(&s, "acme");
    assert!(acme.len() >= 3, "expected at least 3 versions: {acme:?}");
    assert_eq!(
        acme.iter()
            .filter(|d| d.state() == DataKeyState::Active)
            .count(),
        1,
        "{acme:?}"
    );
    for d in &acme {
        assert!(
            d.encryptions <= 5,
            "key {} encrypted {} times, past the rotation threshold of 5",
            d.id,
            d.encryptions
        );
    }
    assert_eq!(acme.iter().map(|d| d.tokens).sum::<u64>(), 12, "{acme:?}");

    let audit = key_audit(&v.db_path());
    let auto: Vec<_> = with_action(&audit, "dek_rotate");
    assert_eq!(auto.len(), acme.len() - 1, "{auto:?}");
    for r in &auto {
        assert_eq!(r.actor, "system", "{r:?}");
        assert_eq!(r.outcome, "success", "{r:?}");
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("automatic")),
            "{r:?}"
        );
        assert!(r.key_id.is_some() && r.key_version.is_some(), "{r:?}");
    }
    let created = with_action(&audit, "dek_create");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].actor, "system");
    assert_eq!(created[0].key_version, Some(1));

    assert_all_detokenize(&payments, &made, PURPOSE).await;
    drop((checkout, payments, admin));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Hard cap.

#[tokio::test(flavor = "multi_thread")]
async fn data_key_refuses_to_encrypt_past_its_hard_limit_until_rotated() {
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[keys]\nauto_rotate = false\nmax_uses = 3\nrotate_after_uses = 3\n",
    );
    let v = TestVault::start_in(dir).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let mut made = Vec::new();
    for i in 0..3 {
        let p = visa_pan(5_000_000, i);
        made.push((tokenize(&mut checkout, &p).await.unwrap(), p));
    }
    let fourth = visa_pan(5_000_000, 3);
    let s = assert_code(
        tokenize(&mut checkout, &fourth).await,
        Code::ResourceExhausted,
        "4th tokenize under a key limited to 3 uses",
    );
    let msg = s.message();
    assert!(
        !msg.chars().any(|c| c.is_ascii_digit()),
        "the refusal mentions digits: {msg:?}"
    );
    assert!(!msg.contains(&fourth) && !msg.contains(&fourth[12..]));

    let st = key_status(&mut admin).await;
    let acme = keys_of(&st, "acme");
    assert_eq!(acme.len(), 1, "no automatic rotation expected: {acme:?}");
    assert_eq!(acme[0].encryptions, 3);
    assert_eq!(acme[0].encryption_limit, 3);

    let dk = rotate(&mut admin, "acme", "key reached its hard limit").await;
    assert_eq!(dk.version, 2);
    let t = tokenize(&mut checkout, &fourth).await.unwrap();
    made.push((t, fourth));
    assert_all_detokenize(&payments, &made, PURPOSE).await;

    let rows = audit_rows(&v.db_path());
    assert!(
        rows.iter()
            .any(|r| r.action == "tokenize" && r.outcome == "resource_exhausted"),
        "the refused tokenize was not audited"
    );
    drop((checkout, payments, admin));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 4 (and 10). Re-encryption, destruction, and their audit trail.

#[tokio::test(flavor = "multi_thread")]
async fn reencryption_moves_every_token_so_the_old_key_can_be_destroyed() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let globex = v.client(GLOBEX_CHECKOUT).await;
    let mut admin = v.keys(ADMIN).await;

    let mut all = tokenize_many(&checkout, 6_000_000, 300).await;
    let old = keys_of(&key_status(&mut admin).await, "acme")[0].clone();
    let new = rotate(&mut admin, "acme", "annual rotation").await;
    assert_ne!(old.id, new.id);
    all.extend(tokenize_many(&checkout, 7_000_000, 50).await);
    let s = key_status(&mut admin).await;
    assert_eq!(key_by_id(&s, old.id).tokens, 300);
    assert_eq!(key_by_id(&s, new.id).tokens, 50);

    let job = start_job(&mut admin, "acme").await;
    assert_eq!(job.tenant, "acme");
    assert_eq!(job.total, 300);
    // Follow it on the stream until it ends.
    let mut stream = call(admin.watch_job(GetJobRequest { job_id: job.job_id }))
        .await
        .unwrap();
    let mut last_done = 0;
    let end = loop {
        let j = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("WatchJob went quiet")
            .unwrap()
            .expect("WatchJob ended before the job did");
        assert!(j.done >= last_done, "progress went backwards: {j:?}");
        last_done = j.done;
        if j.state() != JobState::Running {
            break j;
        }
    };
    assert_eq!(end.state(), JobState::Completed, "{end:?}");
    assert_eq!((end.done, end.total), (300, 300), "{end:?}");
    let again = call(admin.get_job(GetJobRequest { job_id: job.job_id }))
        .await
        .unwrap();
    assert_eq!(again.state(), JobState::Completed);
    assert_eq!(again.done, 300);

    let s = key_status(&mut admin).await;
    assert_eq!(key_by_id(&s, old.id).tokens, 0);
    assert_eq!(key_by_id(&s, new.id).tokens, 350);
    assert_eq!(key_by_id(&s, old.id).state(), DataKeyState::DecryptOnly);

    destroy(&mut admin, old.id, "all tokens re-encrypted")
        .await
        .unwrap();
    let s = key_status(&mut admin).await;
    assert_eq!(key_by_id(&s, old.id).state(), DataKeyState::Destroyed);
    assert_eq!(key_by_id(&s, new.id).state(), DataKeyState::Active);
    assert_all_detokenize(&payments, &all, PURPOSE).await;
    // Destroying it twice is refused.
    assert_code(
        destroy(&mut admin, old.id, "again").await,
        Code::FailedPrecondition,
        "destroy twice",
    );

    // A tenant with nothing under retired keys: an empty job completes.
    let mut g = globex.clone();
    tokenize(&mut g, &visa_pan(8_000_000, 0)).await.unwrap();
    let empty = start_job(&mut admin, "globex").await;
    assert_eq!(empty.total, 0);
    let done = wait_job(&mut admin, empty.job_id, Duration::from_secs(15)).await;
    assert_eq!(done.state(), JobState::Completed, "{done:?}");
    assert_eq!((done.done, done.total), (0, 0));

    // The auditor may follow jobs but not start them.
    let mut auditor = v.keys(AUDITOR).await;
    call(auditor.get_job(GetJobRequest { job_id: job.job_id }))
        .await
        .unwrap();
    assert_code(
        call(auditor.start_reencryption(StartReencryptionRequest {
            tenant: "acme".into(),
            reason: "not mine to do".into(),
        }))
        .await,
        Code::PermissionDenied,
        "auditor starts a job",
    );

    // 10. The audit trail of all of it, with key ids, versions and reasons.
    let audit = key_audit(&v.db_path());
    let created: Vec<_> = with_action(&audit, "dek_create")
        .into_iter()
        .filter(|r| r.tenant.as_deref() == Some("acme"))
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].key_id, Some(old.id));
    assert_eq!(created[0].key_version, Some(1));
    assert_eq!(created[0].actor, "system");
    assert!(created[0].reason.is_some());

    let rotated = with_action(&audit, "dek_rotate");
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    let r = rotated[0];
    assert_eq!(
        (r.actor.as_str(), r.outcome.as_str()),
        (identity(ADMIN), "success")
    );
    assert_eq!((r.key_id, r.key_version), (Some(new.id), Some(2)));
    assert_eq!(r.reason.as_deref(), Some("annual rotation"));
    assert!(
        r.detail
            .as_deref()
            .is_some_and(|d| d.contains(&format!("dek_id={}", old.id))),
        "{r:?}"
    );

    let started: Vec<_> = with_action(&audit, "reencrypt_start")
        .into_iter()
        .filter(|r| r.outcome == "success")
        .collect();
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(started[0].actor, identity(ADMIN));
    assert_eq!(started[0].tenant.as_deref(), Some("acme"));
    assert_eq!(
        started[0].reason.as_deref(),
        Some("move acme tokens onto the active key")
    );
    assert!(
        with_action(&audit, "reencrypt_start")
            .iter()
            .any(|r| r.actor == identity(AUDITOR) && r.outcome == "denied"),
        "the auditor's refused start was not audited"
    );
    let completed = with_action(&audit, "reencrypt_complete");
    assert_eq!(completed.len(), 2, "{completed:?}");
    assert!(completed.iter().all(|r| r.actor == "system"));
    assert_eq!(completed[0].tenant.as_deref(), Some("acme"));
    assert!(with_action(&audit, "reencrypt_fail").is_empty());

    let destroyed = with_action(&audit, "dek_destroy");
    let ok: Vec<_> = destroyed
        .iter()
        .filter(|r| r.outcome == "success")
        .collect();
    assert_eq!(ok.len(), 1, "{destroyed:?}");
    assert_eq!((ok[0].key_id, ok[0].key_version), (Some(old.id), Some(1)));
    assert_eq!(ok[0].actor, identity(ADMIN));
    assert_eq!(ok[0].tenant.as_deref(), Some("acme"));
    assert_eq!(ok[0].reason.as_deref(), Some("all tokens re-encrypted"));
    assert!(
        destroyed
            .iter()
            .any(|r| r.outcome == "failed_precondition" && r.key_id == Some(old.id)),
        "the second destroy was not audited: {destroyed:?}"
    );

    drop((checkout, payments, globex, g, admin, auditor, stream));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Destroy refused while referenced.

#[tokio::test(flavor = "multi_thread")]
async fn destroying_a_referenced_or_active_key_is_refused_and_audited() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let made = tokenize_many(&checkout, 9_000_000, 10).await;
    let old = keys_of(&key_status(&mut admin).await, "acme")[0].clone();
    let new = rotate(&mut admin, "acme", "rotate before destroying").await;

    let s = assert_code(
        destroy(&mut admin, old.id, "try to drop a referenced key").await,
        Code::FailedPrecondition,
        "destroy a key tokens still reference",
    );
    assert!(
        s.message().contains("tokens still reference"),
        "{:?}",
        s.message()
    );
    let s = assert_code(
        destroy(&mut admin, new.id, "try to drop the active key").await,
        Code::FailedPrecondition,
        "destroy the active key",
    );
    assert!(s.message().contains("active"), "{:?}", s.message());
    assert_code(
        destroy(&mut admin, old.id, "   ").await,
        Code::InvalidArgument,
        "destroy without a reason",
    );
    let mut auditor = v.keys(AUDITOR).await;
    assert_code(
        destroy(&mut auditor, old.id, "auditors may not").await,
        Code::PermissionDenied,
        "auditor destroys",
    );
    let mut checkout_keys = v.keys(ACME_CHECKOUT).await;
    assert_code(
        destroy(&mut checkout_keys, old.id, "checkout may not").await,
        Code::PermissionDenied,
        "checkout destroys",
    );

    // Nothing changed.
    let st = key_status(&mut admin).await;
    assert_eq!(key_by_id(&st, old.id).state(), DataKeyState::DecryptOnly);
    assert_eq!(key_by_id(&st, old.id).tokens, 10);
    assert_eq!(key_by_id(&st, new.id).state(), DataKeyState::Active);
    assert_all_detokenize(&payments, &made, PURPOSE).await;

    let audit = key_audit(&v.db_path());
    let rows = with_action(&audit, "dek_destroy");
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r.outcome != "success"), "{rows:?}");
    let got: Vec<(&str, &str, Option<u32>)> = rows
        .iter()
        .map(|r| (r.actor.as_str(), r.outcome.as_str(), r.key_id))
        .collect();
    assert_eq!(
        got,
        vec![
            (identity(ADMIN), "failed_precondition", Some(old.id)),
            (identity(ADMIN), "failed_precondition", Some(new.id)),
            (identity(ADMIN), "invalid_argument", Some(old.id)),
            (identity(AUDITOR), "denied", Some(old.id)),
            (identity(ACME_CHECKOUT), "denied", Some(old.id)),
        ]
    );
    assert_eq!(
        rows[0].reason.as_deref(),
        Some("try to drop a referenced key")
    );
    drop((checkout, payments, admin, auditor, checkout_keys));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 6 (and 10). Crypto-shredding under dual control.

#[tokio::test(flavor = "multi_thread")]
async fn tenant_shred_needs_a_second_admin_and_erases_the_wrapped_keys() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let globex_checkout = v.client(GLOBEX_CHECKOUT).await;
    let globex_payments = v.client(GLOBEX_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;
    let mut admin2 = v.keys(ADMIN_2).await;

    let mut acme = tokenize_many(&checkout, 10_000_000, 10).await;
    rotate(&mut admin, "acme", "rotate before shredding").await;
    acme.extend(tokenize_many(&checkout, 11_000_000, 5).await);
    let globex = tokenize_many(&globex_checkout, 12_000_000, 10).await;

    let db = v.db_path();
    let acme_wrapped = wrapped_deks(&db, "acme");
    let globex_wrapped = wrapped_deks(&db, "globex");
    assert_eq!(acme_wrapped.len(), 2);
    assert_eq!(globex_wrapped.len(), 1);
    // The scan finds them while they exist, so its "absent" means something.
    for (id, w) in acme_wrapped.iter().chain(&globex_wrapped) {
        assert!(
            !on_disk(&db, w).is_empty(),
            "wrapped key {id} not found on disk before the shred"
        );
    }

    let req = call(admin.request_tenant_shred(RequestTenantShredRequest {
        tenant: "acme".into(),
        reason: "customer contract ended".into(),
    }))
    .await
    .unwrap();
    assert_eq!(req.tenant, "acme");
    assert_eq!(req.requested_by, identity(ADMIN));
    // The request alone destroys nothing.
    assert_all_detokenize(&payments, &acme[..3], PURPOSE).await;

    let s = assert_code(
        call(admin.approve_tenant_shred(ApproveTenantShredRequest {
            request_id: req.request_id,
            reason: "approving my own request".into(),
        }))
        .await,
        Code::PermissionDenied,
        "requester approves",
    );
    assert!(s.message().contains("different"), "{:?}", s.message());
    assert_code(
        call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
            request_id: req.request_id ^ 1,
            reason: "wrong id".into(),
        }))
        .await,
        Code::NotFound,
        "approve an unknown request",
    );
    let mut auditor = v.keys(AUDITOR).await;
    assert_code(
        call(auditor.approve_tenant_shred(ApproveTenantShredRequest {
            request_id: req.request_id,
            reason: "auditors may not".into(),
        }))
        .await,
        Code::PermissionDenied,
        "auditor approves",
    );

    let approved = call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
        request_id: req.request_id,
        reason: "second admin approves".into(),
    }))
    .await
    .unwrap();
    let mut ids = approved.data_key_ids.clone();
    ids.sort_unstable();
    let mut want: Vec<u32> = acme_wrapped.iter().map(|(id, _)| *id).collect();
    want.sort_unstable();
    assert_eq!(ids, want);

    // Acme's tokens are gone for good; globex is untouched.
    let failures = detokenize_failures(&payments, &acme, PURPOSE).await;
    assert_eq!(failures.len(), acme.len(), "{failures:?}");
    // Each for the reason that matters, not any error at all.
    assert!(
        failures
            .iter()
            .all(|f| f.contains("FailedPrecondition") && f.contains("destroyed")),
        "{failures:?}"
    );
    let mut p = payments.clone();
    let s = assert_code(
        detokenize(&mut p, &acme[0].0).await,
        Code::FailedPrecondition,
        "detokenize after shred",
    );
    assert!(s.message().contains("destroyed"), "{:?}", s.message());
    assert_all_detokenize(&globex_payments, &globex, PURPOSE).await;
    let st = key_status(&mut admin).await;
    for d in keys_of(&st, "acme") {
        assert_eq!(d.state(), DataKeyState::Destroyed, "{d:?}");
    }
    assert_eq!(keys_of(&st, "globex")[0].state(), DataKeyState::Active);
    assert_code(
        call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
            request_id: req.request_id,
            reason: "approve twice".into(),
        }))
        .await,
        Code::NotFound,
        "approve a finished request",
    );

    // Raw scan while running: the writer has handled later requests, so the
    // WAL checkpoint that follows the shred is done.
    for (id, w) in &acme_wrapped {
        let found = on_disk(&db, w);
        assert!(
            found.is_empty(),
            "wrapped form of shredded key {id} still on disk in {found:?}"
        );
    }
    for (id, w) in &globex_wrapped {
        assert!(!on_disk(&db, w).is_empty(), "globex key {id} vanished");
    }

    let audit = key_audit(&db);
    let shreds = with_action(&audit, "tenant_shred");
    let done: Vec<_> = shreds.iter().filter(|r| r.outcome == "success").collect();
    assert_eq!(done.len(), 1, "{shreds:?}");
    assert_eq!(done[0].actor, identity(ADMIN));
    assert_eq!(done[0].approvers.as_deref(), Some(identity(ADMIN_2)));
    assert_eq!(done[0].reason.as_deref(), Some("customer contract ended"));
    assert_eq!(done[0].tenant.as_deref(), Some("acme"));
    assert!(
        shreds
            .iter()
            .any(|r| r.actor == identity(ADMIN) && r.outcome == "denied"),
        "self-approval not audited: {shreds:?}"
    );
    let asked = with_action(&audit, "shred_request");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].actor, identity(ADMIN));
    assert_eq!(asked[0].reason.as_deref(), Some("customer contract ended"));
    assert!(
        asked[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains(&req.request_id.to_string()))
    );

    drop((
        checkout,
        payments,
        globex_checkout,
        globex_payments,
        admin,
        admin2,
        auditor,
        p,
    ));
    let dir = v.stop().await;
    let db = dir.path().join("vault.db");
    for (id, w) in &acme_wrapped {
        let found = on_disk(&db, w);
        assert!(
            found.is_empty(),
            "after stop, wrapped form of shredded key {id} still in {found:?}"
        );
    }
    for (_, w) in &globex_wrapped {
        assert!(!on_disk(&db, w).is_empty());
    }
}

// ---------------------------------------------------------------------------
// 7. Split knowledge: sealed start, unseal by distinct custodians, seal.

/// A fresh data directory for a 2-of-3 Shamir vault (no database yet),
/// its new KEK and the KEK's id, and the three custodians' shares as text.
fn shamir_2_of_3() -> (tempfile::TempDir, KeyBytes, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    tokenvault::devpki::ensure_dev_dir(dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
    set_kek_config(dir.path(), SHAMIR_2_OF_3);
    for f in ["vault.db", "vault.db-wal", "vault.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let key = KeyBytes::generate().unwrap();
    let kek_id = LocalKek::from_key(&key).id().to_owned();
    let texts: Vec<String> = split(&key, &kek_id, 2, 3)
        .unwrap()
        .iter()
        .map(|s| s.to_text().to_string())
        .collect();
    (dir, key, kek_id, texts)
}

/// A share whose submission cannot be put on record is withdrawn: it never
/// counts toward the threshold, so no unseal rests on an unrecorded share.
#[tokio::test(flavor = "multi_thread")]
async fn a_share_whose_audit_record_cannot_be_written_never_counts() {
    let (dir, _, _, texts) = shamir_2_of_3();
    let v = TestVault::start_in(dir).await;
    let mut c1 = v.keys(CUSTODIANS[0]).await;
    let mut c2 = v.keys(CUSTODIANS[1]).await;

    let db = rusqlite::Connection::open(v.db_path()).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_share BEFORE INSERT ON audit \
         WHEN NEW.action = 'unseal_share' \
         BEGIN SELECT RAISE(ABORT, 'audit refused'); END;",
    )
    .unwrap();
    assert_code(
        unseal(&mut c1, &texts[0]).await,
        Code::Unavailable,
        "a share submitted with no audit record",
    );
    db.execute_batch("DROP TRIGGER refuse_share;").unwrap();
    drop(db);
    let st = unseal(&mut c2, &texts[1]).await.unwrap();
    assert!(st.sealed, "the unrecorded share counted");
    assert_eq!(st.submitted, 1, "{st:?}");
    let st = unseal(&mut c1, &texts[0]).await.unwrap();
    assert!(!st.sealed, "{st:?}");
    drop((c1, c2));
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shamir_vault_starts_sealed_and_needs_distinct_custodians_to_unseal() {
    let (dir, key, kek_id, texts) = shamir_2_of_3();

    let v = TestVault::start_in(dir).await;
    let mut c1 = v.keys(CUSTODIANS[0]).await;
    let mut c2 = v.keys(CUSTODIANS[1]).await;
    let mut c3 = v.keys(CUSTODIANS[2]).await;
    let mut admin = v.keys(ADMIN).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;

    let st = seal_status(&mut c1).await;
    assert!(st.sealed);
    assert_eq!(st.submitted, 0);
    assert!(key_status(&mut admin).await.sealed);
    let s = assert_code(
        tokenize(&mut checkout, &visa_pan(13_000_000, 0)).await,
        Code::Unavailable,
        "tokenize while sealed",
    );
    assert_eq!(s.message(), "vault is sealed");
    wait_health(&v, ServingStatus::NotServing).await;

    // Only custodians (and admins) may unseal; an admin cannot reload a
    // split KEK.
    let mut checkout_keys = v.keys(ACME_CHECKOUT).await;
    assert_code(
        unseal(&mut checkout_keys, &texts[0]).await,
        Code::PermissionDenied,
        "checkout unseals",
    );
    assert_code(
        unseal(&mut admin, "").await,
        Code::FailedPrecondition,
        "admin reload of a split KEK",
    );

    let st = unseal(&mut c1, &texts[0]).await.unwrap();
    assert!(st.sealed);
    assert_eq!((st.submitted, st.threshold), (1, 2));
    // The same custodian again, with the same or another share: still one.
    let st = unseal(&mut c1, &texts[0]).await.unwrap();
    assert!(st.sealed);
    assert_eq!(st.submitted, 1);
    let st = unseal(&mut c1, &texts[1]).await.unwrap();
    assert!(st.sealed, "one custodian unsealed alone with two shares");
    assert_eq!(st.submitted, 1);
    // A corrupted share is refused outright.
    let mut bad = texts[2].clone();
    let at = bad.find("data: ").unwrap() + 10;
    let flipped = if &bad[at..=at] == "A" { "B" } else { "A" };
    bad.replace_range(at..=at, flipped);
    assert_code(
        unseal(&mut c1, &bad).await,
        Code::InvalidArgument,
        "corrupted share",
    );
    // A second custodian with a copy of the same share adds no knowledge.
    let st = unseal(&mut c2, &texts[1]).await.unwrap();
    assert!(st.sealed, "two copies of one share unsealed the vault");
    assert!(seal_status(&mut c3).await.sealed);
    // A second, different share from a second custodian unseals.
    let st = unseal(&mut c2, &texts[2]).await.unwrap();
    assert!(!st.sealed, "{st:?}");
    assert_eq!(st.kek_id, kek_id);
    wait_health(&v, ServingStatus::Serving).await;
    let made = tokenize_many(&checkout, 13_000_000, 10).await;
    assert_all_detokenize(&payments, &made, PURPOSE).await;
    assert_code(
        unseal(&mut c3, &texts[0]).await,
        Code::FailedPrecondition,
        "unseal an unsealed vault",
    );

    // Sealing drops the keys.
    let st = seal(&mut admin, "end of business day").await.unwrap();
    assert!(st.sealed);
    assert_code(
        tokenize(&mut checkout, &visa_pan(13_000_000, 99)).await,
        Code::Unavailable,
        "tokenize after seal",
    );
    let mut p = payments.clone();
    assert_code(
        detokenize(&mut p, &made[0].0).await,
        Code::Unavailable,
        "detokenize after seal",
    );
    wait_health(&v, ServingStatus::NotServing).await;
    assert_code(
        seal(&mut c1, "custodians may not seal").await,
        Code::PermissionDenied,
        "custodian seals",
    );
    // Any other two of the three shares.
    assert!(unseal(&mut c2, &texts[1]).await.unwrap().sealed);
    assert!(!unseal(&mut c3, &texts[2]).await.unwrap().sealed);
    wait_health(&v, ServingStatus::Serving).await;
    assert_all_detokenize(&payments, &made, PURPOSE).await;

    // Shares of another KEK, or of another split, are refused.
    seal(&mut admin, "key ceremony checks").await.unwrap();
    let other = KeyBytes::generate().unwrap();
    let other_id = LocalKek::from_key(&other).id().to_owned();
    let foreign = split(&other, &other_id, 2, 3).unwrap();
    let s = assert_code(
        unseal(&mut c1, &foreign[0].to_text()).await,
        Code::InvalidArgument,
        "share of a different KEK",
    );
    assert!(s.message().contains("different KEK"), "{:?}", s.message());
    let resplit = split(&key, &kek_id, 2, 3).unwrap();
    assert!(unseal(&mut c1, &texts[0]).await.unwrap().sealed);
    let s = assert_code(
        unseal(&mut c2, &resplit[1].to_text()).await,
        Code::InvalidArgument,
        "share of another split of the same KEK",
    );
    assert!(s.message().contains("share set"), "{:?}", s.message());
    assert!(seal_status(&mut c2).await.sealed);

    // A restart starts sealed, with nothing submitted.
    drop((c1, c2, c3, admin, checkout, payments, checkout_keys, p));
    let dir = v.stop().await;
    let v = TestVault::start_in(dir).await;
    let mut c1 = v.keys(CUSTODIANS[0]).await;
    let mut c3 = v.keys(CUSTODIANS[2]).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let st = seal_status(&mut c3).await;
    assert!(st.sealed);
    assert_eq!(st.submitted, 0);
    assert_eq!(st.kek_id, kek_id, "the pinned KEK is reported while sealed");
    assert_code(
        tokenize(&mut checkout, &visa_pan(13_000_000, 98)).await,
        Code::Unavailable,
        "tokenize after restart",
    );
    assert!(unseal(&mut c3, &texts[2]).await.unwrap().sealed);
    assert!(!unseal(&mut c1, &texts[0]).await.unwrap().sealed);
    assert_all_detokenize(&payments, &made, PURPOSE).await;
    tokenize(&mut checkout, &visa_pan(13_000_000, 97))
        .await
        .unwrap();

    // 10. Audit of the ceremony.
    let audit = key_audit(&v.db_path());
    let shares = with_action(&audit, "unseal_share");
    assert!(
        shares
            .iter()
            .filter(|r| r.outcome == "success" && r.actor == identity(CUSTODIANS[0]))
            .count()
            >= 4,
        "{shares:?}"
    );
    assert!(
        shares
            .iter()
            .any(|r| r.outcome == "invalid_argument" && r.actor == identity(CUSTODIANS[0])),
        "the corrupted share was not audited"
    );
    assert!(
        shares
            .iter()
            .any(|r| r.outcome == "denied" && r.actor == identity(ACME_CHECKOUT)),
        "the checkout's attempt was not audited"
    );
    let unseals: Vec<_> = with_action(&audit, "unseal")
        .into_iter()
        .filter(|r| r.outcome == "success")
        .collect();
    assert_eq!(unseals.len(), 3, "{unseals:?}");
    assert_eq!(unseals[0].actor, identity(CUSTODIANS[1]));
    assert_eq!(unseals[2].actor, identity(CUSTODIANS[0]));
    let seals: Vec<_> = with_action(&audit, "seal")
        .into_iter()
        .filter(|r| r.outcome == "success")
        .collect();
    assert_eq!(seals.len(), 2, "{seals:?}");
    assert_eq!(seals[0].actor, identity(ADMIN));
    assert_eq!(seals[0].reason.as_deref(), Some("end of business day"));
    assert_eq!(with_action(&audit, "kek_init").len(), 1);

    drop((c1, c3, checkout, payments));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// 8. KEK rotation to a key file.

#[tokio::test(flavor = "multi_thread")]
async fn kek_rotation_to_a_file_rewraps_every_key_and_retires_the_old_kek() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let globex_checkout = v.client(GLOBEX_CHECKOUT).await;
    let globex_payments = v.client(GLOBEX_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let mut acme = tokenize_many(&checkout, 14_000_000, 20).await;
    rotate(&mut admin, "acme", "rotate before the KEK").await;
    acme.extend(tokenize_many(&checkout, 15_000_000, 5).await);
    let globex = tokenize_many(&globex_checkout, 16_000_000, 5).await;

    let old_text = std::fs::read_to_string(v.dir.path().join("kek.b64")).unwrap();
    let old_id = LocalKek::from_base64(&old_text).unwrap().id().to_owned();
    assert_eq!(key_status(&mut admin).await.kek_id, old_id);

    // A vault whose KEK is a file: an admin seals it and reloads the key;
    // a custodian cannot, having no share to give.
    let mut custodian = v.keys(CUSTODIANS[0]).await;
    assert!(seal(&mut admin, "maintenance").await.unwrap().sealed);
    let mut c = checkout.clone();
    assert_code(
        tokenize(&mut c, &visa_pan(14_000_000, 999)).await,
        Code::Unavailable,
        "tokenize while sealed",
    );
    // An empty share from a custodian is a malformed submission, not a
    // request to reload the KEK.
    let s = assert_code(
        unseal(&mut custodian, "").await,
        Code::InvalidArgument,
        "custodian sends no share",
    );
    assert_eq!(s.message(), "share is empty");
    let mut checkout_keys = v.keys(ACME_CHECKOUT).await;
    assert_code(
        unseal(&mut checkout_keys, "").await,
        Code::PermissionDenied,
        "checkout asks for a reload",
    );
    let rows = key_audit(&v.db_path());
    let empty = with_action(&rows, "unseal_share");
    assert!(
        empty.iter().any(|r| r.actor == identity(CUSTODIANS[0])
            && r.outcome == "invalid_argument"
            && r.detail.as_deref() == Some("share is empty")),
        "{empty:?}"
    );
    let st = unseal(&mut admin, "").await.unwrap();
    assert!(!st.sealed, "{st:?}");
    assert_eq!(st.kek_id, old_id);
    assert_all_detokenize(&payments, &acme, PURPOSE).await;
    drop((custodian, c, checkout_keys));

    let new_path = v.dir.path().join("kek-2.b64");
    let new_kek = LocalKek::generate_file(&new_path).unwrap();
    #[cfg(unix)]
    assert_eq!(mode(&new_path), 0o600);
    let target = || Some(Target::FilePath(new_path.display().to_string()));

    // Refusals first.
    assert_code(
        rotate_kek_dual(
            &v,
            RotateKekRequest {
                reason: String::new(),
                target: target(),
            },
        )
        .await,
        Code::InvalidArgument,
        "KEK rotation without a reason",
    );
    let mut auditor = v.keys(AUDITOR).await;
    assert_code(
        call(auditor.request_kek_rotation(RotateKekRequest {
            reason: "auditors may not".into(),
            target: target(),
        }))
        .await,
        Code::PermissionDenied,
        "auditor rotates the KEK",
    );
    assert_code(
        rotate_kek_dual(
            &v,
            RotateKekRequest {
                reason: "missing file".into(),
                target: Some(Target::FilePath(
                    v.dir.path().join("nope.b64").display().to_string(),
                )),
            },
        )
        .await,
        Code::FailedPrecondition,
        "KEK rotation to a missing file",
    );

    let r = rotate_kek_dual(
        &v,
        RotateKekRequest {
            reason: "yearly KEK rotation".into(),
            target: target(),
        },
    )
    .await
    .unwrap();
    assert_eq!(r.kek_id, new_kek.id());
    assert!(r.share_files.is_empty());
    assert_code(
        rotate_kek_dual(
            &v,
            RotateKekRequest {
                reason: "same again".into(),
                target: target(),
            },
        )
        .await,
        Code::FailedPrecondition,
        "rotation to the current KEK",
    );

    assert_all_detokenize(&payments, &acme, PURPOSE).await;
    assert_all_detokenize(&globex_payments, &globex, PURPOSE).await;
    acme.extend(tokenize_many(&checkout, 17_000_000, 5).await);
    let s = key_status(&mut admin).await;
    assert_eq!(s.kek_id, new_kek.id());
    assert_eq!(s.data_keys.len(), 3, "{s:?}");
    for d in &s.data_keys {
        if d.state() != DataKeyState::Destroyed {
            assert_eq!(d.kek_id, new_kek.id(), "{d:?}");
        }
    }
    let audit = key_audit(&v.db_path());
    let rot: Vec<_> = with_action(&audit, "kek_rotate");
    let ok: Vec<_> = rot.iter().filter(|r| r.outcome == "success").collect();
    assert_eq!(ok.len(), 1, "{rot:?}");
    assert_eq!(ok[0].actor, identity(ADMIN));
    assert_eq!(ok[0].reason.as_deref(), Some("yearly KEK rotation"));
    let detail = ok[0].detail.clone().unwrap_or_default();
    assert!(
        detail.contains(&old_id) && detail.contains(new_kek.id()),
        "{detail}"
    );
    // Refused requests are audited as kek_rotate_request, refused or failed
    // approvals as kek_rotate.
    let requests = with_action(&audit, "kek_rotate_request");
    let refused_requests = requests.iter().filter(|r| r.outcome != "success").count();
    assert_eq!(
        rot.len() + refused_requests,
        5,
        "every refusal is audited too: {rot:?} {requests:?}"
    );

    // Restart on the new KEK alone: the old key file is deleted.
    drop((
        checkout,
        payments,
        globex_checkout,
        globex_payments,
        admin,
        auditor,
    ));
    let dir = v.stop().await;
    set_kek_config(
        dir.path(),
        &format!("[kek]\nfile = \"{}\"\n", new_path.display()),
    );
    std::fs::remove_file(dir.path().join("kek.b64")).unwrap();
    let v = TestVault::start_in(dir).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let globex_payments = v.client(GLOBEX_PAYMENTS).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    assert_all_detokenize(&payments, &acme, PURPOSE).await;
    assert_all_detokenize(&globex_payments, &globex, PURPOSE).await;
    tokenize(&mut checkout, &visa_pan(17_000_000, 99))
        .await
        .unwrap();
    assert_eq!(
        key_status(&mut v.keys(AUDITOR).await).await.kek_id,
        new_kek.id()
    );
    drop((payments, globex_payments, checkout));
    let dir = v.stop().await;

    // The old KEK is refused from now on.
    match TestVault::try_start_in(dir, &[("VAULT_KEK", old_text.trim())]).await {
        Ok(_) => panic!("the vault started with the retired KEK"),
        Err((_dir, e)) => {
            let m = e.to_string();
            assert!(
                matches!(e, StartError::Open(OpenError::KekMismatch { .. })),
                "{e:?}"
            );
            assert!(m.contains("KEK") && m.contains(&old_id), "{m}");
        }
    }
}

// ---------------------------------------------------------------------------
// 9. KEK rotation to a new Shamir share set.

#[tokio::test(flavor = "multi_thread")]
async fn kek_rotation_to_a_share_set_writes_private_share_files_that_unseal() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;

    let mut made = tokenize_many(&checkout, 18_000_000, 20).await;
    rotate(&mut admin, "acme", "rotate before the KEK").await;
    made.extend(tokenize_many(&checkout, 19_000_000, 5).await);

    let out = v.dir.path().join("custody");
    std::fs::create_dir(&out).unwrap();
    let r = rotate_kek_dual(
        &v,
        RotateKekRequest {
            reason: "move to split knowledge".into(),
            target: Some(Target::Shamir(ShamirTarget {
                out_dir: out.display().to_string(),
                shares: 3,
                threshold: 2,
            })),
        },
    )
    .await
    .unwrap();
    assert_eq!(r.share_files.len(), 3, "{r:?}");
    let mut texts = Vec::new();
    for (i, f) in r.share_files.iter().enumerate() {
        let p = Path::new(f);
        assert!(p.starts_with(&out), "{f}");
        #[cfg(unix)]
        assert_eq!(mode(p), 0o600, "{f}");
        let text = std::fs::read_to_string(p).unwrap();
        let share = Share::parse(&text).unwrap();
        assert_eq!(share.kek_id(), r.kek_id);
        assert_eq!(share.index(), u8::try_from(i + 1).unwrap());
        assert_eq!((share.threshold(), share.total()), (2, 3));
        texts.push(text);
    }
    assert_all_detokenize(&payments, &made, PURPOSE).await;
    assert_eq!(key_status(&mut admin).await.kek_id, r.kek_id);

    drop((checkout, payments, admin));
    let dir = v.stop().await;
    set_kek_config(dir.path(), SHAMIR_2_OF_3);
    let v = TestVault::start_in(dir).await;
    let mut c1 = v.keys(CUSTODIANS[0]).await;
    let mut c2 = v.keys(CUSTODIANS[1]).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let st = seal_status(&mut c1).await;
    assert!(st.sealed);
    assert_eq!(st.kek_id, r.kek_id);
    assert_code(
        tokenize(&mut checkout, &visa_pan(19_000_000, 99)).await,
        Code::Unavailable,
        "tokenize while sealed",
    );
    assert!(unseal(&mut c1, &texts[0]).await.unwrap().sealed);
    let st = unseal(&mut c2, &texts[2]).await.unwrap();
    assert!(!st.sealed, "{st:?}");
    assert_all_detokenize(&payments, &made, PURPOSE).await;
    tokenize(&mut checkout, &visa_pan(19_000_000, 98))
        .await
        .unwrap();

    let audit = key_audit(&v.db_path());
    let rot = with_action(&audit, "kek_rotate");
    assert_eq!(rot.len(), 1, "{rot:?}");
    assert_eq!(rot[0].outcome, "success");
    assert_eq!(rot[0].reason.as_deref(), Some("move to split knowledge"));
    drop((c1, c2, payments, checkout));
    v.stop().await;
}

// ---------------------------------------------------------------------------
// Defects found while writing these tests. Each test states the documented
// behaviour; see the report for the cause and a suggested fix.

/// One shred request is one approval: approvals racing on the same request
/// must not each destroy the tenant's keys (a later one would also destroy a
/// key created between them).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_approvals_of_one_shred_request_take_effect_once() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let mut admin = v.keys(ADMIN).await;
    tokenize_many(&checkout, 20_000_000, 3).await;
    let req = call(admin.request_tenant_shred(RequestTenantShredRequest {
        tenant: "acme".into(),
        reason: "contract ended".into(),
    }))
    .await
    .unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut approver = v.keys(ADMIN_2).await;
        let barrier = barrier.clone();
        let id = req.request_id;
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            call(approver.approve_tenant_shred(ApproveTenantShredRequest {
                request_id: id,
                reason: "approved".into(),
            }))
            .await
            .map(|r| r.data_key_ids)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(ids) => ok.push(ids),
            Err(s) => assert_eq!(s.code(), Code::NotFound, "{s:?}"),
        }
    }
    let audit = key_audit(&v.db_path());
    let executed = with_action(&audit, "tenant_shred")
        .into_iter()
        .filter(|r| r.outcome == "success")
        .count();
    assert_eq!(
        (ok.len(), executed),
        (1, 1),
        "one shred request was approved and executed {} times: {ok:?}",
        ok.len()
    );
    drop((checkout, admin));
    v.stop().await;
}

/// Sealing while a re-encryption job runs must pause it ("keys are gone
/// until unseal; resume_jobs restarts us then"), not fail it for good.
#[tokio::test(flavor = "multi_thread")]
async fn sealing_pauses_a_running_reencryption_job_instead_of_failing_it() {
    let dir = tempfile::tempdir().unwrap();
    // Big batches and no pause: the job spends its time working, so the
    // seal lands inside a batch.
    append_config(
        dir.path(),
        "[keys]\nreencrypt_batch = 2000\nreencrypt_pause_ms = 0\n",
    );
    let v = TestVault::start_in(dir).await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;
    let made = tokenize_many(&checkout, 21_000_000, 4_000).await;

    // Rounds whose seal found the job part-way (the case under test; a
    // seal after the job ended proves nothing).
    let mut mid_job = 0;
    for (round, delay_ms) in [10u64, 30, 60].into_iter().enumerate() {
        rotate(&mut admin, "acme", &format!("round {round}")).await;
        let job = start_job(&mut admin, "acme").await;
        assert_eq!(job.total, 4_000);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        assert!(seal(&mut admin, "seal mid-job").await.unwrap().sealed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sealed = call(admin.get_job(GetJobRequest { job_id: job.job_id }))
            .await
            .unwrap();
        if sealed.state() == JobState::Running && sealed.done < sealed.total {
            mid_job += 1;
        }
        assert!(!unseal(&mut admin, "").await.unwrap().sealed);
        let end = wait_job(&mut admin, job.job_id, Duration::from_secs(30)).await;
        assert_eq!(
            end.state(),
            JobState::Completed,
            "round {round}: sealing {delay_ms} ms into the job ended it: {end:?}"
        );
        assert_eq!(end.done, end.total, "{end:?}");
    }
    assert!(mid_job > 0, "no seal landed while the job was running");
    assert_all_detokenize(&payments, &made[..200], PURPOSE).await;
    drop((checkout, payments, admin));
    v.stop().await;
}

/// `[kek.shamir] threshold` is documented as the number of custodians whose
/// shares open the vault; with 3 configured, two custodians must not unseal
/// it, whatever threshold the share files claim.
#[tokio::test(flavor = "multi_thread")]
async fn shamir_unseal_needs_the_configured_threshold_of_custodians() {
    let dir = tempfile::tempdir().unwrap();
    tokenvault::devpki::ensure_dev_dir(dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
    set_kek_config(
        dir.path(),
        "[kek]\nsource = \"shamir\"\n\n[kek.shamir]\nthreshold = 3\n",
    );
    let key = KeyBytes::generate().unwrap();
    let kek_id = LocalKek::from_key(&key).id().to_owned();
    let shares = split(&key, &kek_id, 2, 3).unwrap();
    let v = TestVault::start_in(dir).await;
    let mut c1 = v.keys(CUSTODIANS[0]).await;
    let mut c2 = v.keys(CUSTODIANS[1]).await;
    // Refusing the mismatched shares or waiting for a third custodian would
    // both be correct; opening is not.
    for (c, share) in [(&mut c1, &shares[0]), (&mut c2, &shares[1])] {
        match unseal(c, &share.to_text()).await {
            Ok(st) => assert!(st.sealed, "{st:?}"),
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        }
    }
    let st = seal_status(&mut c1).await;
    assert!(
        st.sealed,
        "2 custodians unsealed a vault configured for a threshold of 3: {st:?}"
    );
    drop((c1, c2));
    v.stop().await;
}

/// KEK rotation through dual control: the requester, then a different
/// administrator.
async fn rotate_kek_dual(
    v: &TestVault,
    req: RotateKekRequest,
) -> Result<RotateKekResponse, tonic::Status> {
    let mut admin = v.keys(ADMIN).await;
    let pending = admin.request_kek_rotation(req).await?.into_inner();
    let mut admin2 = v.keys(ADMIN_2).await;
    Ok(admin2
        .approve_kek_rotation(ApproveKekRotationRequest {
            request_id: pending.request_id,
            reason: "second administrator approves".into(),
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn kek_rotation_needs_a_second_administrator() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let payments = v.client(ACME_PAYMENTS).await;
    let made = tokenize_many(&checkout, 21_000_000, 5).await;
    let mut admin = v.keys(ADMIN).await;
    let before = key_status(&mut admin).await.kek_id;
    let path = v.dir.path().join("kek-dual.b64");
    let new_kek = LocalKek::generate_file(&path).unwrap();
    let pending = admin
        .request_kek_rotation(RotateKekRequest {
            reason: "yearly".into(),
            target: Some(Target::FilePath(path.display().to_string())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pending.description.contains("kek-dual.b64"), "{pending:?}");
    // Nothing changed yet.
    assert_eq!(key_status(&mut admin).await.kek_id, before);
    // The requester cannot approve their own request.
    let own = admin
        .approve_kek_rotation(ApproveKekRotationRequest {
            request_id: pending.request_id,
            reason: "self".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied, "{own:?}");
    assert_eq!(key_status(&mut admin).await.kek_id, before);
    // Concurrent approvals by the second admin take effect once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut a2 = v.keys(ADMIN_2).await;
        let id = pending.request_id;
        tasks.push(tokio::spawn(async move {
            a2.approve_kek_rotation(ApproveKekRotationRequest {
                request_id: id,
                reason: "approved".into(),
            })
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1, "exactly one approval takes effect");
    assert_eq!(key_status(&mut admin).await.kek_id, new_kek.id());
    assert_all_detokenize(&payments, &made, PURPOSE).await;
    let rows = audit_rows(&v.db_path());
    assert!(
        rows.iter()
            .any(|r| r.action == "kek_rotate_request" && r.outcome == "success")
    );
    let done: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "kek_rotate" && r.outcome == "success")
        .collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].actor, identity(ADMIN));
    assert!(
        rows.iter().any(|r| r.action == "kek_rotate"
            && r.outcome == "denied"
            && r.actor == identity(ADMIN))
    );
}

/// Free text a caller sends with a key lifecycle request (reason, tenant,
/// KEK target, audit filter) lands in the append-only audit log only once
/// it passes its checks: refused text, e.g. a pasted card number, is never
/// stored, on any path, and never echoed in the answer.
#[tokio::test(flavor = "multi_thread")]
async fn rejected_free_text_never_reaches_the_audit_table() {
    use tokenvault::proto::ListEventsRequest;
    use tokenvault::proto::audit_service_client::AuditServiceClient;
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    tokenize_many(&checkout, 40_000_000, 2).await;
    let mut admin = v.keys(ADMIN).await;
    let mut admin2 = v.keys(ADMIN_2).await;
    let card = "4111 1111 1111 1111";
    let dotted = "4111.1111.1111.1111";
    let bad = format!("customer card {card}");
    let ok = "a valid reason";
    let pending = call(admin.request_tenant_shred(RequestTenantShredRequest {
        tenant: "acme".into(),
        reason: "contract ended".into(),
    }))
    .await
    .unwrap();
    let kek_path = v.dir.path().join("kek-next.b64");
    LocalKek::generate_file(&kek_path).unwrap();
    let kek_req = call(admin.request_kek_rotation(RotateKekRequest {
        reason: "yearly".into(),
        target: Some(Target::FilePath(kek_path.display().to_string())),
    }))
    .await
    .unwrap();

    let mut answers: Vec<(&str, Result<(), Status>)> = vec![
        (
            "rotate: reason",
            call(admin.rotate_data_key(RotateDataKeyRequest {
                tenant: "acme".into(),
                reason: bad.clone(),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "rotate: tenant",
            call(admin.rotate_data_key(RotateDataKeyRequest {
                tenant: card.into(),
                reason: ok.into(),
            }))
            .await
            .map(|_| ()),
        ),
        ("destroy: reason", destroy(&mut admin, 1, &bad).await),
        (
            "shred request: tenant",
            call(admin.request_tenant_shred(RequestTenantShredRequest {
                tenant: dotted.into(),
                reason: ok.into(),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "shred request: reason",
            call(admin.request_tenant_shred(RequestTenantShredRequest {
                tenant: "acme".into(),
                reason: format!("card {dotted}"),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "shred approval: reason",
            call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
                request_id: pending.request_id,
                reason: bad.clone(),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "re-encryption: tenant",
            call(admin.start_reencryption(StartReencryptionRequest {
                tenant: card.into(),
                reason: ok.into(),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "re-encryption: reason",
            call(admin.start_reencryption(StartReencryptionRequest {
                tenant: "acme".into(),
                reason: bad.clone(),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "KEK request: target",
            call(admin.request_kek_rotation(RotateKekRequest {
                reason: ok.into(),
                target: Some(Target::FilePath(format!("/keys/{dotted}.b64"))),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "KEK request: reason",
            call(admin.request_kek_rotation(RotateKekRequest {
                reason: bad.clone(),
                target: Some(Target::FilePath(kek_path.display().to_string())),
            }))
            .await
            .map(|_| ()),
        ),
        (
            "KEK approval: reason",
            call(admin2.approve_kek_rotation(ApproveKekRotationRequest {
                request_id: kek_req.request_id,
                reason: bad.clone(),
            }))
            .await
            .map(|_| ()),
        ),
        ("seal: reason", seal(&mut admin, &bad).await.map(|_| ())),
    ];
    let mut auditor = AuditServiceClient::new(channel(&v.url(), &v.pki(AUDITOR)).await.unwrap());
    for (what, filter) in [
        (
            "list: actor",
            ListEventsRequest {
                actor: bad.clone(),
                ..Default::default()
            },
        ),
        (
            "list: tenant",
            ListEventsRequest {
                tenant: card.into(),
                ..Default::default()
            },
        ),
        (
            "list: outcome",
            ListEventsRequest {
                outcome: dotted.into(),
                ..Default::default()
            },
        ),
    ] {
        answers.push((what, call(auditor.list_events(filter)).await.map(|_| ())));
    }
    for (what, res) in &answers {
        let s = res.as_ref().expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(!s.message().contains("1111"), "{what}: {s:?}");
    }

    // Nothing was changed, and nothing of the refused text was stored.
    assert!(!seal_status(&mut admin).await.sealed);
    for needle in ["1111 1111", "1111.1111", "4111111111111111"] {
        let found = on_disk(&v.db_path(), needle.as_bytes());
        assert!(found.is_empty(), "{needle:?} stored in {found:?}");
    }
    let rows = key_audit(&v.db_path());
    let refused: Vec<_> = rows
        .iter()
        .filter(|r| r.outcome == "invalid_argument")
        .collect();
    assert_eq!(refused.len(), answers.len(), "{refused:#?}");
    assert!(
        refused
            .iter()
            .any(|r| r.action == "dek_rotate" && r.reason.as_deref() == Some("(rejected)")),
        "{refused:#?}"
    );
    // The requests refused for a bad approval reason are still pending.
    call(admin2.approve_tenant_shred(ApproveTenantShredRequest {
        request_id: pending.request_id,
        reason: "second admin approves".into(),
    }))
    .await
    .unwrap();
    drop((checkout, admin, admin2, auditor));
    v.stop().await;
}

/// A sealed vault answers every data call UNAVAILABLE, metadata reads and
/// deletions included, and audits each refusal.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_and_delete_answer_unavailable_while_sealed() {
    use tokenvault::proto::{DeleteTokenRequest, GetTokenMetadataRequest};
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let token = tokenize(&mut checkout, &visa_pan(41_000_000, 0))
        .await
        .unwrap();
    let mut admin = v.keys(ADMIN).await;
    assert!(seal(&mut admin, "maintenance").await.unwrap().sealed);

    let s = assert_code(
        call(checkout.get_token_metadata(GetTokenMetadataRequest {
            token: token.clone(),
        }))
        .await,
        Code::Unavailable,
        "metadata while sealed",
    );
    assert_eq!(s.message(), "vault is sealed");
    assert_code(
        call(checkout.delete_token(DeleteTokenRequest {
            token: token.clone(),
        }))
        .await,
        Code::Unavailable,
        "delete while sealed",
    );
    let refused: Vec<(String, String)> = v
        .audit_rows()
        .into_iter()
        .filter(|r| r.action == "get_metadata" || r.action == "delete_token")
        .map(|r| (r.action, r.outcome))
        .collect();
    assert_eq!(
        refused,
        [
            ("get_metadata".to_owned(), "sealed".to_owned()),
            ("delete_token".to_owned(), "sealed".to_owned())
        ]
    );

    // The refused delete deleted nothing.
    assert!(!unseal(&mut admin, "").await.unwrap().sealed);
    call(checkout.get_token_metadata(GetTokenMetadataRequest { token }))
        .await
        .unwrap();
    drop((checkout, admin));
    v.stop().await;
}
