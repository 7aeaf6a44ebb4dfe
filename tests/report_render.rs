#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Renders a key-lifecycle report and opens it in a real headless Chromium:
//! the page must parse into a DOM with the tenants, key states and flags,
//! carry no script element even though the log holds one in a reason, and
//! paint a non-trivial screenshot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokenvault::audit::report::{ReportInput, build, render_html, render_markdown};
use tokenvault::audit::verify::Verdict;
use tokenvault::domain::audit::{AuditAction, AuditRecord, Checkpoint};

const CHROMIUM: &str = "/usr/bin/chromium";
/// 2026-01-01 00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

struct Rec(AuditRecord);

impl Rec {
    fn new(seq: u64, time_ms: i64, actor: &str, action: AuditAction) -> Self {
        Rec(AuditRecord {
            seq,
            time_ms,
            actor: actor.into(),
            tenant: None,
            action: action.as_str().into(),
            token: None,
            outcome: "success".into(),
            peer: None,
            purpose: None,
            detail: None,
            key_id: None,
            key_version: None,
            reason: None,
            approvers: None,
            entry_hash: None,
            chain_hash: None,
        })
    }
    fn tenant(mut self, t: &str) -> Self {
        self.0.tenant = Some(t.into());
        self
    }
    fn key(mut self, id: u32, version: u32) -> Self {
        self.0.key_id = Some(id);
        self.0.key_version = Some(version);
        self
    }
    fn detail(mut self, d: &str) -> Self {
        self.0.detail = Some(d.into());
        self
    }
    fn reason(mut self, r: &str) -> Self {
        self.0.reason = Some(r.into());
        self
    }
    fn approvers(mut self, a: &str) -> Self {
        self.0.approvers = Some(a.into());
        self
    }
    fn outcome(mut self, o: &str) -> Self {
        self.0.outcome = o.into();
        self
    }
    fn purpose(mut self, p: &str) -> Self {
        self.0.purpose = Some(p.into());
        self
    }
}

fn scenario() -> (Vec<AuditRecord>, Vec<Checkpoint>) {
    use AuditAction as A;
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut v = vec![
        Rec::new(next(), T0, "system", A::KekInit).detail("kek=local:3f9a1c"),
        Rec::new(next(), T0 + 1000, "system", A::AuditKeyCreate)
            .detail("key=ed25519:77ab kek=local:3f9a1c"),
        Rec::new(next(), T0 + HOUR, "system", A::DekCreate)
            .tenant("acme")
            .key(1, 1)
            .reason("first use of tenant")
            .detail("kek=local:3f9a1c"),
    ];
    for i in 0..5 {
        v.push(
            Rec::new(
                next(),
                T0 + 2 * HOUR + i * HOUR,
                "app-checkout",
                A::Tokenize,
            )
            .tenant("acme"),
        );
    }
    v.push(
        Rec::new(next(), T0 + 3 * DAY, "app-support", A::Detokenize)
            .tenant("acme")
            .purpose("SECRET-PURPOSE chargeback 8812"),
    );
    v.push(
        Rec::new(next(), T0 + 3 * DAY, "app-support", A::Detokenize)
            .tenant("acme")
            .outcome("denied"),
    );
    v.push(
        Rec::new(next(), T0 + 50 * DAY, "system", A::DekCreate)
            .tenant("globex")
            .key(2, 1)
            .reason("first use of tenant")
            .detail("kek=local:3f9a1c"),
    );
    v.push(Rec::new(next(), T0 + 50 * DAY + HOUR, "app-globex", A::Tokenize).tenant("globex"));
    v.push(
        Rec::new(next(), T0 + 100 * DAY, "admin-alice", A::DekRotate)
            .tenant("acme")
            .key(3, 2)
            .reason("<script>alert(1)</script>")
            .detail("retired dek_id=1 version=1 after 12 encryptions; kek=local:3f9a1c"),
    );
    v.push(
        Rec::new(
            next(),
            T0 + 100 * DAY + HOUR,
            "admin-alice",
            A::ReencryptStart,
        )
        .tenant("acme")
        .reason("move tokens off v1")
        .detail("tokens_to_move=12"),
    );
    v.push(
        Rec::new(
            next(),
            T0 + 100 * DAY + 2 * HOUR,
            "system",
            A::ReencryptComplete,
        )
        .tenant("acme")
        .detail("job=1 moved=12 of 12 passes=1"),
    );
    v.push(
        Rec::new(
            next(),
            T0 + 100 * DAY + 3 * HOUR,
            "admin-alice",
            A::DekDestroy,
        )
        .tenant("acme")
        .key(1, 1)
        .reason("v1 no longer referenced"),
    );
    v.push(
        Rec::new(next(), T0 + 101 * DAY, "admin-alice", A::KekRotate)
            .reason("annual KEK rotation")
            .detail("from=local:3f9a1c to=local:9b20e4 rewrapped_deks=2"),
    );
    v.push(
        Rec::new(next(), T0 + 102 * DAY, "admin-bob", A::ShredRequest)
            .tenant("globex")
            .reason("contract ended")
            .detail("request_id=77"),
    );
    v.push(
        Rec::new(next(), T0 + 102 * DAY + HOUR, "admin-bob", A::TenantShred)
            .tenant("globex")
            .approvers("admin-carol")
            .reason("contract ended")
            .detail("request_id=77 destroyed dek_ids=[2]"),
    );
    v.push(
        Rec::new(next(), T0 + 103 * DAY, "mallory", A::DekDestroy)
            .key(3, 2)
            .outcome("denied")
            .reason("cleanup")
            .detail("permission denied: role app cannot manage keys"),
    );
    v.push(Rec::new(next(), T0 + 104 * DAY, "app-checkout", A::Tokenize).tenant("acme"));
    let cp = |seq, time_ms| Checkpoint {
        seq,
        chain_hash: [0; 32],
        time_ms,
        signature: vec![],
        key_id: "ed25519:77ab".into(),
    };
    let checkpoints = vec![
        cp(2, T0 + 2000),
        cp(16, T0 + 101 * DAY - HOUR),
        cp(19, T0 + 103 * DAY - HOUR),
    ];
    (v.into_iter().map(|r| r.0).collect(), checkpoints)
}

