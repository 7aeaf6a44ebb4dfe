//! Proves that every token acknowledged before the `vault` process dies (SIGKILL) or stops (SIGTERM) under concurrent load is durable and detokenizes to its own card number after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::calls::CALL_TIMEOUT;
use common::cards::visa_pan;
use common::process::VaultProc;
use tokenvault::client::{ClientPki, connect};
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::{DetokenizeRequest, TokenizeRequest};
use tonic::transport::Channel;

type Client = TokenServiceClient<Channel>;

const TASKS: usize = 32;
const CONNECTIONS: usize = 4;
/// Upper bound on tokenize calls per load task, whatever happens.
const MAX_CALLS_PER_TASK: usize = 5_000;

// ---------------------------------------------------------------------------
// Load.

/// Concurrent tokenize load. A (token, PAN) pair is recorded only once its
/// response has been received.
struct Load {
    acked: Arc<Mutex<Vec<(String, String)>>>,
    /// Set just before the server is killed or told to stop: from then on an
    /// error ends a task instead of being a failure.
    interrupted: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    early_errors: Arc<Mutex<Vec<String>>>,
    /// Tasks that ended on an error after the interruption, i.e. were still
    /// calling when the server went away.
    cut_off: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(url: &str, pki: &ClientPki, base: u64) -> Self {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let c = tokio::time::timeout(CALL_TIMEOUT, connect(url, pki))
                .await
                .expect("connect timed out")
                .expect("connect to the vault");
            clients.push(c);
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let interrupted = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let early_errors = Arc::new(Mutex::new(Vec::new()));
        let cut_off = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let mut client: Client = clients[i % CONNECTIONS].clone();
            let acked = acked.clone();
            let interrupted = interrupted.clone();
            let stop = stop.clone();
            let early_errors = early_errors.clone();
            let cut_off = cut_off.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..MAX_CALLS_PER_TASK {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let pan = visa_pan(base, counter.fetch_add(1, Ordering::SeqCst));
                    let call = client.tokenize(TokenizeRequest {
                        pan: pan.clone(),
                        expiry: None,
                    });
                    let err = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                        Ok(Ok(resp)) => {
                            let token = resp.into_inner().token;
                            acked.lock().unwrap().push((token, pan));
                            continue;
                        }
                        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                        Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
                    };
                    if interrupted.load(Ordering::SeqCst) {
                        cut_off.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    early_errors.lock().unwrap().push(err);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Self {
            acked,
            interrupted,
            stop,
            early_errors,
            cut_off,
            tasks,
        }
    }

    fn acked_len(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until the load has run ~1.5 s with a meaningful number of
    /// acknowledged tokens (bounded in time either way).
    async fn run_a_while(&self) {
        let t0 = Instant::now();
        loop {
            let n = self.acked_len();
            let t = t0.elapsed();
            if (t >= Duration::from_millis(1500) && n >= 300)
                || n >= 5_000
                || t >= Duration::from_secs(8)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the load (after the server is gone) and returns the acknowledged
    /// pairs and how many tasks were cut off by the interruption.
    async fn finish(self) -> (Vec<(String, String)>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            tokio::time::timeout(CALL_TIMEOUT * 2, t)
                .await
                .expect("load task did not end")
                .expect("load task panicked");
        }
        let early = self.early_errors.lock().unwrap().clone();
        assert!(
            early.is_empty(),
            "{} tokenize calls failed before the server was interrupted, e.g. {:?}",
            early.len(),
            early.first()
        );
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, self.cut_off.load(Ordering::SeqCst))
    }
}

/// Detokenizes every recorded token on a fresh server and asserts each
/// returns its own card number.
async fn assert_all_detokenize(url: &str, pki: &ClientPki, acked: &[(String, String)]) {
    let chunks: Vec<Vec<(String, String)>> = acked.chunks(64).map(<[_]>::to_vec).collect();
    let work = Arc::new(Mutex::new(chunks));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut client = tokio::time::timeout(CALL_TIMEOUT, connect(url, pki))
            .await
            .expect("connect timed out")
            .expect("connect to the restarted vault");
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let Some(chunk) = work.lock().unwrap().pop() else {
                    return failures;
                };
                for (token, pan) in chunk {
                    let call = client.detokenize(DetokenizeRequest {
                        token: token.clone(),
                        purpose: "crash test".into(),
                    });
                    match tokio::time::timeout(CALL_TIMEOUT, call).await {
                        Ok(Ok(r)) if r.get_ref().pan == pan => {}
                        Ok(Ok(_)) => failures.push(format!("{token}: a different card number")),
                        Ok(Err(s)) => {
                            failures.push(format!("{token}: {:?}: {}", s.code(), s.message()));
                        }
                        Err(_) => failures.push(format!("{token}: no answer")),
                    }
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
        "{} of {} acknowledged tokens did not detokenize to their card number after restart, e.g. {:?}",
        failures.len(),
        acked.len(),
        &failures[..failures.len().min(5)]
    );
}

/// A new tokenize works on the restarted server (its key counters resumed).
async fn assert_tokenize_works(url: &str, pki: &ClientPki) {
    let mut c = connect(url, pki).await.unwrap();
    let r = tokio::time::timeout(
        CALL_TIMEOUT,
        c.tokenize(TokenizeRequest {
            pan: visa_pan(999_000_000, 0),
            expiry: None,
        }),
    )
    .await
    .expect("tokenize after restart timed out")
    .expect("tokenize after restart");
    assert!(r.get_ref().token.starts_with("tok_"));
}

fn check_distinct(acked: &[(String, String)]) {
    let tokens: std::collections::HashSet<&str> = acked.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tokens.len(), acked.len(), "a token was handed out twice");
}

/// Raises the detokenize budget: these tests read back thousands of
/// tokens at full speed, which is durability under test, not rate limits.
fn unlimited_detokenize(data: &std::path::Path) {
    common::append_config(
        data,
        "[limits]\ndetokenize_per_second = 1000000\ndetokenize_burst = 1000000\n",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_tokens_survive_sigkill_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    unlimited_detokenize(&data);

    let mut vault = VaultProc::start(&data, &logs, "first", "info");
    let checkout = ClientPki::from_dev_dir(&data, "acme-checkout").unwrap();
    let payments = ClientPki::from_dev_dir(&data, "acme-payments").unwrap();

    let load = Load::start(&vault.url(), &checkout, 10_000_000).await;
    load.run_a_while().await;
    let before = load.acked_len();
    load.interrupted.store(true, Ordering::SeqCst);
    vault.sigkill();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    let (acked, cut_off) = load.finish().await;
    assert!(!status.success(), "a SIGKILLed vault reported {status}");
    assert!(
        !vault.stderr().contains("vault stopped"),
        "the vault was killed, yet logged a graceful stop"
    );
    assert!(
        before >= 100,
        "only {before} tokens acknowledged before the kill; the test proves nothing"
    );
    assert!(
        cut_off > 0,
        "no load task was still calling when the vault was killed"
    );
    check_distinct(&acked);
    eprintln!(
        "{before} acknowledged when interrupted, {} in all; {cut_off} of {TASKS} tasks cut off",
        acked.len()
    );
    drop(vault);

    let vault = VaultProc::start(&data, &logs, "second", "info");
    assert_all_detokenize(&vault.url(), &payments, &acked).await;
    assert_tokenize_works(&vault.url(), &checkout).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    unlimited_detokenize(&data);

    let mut vault = VaultProc::start(&data, &logs, "first", "info");
    let checkout = ClientPki::from_dev_dir(&data, "acme-checkout").unwrap();
    let payments = ClientPki::from_dev_dir(&data, "acme-payments").unwrap();

    let load = Load::start(&vault.url(), &checkout, 20_000_000).await;
    load.run_a_while().await;
    let before = load.acked_len();
    load.interrupted.store(true, Ordering::SeqCst);
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    let (acked, cut_off) = load.finish().await;
    let stderr = vault.stderr();
    assert!(
        status.success(),
        "vault exited with {status} on SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("vault stopped"),
        "no `vault stopped` line in the log:\n{stderr}"
    );
    assert!(
        before >= 100,
        "only {before} tokens acknowledged before SIGTERM; the test proves nothing"
    );
    assert!(
        cut_off > 0,
        "no load task was still calling when the vault stopped"
    );
    check_distinct(&acked);
    eprintln!(
        "{before} acknowledged when interrupted, {} in all; {cut_off} of {TASKS} tasks cut off",
        acked.len()
    );
    drop(vault);

    let vault = VaultProc::start(&data, &logs, "second", "info");
    assert_all_detokenize(&vault.url(), &payments, &acked).await;
    assert_tokenize_works(&vault.url(), &checkout).await;
}
