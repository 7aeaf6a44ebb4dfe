//! Proves that no card number reaches the disk or the logs in clear: after a full workload at debug log level, neither the SQLite files (live and after shutdown) nor any other data file nor the captured standard output and error hold a known PAN or any Luhn-valid run of 13–19 ASCII digits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::calls::CALL_TIMEOUT;
use common::cards::{luhn_valid, with_luhn};
use common::process::VaultProc;
use tokenvault::client::{ClientPki, connect};
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::{
    CardBrand, DeleteTokenRequest, DetokenizeRequest, Expiry, GetTokenMetadataRequest,
    TokenizeRequest,
};
use tonic::Code;
use tonic::transport::Channel;

type Client = TokenServiceClient<Channel>;

const CARDS: usize = 200;
const DELETED: usize = 40;
const PURPOSE: &str = "leakage test";

// ---------------------------------------------------------------------------
// Card numbers.

/// splitmix64: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A tokenized test card: what was sent and what must come back.
#[derive(Debug, Clone)]
struct Card {
    /// Digits only.
    pan: String,
    /// The form sent (sometimes with spaces or hyphens).
    sent: String,
    brand: CardBrand,
    expiry: Option<Expiry>,
}

impl Card {
    fn bin(&self) -> &str {
        &self.pan[..if self.pan.len() >= 16 { 8 } else { 6 }]
    }
    fn last4(&self) -> &str {
        &self.pan[self.pan.len() - 4..]
    }
}

/// `CARDS` distinct Luhn-valid card numbers over several brands and lengths.
fn test_cards() -> Vec<Card> {
    // (IIN prefix choices, length choices, brand)
    let specs: &[(&[&str], &[usize], CardBrand)] = &[
        (&["4"], &[16, 13, 19], CardBrand::Visa),
        (
            &["51", "52", "53", "54", "55"],
            &[16],
            CardBrand::Mastercard,
        ),
        (&["2221", "2500", "2720"], &[16], CardBrand::Mastercard),
        (&["34", "37"], &[15], CardBrand::Amex),
        (&["6011", "65"], &[16, 19], CardBrand::Discover),
        (&["3528", "3566", "3589"], &[16], CardBrand::Jcb),
        (&["36", "3095", "300"], &[14], CardBrand::DinersClub),
        (&["620", "621", "81"], &[16, 17, 19], CardBrand::Unionpay),
        (&["6759", "5018", "6304"], &[12, 16, 19], CardBrand::Maestro),
    ];
    let mut rng = Rng(0x7e57_ca4d_0000_0001);
    let mut seen = HashSet::new();
    let mut cards = Vec::new();
    let mut i = 0usize;
    while cards.len() < CARDS {
        let (prefixes, lens, brand) = specs[i % specs.len()];
        i += 1;
        let prefix = prefixes[usize::try_from(rng.below(prefixes.len() as u64)).unwrap()];
        let len = lens[usize::try_from(rng.below(lens.len() as u64)).unwrap()];
        let mut body = prefix.to_owned();
        while body.len() < len - 1 {
            body.push(char::from(b'0' + u8::try_from(rng.below(10)).unwrap()));
        }
        let pan = with_luhn(&body);
        if !seen.insert(pan.clone()) {
            continue;
        }
        let sent = match cards.len() % 4 {
            1 => spaced(&pan, ' '),
            2 => spaced(&pan, '-'),
            _ => pan.clone(),
        };
        let expiry = (cards.len() % 3 == 0).then(|| Expiry {
            month: u32::try_from(1 + cards.len() % 12).unwrap(),
            year: 2030,
        });
        cards.push(Card {
            pan,
            sent,
            brand,
            expiry,
        });
    }
    cards
}

/// `pan` in groups of four separated by `sep`.
fn spaced(pan: &str, sep: char) -> String {
    let mut s = String::new();
    for (i, c) in pan.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            s.push(sep);
        }
        s.push(c);
    }
    s
}

/// The same number with a wrong check digit.
fn bad_checksum(pan: &str) -> String {
    let (body, last) = pan.split_at(pan.len() - 1);
    let d = last.as_bytes()[0] - b'0';
    format!("{body}{}", char::from(b'0' + (d + 1) % 10))
}

// ---------------------------------------------------------------------------
// Calls.

