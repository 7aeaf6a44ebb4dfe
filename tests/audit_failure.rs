//! Proves that when audit records cannot be written, the vault fails closed and says so: with a fault injected into the running vault's database (a trigger that aborts every audit insert), detokenize and tokenize fail with UNAVAILABLE and return no card number or token, the server log raises `alert="audit_write_failed"` (PCI DSS 10.7.2) without the card number, and once the fault is gone the vault serves again with its audit chain intact.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::calls::call;
use common::process::{VaultProc, assert_audit_log_verifies};
use common::*;
use tokenvault::proto::{DetokenizeRequest, TokenizeRequest};
use tonic::Code;

const PAN: &str = "4111111111111111";
const OTHER_PAN: &str = "5555555555554444";

fn tok(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        pan: pan.into(),
        expiry: None,
    }
}

fn detok(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        token: token.into(),
        purpose: "audit failure test".into(),
    }
}

/// How many audit-failure alerts the server log holds.
fn alerts_in(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("audit_write_failed"))
        .count()
}

/// Runs the SQL on the live database from outside the vault, as a fault.
fn inject(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn audit_write_failure_fails_closed_and_raises_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut vault = VaultProc::start(&data, &dir.path().join("logs"), "run", "info");
    let url = vault.url();
    let db = data.join("vault.db");
    let mut checkout = client_at(&url, &data, "acme-checkout").await;
    let mut payments = client_at(&url, &data, "acme-payments").await;
    let token = call(checkout.tokenize(tok(PAN)))
        .await
        .unwrap()
        .token
        .clone();
    assert_eq!(
        call(payments.detokenize(detok(&token))).await.unwrap().pan,
        PAN
    );

    inject(
        &db,
        "CREATE TRIGGER inject_audit_failure BEFORE INSERT ON audit
         BEGIN SELECT RAISE(ABORT, 'injected audit failure'); END;",
    );
    let e = call(payments.detokenize(detok(&token))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        !e.message().contains(PAN) && !e.message().contains(&token),
        "{e:?}"
    );
    let after_detokenize = alerts_in(&vault.stderr());
    assert!(after_detokenize >= 1, "{}", vault.stderr());
    let e = call(checkout.tokenize(tok(OTHER_PAN))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains(OTHER_PAN), "{e:?}");
    // The alert is written before the caller is answered, so the failed
    // tokenize has raised its own by now.
    assert!(
        alerts_in(&vault.stderr()) > after_detokenize,
        "a failed tokenize raised no alert:\n{}",
        vault.stderr()
    );

    let log = vault.stderr();
    let alerts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit_write_failed"))
        .collect();
    assert!(alerts.iter().all(|l| l.contains("ERROR")), "{log}");
    assert!(
        alerts[0].contains("injected audit failure"),
        "the alert says why: {}",
        alerts[0]
    );
    assert!(!log.contains(PAN) && !log.contains(OTHER_PAN), "{log}");

    inject(&db, "DROP TRIGGER inject_audit_failure;");
    assert_eq!(
        call(payments.detokenize(detok(&token))).await.unwrap().pan,
        PAN
    );
    let again = call(checkout.tokenize(tok(OTHER_PAN)))
        .await
        .unwrap()
        .token
        .clone();
    assert_eq!(
        call(payments.detokenize(detok(&again))).await.unwrap().pan,
        OTHER_PAN
    );

    // The rolled-back commits left no gap or broken link in the chain.
    vault.sigterm();
    assert!(vault.wait_exit(Duration::from_secs(30)).await.success());
    assert_audit_log_verifies(&db, dir.path());
    let rows = audit_rows(&db);
    assert!(
        rows.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "audit sequence has a gap"
    );
}
