//! Start-up and shutdown of the server: one vault per database, secret
//! files checked before use, the store closed on every way out, and health
//! reporting NOT_SERVING while calls drain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::calls::call;
use common::cards::visa_pan;
use common::process::VaultProc;
use common::*;
use tokenvault::client::{ClientPki, channel, connect};
use tokenvault::domain::Vault;
use tokenvault::domain::audit::{AuditAction, AuditEvent};
use tokenvault::proto::TokenizeRequest;
use tokenvault::server::{StartError, open_configured, serve};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

async fn tokenize_once(url: &str, pki: &ClientPki) {
    let mut c = connect(url, pki).await.unwrap();
    let t = call(c.tokenize(TokenizeRequest {
        pan: visa_pan(7_000_000, 1),
        expiry: None,
    }))
    .await
    .unwrap();
    assert!(t.token.starts_with("tok_"));
}

/// A second vault on the same data directory would keep its own audit
/// sequence and chain head and fork the chain. It must refuse to start,
/// naming the database, while the first keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_vault_on_the_same_database_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    let first = VaultProc::start(&data, &logs, "first", "info");
    let checkout = ClientPki::from_dev_dir(&data, ACME_CHECKOUT).unwrap();
    tokenize_once(&first.url(), &checkout).await;

    let Err(stderr) = VaultProc::try_start_via(&[], &data, &logs, "second", "info") else {
        panic!("a second vault started on the same database");
    };
    let db = data.join("vault.db").display().to_string();
    assert!(
        stderr.contains("in use by another vault process") && stderr.contains(&db),
        "{stderr}"
    );
    tokenize_once(&first.url(), &checkout).await;
}

/// Serves the dev vault of `root` until it fails or `stop` resolves;
/// returns the vault (to inspect its store) and how `serve` ended.
async fn serve_dev(
    root: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Arc<Vault>, Result<(), StartError>) {
    let cfg = dev_config(root, &[]);
    let vault = open_configured(&cfg, &HashMap::new()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(30),
        serve(listener, &cfg, vault.clone(), stop),
    )
    .await
    .expect("serve neither failed nor stopped");
    (vault, served)
}

fn an_event() -> AuditEvent {
    AuditEvent::new(0, "test", AuditAction::Detokenize)
}

/// A start that fails after the store is open (here: the TLS key cannot be
/// used) used to leave the store open, its writer running and, with the
/// database lock, the database unusable by a retry in the same process.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_start_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = ensure_layout(dir.path()).root.join("pki/server.key");
    let good = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    tokenvault::fsutil::write_private(&key, b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n")
        .unwrap();

    let (vault, served) = serve_dev(dir.path(), std::future::pending()).await;
    let e = served.expect_err("a vault with an unusable TLS key served");
    assert!(matches!(e, StartError::Tls(_)), "{e}");
    // Names the file, never quotes it.
    let text = e.to_string();
    assert!(
        text.contains("server.key") && !text.contains("MIIE"),
        "{text}"
    );
    let after = vault.store().append_audit(an_event()).await;
    assert!(
        matches!(&after, Err(e) if e.to_string().contains("closed")),
        "the store is still open after a failed start: {after:?}"
    );
    drop(vault);
    // The database is free again: a fixed vault starts in this process.
    std::fs::remove_file(&key).unwrap();
    tokenvault::fsutil::write_private(&key, &good).unwrap();
    let v = TestVault::start_in(dir).await;
    drop(v.stop().await);
}

/// A health client as `pki`, and an open watch of the overall status.
async fn health_watch(
    url: &str,
    pki: &ClientPki,
) -> (
    HealthClient<tonic::transport::Channel>,
    tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) {
    let mut health = HealthClient::new(channel(url, pki).await.unwrap());
    let watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    (health, watch)
}

fn ensure_layout(root: &Path) -> tokenvault::devpki::DevLayout {
    tokenvault::devpki::ensure_dev_dir(root, "127.0.0.1:0".parse().unwrap()).unwrap()
}

