//! Proves that detokenize is rate-limited per caller identity over real gRPC: a caller past its budget gets RESOURCE_EXHAUSTED (audited, with no token or digits in the message) while another caller is served; calls for tokens that do not exist, by detokenize or by a payment worker's metadata read, spend the budget ten times faster; and running out raises one throttled alert in the server log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::calls::call;
use common::process::VaultProc;
use common::*;
use tokenvault::proto::{DetokenizeRequest, GetTokenMetadataRequest, TokenizeRequest};
use tonic::{Code, Status};

const PURPOSE: &str = "budget test";

fn limits(rate: u32, burst: u32, miss_cost: u32) -> String {
    format!(
        "[limits]\ndetokenize_per_second = {rate}\ndetokenize_burst = {burst}\ndetokenize_miss_cost = {miss_cost}\n"
    )
}

async fn tokenize(c: &mut Client, pan: &str) -> String {
    call(c.tokenize(TokenizeRequest {
        pan: pan.into(),
        expiry: None,
    }))
    .await
    .unwrap()
    .token
}

async fn detokenize(c: &mut Client, token: &str) -> Result<String, Status> {
    call(c.detokenize(DetokenizeRequest {
        token: token.into(),
        purpose: PURPOSE.into(),
    }))
    .await
    .map(|r| r.pan.clone())
}

/// A well-formed token that was never issued.
fn unknown_token() -> String {
    let mut b = [0u8; 22];
    getrandom::fill(&mut b).unwrap();
    format!("tok_{}", bs58::encode(b).into_string())
}

/// Calls until one is refused, at most `limit` calls; returns the refusal.
async fn first_refusal(c: &mut Client, token: &str, pan: &str, limit: usize) -> Option<Status> {
    for _ in 0..limit {
        match detokenize(c, token).await {
            Ok(got) => assert_eq!(got, pan),
            Err(s) => return Some(s),
        }
    }
    None
}

#[tokio::test]
async fn a_caller_past_its_budget_is_refused_and_audited_while_another_is_served() {
    let dir = tempfile::tempdir().unwrap();
    // One call a second after a burst of five: the test makes its calls
    // far faster than that.
    append_config(dir.path(), &limits(1, 5, 10));
    let v = TestVault::start_in(dir).await;
    let pan = "4111111111111111";
    let acme_token = tokenize(&mut v.client("acme-checkout").await, pan).await;
    let globex_token = tokenize(&mut v.client("globex-checkout").await, pan).await;

    let mut acme = v.client("acme-payments").await;
    for _ in 0..5 {
        assert_eq!(detokenize(&mut acme, &acme_token).await.unwrap(), pan);
    }
    // The sixth call is refused unless a second has passed since the
    // first; within twenty more calls one certainly is.
    let refused = first_refusal(&mut acme, &acme_token, pan, 20)
        .await
        .expect("no call was refused past the burst");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("rate limit") && refused.message().contains("retry in"),
        "{}",
        refused.message()
    );
    assert!(!refused.message().contains(&acme_token));
    assert!(!refused.message().contains(pan));

    // Another identity has a budget of its own.
    let mut globex = v.client("globex-payments").await;
    assert_eq!(detokenize(&mut globex, &globex_token).await.unwrap(), pan);

    let rows = v.audit_rows();
    let refusals: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "detokenize" && r.outcome == "resource_exhausted")
        .collect();
    assert!(
        !refusals.is_empty(),
        "a refused detokenize left no audit record"
    );
    for r in &refusals {
        assert_eq!(r.actor, identity("acme-payments"));
        assert_eq!(r.purpose.as_deref(), Some(PURPOSE));
        assert!(r.token.is_some(), "the record names the token asked for");
    }
    v.stop().await;
}