async fn client(url: &str, pki: &ClientPki) -> Client {
    tokio::time::timeout(CALL_TIMEOUT, connect(url, pki))
        .await
        .expect("connect timed out")
        .expect("connect to the vault")
}

/// Runs `f` over `items` with up to 8 calls in flight, in order of results.
async fn concurrently<T, R, F, Fut>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let chunk = items.len().div_ceil(8).max(1);
    let mut items = items.into_iter();
    let mut tasks = Vec::new();
    loop {
        let part: Vec<T> = items.by_ref().take(chunk).collect();
        if part.is_empty() {
            break;
        }
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for item in part {
                out.push(
                    tokio::time::timeout(CALL_TIMEOUT, f(item))
                        .await
                        .expect("call timed out"),
                );
            }
            out
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

/// No part of the input's digits echoed in an error message: no run of
/// six of them (a BIN's worth), so a message quoting part of a long input
/// fails too, while the rule's own numbers ("12 to 19 digits") pass.
fn assert_no_digits_echoed(message: &str, input: &str) {
    let digits: Vec<char> = input.chars().filter(char::is_ascii_digit).collect();
    let shown: String = message.chars().filter(char::is_ascii_digit).collect();
    for w in digits.windows(6) {
        let w: String = w.iter().collect();
        assert!(
            !shown.contains(&w),
            "error message echoes digits of the card number: {message:?}"
        );
    }
    assert!(!message.contains(input), "{message:?}");
}

// ---------------------------------------------------------------------------
// Scanning.

/// What a scan looks for: known digit strings (digits only; matched even
/// when the file separates them with spaces or hyphens).
struct Needles {
    set: HashSet<Vec<u8>>,
    lens: BTreeSet<usize>,
}

impl Needles {
    fn new(pans: impl IntoIterator<Item = String>) -> Self {
        let set: HashSet<Vec<u8>> = pans.into_iter().map(String::into_bytes).collect();
        let lens = set.iter().map(Vec::len).collect();
        Self { set, lens }
    }
}

/// Findings in `bytes` (named `name`): any known PAN, as digits or grouped
/// with spaces/hyphens, and any maximal run of 13–19 ASCII digits that
/// passes Luhn.
fn scan(name: &str, bytes: &[u8], needles: &Needles) -> Vec<String> {
    let mut findings = Vec::new();
    // Known PANs: runs of digits, spaces and hyphens, separators dropped.
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits: Vec<(u8, usize)> = Vec::new();
        while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b' ' | b'-') {
            if bytes[i].is_ascii_digit() {
                digits.push((bytes[i], i));
            }
            i += 1;
        }
        let plain: Vec<u8> = digits.iter().map(|&(d, _)| d).collect();
        for &len in &needles.lens {
            for (k, w) in plain.windows(len).enumerate() {
                if needles.set.contains(w) {
                    findings.push(format!(
                        "{name}: a known card number ({}…) at offset {} (run starting at {start})",
                        String::from_utf8_lossy(&w[..6]),
                        digits[k].1
                    ));
                }
            }
        }
    }
    // Any Luhn-valid maximal run of 13–19 ASCII digits.
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let run = &bytes[start..i];
        if (13..=19).contains(&run.len()) && luhn_valid(run) {
            findings.push(format!(
                "{name}: a Luhn-valid run of {} digits ({}…) at offset {start}",
                run.len(),
                String::from_utf8_lossy(&run[..6])
            ));
        }
    }
    findings
}

/// Maximal runs of ASCII digits in `bytes`.
fn digit_runs(bytes: &[u8]) -> HashSet<&[u8]> {
    bytes
        .split(|b| !b.is_ascii_digit())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Every regular file under `dir`, recursively, except `pki/` and the KEK
/// file (key material, not scanned for card numbers).
fn data_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap();
        if rel == Path::new("pki") || rel == Path::new("kek.b64") {
            continue;
        }
        if path.is_dir() {
            data_files(root, &path, out);
        } else if path.is_file() {
            out.push(path);
        }
    }
}

