//! The PKCS#11 KEK against a real SoftHSM2 token, driving the `vault` binary
//! as child processes (SoftHSM reads `SOFTHSM2_CONF` from the environment,
//! which only a child process can be given safely).
//!
//! Without `softhsm2-util` or the module these tests print "skipped" and
//! pass, except under CI (env `CI` set), where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::process::{clear_vault_env, sigterm, wait_or_kill};
use tempfile::TempDir;
use tokenvault::client::{ClientPki, connect};
use tokenvault::proto::{DetokenizeRequest, TokenizeRequest};

const WAIT: Duration = Duration::from_secs(30);
const PIN: &str = "1234";
const SO_PIN: &str = "5678";
const TOKEN: &str = "vault";
const PAN: &str = "4111111111111111";

const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// A fresh SoftHSM2 token store in a temp directory, with one initialised
/// token labelled `vault`.
struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
    module: PathBuf,
}

impl SoftHsm {
    /// `None` (after saying so) when SoftHSM2 is not installed; panics
    /// instead under CI, which installs it.
    fn setup() -> Option<Self> {
        let util = Command::new("softhsm2-util")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
        let (true, Some(module)) = (util, module) else {
            if std::env::var_os("CI").is_some() {
                panic!("softhsm2 is required under CI (softhsm2-util and libsofthsm2.so)");
            }
            eprintln!("skipped: softhsm2 not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN])
            .args(["--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { dir, conf, module })
    }

    /// A `vault` command with the SoftHSM configuration and PIN in its
    /// environment (and nothing inherited that could pick another KEK).
    fn vault(&self, pin: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vault"));
        c.env("SOFTHSM2_CONF", &self.conf)
            .env("VAULT_HSM_PIN", pin)
            .env("VAULT_HSM_MODULE", &self.module)
            .env("RUST_LOG", "warn");
        clear_vault_env(&mut c);
        c
    }

    /// Imports raw AES key bytes with `softhsm2-util --import --aes`.
    fn import_aes(&self, label: &str, id_hex: &str, key: &[u8]) {
        let file = self.dir.path().join(format!("{label}-{id_hex}.bin"));
        std::fs::write(&file, key).unwrap();
        let out = Command::new("softhsm2-util")
            .arg("--import")
            .arg(&file)
            .args(["--aes", "--token", TOKEN, "--label", label, "--id", id_hex])
            .args(["--pin", PIN])
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&file).unwrap();
    }

    /// Runs `vault keys <sub> --token-label vault --key-label <label>`.
    fn keys(&self, sub: &str, label: &str, pin: &str) -> Finished {
        let mut c = self.vault(pin);
        c.args(["keys", sub, "--token-label", TOKEN, "--key-label", label]);
        Proc::spawn(c).finish()
    }
}

/// A child process whose output is drained by threads (so it never blocks
/// on a full pipe) and which is killed if still running when dropped.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let buf = stdout.clone();
        let r1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                buf.lock().unwrap().push_str(&line);
                buf.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let buf = stderr.clone();
        let r2 = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            buf.lock().unwrap().push_str(&s);
        });
        Self {
            child,
            lines,
            stdout,
            stderr,
            readers: vec![r1, r2],
        }
    }

    /// Waits (bounded) for the `listening on ADDR` line; returns ADDR.
    fn listening(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        return addr.trim().to_owned();
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "no `listening on` line within {WAIT:?}; stderr:\n{}",
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    /// Sends SIGTERM (a graceful stop), then waits for the exit.
    fn terminate(self) -> Finished {
        sigterm(&self.child);
        self.finish()
    }

    /// Waits (bounded) for the exit and collects all output.
    fn finish(mut self) -> Finished {
        let Some(status) = wait_or_kill(&mut self.child, WAIT, Duration::from_millis(50)) else {
            panic!(
                "process did not exit within {WAIT:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Replaces the `[kek]` section (and any `[kek.*]` subsection) of a vault
/// config with an HSM one.
fn use_hsm_kek(config: &Path, module: &Path, key_label: &str) {
    let text = std::fs::read_to_string(config).unwrap();
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
    out.push_str(&format!(
        "\n[kek]\nsource = \"hsm\"\n\n[kek.hsm]\nmodule = {:?}\ntoken_label = {TOKEN:?}\nkey_label = {key_label:?}\n",
        module.display().to_string()
    ));
    std::fs::write(config, out).unwrap();
}

fn remove_db(data: &Path) {
    for name in ["vault.db", "vault.db-wal", "vault.db-shm"] {
        let p = data.join(name);
        if p.exists() {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// Runs one client call on its own runtime, dropped afterwards so the
/// connection closes (an idle open connection would hold the server's
/// graceful drain for its full duration).
fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn pki(data: &Path, name: &str) -> ClientPki {
    ClientPki::from_dev_dir(data, name).unwrap()
}

fn url(addr: &str) -> String {
    let port = addr.rsplit(':').next().unwrap();
    format!("https://127.0.0.1:{port}")
}

async fn tokenize(addr: &str, data: &Path) -> String {
    let mut c = connect(&url(addr), &pki(data, "acme-checkout"))
        .await
        .unwrap();
    c.tokenize(TokenizeRequest {
        pan: PAN.into(),
        expiry: None,
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

async fn detokenize(addr: &str, data: &Path, token: &str) -> String {
    let mut c = connect(&url(addr), &pki(data, "acme-payments"))
        .await
        .unwrap();
    let mut r = c
        .detokenize(DetokenizeRequest {
            token: token.into(),
            purpose: "charge order 42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The response wipes its card number when dropped: take it out first.
    std::mem::take(&mut r.pan)
}

#[test]
fn hsm_generate_and_info() {
    let Some(hsm) = SoftHsm::setup() else { return };
    let g = hsm.keys("hsm-generate", "kek-1", PIN);
    assert!(g.status.success(), "hsm-generate: {}", g.stderr);
    assert!(g.stdout.contains("kek id hsm:vault:"), "{}", g.stdout);

    let i = hsm.keys("hsm-info", "kek-1", PIN);
    assert!(i.status.success(), "hsm-info: {}", i.stderr);
    for want in [
        "token: vault",
        "key label: kek-1",
        "value length: 32",
        "extractable: false",
        "sensitive: true",
        "never extractable: true",
        "private: true",
    ] {
        assert!(
            i.stdout.lines().any(|l| l.trim() == want),
            "missing {want:?} in:\n{}",
            i.stdout
        );
    }
    // The id printed at generation is the one hsm-info reports.
    let id = i
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("key id: "))
        .unwrap();
    assert_eq!(id.len(), 32, "16-byte CKA_ID in hex");
    assert!(
        g.stdout.contains(&format!("hsm:vault:{id}")),
        "{}",
        g.stdout
    );

    let again = hsm.keys("hsm-generate", "kek-1", PIN);
    assert!(!again.status.success(), "a second key with the same label");
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);

    let missing = hsm.keys("hsm-info", "no-such-key", PIN);
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("no secret key"),
        "{}",
        missing.stderr
    );
    drop(hsm.dir);
}

#[test]
fn vault_serves_with_hsm_kek_and_refuses_another_key() {
    let Some(hsm) = SoftHsm::setup() else { return };
    let g = hsm.keys("hsm-generate", "kek-1", PIN);
    assert!(g.status.success(), "hsm-generate: {}", g.stderr);

    // A development data directory (certificates, config), made once by
    // `vault dev`, then switched to the HSM KEK with a fresh database (the
    // old one is pinned to the file KEK).
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut dev = hsm.vault(PIN);
    dev.args(["dev", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"]);
    let mut dev = Proc::spawn(dev);
    let addr = dev.listening();
    // `listening on` is printed before the SIGTERM handler is installed;
    // one served connection proves the serve loop (and handler) is running.
    block(connect(&url(&addr), &pki(&data, "acme-checkout"))).unwrap();
    let f = dev.terminate();
    assert!(f.status.success(), "vault dev: {}", f.stderr);
    let config = data.join("vault.toml");
    use_hsm_kek(&config, &hsm.module, "kek-1");
    remove_db(&data);

    let serve = |pin: &str| {
        let mut c = hsm.vault(pin);
        c.arg("serve").arg("--config").arg(&config);
        Proc::spawn(c)
    };

    // Serve, tokenize, detokenize.
    let mut v = serve(PIN);
    let addr = v.listening();
    let token = block(tokenize(&addr, &data));
    assert_eq!(block(detokenize(&addr, &data, &token)), PAN);
    let f = v.terminate();
    assert!(f.status.success(), "serve: {}", f.stderr);

    // Restart with the same HSM key: the data key unwraps, the old token
    // still detokenizes.
    let mut v = serve(PIN);
    let addr = v.listening();
    assert_eq!(block(detokenize(&addr, &data, &token)), PAN);
    let f = v.terminate();
    assert!(f.status.success(), "serve: {}", f.stderr);

    // A tampered key check value (HSM-wrapped, format 0x02) fails
    // authentication in the HSM: refused at start.
    let db = data.join("vault.db");
    let original: Vec<u8> = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("SELECT value FROM meta WHERE key = 'kek_check'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(original.len(), 61);
    assert_eq!(original[0], 0x02, "HSM-wrapped format byte");
    let set_check = |blob: &[u8]| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute("UPDATE meta SET value = ?1 WHERE key = 'kek_check'", [blob])
            .unwrap();
    };
    let mut bad = original.clone();
    bad[20] ^= 1;
    set_check(&bad);
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "tampered check value accepted");
    assert!(f.stderr.contains("KEK"), "{}", f.stderr);
    set_check(&original);

    // A tampered wrapped data key: the HSM's GCM tag check fails and the
    // vault refuses to start, naming the reason (never key bytes).
    let dek: (i64, Vec<u8>) = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row(
            "SELECT id, wrapped FROM deks ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!((dek.1.len(), dek.1[0]), (61, 0x02));
    let set_dek = |blob: &[u8]| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "UPDATE deks SET wrapped = ?1 WHERE id = ?2",
            rusqlite::params![blob, dek.0],
        )
        .unwrap();
    };
    let mut bad = dek.1.clone();
    bad[60] ^= 0x80;
    set_dek(&bad);
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "tampered data key accepted");
    assert!(f.stderr.contains("authentication failed"), "{}", f.stderr);
    bad[0] = 0x01;
    set_dek(&bad);
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "wrong-format data key accepted");
    assert!(f.stderr.contains("malformed"), "{}", f.stderr);
    set_dek(&dek.1);

    // A second key, even in the same token, is a different KEK: refused.
    let g2 = hsm.keys("hsm-generate", "kek-2", PIN);
    assert!(g2.status.success(), "hsm-generate kek-2: {}", g2.stderr);
    use_hsm_kek(&config, &hsm.module, "kek-2");
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "a different HSM key was accepted");
    assert!(f.stderr.contains("KEK"), "{}", f.stderr);
    assert!(f.stderr.contains("pinned"), "{}", f.stderr);

    // Keys the adapter must refuse whatever the database says: an AES-128
    // key, and a label that names two keys.
    hsm.import_aes("kek-short", "a1", &[0x11; 16]);
    use_hsm_kek(&config, &hsm.module, "kek-short");
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "an AES-128 key was accepted");
    assert!(f.stderr.contains("not an AES-256 key"), "{}", f.stderr);
    hsm.import_aes("kek-dup", "b1", &[0x22; 32]);
    hsm.import_aes("kek-dup", "b2", &[0x33; 32]);
    use_hsm_kek(&config, &hsm.module, "kek-dup");
    let f = serve(PIN).finish();
    assert!(!f.status.success(), "an ambiguous label was accepted");
    assert!(f.stderr.contains("must be unique"), "{}", f.stderr);

    // Back on kek-1, a wrong PIN: refused, and the PIN is never echoed.
    use_hsm_kek(&config, &hsm.module, "kek-1");
    let wrong = "wrong-pin-918273";
    let f = serve(wrong).finish();
    assert!(!f.status.success(), "wrong PIN accepted");
    assert!(f.stderr.contains("PIN"), "{}", f.stderr);
    assert!(!f.stderr.contains(wrong) && !f.stdout.contains(wrong));

    // And the right one still works (nothing was locked or changed).
    let mut v = serve(PIN);
    let addr = v.listening();
    assert_eq!(block(detokenize(&addr, &data, &token)), PAN);
    assert!(v.terminate().status.success());
}
