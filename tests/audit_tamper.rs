//! Proves that every kind of tampering with the audit log — in an export or in the database file itself — is caught by `vault audit verify` / `verify-db`, naming the problem and the first untrustworthy sequence number.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::calls::call;
use common::cards::with_luhn;
use common::process::{clear_vault_env, wait_or_kill};
use common::*;
use serde_json::Value;
use tempfile::TempDir;
use tokenvault::audit::chain::{Entry, GENESIS, link};
use tokenvault::audit::export::Line;
use tokenvault::audit::signer::{AuditSigner, public_key_pem};
use tokenvault::proto::{
    DetokenizeRequest, GetTokenMetadataRequest, RotateDataKeyRequest, TokenizeRequest,
};

/// Upper bound on one `vault audit …` child process.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The `vault` binary as a child process.

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `vault <args>` in `cwd` (a fresh temp dir if none), output to files
/// so nothing can block on a pipe, killed if it outlives `CLI_TIMEOUT`.
fn vault_cli(args: &[OsString], cwd: Option<&Path>) -> Run {
    let out_dir = tempfile::tempdir().unwrap();
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vault"));
    cmd.args(args)
        .current_dir(cwd.unwrap_or(out_dir.path()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .env("RUST_LOG", "warn");
    clear_vault_env(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let Some(status) = wait_or_kill(&mut child, CLI_TIMEOUT, Duration::from_millis(10)) else {
        panic!(
            "vault {args:?} did not exit within {CLI_TIMEOUT:?}; stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&stdout_path).unwrap(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap(),
    }
}

fn args(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_owned()).collect()
}

fn verify_file(pk: &Path, file: &Path) -> Run {
    vault_cli(
        &args(&[&"audit", &"verify", &"--public-key", &pk, &file]),
        None,
    )
}

fn verify_db(pk: &Path, db: &Path) -> Run {
    vault_cli(
        &args(&[&"audit", &"verify-db", &"--public-key", &pk, &db]),
        None,
    )
}

// ---------------------------------------------------------------------------
// The fixture: a stopped vault's database, its public key and an export.

struct Fixture {
    /// The stopped vault's data directory.
    _data: TempDir,
    /// Scratch space: the public key, the export and tampered copies.
    work: TempDir,
    db: PathBuf,
    pk: PathBuf,
    log: PathBuf,
    /// The export, one JSON value per line.
    lines: Vec<Value>,
}

/// Starts a vault, makes ~30 mixed calls (tokenize, detokenize, metadata, a
/// rotation, denials), stops it (the shutdown checkpoint covers the end),
/// then takes the public key and an export from the database file with the
/// CLI, and checks the untouched export verifies.
async fn fixture() -> Fixture {
    let v = TestVault::start().await;
    {
        let mut checkout = v.client(ACME_CHECKOUT).await;
        let mut payments = v.client(ACME_PAYMENTS).await;
        let mut globex = v.client(GLOBEX_CHECKOUT).await;
        let mut keys = v.keys(ADMIN).await;
        let mut tokens = Vec::new();
        for i in 0..8 {
            let pan = with_luhn(&format!("411111{i:09}"));
            let t = call(checkout.tokenize(TokenizeRequest { pan, expiry: None }))
                .await
                .unwrap()
                .token;
            tokens.push(t);
        }
        for t in &tokens {
            call(payments.detokenize(DetokenizeRequest {
                token: t.clone(),
                purpose: "refund".into(),
            }))
            .await
            .unwrap();
        }
        for t in &tokens[..4] {
            call(payments.get_token_metadata(GetTokenMetadataRequest { token: t.clone() }))
                .await
                .unwrap();
        }
        call(keys.rotate_data_key(RotateDataKeyRequest {
            tenant: "acme".into(),
            reason: "scheduled rotation".into(),
        }))
        .await
        .unwrap();
        for t in &tokens[..2] {
            // Denied: checkout may only tokenize.
            call(checkout.detokenize(DetokenizeRequest {
                token: t.clone(),
                purpose: "curiosity".into(),
            }))
            .await
            .unwrap_err();
        }
        for i in 0..3 {
            let pan = with_luhn(&format!("555555{i:09}"));
            call(globex.tokenize(TokenizeRequest { pan, expiry: None }))
                .await
                .unwrap();
        }
        for t in &tokens[4..] {
            call(payments.detokenize(DetokenizeRequest {
                token: t.clone(),
                purpose: "chargeback".into(),
            }))
            .await
            .unwrap();
        }
    }
    let db = v.db_path();
    let data = v.stop().await;

    let work = tempfile::tempdir().unwrap();
    let pk = work.path().join("pk.pem");
    let log = work.path().join("log.jsonl");
    let r = vault_cli(
        &args(&[&"audit", &"public-key", &"--db", &db, &"--out", &pk]),
        None,
    );
    assert!(r.ok(), "public-key: {r}");
    let r = vault_cli(
        &args(&[&"audit", &"export", &"--db", &db, &"--out", &log]),
        None,
    );
    assert!(r.ok(), "export: {r}");
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let f = Fixture {
        _data: data,
        work,
        db,
        pk,
        log,
        lines,
    };
    assert!(f.last_seq() >= 30, "{} entries", f.last_seq());
    assert_eq!(
        f.checkpoint_seqs().last(),
        Some(&f.last_seq()),
        "the shutdown checkpoint covers the final entry"
    );
    f
}

impl Fixture {
    fn entries(&self) -> impl Iterator<Item = &Value> {
        self.lines.iter().filter(|v| v["type"] == "entry")
    }

    fn last_seq(&self) -> u64 {
        self.entries().last().unwrap()["seq"].as_u64().unwrap()
    }

    fn checkpoint_seqs(&self) -> Vec<u64> {
        self.lines
            .iter()
            .filter(|v| v["type"] == "checkpoint")
            .map(|v| v["seq"].as_u64().unwrap())
            .collect()
    }

    /// The seq of the first entry matching `pred`.
    fn seq_where(&self, pred: impl Fn(&Value) -> bool) -> u64 {
        self.entries().find(|v| pred(v)).unwrap()["seq"]
            .as_u64()
            .unwrap()
    }

    /// A seq in the middle of the log, well away from both ends.
    fn middle(&self) -> u64 {
        self.seq_where(|v| {
            v["action"] == "detokenize"
                && v["outcome"] == "success"
                && v["seq"].as_u64().unwrap() > 8
        })
    }

    /// The first seq a checkpoint mismatch at or after `k` is reported at:
    /// just after the last checkpoint before `k`.
    fn covered_before(&self, k: u64) -> u64 {
        self.checkpoint_seqs()
            .into_iter()
            .filter(|&c| c < k)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// A copy of the database file (and its WAL, if any) to tamper with.
    fn db_copy(&self, name: &str) -> PathBuf {
        let to = self.work.path().join(format!("{name}.db"));
        std::fs::copy(&self.db, &to).unwrap();
        for suffix in ["-wal", "-shm"] {
            let mut from = self.db.clone().into_os_string();
            from.push(suffix);
            if Path::new(&from).exists() {
                let mut dest = to.clone().into_os_string();
                dest.push(suffix);
                std::fs::copy(&from, &dest).unwrap();
            }
        }
        to
    }
}

/// Index (into the export lines) of the entry with `seq`.
fn pos(lines: &[Value], seq: u64) -> usize {
    lines
        .iter()
        .position(|v| v["type"] == "entry" && v["seq"] == seq)
        .unwrap_or_else(|| panic!("no entry {seq}"))
}

/// Recomputes every entry hash and chain head, as a forger with the
/// algorithm (but not the signing key) would.
fn rehash(lines: &mut [Value]) {
    let mut head = GENESIS;
    for v in lines.iter_mut().filter(|v| v["type"] == "entry") {
        let Line::Entry(e) = serde_json::from_value::<Line>(v.clone()).unwrap() else {
            unreachable!()
        };
        let rec = e.record().unwrap();
        let eh = Entry::of_record(&rec).hash();
        head = link(&head, &eh);
        v["entry_hash"] = Value::String(hex::encode(eh));
        v["chain_hash"] = Value::String(hex::encode(head));
    }
}

/// The first checkpoint at or after `seq`.
fn first_cp_from(f: &Fixture, seq: u64) -> u64 {
    f.checkpoint_seqs().into_iter().find(|&c| c >= seq).unwrap()
}

fn write_lines(path: &Path, lines: &[Value]) {
    let mut text = String::new();
    for v in lines {
        text.push_str(&serde_json::to_string(v).unwrap());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// What a failed verification must say.
struct Expect {
    /// The first untrustworthy seq (any one of these).
    seqs: Vec<u64>,
    /// Any one of these phrases names the problem.
    any_of: &'static [&'static str],
}

fn expect(seq: u64, any_of: &'static [&'static str]) -> Expect {
    Expect {
        seqs: vec![seq],
        any_of,
    }
}

/// Checks a run failed as expected; returns a description of what is wrong
/// instead of panicking, so a table reports every case.
fn check_failed(case: &str, r: &Run, want: &Expect) -> Result<(), String> {
    let out = r.output();
    if r.ok() || r.code.is_none() {
        return Err(format!("{case}: tampering NOT detected\n{r}"));
    }
    let named = want.seqs.iter().any(|seq| {
        r.stdout.contains(&format!("FAILED at seq {seq} "))
            || r.stdout.contains(&format!("FAILED at seq {seq}:"))
    });
    if !named {
        return Err(format!(
            "{case}: expected the first bad seq to be one of {:?}\n{r}",
            want.seqs
        ));
    }
    if !want.any_of.iter().any(|p| out.contains(p)) {
        return Err(format!(
            "{case}: expected the problem to be named as one of {:?}\n{r}",
            want.any_of
        ));
    }
    if !r.stderr.contains("failed verification") {
        return Err(format!("{case}: expected an error on stderr\n{r}"));
    }
    Ok(())
}

fn report(results: Vec<(String, Result<(), String>)>) {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    for (name, r) in &results {
        eprintln!(
            "{:<40} {}",
            name,
            if r.is_ok() { "detected" } else { "PROBLEM" }
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} tamper cases failed:\n\n{}",
        failed.len(),
        results.len(),
        failed.join("\n\n")
    );
}

type Tamper = Box<dyn Fn(&mut Vec<Value>)>;
type DbTamper = Box<dyn Fn(&Path)>;

/// A tampering of the export lines.
fn t(f: impl Fn(&mut Vec<Value>) + 'static) -> Tamper {
    Box::new(f)
}

/// A tampering of a database file.
fn d(f: impl Fn(&Path) + 'static) -> DbTamper {
    Box::new(f)
}

const ALTERED: &[&str] = &["a field was altered"];
const CHECKPOINT_DIFFERS: &[&str] = &["differs from the signed checkpoint"];
const GAP: &[&str] = &["sequence gap"];
const DISORDER: &[&str] = &[
    "out of order",
    "sequence gap",
    "chain link broken",
    "a field was altered",
];
const TRUNCATED: &[&str] = &["log truncated"];
const BAD_SIGNATURE: &[&str] = &["invalid signature"];

// ---------------------------------------------------------------------------
// Baseline.

#[tokio::test(flavor = "multi_thread")]
async fn an_untouched_export_and_database_verify() {
    let f = fixture().await;
    let r = verify_file(&f.pk, &f.log);
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("VERIFIED"), "{r}");
    let n = f.last_seq();
    assert!(
        r.stdout.contains(&format!(
            "{n} entries (seq 1..{n}), {} signed checkpoints",
            f.checkpoint_seqs().len()
        )),
        "{r}"
    );
    assert!(
        r.stdout.contains(&format!("the last covering seq {n}")),
        "{r}"
    );
    assert!(!r.stdout.contains("WARNING"), "{r}");

    let r = verify_db(&f.pk, &f.db);
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("VERIFIED"), "{r}");

    // The export is exactly what the database holds.
    let (entries, cps, public) = tokenvault::storage::sqlite::read_audit_offline(&f.db).unwrap();
    assert_eq!(entries.len() as u64, n);
    assert_eq!(cps.len(), f.checkpoint_seqs().len());
    let pem = std::fs::read_to_string(&f.pk).unwrap();
    let pk: [u8; 32] = public.unwrap().try_into().unwrap();
    assert_eq!(pem, public_key_pem(&pk));
}

// ---------------------------------------------------------------------------
// Tampering with an export.

#[tokio::test(flavor = "multi_thread")]
async fn every_tampered_export_fails_verification() {
    let f = fixture().await;
    let n = f.last_seq();
    let k = f.middle();
    let denied = f.seq_where(|v| v["outcome"] == "denied");
    let last_cp = *f.checkpoint_seqs().last().unwrap();
    let first_cp = f.checkpoint_seqs()[0];

    let mut cases: Vec<(&str, Tamper, Expect, Option<PathBuf>)> = Vec::new();

    cases.push((
        "edit actor",
        t(move |l| {
            let i = pos(l, k);
            l[i]["actor"] = "spiffe://tokenvault.dev/someone-else".into();
        }),
        expect(k, ALTERED),
        None,
    ));
    cases.push((
        "edit outcome (denied → success)",
        t(move |l| {
            let i = pos(l, denied);
            l[i]["outcome"] = "success".into();
        }),
        expect(denied, ALTERED),
        None,
    ));
    cases.push((
        "edit time",
        t(move |l| {
            let i = pos(l, k);
            let t = l[i]["time_ms"].as_i64().unwrap();
            l[i]["time_ms"] = (t - 3_600_000).into();
        }),
        expect(k, ALTERED),
        None,
    ));
    cases.push((
        "edit and recompute every hash",
        t(move |l| {
            let i = pos(l, denied);
            l[i]["outcome"] = "success".into();
            l[i]["detail"] = Value::Null;
            rehash(l);
        }),
        expect(f.covered_before(denied), CHECKPOINT_DIFFERS),
        None,
    ));
    cases.push((
        "delete an entry",
        t(move |l| {
            l.remove(pos(l, k));
        }),
        expect(k, GAP),
        None,
    ));
    cases.push((
        "duplicate an entry",
        t(move |l| {
            let i = pos(l, k);
            let dup = l[i].clone();
            l.insert(i + 1, dup);
        }),
        expect(k + 1, &["out of order"]),
        None,
    ));
    cases.push((
        "insert a forged entry, renumbering the rest",
        t(move |l| {
            let i = pos(l, k);
            let mut forged = l[i].clone();
            forged["token"] = Value::Null;
            for v in l.iter_mut().filter(|v| v["type"] == "entry") {
                let s = v["seq"].as_u64().unwrap();
                if s > k {
                    v["seq"] = (s + 1).into();
                }
            }
            forged["seq"] = (k + 1).into();
            l.insert(i + 1, forged);
        }),
        expect(k + 1, ALTERED),
        None,
    ));
    cases.push((
        "insert a forged entry and recompute every hash",
        t(move |l| {
            let i = pos(l, k);
            let forged = l[i].clone();
            for v in l.iter_mut().filter(|v| v["type"] == "entry") {
                let s = v["seq"].as_u64().unwrap();
                if s > k {
                    v["seq"] = (s + 1).into();
                }
            }
            l.insert(i + 1, forged);
            let j = i + 1;
            l[j]["seq"] = (k + 1).into();
            rehash(l);
        }),
        expect(f.covered_before(k + 1), CHECKPOINT_DIFFERS),
        None,
    ));
    cases.push((
        "swap two adjacent entries",
        t(move |l| {
            let (i, j) = (pos(l, k), pos(l, k + 1));
            l.swap(i, j);
        }),
        expect(k, DISORDER),
        None,
    ));
    cases.push((
        "swap two adjacent entries' contents, keeping seqs",
        t(move |l| {
            let (i, j) = (pos(l, k), pos(l, k + 1));
            l.swap(i, j);
            l[i]["seq"] = k.into();
            l[j]["seq"] = (k + 1).into();
        }),
        expect(k, DISORDER),
        None,
    ));
    cases.push((
        "truncate the tail, keeping the last checkpoint",
        t(move |l| {
            l.retain(|v| !(v["type"] == "entry" && v["seq"].as_u64().unwrap() > n - 5));
        }),
        expect(n - 4, TRUNCATED),
        None,
    ));
    cases.push((
        "flip a byte of a checkpoint signature",
        t(move |l| {
            let cp = l.iter_mut().rfind(|v| v["type"] == "checkpoint").unwrap();
            let mut sig = hex::decode(cp["signature"].as_str().unwrap()).unwrap();
            sig[10] ^= 0x01;
            cp["signature"] = hex::encode(sig).into();
        }),
        expect(last_cp, BAD_SIGNATURE),
        None,
    ));
    cases.push((
        "move a checkpoint to another seq",
        t(move |l| {
            let cp = l.iter_mut().rfind(|v| v["type"] == "checkpoint").unwrap();
            cp["seq"] = (last_cp - 1).into();
        }),
        expect(last_cp - 1, BAD_SIGNATURE),
        None,
    ));
    // Verified against another vault's key: every signature fails.
    let other = AuditSigner::generate().unwrap();
    let wrong_pk = f.work.path().join("wrong.pem");
    std::fs::write(&wrong_pk, public_key_pem(other.public())).unwrap();
    cases.push((
        "the wrong public key",
        t(|_| {}),
        expect(first_cp, BAD_SIGNATURE),
        Some(wrong_pk),
    ));

    let mut results = Vec::new();
    for (i, (name, tamper, want, pk)) in cases.into_iter().enumerate() {
        let mut lines = f.lines.clone();
        tamper(&mut lines);
        let path = f.work.path().join(format!("tampered-{i}.jsonl"));
        write_lines(&path, &lines);
        let r = verify_file(pk.as_deref().unwrap_or(&f.pk), &path);
        results.push((name.to_string(), check_failed(name, &r, &want)));
    }
    report(results);
}

/// Without a trusted copy of the latest checkpoint, an attacker who drops
/// checkpoints can rewrite what they no longer cover; the verifier must then
/// never claim the rewritten part is covered (it says so, or fails).
#[tokio::test(flavor = "multi_thread")]
async fn stripping_checkpoints_never_passes_silently() {
    let f = fixture().await;
    let n = f.last_seq();
    let denied = f.seq_where(|v| v["outcome"] == "denied");

    // Every checkpoint dropped and an entry rewritten.
    let mut lines = f.lines.clone();
    lines.retain(|v| v["type"] != "checkpoint");
    let i = pos(&lines, denied);
    lines[i]["outcome"] = "success".into();
    rehash(&mut lines);
    let path = f.work.path().join("stripped.jsonl");
    write_lines(&path, &lines);
    let r = verify_file(&f.pk, &path);
    assert!(
        !r.ok() || r.stdout.contains("WARNING: no signed checkpoint"),
        "{r}"
    );
    assert!(!r.stdout.contains("the last covering seq"), "{r}");

    // The tail cut off together with the checkpoints covering it.
    let cps = f.checkpoint_seqs();
    let cut = (1..=n - 5).rev().find(|s| !cps.contains(s)).unwrap();
    let mut lines = f.lines.clone();
    lines.retain(|v| v["seq"].as_u64().is_none_or(|s| s <= cut));
    let path = f.work.path().join("cut.jsonl");
    write_lines(&path, &lines);
    let r = verify_file(&f.pk, &path);
    assert!(
        !r.ok()
            || r.stdout.contains("not yet covered by a checkpoint")
            || r.stdout.contains("WARNING: no signed checkpoint"),
        "{r}"
    );
}

// ---------------------------------------------------------------------------
// Tampering with the live database file.

fn sql(db: &Path, batch: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(batch)
        .unwrap_or_else(|e| panic!("{batch}: {e}"));
}

const DROP_AUDIT_TRIGGERS: &str = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";

/// Recomputes the stored hashes over the (tampered) rows, as a forger with
/// the algorithm but not the signing key would.
fn rehash_db(db: &Path) {
    let (entries, _, _) = tokenvault::storage::sqlite::read_audit_offline(db).unwrap();
    let chain = tokenvault::audit::verify::chain_of(&entries);
    let c = rusqlite::Connection::open(db).unwrap();
    for (r, (eh, ch)) in entries.iter().zip(chain) {
        c.execute(
            "UPDATE audit SET entry_hash = ?2, chain_hash = ?3 WHERE seq = ?1",
            rusqlite::params![i64::try_from(r.seq).unwrap(), &eh[..], &ch[..]],
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tampered_database_fails_verification() {
    let f = fixture().await;
    let n = f.last_seq();
    let k = f.middle();
    let denied = f.seq_where(|v| v["outcome"] == "denied");
    let last_cp = *f.checkpoint_seqs().last().unwrap();
    let (ki, ni, di) = (
        i64::try_from(k).unwrap(),
        i64::try_from(n).unwrap(),
        i64::try_from(denied).unwrap(),
    );

    let cases: Vec<(&str, DbTamper, Expect)> = vec![
        (
            "UPDATE one field",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "{DROP_AUDIT_TRIGGERS}
                         UPDATE audit SET actor = 'spiffe://tokenvault.dev/someone-else' WHERE seq = {ki};"
                    ),
                );
            }),
            expect(k, ALTERED),
        ),
        (
            "UPDATE one field and recompute every hash",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "{DROP_AUDIT_TRIGGERS}
                         UPDATE audit SET outcome = 'success', detail = NULL WHERE seq = {di};"
                    ),
                );
                rehash_db(db);
            }),
            expect(f.covered_before(denied), CHECKPOINT_DIFFERS),
        ),
        (
            "UPDATE one field and NULL its stored hashes",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "{DROP_AUDIT_TRIGGERS}
                         UPDATE audit SET outcome = 'success', entry_hash = NULL, chain_hash = NULL
                         WHERE seq = {di};"
                    ),
                );
            }),
            // Today the row itself passes (no stored hash to compare) and
            // the next link no longer matches; naming the row itself, as
            // the export verifier does, would be as good.
            Expect {
                seqs: vec![denied, denied + 1],
                any_of: &["chain link broken", "lacks its recorded hashes", "altered"],
            },
        ),
        (
            "DELETE one row",
            d(move |db| {
                sql(
                    db,
                    &format!("{DROP_AUDIT_TRIGGERS} DELETE FROM audit WHERE seq = {ki};"),
                );
            }),
            expect(k, GAP),
        ),
        (
            "INSERT a forged row with the next seq (no trigger stops it)",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "INSERT INTO audit (seq, time_ms, actor, tenant, action, token, outcome, peer,
                                            purpose, detail, entry_hash, key_id, key_version, reason,
                                            approvers, chain_hash)
                         SELECT {ni} + 1, time_ms, actor, tenant, action, token, outcome, peer,
                                purpose, detail, entry_hash, key_id, key_version, reason,
                                approvers, chain_hash
                         FROM audit WHERE seq = {ki};"
                    ),
                );
            }),
            expect(n + 1, ALTERED),
        ),
        (
            "swap two rows' contents via a temporary seq",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "{DROP_AUDIT_TRIGGERS}
                         UPDATE audit SET seq = -1 WHERE seq = {ki};
                         UPDATE audit SET seq = {ki} WHERE seq = {ki} + 1;
                         UPDATE audit SET seq = {ki} + 1 WHERE seq = -1;"
                    ),
                );
            }),
            expect(k, DISORDER),
        ),
        (
            "DELETE the last rows, the checkpoint remaining",
            d(move |db| {
                sql(
                    db,
                    &format!("{DROP_AUDIT_TRIGGERS} DELETE FROM audit WHERE seq > {ni} - 5;"),
                );
            }),
            expect(n - 4, TRUNCATED),
        ),
        (
            "UPDATE a checkpoint's signature",
            d(move |db| {
                let c = rusqlite::Connection::open(db).unwrap();
                c.execute_batch("DROP TRIGGER checkpoints_no_update;")
                    .unwrap();
                let sig: Vec<u8> = c
                    .query_row(
                        "SELECT signature FROM checkpoints WHERE seq = ?1",
                        [i64::try_from(last_cp).unwrap()],
                        |r| r.get(0),
                    )
                    .unwrap();
                let mut forged = sig.clone();
                forged[0] ^= 0x80;
                c.execute(
                    "UPDATE checkpoints SET signature = ?2 WHERE seq = ?1",
                    rusqlite::params![i64::try_from(last_cp).unwrap(), forged],
                )
                .unwrap();
            }),
            expect(last_cp, BAD_SIGNATURE),
        ),
        (
            "UPDATE a checkpoint's head to a forged chain's",
            d(move |db| {
                sql(
                    db,
                    &format!(
                        "{DROP_AUDIT_TRIGGERS} DROP TRIGGER checkpoints_no_update;
                         UPDATE audit SET outcome = 'success', detail = NULL WHERE seq = {di};"
                    ),
                );
                rehash_db(db);
                sql(
                    db,
                    "UPDATE checkpoints SET chain_hash =
                       (SELECT a.chain_hash FROM audit a WHERE a.seq = checkpoints.seq);",
                );
            }),
            // Without the signing key, the heads cannot be re-signed.
            expect(first_cp_from(&f, denied), BAD_SIGNATURE),
        ),
    ];

    let mut results = Vec::new();
    for (i, (name, tamper, want)) in cases.into_iter().enumerate() {
        let copy = f.db_copy(&format!("tampered-{i}"));
        tamper(&copy);
        let r = verify_db(&f.pk, &copy);
        results.push((name.to_string(), check_failed(name, &r, &want)));
    }
    report(results);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_refuses_updates_and_deletes_of_audit_rows_and_checkpoints() {
    let f = fixture().await;
    let copy = f.db_copy("triggers");
    let k = i64::try_from(f.middle()).unwrap();
    let cp = i64::try_from(f.checkpoint_seqs()[0]).unwrap();
    let c = rusqlite::Connection::open(&copy).unwrap();
    let refused = |stmt: &str, why: &str| {
        let e = c
            .execute(stmt, [])
            .expect_err(&format!("{stmt} was allowed"));
        assert!(e.to_string().contains(why), "{stmt}: {e}");
    };
    refused(
        &format!("UPDATE audit SET actor = 'x' WHERE seq = {k}"),
        "append-only",
    );
    refused(
        &format!("UPDATE audit SET seq = seq + 1000 WHERE seq = {k}"),
        "append-only",
    );
    refused(&format!("DELETE FROM audit WHERE seq = {k}"), "append-only");
    refused("DELETE FROM audit", "append-only");
    refused(
        &format!("UPDATE checkpoints SET signature = x'00' WHERE seq = {cp}"),
        "append-only",
    );
    refused(
        &format!("DELETE FROM checkpoints WHERE seq = {cp}"),
        "append-only",
    );
    refused("DELETE FROM checkpoints", "append-only");
    drop(c);
    // Nothing changed: the copy still verifies.
    let r = verify_db(&f.pk, &copy);
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("VERIFIED"), "{r}");
}