/// Copies the live SQLite files (those that exist) into `to`.
fn snapshot_db(data: &Path, to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let mut copied = Vec::new();
    for name in ["vault.db", "vault.db-wal", "vault.db-shm"] {
        let from = data.join(name);
        if from.exists() {
            let dest = to.join(name);
            std::fs::copy(&from, &dest).unwrap();
            copied.push(dest);
        }
    }
    copied
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn no_card_number_in_clear_on_disk_or_in_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    let snapshot = tmp.path().join("live-snapshot");

    let mut vault = VaultProc::start(&data, &logs, "vault", "debug");
    assert_no_core_dumps(vault.pid());
    let url = vault.url();
    let checkout_pki = ClientPki::from_dev_dir(&data, "acme-checkout").unwrap();
    let payments_pki = ClientPki::from_dev_dir(&data, "acme-payments").unwrap();
    let checkout = client(&url, &checkout_pki).await;
    let payments = client(&url, &payments_pki).await;

    let cards = test_cards();
    let mut needles: Vec<String> = cards.iter().map(|c| c.pan.clone()).collect();

    // Tokenize every card.
    let results = concurrently(cards.clone(), {
        let checkout = checkout.clone();
        move |card: Card| {
            let mut c = checkout.clone();
            async move {
                let r = c
                    .tokenize(TokenizeRequest {
                        pan: card.sent.clone(),
                        expiry: card.expiry,
                    })
                    .await;
                (card, r)
            }
        }
    })
    .await;
    let mut tokens: Vec<(String, Card)> = Vec::new();
    for (card, r) in results {
        let r = r
            .unwrap_or_else(|s| panic!("tokenize {:?} ({}…): {s:?}", card.brand, card.bin()))
            .into_inner();
        let m = r.metadata.unwrap();
        assert_eq!(m.bin, card.bin());
        assert_eq!(m.last4, card.last4());
        assert_eq!(m.brand, i32::from(card.brand), "brand of {}…", card.bin());
        assert_eq!(m.pan_length, u32::try_from(card.pan.len()).unwrap());
        assert!(
            !r.token.contains(&card.pan),
            "the token contains the card number"
        );
        tokens.push((r.token, card));
    }

    // Detokenize every token.
    let results = concurrently(tokens.clone(), {
        let payments = payments.clone();
        move |(token, card): (String, Card)| {
            let mut c = payments.clone();
            async move {
                let r = c
                    .detokenize(DetokenizeRequest {
                        token,
                        purpose: PURPOSE.into(),
                    })
                    .await;
                (card, r)
            }
        }
    })
    .await;
    for (card, r) in results {
        let r = r.expect("detokenize").into_inner();
        assert!(r.pan == card.pan, "detokenize returned another card number");
        assert_eq!(r.expiry, card.expiry);
    }

    // Metadata of every token.
    let results = concurrently(tokens.clone(), {
        let checkout = checkout.clone();
        move |(token, card): (String, Card)| {
            let mut c = checkout.clone();
            async move {
                let r = c
                    .get_token_metadata(GetTokenMetadataRequest { token })
                    .await;
                (card, r)
            }
        }
    })
    .await;
    for (card, r) in results {
        let m = r.expect("metadata").into_inner().metadata.unwrap();
        assert_eq!(
            (m.bin.as_str(), m.last4.as_str()),
            (card.bin(), card.last4())
        );
        assert_eq!(m.expiry, card.expiry);
    }

    // Delete some.
    let (deleted, kept) = tokens.split_at(DELETED);
    let results = concurrently(deleted.to_vec(), {
        let checkout = checkout.clone();
        move |(token, _): (String, Card)| {
            let mut c = checkout.clone();
            async move { c.delete_token(DeleteTokenRequest { token }).await }
        }
    })
    .await;
    for r in results {
        r.expect("delete");
    }
    let gone = payments
        .clone()
        .detokenize(DetokenizeRequest {
            token: deleted[0].0.clone(),
            purpose: PURPOSE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Invalid card numbers: wrong check digit (plain and grouped), a letter,
    // too short, too long.
    let mut invalid: Vec<String> = Vec::new();
    for (k, card) in cards.iter().take(20).enumerate() {
        let bad = bad_checksum(&card.pan);
        needles.push(bad.clone());
        invalid.push(if k % 2 == 0 { bad } else { spaced(&bad, ' ') });
    }
    let letter = format!("{}x{}", &cards[0].pan[..8], &cards[0].pan[9..]);
    needles.push(cards[0].pan[..8].to_owned() + &cards[0].pan[9..]);
    invalid.push(letter);
    invalid.push(cards[1].pan[..11].to_owned());
    let too_long = format!("{}{}", cards[2].pan, cards[3].pan);
    needles.push(cards[2].pan.clone() + &cards[3].pan[..1]);
    invalid.push(too_long);
    for input in &invalid {
        let e = checkout
            .clone()
            .tokenize(TokenizeRequest {
                pan: input.clone(),
                expiry: None,
            })
            .await
            .expect_err("an invalid card number was tokenized");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert_no_digits_echoed(e.message(), input);
    }

    // A card number in the detokenize purpose is refused (and must not be
    // stored in the audit log).
    for purpose in [
        format!("refund {}", kept[0].1.pan),
        format!("refund {} now", spaced(&kept[1].1.pan, ' ')),
        format!("card={}", spaced(&kept[2].1.pan, '-')),
    ] {
        let e = payments
            .clone()
            .detokenize(DetokenizeRequest {
                token: kept[0].0.clone(),
                purpose: purpose.clone(),
            })
            .await
            .expect_err("a purpose holding a card number was accepted");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert_no_digits_echoed(e.message(), &purpose);
    }

    let needles = Needles::new(needles);
    let mut findings = Vec::new();

    // The live database, WAL and shared memory, copied while the vault runs.
    let live = snapshot_db(&data, &snapshot);
    let live_wal = snapshot.join("vault.db-wal");
    assert!(
        live_wal.exists() && std::fs::metadata(&live_wal).unwrap().len() > 0,
        "expected a non-empty WAL while the vault runs"
    );
    let mut live_bytes = Vec::new();
    for p in &live {
        let bytes = std::fs::read(p).unwrap();
        findings.extend(scan(&p.display().to_string(), &bytes, &needles));
        live_bytes.extend_from_slice(&bytes);
        live_bytes.push(0);
    }
    // Not vacuous: the live files hold each kept card's stored metadata.
    let live_runs = digit_runs(&live_bytes);
    for (_, card) in kept {
        let meta = format!("{}{}", card.bin(), card.last4());
        assert!(
            live_runs.contains(meta.as_bytes()),
            "live database files lack the stored BIN+last4 of a kept token; is the scan reading content?"
        );
    }

    // Graceful stop.
    vault.sigterm();
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    let stderr = vault.stderr();
    assert!(status.success(), "vault exited with {status}:\n{stderr}");
    assert!(stderr.contains("vault stopped"), "no `vault stopped` line");
    assert!(
        stderr.contains("DEBUG"),
        "no debug lines in the log; VAULT_LOG=debug did not take"
    );
    drop(vault);

    // Everything in the data directory except key material.
    let mut files = Vec::new();
    data_files(&data, &data, &mut files);
    let db = data.join("vault.db");
    assert!(files.contains(&db), "no vault.db in {}", data.display());
    for p in &files {
        findings.extend(scan(
            &p.display().to_string(),
            &std::fs::read(p).unwrap(),
            &needles,
        ));
    }
    let db_bytes = std::fs::read(&db).unwrap();
    assert!(
        db_bytes.len() >= 16 * 1024,
        "vault.db is only {} bytes",
        db_bytes.len()
    );
    let db_runs = digit_runs(&db_bytes);
    for (_, card) in kept {
        let meta = format!("{}{}", card.bin(), card.last4());
        assert!(
            db_runs.contains(meta.as_bytes()),
            "vault.db lacks the stored BIN+last4 of a kept token"
        );
    }

    // The captured standard output and error.
    for name in ["vault.stdout", "vault.stderr"] {
        let p = logs.join(name);
        let bytes = std::fs::read(&p).unwrap();
        assert!(!bytes.is_empty(), "{name} is empty");
        findings.extend(scan(&p.display().to_string(), &bytes, &needles));
    }

    assert!(
        findings.is_empty(),
        "card numbers in clear:\n{}",
        findings.join("\n")
    );
}

/// A crash of the serving process must not write its memory (keys, card
/// numbers) to a core file: its core size limit is 0, soft and hard (the
/// process also makes itself non-dumpable; `hardening.rs` tests that).
fn assert_no_core_dumps(pid: u32) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core size line in /proc/PID/limits");
    let fields: Vec<&str> = core.split_whitespace().collect();
    // "Max core file size <soft> <hard> bytes"
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

/// Core files in `dir` (the kernel here names them `core` or `core.PID`).
fn core_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n == "core" || n.starts_with("core."))
        .collect()
}