/// The server's TLS private key gets the same check as the KEK file:
/// readable by group or others, or owned by another user, and the vault
/// refuses to start, naming the file and the fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = ensure_layout(dir.path()).root.join("pki/server.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the dev PKI writes keys 0600");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (_, served) = serve_dev(dir.path(), std::future::pending()).await;
    let e = served
        .expect_err("served with a group-readable TLS key")
        .to_string();
    assert!(
        e.contains("TLS private key") && e.contains("server.key") && e.contains("chmod 600"),
        "{e}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if rustix::process::geteuid().is_root() {
        let nobody = rustix::process::Uid::from_raw(65534);
        rustix::fs::chown(&key, Some(nobody), None).unwrap();
        let (_, served) = serve_dev(dir.path(), std::future::pending()).await;
        let e = served
            .expect_err("served with another user's TLS key")
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        rustix::fs::chown(&key, Some(rustix::process::geteuid()), None).unwrap();
    }
    let v = TestVault::start_in(dir).await;
    drop(v.stop().await);
}

/// Health turns NOT_SERVING when shutdown begins, before the drain, so
/// load balancers stop sending calls while in-flight ones finish. It used
/// to change only once the drain was over. A health watch is itself an
/// in-flight call: with a drain of 30 s it sees NOT_SERVING at once (well
/// within 10 s) now, only after 30 s before; once it hangs up, nothing is
/// in flight and the vault stops without waiting out the drain.
#[tokio::test(flavor = "multi_thread")]
async fn health_reports_not_serving_while_draining() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    with_drain_seconds(dir.path(), 30);
    let v = TestVault::start_in(dir).await;
    let (health, mut watch) = health_watch(&v.url(), &v.pki(AUDITOR)).await;
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| m.map(|m| m.status);
    assert_eq!(
        status(watch.message().await.unwrap()),
        Some(i32::from(ServingStatus::Serving))
    );

    let stopping = tokio::spawn(v.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("health did not turn NOT_SERVING when the drain began");
    assert_eq!(
        status(next.expect("the watch ended without reporting NOT_SERVING")),
        Some(i32::from(ServingStatus::NotServing))
    );
    drop(watch);
    drop(health);
    let stopped = tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the vault waited out the drain with nothing in flight");
    drop(stopped.unwrap());
}

/// The first SIGTERM drains; while a call keeps the drain waiting (a
/// health watch never ends), a second signal ends the process at once
/// instead of being swallowed. What was answered before is durable.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_ends_a_draining_vault_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    with_drain_seconds(&data, 60);
    let mut vault = VaultProc::start(&data, &dir.path().join("logs"), "signals", "info");
    let url = vault.url();
    let pki = ClientPki::from_dev_dir(&data, AUDITOR).unwrap();
    let (health, mut watch) = health_watch(&url, &pki).await;
    watch.message().await.unwrap();
    let token = {
        let mut c = connect(
            &url,
            &ClientPki::from_dev_dir(&data, ACME_CHECKOUT).unwrap(),
        )
        .await
        .unwrap();
        call(c.tokenize(TokenizeRequest {
            pan: visa_pan(9_300_000, 1),
            expiry: None,
        }))
        .await
        .unwrap()
        .token
    };

    vault.sigterm();
    // Draining: NOT_SERVING is reported, and the open watch holds the drain.
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the drain did not begin");
    assert!(next.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(!status.success(), "a forced exit reported success");
    assert!(
        vault.stderr().contains("second signal"),
        "{}",
        vault.stderr()
    );
    drop((watch, health));

    // The token answered before the signals is there after a restart.
    let v = VaultProc::start(&data, &dir.path().join("logs"), "after", "info");
    let mut pay = connect(
        &v.url(),
        &ClientPki::from_dev_dir(&data, ACME_PAYMENTS).unwrap(),
    )
    .await
    .unwrap();
    let got = call(pay.detokenize(tokenvault::proto::DetokenizeRequest {
        token,
        purpose: "charge order 42".into(),
    }))
    .await
    .unwrap();
    assert_eq!(got.pan, visa_pan(9_300_000, 1));
}

