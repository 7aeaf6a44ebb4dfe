//! Proves that a re-encryption job interrupted by SIGKILL of the `vault` process resumes by itself after a restart, finishes exactly, and leaves every token readable and the old key destroyable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokenvault::client::{ClientPki, channel, connect};
use tokenvault::proto::key_service_client::KeyServiceClient;
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::{
    DataKey, DataKeyState, DestroyDataKeyRequest, DetokenizeRequest, GetJobRequest,
    GetKeyStatusRequest, GetKeyStatusResponse, Job, JobState, RotateDataKeyRequest,
    StartReencryptionRequest, TokenizeRequest,
};
use tonic::Status;
use tonic::transport::Channel;

type Client = TokenServiceClient<Channel>;
type Keys = KeyServiceClient<Channel>;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(10);
const CARDS: u64 = 1_000;
const PARALLEL: usize = 8;

/// Environment variables that would change what the child serves.
const VAULT_ENV: &[&str] = &[
    "VAULT_KEK",
    "VAULT_KEK_FILE",
    "VAULT_DB",
    "VAULT_LISTEN",
    "VAULT_REFLECTION",
    "VAULT_DATA_DIR",
    "VAULT_CONFIG",
];

// ---------------------------------------------------------------------------
// The vault as a child process.

/// A `vault dev` child process on 127.0.0.1. Dropping it sends SIGKILL and
/// reaps it, so a failing test never leaves a server behind.
struct VaultProc {
    child: Child,
    addr: SocketAddr,
    stderr_path: PathBuf,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl VaultProc {
    /// Starts `vault dev` on `data_dir` (reusing its config if it exists)
    /// and waits for its `listening on ADDR` line.
    fn start(data_dir: &Path, logs: &Path, run: &str) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        let stderr_path = logs.join(format!("{run}.stderr"));
        let stdout_path = logs.join(format!("{run}.stdout"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vault"));
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("VAULT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap());
        for v in VAULT_ENV {
            cmd.env_remove(v);
        }
        let mut child = cmd.spawn().expect("spawn the vault binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout_reader = std::thread::spawn(move || {
            let mut copy = File::create(stdout_path).unwrap();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "{line}");
                let _ = tx.send(line);
            }
        });
        let mut proc = VaultProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_path,
            stdout_reader: Some(stdout_reader),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    // Only the bare announcement line counts, not the help text.
                    if let Some(addr) = line
                        .strip_prefix("listening on ")
                        .and_then(|rest| rest.trim().parse::<SocketAddr>().ok())
                    {
                        assert!(addr.ip().is_loopback(), "vault bound {addr}, not loopback");
                        proc.addr = addr;
                        return proc;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "vault did not announce its address within {START_TIMEOUT:?}; stderr:\n{}",
                    proc.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "vault exited before announcing its address ({:?}); stderr:\n{}",
                    proc.child.try_wait(),
                    proc.stderr()
                ),
            }
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the vault");
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits at most `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stdout_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vault did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for VaultProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Cards and calls.

fn luhn_digit(body: &str) -> u32 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// The `n`th distinct Luhn-valid 16-digit Visa number of a series.
fn pan(base: u64, n: u64) -> String {
    let body = format!("4{:014}", base + n);
    format!("{body}{}", luhn_digit(&body))
}

async fn call<T>(f: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL, f)
        .await
        .expect("call timed out")
        .map(tonic::Response::into_inner)
}

async fn keys(url: &str, data: &Path, name: &str) -> Keys {
    let pki = ClientPki::from_dev_dir(data, name).unwrap();
    KeyServiceClient::new(
        tokio::time::timeout(CALL, channel(url, &pki))
            .await
            .expect("connect timed out")
            .unwrap(),
    )
}

async fn tokens(url: &str, data: &Path, name: &str) -> Client {
    let pki = ClientPki::from_dev_dir(data, name).unwrap();
    tokio::time::timeout(CALL, connect(url, &pki))
        .await
        .expect("connect timed out")
        .unwrap()
}

async fn tokenize_many(c: &Client, n: u64) -> Vec<(String, String)> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let mut c = c.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                let p = pan(30_000_000, i);
                let t = call(c.tokenize(TokenizeRequest {
                    pan: p.clone(),
                    expiry: None,
                }))
                .await
                .unwrap_or_else(|s| panic!("tokenize: {s:?}"))
                .token;
                out.push((t, p));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn assert_all_detokenize(c: &Client, pairs: &[(String, String)]) {
    let work = Arc::new(Mutex::new(pairs.to_vec()));
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let mut c = c.clone();
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let Some((token, pan)) = work.lock().unwrap().pop() else {
                    return failures;
                };
                let r = call(c.detokenize(DetokenizeRequest {
                    token: token.clone(),
                    purpose: "re-encryption crash test".into(),
                }))
                .await;
                match r {
                    Ok(r) if r.pan == pan => {}
                    Ok(_) => failures.push(format!("{token}: a different card number")),
                    Err(s) => failures.push(format!("{token}: {:?}: {}", s.code(), s.message())),
                }
            }
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("detokenize task did not end")
                .unwrap(),
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} tokens did not detokenize, e.g. {:?}",
        failures.len(),
        pairs.len(),
        &failures[..failures.len().min(5)]
    );
}

async fn key_status(k: &mut Keys) -> GetKeyStatusResponse {
    call(k.get_key_status(GetKeyStatusRequest {}))
        .await
        .unwrap()
}

fn key_by_id(s: &GetKeyStatusResponse, id: u32) -> DataKey {
    s.data_keys
        .iter()
        .find(|d| d.id == id)
        .cloned()
        .unwrap_or_else(|| panic!("no data key {id} in {s:?}"))
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
    let mut vault = VaultProc::start(&data, &logs, "setup");
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "setup vault exited with {status}");
    drop(vault);
    let cfg = data.join("vault.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains("[keys]"));
    text.push_str("\n[keys]\nreencrypt_batch = 20\nreencrypt_pause_ms = 50\n");
    std::fs::write(&cfg, text).unwrap();

    let mut vault = VaultProc::start(&data, &logs, "first");
    let url = vault.url();
    let checkout = tokens(&url, &data, "acme-checkout").await;
    let made = tokenize_many(&checkout, CARDS).await;
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
    let mut vault = VaultProc::start(&data, &logs, "second");
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
    assert_all_detokenize(&payments, &made).await;

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
