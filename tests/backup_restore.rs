//! A restore drill (REQUIREMENTS 9): `vault backup` takes a consistent snapshot while the vault serves under load, mode 0600, holding no card number and no KEK; `vault restore` refuses while the vault runs and refuses to replace a database unless told, then keeps it; after the restore every token of the backup detokenizes to its card number, tokens made after it are gone, a card deleted after it stays deleted, every data key that was active is retired (audited, so none continues from the backup's rolled-back use counter) and new tokens get fresh keys, and the audit log verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use common::calls::{assert_all_detokenize, call, tokenize_many};
use common::cards::visa_pan;
use common::process::{VaultProc, assert_audit_log_verifies, vault_cli};
use common::*;
use tokenvault::proto::{DeleteTokenRequest, DetokenizeRequest, TokenizeRequest};
use tonic::Code;

const PURPOSE: &str = "restore drill";

fn active_keys(db: &Path) -> Vec<u32> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT id FROM deks WHERE state = 'active' ORDER BY id")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_drill_recovers_the_backup_and_retires_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let data = work.join("data");
    let db = data.join("vault.db");
    let config = data.join("vault.toml");
    let (config_s, backup) = (config.to_str().unwrap(), work.join("vault-backup.db"));
    let backup_s = backup.to_str().unwrap();
    let mut vault = VaultProc::start(&data, &work.join("logs"), "first", "info");
    let url = vault.url();
    let checkout = client_at(&url, &data, "acme-checkout").await;
    let before = tokenize_many(&checkout, 40_000_000, 60).await;
    let globex_before = tokenize_many(
        &client_at(&url, &data, "globex-checkout").await,
        41_000_000,
        10,
    )
    .await;

    // Back up while tokenize calls keep committing.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (mut c, stop, done) = (checkout.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let pan = visa_pan(42_000_000, done.load(Ordering::SeqCst));
                call(c.tokenize(TokenizeRequest { pan, expiry: None }))
                    .await
                    .unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    while done.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_start = done.load(Ordering::SeqCst);
    let run = tokio::task::spawn_blocking({
        let (config_s, backup_s, work) =
            (config_s.to_owned(), backup_s.to_owned(), work.to_owned());
        move || {
            vault_cli(
                &["backup", "--config", &config_s, "--out", &backup_s],
                &work,
            )
        }
    })
    .await
    .unwrap();
    let during = done.load(Ordering::SeqCst) - at_start;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(during > 0, "no tokenize committed while the backup ran");
    assert!(run.stdout.contains("holds no KEK"), "{}", run.stdout);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "backup mode {mode:o}");
    }
    let raw = std::fs::read(&backup).unwrap();
    for (_, pan) in before.iter().chain(&globex_before) {
        assert!(
            !contains(&raw, pan.as_bytes()),
            "a card number in clear in the backup"
        );
    }
    let kek_b64 = std::fs::read_to_string(data.join("kek.b64")).unwrap();
    let kek = base64::engine::general_purpose::STANDARD
        .decode(kek_b64.trim())
        .unwrap();
    assert!(!contains(&raw, &kek), "the KEK is in the backup");
    assert!(
        !contains(&raw, kek_b64.trim().as_bytes()),
        "the KEK is in the backup"
    );
    // A second backup to the same file is refused: nothing is overwritten.
    let again = vault_cli(&["backup", "--config", config_s, "--out", backup_s], work);
    assert_ne!(again.code, Some(0));
    assert_eq!(std::fs::read(&backup).unwrap(), raw);

    let after = tokenize_many(&checkout, 43_000_000, 20).await;
    // A card deleted after the backup stays deleted after the restore.
    let (erased, _) = before[0].clone();
    let mut c = checkout.clone();
    call(c.delete_token(DeleteTokenRequest {
        token: erased.clone(),
    }))
    .await
    .unwrap();
    let old_active = active_keys(&db);
    assert_eq!(old_active.len(), 2, "one active key per tenant");

    // Not while the vault runs.
    let run = vault_cli(
        &[
            "restore",
            "--config",
            config_s,
            "--from",
            backup_s,
            "--replace",
        ],
        work,
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("in use by another vault process"),
        "{}",
        run.stderr
    );

    vault.sigterm();
    assert!(vault.wait_exit(Duration::from_secs(30)).await.success());
    // A backup fetched back from storage may have lost its mode: the
    // restored database is 0600 all the same.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&backup, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let run = vault_cli(&["restore", "--config", config_s, "--from", backup_s], work);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--replace"), "{}", run.stderr);
    let run = vault_cli(
        &[
            "restore",
            "--config",
            config_s,
            "--from",
            backup_s,
            "--replace",
        ],
        work,
    );
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("is kept, complete, as"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("0 key destructions, 1 token deletions"),
        "{}",
        run.stdout
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&db).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "restored database mode {mode:o}");
    }
    let kept = std::fs::read_dir(&data)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("vault.db.replaced-")
        })
        .count();
    assert!(kept >= 1, "the replaced database was not kept");

    let vault = VaultProc::start(&data, &work.join("logs"), "second", "info");
    let url = vault.url();
    let payments = client_at(&url, &data, "acme-payments").await;
    assert_all_detokenize(&payments, &before[1..], PURPOSE).await;
    assert_all_detokenize(
        &client_at(&url, &data, "globex-payments").await,
        &globex_before,
        PURPOSE,
    )
    .await;
    let mut p = payments.clone();
    for (token, _) in after.iter().chain(&before[..1]) {
        let e = call(p.detokenize(DetokenizeRequest {
            token: token.clone(),
            purpose: PURPOSE.into(),
        }))
        .await
        .unwrap_err();
        assert_eq!(
            e.code(),
            Code::NotFound,
            "a token made, or deleted, after the backup is there"
        );
    }
    assert!(
        active_keys(&db).is_empty(),
        "a key active in the backup is still active"
    );
    let checkout = client_at(&url, &data, "acme-checkout").await;
    let fresh = tokenize_many(&checkout, 44_000_000, 5).await;
    assert_all_detokenize(&payments, &fresh, PURPOSE).await;
    let new_active = active_keys(&db);
    assert_eq!(new_active.len(), 1);
    assert!(
        !old_active.contains(&new_active[0]),
        "an old key encrypts again"
    );
    assert!(
        vault.stderr().contains("restored from a backup"),
        "{}",
        vault.stderr()
    );

    let rows = audit_rows(&db);
    let restore: Vec<_> = rows.iter().filter(|r| r.action == "restore").collect();
    assert_eq!(restore.len(), 1);
    let detail = restore[0].detail.clone().unwrap_or_default();
    assert!(detail.contains("backup=vault-backup.db"), "{detail}");
    let retired: Vec<u32> = detail
        .split_once("retired dek_ids=[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list.split(',').map(|id| id.parse().unwrap()).collect())
        .unwrap_or_else(|| panic!("no retired key list in {detail}"));
    assert_eq!(retired, old_active, "{detail}");
    vault.sigterm();
    let mut vault = vault;
    assert!(vault.wait_exit(Duration::from_secs(30)).await.success());
    assert_audit_log_verifies(&db, work);
}