/// A connection that never starts its TLS handshake is closed once
/// `limits.handshake_timeout_ms` passes, while the vault keeps serving:
/// idle sockets cannot pile up before anyone is authenticated.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_handshakes_is_closed() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    append_config(dir.path(), "[limits]\nhandshake_timeout_ms = 300\n");
    let v = TestVault::start_in(dir).await;
    let mut idle = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // Without the timeout this read would wait forever; the bound here is
    // only a guard against hanging the suite.
    let n = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf))
        .await
        .expect("the idle connection was never closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server sent bytes to a silent client");
    let mut checkout = v.client(ACME_CHECKOUT).await;
    call(checkout.tokenize(TokenizeRequest {
        pan: visa_pan(9_100_000, 1),
        expiry: None,
    }))
    .await
    .unwrap();
    drop(checkout);
    v.stop().await;
}

/// With `limits.max_connections` taken, a new connection is not served
/// until an open one closes (it waits in the backlog or, if it was already
/// shaking hands as the slot went, for a slot within its handshake time);
/// then it is.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    append_config(dir.path(), "[limits]\nmax_connections = 1\n");
    let v = TestVault::start_in(dir).await;
    let mut first = v.client(ACME_CHECKOUT).await;
    call(first.tokenize(TokenizeRequest {
        pan: visa_pan(9_200_000, 1),
        expiry: None,
    }))
    .await
    .unwrap();

    let mut second = Box::pin(async {
        let mut c = v.client(ACME_CHECKOUT).await;
        call(c.tokenize(TokenizeRequest {
            pan: visa_pan(9_200_000, 2),
            expiry: None,
        }))
        .await
        .unwrap();
        c
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "a second connection was served while the only slot was taken"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the freed slot was never given to the waiting connection");
    drop(second);
    v.stop().await;
}

/// With the handshake budget full of connections that never handshake
/// (and a handshake timeout far away), a real caller still gets in: it
/// evicts the oldest pending handshake, which is closed, and the newer one
/// stays. Pending handshakes take no connection slot: with only one, the
/// caller gets it.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_handshake_budget_gives_way_to_a_new_caller() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[limits]\nmax_handshakes = 2\nmax_connections = 1\nhandshake_timeout_ms = 600000\n",
    );
    let v = TestVault::start_in(dir).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(v.addr).await.unwrap());
    }
    let mut checkout = tokio::time::timeout(Duration::from_secs(30), v.client(ACME_CHECKOUT))
        .await
        .expect("stalled handshakes kept a caller out");
    call(checkout.tokenize(TokenizeRequest {
        pan: visa_pan(9_400_000, 1),
        expiry: None,
    }))
    .await
    .unwrap();
    // The oldest stalled socket was closed to make room.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), idle[0].read(&mut buf))
        .await
        .expect("the oldest pending handshake was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let newer = tokio::time::timeout(Duration::from_millis(200), idle[1].read(&mut buf)).await;
    assert!(
        newer.is_err(),
        "the newer pending handshake was closed too: {newer:?}"
    );
    drop((checkout, idle));
    v.stop().await;
}

/// A flood of new connections from one host (127.0.0.2), arriving far
/// faster than the handshake budget per handshake time, cannot keep a
/// caller from another host (127.0.0.1) out: the flood only closes its own
/// pending handshakes. (Closing the oldest pending handshake, whoever's,
/// closed the caller's mid-handshake.)
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_one_host_cannot_keep_a_caller_from_another_out() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[limits]\nmax_handshakes = 4\nhandshake_timeout_ms = 600000\n",
    );
    let v = TestVault::start_in(dir).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let (stop, addr) = (stop.clone(), v.addr);
        async move {
            // Recent sockets stay open (pending on the vault's side until
            // it closes them); older ones are dropped to bound descriptors.
            let mut open = std::collections::VecDeque::new();
            let mut opened = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                if let Ok(s) = socket.connect(addr).await {
                    opened += 1;
                    open.push_back(s);
                    if open.len() > 32 {
                        open.pop_front();
                    }
                }
                tokio::task::yield_now().await;
            }
            opened
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let mut checkout = tokio::time::timeout(Duration::from_secs(30), v.client(ACME_CHECKOUT))
            .await
            .expect("connecting timed out");
        call(checkout.tokenize(TokenizeRequest {
            pan: visa_pan(9_500_000, i + 1),
            expiry: None,
        }))
        .await
        .expect("a one-host flood kept a caller from another host out");
    }
    stop.store(true, Ordering::Relaxed);
    let opened = flood.await.unwrap();
    assert!(opened > 100, "the flood opened only {opened} connections");
    v.stop().await;
}