/// The writer continues the chain from the last row's chain hash. With that
/// hash gone it used to restart from genesis silently, so every later entry
/// would chain onto nothing; the vault must refuse to start instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_vault_whose_audit_chain_head_is_missing_refuses_to_start() {
    let v = TestVault::start().await;
    let db = v.db_path();
    let data = v.stop().await;
    sql(
        &db,
        &format!(
            "{DROP_AUDIT_TRIGGERS}
             UPDATE audit SET chain_hash = NULL WHERE seq = (SELECT MAX(seq) FROM audit);"
        ),
    );
    let before = audit_rows(&db).len();
    let Err((_data, e)) = TestVault::try_start_in(data, &[]).await else {
        panic!("a vault with no audit chain head started");
    };
    let e = e.to_string();
    assert!(e.contains("audit chain head is missing"), "{e}");
    assert_eq!(audit_rows(&db).len(), before, "nothing may be appended");
}

/// Records removed from the end of the log, past its last signed
/// checkpoint, or a record at a checkpoint altered: the vault refuses to
/// start instead of reusing signed sequence numbers on a chain that can
/// never verify again.
#[tokio::test(flavor = "multi_thread")]
async fn a_vault_whose_log_lost_signed_records_refuses_to_start() {
    for (case, tamper, want) in [
        (
            "tail removed",
            "DELETE FROM audit WHERE seq > (SELECT MAX(seq) FROM checkpoints) - 2;",
            "audit records were removed",
        ),
        (
            "checkpointed record altered",
            "UPDATE audit SET chain_hash = zeroblob(32)
             WHERE seq = (SELECT MAX(seq) FROM checkpoints);",
            "does not match the signed checkpoint",
        ),
    ] {
        let v = TestVault::start().await;
        let mut c = v.client(ACME_CHECKOUT).await;
        call(c.tokenize(TokenizeRequest {
            pan: "4111111111111111".into(),
            expiry: None,
        }))
        .await
        .unwrap();
        drop(c);
        let db = v.db_path();
        // Stopping signs a checkpoint of the head.
        let data = v.stop().await;
        sql(&db, &format!("{DROP_AUDIT_TRIGGERS} {tamper}"));
        let before = audit_rows(&db).len();
        let Err((_data, e)) = TestVault::try_start_in(data, &[]).await else {
            panic!("{case}: the vault started");
        };
        let e = e.to_string();
        assert!(e.contains(want), "{case}: {e}");
        assert_eq!(audit_rows(&db).len(), before, "{case}: nothing appended");
    }
}