/// Runs `cmd`, killing it after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut b).ok();
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut b).ok();
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait chromium") {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn chromium(profile: &Path, extra: &[String], page: &Path) -> Output {
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("file://{}", page.display()));
    run_bounded(cmd, Duration::from_secs(60))
}

/// Where the screenshot is kept for a human to look at, when asked.
fn keep_dir() -> Option<PathBuf> {
    std::env::var_os("REPORT_SCREENSHOT_DIR").map(PathBuf::from)
}

#[test]
fn report_renders_in_headless_chromium() {
    let (entries, checkpoints) = scenario();
    let verdict = Verdict {
        first_seq: 1,
        entries: entries.len() as u64,
        checkpoints: checkpoints.len() as u64,
        covered_to: Some(19),
        problem: None,
    };
    let report = build(&ReportInput {
        entries: &entries,
        checkpoints: &checkpoints,
        verdict: Some(&verdict),
        crypto_period_ms: 90 * DAY,
        generated_ms: T0 + 120 * DAY,
    });
    let html = render_html(&report);
    assert!(!html.contains("<script"));
    assert!(!html.contains("SECRET-PURPOSE"));
    assert!(render_markdown(&report).contains("## Tenant globex"));
    // Only the rendering below needs the browser.
    if !Path::new(CHROMIUM).exists() {
        if std::env::var_os("CI").is_some() {
            panic!("{CHROMIUM} is missing; CI must install chromium");
        }
        println!("skipped: chromium not installed");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();

    let dom = chromium(
        &dir.path().join("profile-dom"),
        &["--dump-dom".into()],
        &page,
    );
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for needle in [
        "Key-lifecycle report",
        "acme",
        "globex",
        "decrypt-only",
        "destroyed",
        "outlived its crypto-period",
        "destroyed without dual control",
        "VERIFIED",
        "not yet covered by a checkpoint",
        "checkpoint #16 (2026-04-11 23:00:00Z)",
        // The reason is shown as text…
        "&lt;script&gt;alert(1)&lt;/script&gt;",
    ] {
        assert!(dom.contains(needle), "DOM lacks {needle:?}");
    }
    // …and never became an element.
    assert!(!dom.contains("<script"), "the DOM holds a script element");
    assert!(!dom.contains("SECRET-PURPOSE"));

    let shot = dir.path().join("report.png");
    let out = chromium(
        &dir.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000".into(),
            "--hide-scrollbars".into(),
        ],
        &page,
    );
    assert!(
        out.status.success(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10 * 1024, "screenshot only {} bytes", png.len());
    if let Some(keep) = keep_dir() {
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&shot, keep.join("report.png")).unwrap();
        std::fs::write(keep.join("report.html"), &html).unwrap();
    }
}