/// Shutdown pauses a running re-encryption job before the final signed
/// checkpoint, so that checkpoint covers the last audit entry; the job
/// stays running (nothing failed) and the next start finishes it.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_pauses_reencryption_before_the_final_checkpoint() {
    use common::calls::tokenize_many;
    use tokenvault::proto::{
        GetJobRequest, JobState, RotateDataKeyRequest, StartReencryptionRequest,
    };
    const CARDS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[keys]\nreencrypt_batch = 10\nreencrypt_pause_ms = 20\n",
    );
    let v = TestVault::start_in(dir).await;
    let checkout = v.client(ACME_CHECKOUT).await;
    assert_eq!(
        tokenize_many(&checkout, 9_300_000, CARDS).await.len() as u64,
        CARDS
    );
    let mut admin = v.keys(ADMIN).await;
    call(admin.rotate_data_key(RotateDataKeyRequest {
        tenant: "acme".into(),
        reason: "rotation before re-encryption".into(),
    }))
    .await
    .unwrap();
    let job = call(admin.start_reencryption(StartReencryptionRequest {
        tenant: "acme".into(),
        reason: "move every token to the new key".into(),
    }))
    .await
    .unwrap();
    loop {
        let j = call(admin.get_job(GetJobRequest { job_id: job.job_id }))
            .await
            .unwrap();
        assert_eq!(j.state(), JobState::Running, "ended before the stop: {j:?}");
        if j.done > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop((checkout, admin));
    let db = v.db_path();
    let dir = v.stop().await;

    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let one = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        one("SELECT max(seq) FROM audit"),
        one("SELECT max(seq) FROM checkpoints"),
        "audit entries were written after the final checkpoint"
    );
    let (state, done): (String, i64) = c
        .query_row("SELECT state, done FROM jobs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(state, "running", "the job should pause, not fail or finish");
    assert!(
        u64::try_from(done).unwrap() < CARDS,
        "the stop came after the job finished ({done} moved)"
    );
    assert_eq!(
        one("SELECT count(*) FROM audit WHERE action LIKE 'reencrypt_fail%'"),
        0
    );
    drop(c);

    let v = TestVault::start_in(dir).await;
    let mut admin = v.keys(ADMIN).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let j = loop {
        let j = call(admin.get_job(GetJobRequest { job_id: job.job_id }))
            .await
            .unwrap();
        if j.state() != JobState::Running {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "never resumed: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(j.state(), JobState::Completed, "{j:?}");
    assert_eq!(j.done, CARDS);
    drop(admin);
    v.stop().await;
}

/// PCI DSS 3.6.1.1: production and test use different keys. `vault dev`
/// makes and uses its own development KEK and database; with `VAULT_KEK`,
/// `VAULT_KEK_FILE` or `VAULT_DB` set (as on a production host) it refuses
/// to start before it creates anything, so a production KEK can never be
/// pinned to a development database, nor the development KEK to a
/// database at a production path.
#[test]
fn vault_dev_refuses_a_kek_from_the_environment() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Built at run time so the secret scanner never meets a KEK-like
    // literal in the repository.
    let kek = {
        use base64::Engine as _;
        let bytes: Vec<u8> = (0u8..32).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    for (var, value) in [
        ("VAULT_KEK", kek.as_str()),
        ("VAULT_KEK_FILE", "/etc/vault/kek.b64"),
        ("VAULT_DB", "/var/lib/vault/vault.db"),
    ] {
        let err = dir.path().join("stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vault"));
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap());
        common::process::clear_vault_env(&mut cmd);
        cmd.env(var, value);
        let mut child = cmd.spawn().unwrap();
        let status = common::process::wait_or_kill(
            &mut child,
            Duration::from_secs(30),
            Duration::from_millis(10),
        )
        .expect("vault dev did not exit");
        let stderr = std::fs::read_to_string(&err).unwrap();
        assert!(!status.success(), "vault dev started with {var} set");
        assert!(
            stderr.contains(var) && stderr.contains("production KEK or database"),
            "{stderr}"
        );
        assert!(!data.exists(), "vault dev created files before refusing");
    }
}