// ---------------------------------------------------------------------------
// The verifier's independence.

#[tokio::test(flavor = "multi_thread")]
async fn verification_needs_only_the_export_and_the_public_key() {
    let f = fixture().await;
    let alone = tempfile::tempdir().unwrap();
    std::fs::copy(&f.pk, alone.path().join("pk.pem")).unwrap();
    std::fs::copy(&f.log, alone.path().join("log.jsonl")).unwrap();
    let run = |file: &str| {
        vault_cli(
            &args(&[&"audit", &"verify", &"--public-key", &"pk.pem", &file]),
            Some(alone.path()),
        )
    };
    let r = run("log.jsonl");
    assert!(r.ok(), "{r}");
    assert!(r.stdout.contains("VERIFIED"), "{r}");
    // And it still catches tampering there.
    let text = std::fs::read_to_string(alone.path().join("log.jsonl")).unwrap();
    let k = f.middle();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let i = pos(&lines, k);
    lines[i]["purpose"] = "fraud".into();
    write_lines(&alone.path().join("bad.jsonl"), &lines);
    let r = run("bad.jsonl");
    check_failed("edit purpose", &r, &expect(k, ALTERED)).unwrap();
    // Only the files given (and what the run wrote, nothing) are there: no
    // database, no KEK, no configuration was needed or created.
    let mut names: Vec<String> = std::fs::read_dir(alone.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bad.jsonl", "log.jsonl", "pk.pem"]);
}