/// A vault that crashes writes no core dump, even when started with core
/// dumps allowed: it lowers its own limit to 0 and makes itself
/// non-dumpable before loading any key. A control process crashed the same
/// way shows that this machine does write core files into the working
/// directory; where it does not, only the limit is checked.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_vault_writes_no_core_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let allow_cores = ["prlimit", "--core=unlimited:unlimited", "--"];

    let control_dir = tmp.path().join("control");
    std::fs::create_dir_all(&control_dir).unwrap();
    let mut control = std::process::Command::new(allow_cores[0])
        .args(&allow_cores[1..])
        .args(["sleep", "30"])
        .current_dir(&control_dir)
        .spawn()
        .expect("run prlimit (util-linux)");
    std::thread::sleep(Duration::from_millis(200));
    common::process::signal(&control, "ABRT");
    control.wait().unwrap();
    let cores_are_written = !core_files(&control_dir).is_empty();

    let logs = tmp.path().join("logs");
    let mut vault = VaultProc::start_via(
        &allow_cores,
        &tmp.path().join("data"),
        &logs,
        "crash",
        "info",
    );
    assert_no_core_dumps(vault.pid());
    vault.signal("ABRT");
    let status = vault.wait_exit(Duration::from_secs(15)).await;
    assert!(!status.success(), "the vault survived SIGABRT: {status}");
    assert_eq!(
        core_files(&logs),
        Vec::<String>::new(),
        "the vault dumped core"
    );
    if !cores_are_written {
        eprintln!("this machine wrote no core for the control process either");
    }
}

