//! Proves that a re-encryption job interrupted by SIGKILL of the `vault` process resumes by itself after a restart, finishes exactly, and leaves every token readable and the old key destroyable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::calls::{
    CALL_TIMEOUT, assert_all_detokenize, call, key_by_id, key_status, tokenize_many,
};
use common::process::VaultProc;
use tokenvault::client::{ClientPki, channel, connect};
use tokenvault::proto::key_service_client::KeyServiceClient;
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::{
    DataKeyState, DestroyDataKeyRequest, GetJobRequest, Job, JobState, RotateDataKeyRequest,
    StartReencryptionRequest,
};
use tonic::transport::Channel;

type Client = TokenServiceClient<Channel>;
type Keys = KeyServiceClient<Channel>;

const CARDS: u64 = 1_000;
const PURPOSE: &str = "re-encryption crash test";

// ---------------------------------------------------------------------------
// Calls.

async fn keys(url: &str, data: &Path, name: &str) -> Keys {
    let pki = ClientPki::from_dev_dir(data, name).unwrap();
    KeyServiceClient::new(
        tokio::time::timeout(CALL_TIMEOUT, channel(url, &pki))
            .await
            .expect("connect timed out")
            .unwrap(),
    )
}

async fn tokens(url: &str, data: &Path, name: &str) -> Client {
    let pki = ClientPki::from_dev_dir(data, name).unwrap();
    tokio::time::timeout(CALL_TIMEOUT, connect(url, &pki))
        .await
        .expect("connect timed out")
        .unwrap()
}

async fn get_job(k: &mut Keys, id: u64) -> Job {
    call(k.get_job(GetJobRequest { job_id: id })).await.unwrap()
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn reencryption_killed_midway_resumes_after_restart_and_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");

    // Create the development setup, stop, then slow re-encryption down so
    // the kill lands in the middle of the job.
    let mut vault = VaultProc::start(&data, &logs, "setup", "info");
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "setup vault exited with {status}");
    drop(vault);
    let cfg = data.join("vault.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains("[keys]"));
    text.push_str("\n[keys]\nreencrypt_batch = 20\nreencrypt_pause_ms = 50\n");
    std::fs::write(&cfg, text).unwrap();

    let mut vault = VaultProc::start(&data, &logs, "first", "info");
    let url = vault.url();
    let checkout = tokens(&url, &data, "acme-checkout").await;
    let made = tokenize_many(&checkout, 30_000_000, CARDS).await;
    assert_eq!(made.len(), 1_000);
    let mut admin = keys(&url, &data, "admin").await;
    let s = key_status(&mut admin).await;
    let old = s
        .data_keys
        .iter()
        .find(|d| d.tenant == "acme")
        .cloned()
        .unwrap();
    assert_eq!(old.tokens, CARDS);
    let new = call(admin.rotate_data_key(RotateDataKeyRequest {
        tenant: "acme".into(),
        reason: "rotation before re-encryption".into(),
    }))
    .await
    .unwrap()
    .data_key
    .unwrap();
    let job = call(admin.start_reencryption(StartReencryptionRequest {
        tenant: "acme".into(),
        reason: "move every token to the new key".into(),
    }))
    .await
    .unwrap();
    assert_eq!(job.total, CARDS);

    // Kill the vault once part of the job is committed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let j = get_job(&mut admin, job.job_id).await;
        assert_eq!(
            j.state(),
            JobState::Running,
            "the job ended before the kill: {j:?}"
        );
        if j.done > 0 {
            break j;
        }
        assert!(Instant::now() < deadline, "the job made no progress: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    vault.sigkill();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(!status.success(), "a SIGKILLed vault reported {status}");
    assert!(
        seen.done < seen.total,
        "the kill came too late to interrupt anything: {seen:?}"
    );
    drop((checkout, admin, vault));

    // Restart: nobody asks; the job resumes from its checkpoint.
    let mut vault = VaultProc::start(&data, &logs, "second", "info");
    let url = vault.url();
    let mut admin = keys(&url, &data, "admin").await;
    let after_restart = get_job(&mut admin, job.job_id).await;
    assert!(
        after_restart.done >= seen.done,
        "committed progress was lost: {seen:?} then {after_restart:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        let j = get_job(&mut admin, job.job_id).await;
        if j.state() != JobState::Running {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not finish within 60 s of the restart: {j:?}; stderr:\n{}",
            vault.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(end.state(), JobState::Completed, "{end:?}");
    assert_eq!((end.done, end.total), (CARDS, CARDS), "{end:?}");

    let s = key_status(&mut admin).await;
    assert_eq!(key_by_id(&s, old.id).tokens, 0);
    assert_eq!(key_by_id(&s, new.id).tokens, CARDS);
    call(admin.destroy_data_key(DestroyDataKeyRequest {
        data_key_id: old.id,
        reason: "re-encryption complete".into(),
    }))
    .await
    .unwrap();
    let s = key_status(&mut admin).await;
    assert_eq!(key_by_id(&s, old.id).state(), DataKeyState::Destroyed);

    let payments = tokens(&url, &data, "acme-payments").await;
    assert_all_detokenize(&payments, &made, PURPOSE).await;

    // The record: one start, one completion, no failure.
    let c = rusqlite::Connection::open_with_flags(
        data.join("vault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = |action: &str| -> i64 {
        c.query_row(
            "SELECT count(*) FROM audit WHERE action = ?1 AND outcome = 'success'",
            [action],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(count("reencrypt_start"), 1);
    assert_eq!(count("reencrypt_complete"), 1);
    assert_eq!(count("reencrypt_fail"), 0);
    assert_eq!(count("dek_destroy"), 1);
    drop(c);
    drop((admin, payments));
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "vault exited with {status}");
}