#[tokio::test]
async fn calls_for_unknown_tokens_spend_the_budget_ten_times_faster() {
    let dir = tempfile::tempdir().unwrap();
    append_config(dir.path(), &limits(1, 10, 10));
    let v = TestVault::start_in(dir).await;
    let pan = "5555555555554444";
    let token = tokenize(&mut v.client("acme-checkout").await, pan).await;
    let other = tokenize(&mut v.client("globex-checkout").await, pan).await;

    // Without misses, a burst of ten goes through.
    let mut globex = v.client("globex-payments").await;
    for _ in 0..3 {
        assert_eq!(detokenize(&mut globex, &other).await.unwrap(), pan);
    }

    // One miss costs ten calls: the whole burst.
    let mut acme = v.client("acme-payments").await;
    let miss = detokenize(&mut acme, &unknown_token()).await.unwrap_err();
    assert_eq!(miss.code(), Code::NotFound);
    let refused = first_refusal(&mut acme, &token, pan, 3)
        .await
        .expect("a miss did not spend the budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Another tenant's token is a miss too: it must not be cheaper to
    // probe for other tenants' tokens than for made-up ones.
    let mut globex_fresh = v.client("globex-payments").await;
    let cross = detokenize(&mut globex_fresh, &token).await.unwrap_err();
    assert_eq!(cross.code(), Code::NotFound);
    let refused = first_refusal(&mut globex_fresh, &other, pan, 3)
        .await
        .expect("a cross-tenant miss did not spend the budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    v.stop().await;
}

async fn metadata(c: &mut Client, token: &str) -> Result<(), Status> {
    call(c.get_token_metadata(GetTokenMetadataRequest {
        token: token.into(),
    }))
    .await
    .map(|_| ())
}

/// A payment worker cannot screen tokens through GetTokenMetadata for free
/// and spend its detokenize budget only on hits: its metadata misses cost
/// what detokenize misses cost. A checkout service (no detokenize role)
/// reads metadata without a budget.
#[tokio::test]
async fn metadata_misses_by_a_payment_worker_spend_its_detokenize_budget() {
    let dir = tempfile::tempdir().unwrap();
    append_config(dir.path(), &limits(1, 10, 10));
    let v = TestVault::start_in(dir).await;
    let pan = "5555555555554444";
    let mut checkout = v.client("acme-checkout").await;
    let token = tokenize(&mut checkout, pan).await;

    let mut acme = v.client("acme-payments").await;
    let miss = metadata(&mut acme, &unknown_token()).await.unwrap_err();
    assert_eq!(miss.code(), Code::NotFound, "{miss:?}");
    let refused = first_refusal(&mut acme, &token, pan, 3)
        .await
        .expect("a metadata miss did not spend the detokenize budget");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let screened = metadata(&mut acme, &token).await.unwrap_err();
    assert_eq!(screened.code(), Code::ResourceExhausted, "{screened:?}");

    for _ in 0..20 {
        let miss = metadata(&mut checkout, &unknown_token()).await.unwrap_err();
        assert_eq!(miss.code(), Code::NotFound, "{miss:?}");
    }
    metadata(&mut checkout, &token).await.unwrap();
    v.stop().await;
}

#[tokio::test]
async fn running_out_raises_one_throttled_alert_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    append_config(&data, &limits(1, 3, 10));
    let vault = VaultProc::start(&data, &dir.path().join("logs"), "budget", "info");
    let url = vault.url();
    let pan = "4000056655665556";
    let token = tokenize(&mut client_at(&url, &data, "acme-checkout").await, pan).await;

    let mut acme = client_at(&url, &data, "acme-payments").await;
    let mut refusals = 0;
    for _ in 0..30 {
        if detokenize(&mut acme, &token).await.is_err() {
            refusals += 1;
        }
    }
    assert!(refusals >= 2, "{refusals} refusals");

    let mut globex = client_at(&url, &data, "globex-payments").await;
    for _ in 0..3 {
        let miss = detokenize(&mut globex, &unknown_token()).await.unwrap_err();
        assert!(
            matches!(miss.code(), Code::NotFound | Code::ResourceExhausted),
            "{miss:?}"
        );
    }

    let log = vault.stderr();
    let rate_alerts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("detokenize_rate_exceeded") && l.contains(identity("acme-payments")))
        .collect();
    assert_eq!(
        rate_alerts.len(),
        1,
        "one alert per caller per interval:\n{log}"
    );
    assert!(rate_alerts[0].contains("WARN"), "{log}");
    let miss_alerts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("detokenize_misses"))
        .collect();
    assert_eq!(miss_alerts.len(), 1, "{log}");
    assert!(
        miss_alerts[0].contains(identity("globex-payments")),
        "{log}"
    );
    assert!(!log.contains(&token) && !log.contains(pan), "{log}");
}