/// `server.lock_memory = true`: the vault either runs with its memory
/// locked (so keys and card numbers cannot reach swap), or, where it may not
/// lock (no `CAP_IPC_LOCK`, a low `RLIMIT_MEMLOCK`), refuses to start and
/// says how to fix it. It never runs unlocked when told to lock.
#[tokio::test(flavor = "multi_thread")]
async fn a_vault_told_to_lock_memory_runs_locked_or_not_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let layout = tokenvault::devpki::ensure_dev_dir(&data, "127.0.0.1:0".parse().unwrap()).unwrap();
    let text = std::fs::read_to_string(layout.config()).unwrap();
    assert!(text.contains("[server]\n"), "{text}");
    std::fs::write(
        layout.config(),
        text.replace("[server]\n", "[server]\nlock_memory = true\n"),
    )
    .unwrap();

    let logs = tmp.path().join("logs");
    match VaultProc::try_start_via(&[], &data, &logs, "locked", "info") {
        Ok(vault) => {
            let status = std::fs::read_to_string(format!("/proc/{}/status", vault.pid())).unwrap();
            let locked_kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("a VmLck line");
            assert!(
                locked_kb > 0,
                "told to lock, runs with nothing locked:\n{status}"
            );
        }
        Err(stderr) => {
            assert!(stderr.contains("cannot lock memory"), "{stderr}");
            assert!(stderr.contains("CAP_IPC_LOCK"), "{stderr}");
        }
    }
}

/// The scanner itself finds what it must, so a clean scan means something.
#[test]
fn scanner_finds_planted_card_numbers() {
    let needles = Needles::new(["4111111111111111".to_owned()]);
    let planted: &[(&[u8], usize)] = &[
        // Known, and a Luhn-valid run: two findings.
        (b"\x00\x014111111111111111\x02", 2),
        // Known, grouped.
        (b"pan=4111 1111 1111 1111 end", 1),
        (b"pan=4111-1111-1111-1111", 1),
        // Unknown but Luhn-valid.
        (b"x378282246310005y", 1),
        // Timestamps, short runs, a Luhn-invalid 16-digit run: nothing.
        (
            b"2026-08-04T10:11:12.123456Z 41111111 1111 4111111111111112",
            0,
        ),
    ];
    for &(bytes, expected) in planted {
        let found = scan("t", bytes, &needles);
        assert_eq!(
            found.len(),
            expected,
            "{:?}: {found:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}
