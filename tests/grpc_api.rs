//! Proves the public gRPC contract of `vault.v1.TokenService` end to end over mTLS: round trips, tenancy, the role matrix, validation, deletion, restart, KEK pinning, auditing, concurrency and message limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::cards::with_luhn;
use common::*;
use tokenvault::domain::vault::OpenError;
use tokenvault::proto::{
    CardBrand, DeleteTokenRequest, DetokenizeRequest, Expiry, GetTokenMetadataRequest,
    TokenizeRequest,
};
use tokenvault::server::StartError;
use tonic::Code;

const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

fn tok_req(pan: &str, expiry: Option<(u32, u32)>) -> TokenizeRequest {
    TokenizeRequest {
        pan: pan.into(),
        expiry: expiry.map(|(month, year)| Expiry { month, year }),
    }
}

fn detok_req(token: &str, purpose: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        token: token.into(),
        purpose: purpose.into(),
    }
}

fn meta_req(token: &str) -> GetTokenMetadataRequest {
    GetTokenMetadataRequest {
        token: token.into(),
    }
}

fn del_req(token: &str) -> DeleteTokenRequest {
    DeleteTokenRequest {
        token: token.into(),
    }
}

async fn tokenize(c: &mut Client, pan: &str) -> String {
    c.tokenize(tok_req(pan, None))
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A well-formed token that was never issued.
fn random_token() -> String {
    let mut b = [0u8; 22];
    getrandom::fill(&mut b).unwrap();
    format!("tok_{}", bs58::encode(b).into_string())
}

fn token_bytes(token: &str) -> Vec<u8> {
    bs58::decode(token.strip_prefix("tok_").unwrap())
        .into_vec()
        .unwrap()
}

/// Every run of `n` consecutive digits in `s`.
fn digit_windows(s: &str, n: usize) -> Vec<String> {
    let digits: Vec<char> = s.chars().filter(char::is_ascii_digit).collect();
    let mut out = Vec::new();
    // Windows over contiguous digit runs of the raw input.
    for run in s.split(|c: char| !c.is_ascii_digit()) {
        let b = run.as_bytes();
        if b.len() >= n {
            for w in b.windows(n) {
                out.push(String::from_utf8(w.to_vec()).unwrap());
            }
        }
    }
    // And over the input with separators removed.
    if digits.len() >= n {
        for w in digits.windows(n) {
            out.push(w.iter().collect());
        }
    }
    out
}

struct Card {
    pan: &'static str,
    brand: CardBrand,
    expiry: Option<(u32, u32)>,
}

const CARDS: &[Card] = &[
    Card {
        pan: "4111111111111111",
        brand: CardBrand::Visa,
        expiry: Some((12, 2030)),
    },
    Card {
        pan: "4222222222222",
        brand: CardBrand::Visa,
        expiry: None,
    },
    Card {
        pan: "5555555555554444",
        brand: CardBrand::Mastercard,
        expiry: Some((1, 2027)),
    },
    Card {
        pan: "2223003122003222",
        brand: CardBrand::Mastercard,
        expiry: None,
    },
    Card {
        pan: "378282246310005",
        brand: CardBrand::Amex,
        expiry: Some((6, 2029)),
    },
    Card {
        pan: "6011111111111117",
        brand: CardBrand::Discover,
        expiry: None,
    },
    Card {
        pan: "3530111333300000",
        brand: CardBrand::Jcb,
        expiry: Some((9, 2031)),
    },
    Card {
        pan: "36227206271667",
        brand: CardBrand::DinersClub,
        expiry: None,
    },
    Card {
        pan: "6200000000000005",
        brand: CardBrand::Unionpay,
        expiry: Some((2, 2099)),
    },
    Card {
        pan: "6759649826438453",
        brand: CardBrand::Maestro,
        expiry: Some((3, 2000)),
    },
];

#[tokio::test]
async fn every_brand_round_trips_with_correct_metadata() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    for card in CARDS {
        let before = now_ms();
        let resp = checkout
            .tokenize(tok_req(card.pan, card.expiry))
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}", card.brand.as_str_name()))
            .into_inner();
        let after = now_ms();
        let ctx = card.brand.as_str_name();
        let want_bin = if card.pan.len() >= 16 {
            &card.pan[..8]
        } else {
            &card.pan[..6]
        };
        let want_expiry = card.expiry.map(|(month, year)| Expiry { month, year });
        for (m, source) in [
            (resp.metadata.clone().unwrap(), "tokenize"),
            (
                checkout
                    .get_token_metadata(meta_req(&resp.token))
                    .await
                    .unwrap()
                    .into_inner()
                    .metadata
                    .unwrap(),
                "get_token_metadata",
            ),
        ] {
            assert_eq!(m.brand(), card.brand, "{ctx} {source}");
            assert_eq!(m.bin, want_bin, "{ctx} {source}");
            assert_eq!(m.last4, card.pan[card.pan.len() - 4..], "{ctx} {source}");
            assert_eq!(m.pan_length as usize, card.pan.len(), "{ctx} {source}");
            assert_eq!(m.expiry, want_expiry, "{ctx} {source}");
            let ts = m.created_at.unwrap();
            let created = ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000;
            assert!(
                created >= before - 1000 && created <= after + 1000,
                "{ctx} {source}: created_at {created} not within [{before}, {after}]"
            );
        }
        let d = payments
            .detokenize(detok_req(&resp.token, "charge order 7"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.pan, card.pan, "{ctx}");
        assert_eq!(d.expiry, want_expiry, "{ctx}");
    }
}

#[tokio::test]
async fn spaces_and_hyphens_are_normalised_away() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    for (input, digits) in [
        ("4111 1111 1111 1111", "4111111111111111"),
        ("5555-5555-5555-4444", "5555555555554444"),
        ("3782 822463 10005", "378282246310005"),
        (" 6011-1111 1111-1117 ", "6011111111111117"),
    ] {
        let r = checkout
            .tokenize(tok_req(input, None))
            .await
            .unwrap()
            .into_inner();
        let m = r.metadata.unwrap();
        assert_eq!(m.pan_length as usize, digits.len(), "{input:?}");
        assert_eq!(m.last4, digits[digits.len() - 4..], "{input:?}");
        let d = payments
            .detokenize(detok_req(&r.token, "charge"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.pan, digits, "{input:?}");
    }
}

#[tokio::test]
async fn same_pan_twice_gives_distinct_opaque_tokens() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let a = tokenize(&mut checkout, "4111111111111111").await;
    let b = tokenize(&mut checkout, "4111111111111111").await;
    assert_ne!(a, b);
    for t in [&a, &b] {
        let body = t.strip_prefix("tok_").unwrap_or_else(|| panic!("{t}"));
        assert!(!body.is_empty());
        assert!(body.chars().all(|c| BASE58.contains(c)), "{t}");
        assert!(!t.chars().all(|c| c.is_ascii_digit()), "{t}");
        assert!(!body.chars().all(|c| c.is_ascii_digit()), "{t}");
        assert!(!t.contains("4111111111111111"), "{t}");
        assert_eq!(token_bytes(t).len(), 22, "{t}");
    }
}

#[tokio::test]
async fn other_tenants_token_is_indistinguishable_from_a_missing_one() {
    let v = TestVault::start().await;
    let mut acme = v.client(ACME_CHECKOUT).await;
    let mut globex_pay = v.client(GLOBEX_PAYMENTS).await;
    let mut globex_co = v.client(GLOBEX_CHECKOUT).await;
    let acme_token = tokenize(&mut acme, "4111111111111111").await;
    let missing = random_token();

    let a = globex_pay
        .detokenize(detok_req(&acme_token, "charge"))
        .await
        .unwrap_err();
    let b = globex_pay
        .detokenize(detok_req(&missing, "charge"))
        .await
        .unwrap_err();
    assert_eq!(a.code(), Code::NotFound);
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));

    let a = globex_co
        .get_token_metadata(meta_req(&acme_token))
        .await
        .unwrap_err();
    let b = globex_co
        .get_token_metadata(meta_req(&missing))
        .await
        .unwrap_err();
    assert_eq!(a.code(), Code::NotFound);
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));

    let a = globex_co
        .delete_token(del_req(&acme_token))
        .await
        .unwrap_err();
    let b = globex_co.delete_token(del_req(&missing)).await.unwrap_err();
    assert_eq!(a.code(), Code::NotFound);
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));

    // And the failed cross-tenant delete left the token in place.
    let mut acme_pay = v.client(ACME_PAYMENTS).await;
    let d = acme_pay
        .detokenize(detok_req(&acme_token, "charge"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "4111111111111111");
}

fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn every_caller_gets_the_expected_code_on_every_rpc() {
    use Code::{NotFound as NF, Ok as OK, PermissionDenied as PD};
    let v = TestVault::start().await;
    let mut acme = v.client(ACME_CHECKOUT).await;
    let token = tokenize(&mut acme, "4111111111111111").await;
    // (caller, tokenize, detokenize, get_metadata, delete) on an acme token.
    let table = [
        (ACME_CHECKOUT, OK, PD, OK, OK),
        (ACME_PAYMENTS, PD, OK, OK, PD),
        (GLOBEX_CHECKOUT, OK, PD, NF, NF),
        (GLOBEX_PAYMENTS, PD, NF, NF, PD),
        (AUDITOR, PD, PD, OK, PD),
        (ADMIN, PD, PD, OK, OK),
    ];
    for (name, tok, detok, meta, del) in table {
        let mut c = v.client(name).await;
        let got = code_of(c.tokenize(tok_req("5555555555554444", None)).await);
        assert_eq!(got, tok, "{name} Tokenize");
        let got = code_of(c.detokenize(detok_req(&token, "charge")).await);
        assert_eq!(got, detok, "{name} Detokenize");
        let got = code_of(c.get_token_metadata(meta_req(&token)).await);
        assert_eq!(got, meta, "{name} GetTokenMetadata");
        let fresh = tokenize(&mut acme, "4111111111111111").await;
        let got = code_of(c.delete_token(del_req(&fresh)).await);
        assert_eq!(got, del, "{name} DeleteToken");
        // A refused delete really left the token alone.
        let still_there = code_of(acme.get_token_metadata(meta_req(&fresh)).await);
        let want = if del == OK { NF } else { OK };
        assert_eq!(still_there, want, "{name} DeleteToken effect");
    }
}

#[tokio::test]
async fn invalid_pans_are_rejected_without_echoing_digits() {
    let v = TestVault::start().await;
    let mut c = v.client(ACME_CHECKOUT).await;
    let cases = [
        ("too short", "4111111111"),
        ("too long", "41111111111111111111"),
        (
            "far too long",
            "4111111111111111111111111111111111111111111111111111111111111111111111",
        ),
        ("letters", "4111a11111111111"),
        ("luhn failure", "4111111111111112"),
        ("luhn failure with separators", "4111-1111 1111-1112"),
        ("empty", ""),
        ("only separators", " - - "),
    ];
    for (what, pan) in cases {
        let s = c.tokenize(tok_req(pan, None)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(!s.message().is_empty(), "{what}");
        for w in digit_windows(pan, 4) {
            assert!(
                !s.message().contains(&w),
                "{what}: message {:?} echoes {w}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn invalid_expiry_is_rejected() {
    let v = TestVault::start().await;
    let mut c = v.client(ACME_CHECKOUT).await;
    for (month, year) in [(13, 2030), (0, 2030), (12, 99), (1, 2100)] {
        let s = c
            .tokenize(tok_req("4111111111111111", Some((month, year))))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{month}/{year}: {s:?}");
    }
}

#[tokio::test]
async fn malformed_tokens_are_invalid_and_unknown_ones_not_found() {
    let v = TestVault::start().await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let long = "x".repeat(1000);
    let long_tok = format!("tok_{}", "1".repeat(996));
    for bad in ["", "abc", "tok_0OIl", "4111111111111111", &long, &long_tok] {
        let s = pay.detokenize(detok_req(bad, "charge")).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "detokenize {bad:.20}");
        let s = pay.get_token_metadata(meta_req(bad)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "metadata {bad:.20}");
        let s = co.delete_token(del_req(bad)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "delete {bad:.20}");
        assert!(!s.message().contains("4111"), "{s:?}");
    }
    let unknown = random_token();
    let s = pay
        .detokenize(detok_req(&unknown, "charge"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = pay
        .get_token_metadata(meta_req(&unknown))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = co.delete_token(del_req(&unknown)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}

#[tokio::test]
async fn detokenize_requires_a_purpose_free_of_card_numbers() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let token = tokenize(&mut co, "5555555555554444").await;
    for purpose in ["", "   ", "\t\n "] {
        let s = pay
            .detokenize(detok_req(&token, purpose))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{purpose:?}");
    }
    let leaky = [
        "refund 4111 1111 1111 1111",
        "refund 4111-1111-1111-1111 now",
        "card 378282246310005",
    ];
    for purpose in leaky {
        let s = pay
            .detokenize(detok_req(&token, purpose))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{purpose:?}");
        assert!(!s.message().contains("1111"), "{s:?}");
    }
    let rows = v.audit_rows();
    let detok: Vec<_> = rows.iter().filter(|r| r.action == "detokenize").collect();
    assert_eq!(detok.len(), 3 + leaky.len(), "{rows:#?}");
    for r in &detok {
        assert_eq!(r.outcome, "invalid_argument", "{r:?}");
        assert_eq!(r.token.as_deref(), Some(&token_bytes(&token)[..]), "{r:?}");
    }
    for r in rows.iter().filter(|r| r.action == "detokenize") {
        for field in [&r.purpose, &r.detail].into_iter().flatten() {
            let squashed: String = field.chars().filter(char::is_ascii_digit).collect();
            for pan in ["4111111111111111", "378282246310005"] {
                assert!(!squashed.contains(pan), "audit row leaks a PAN: {r:?}");
            }
            assert!(!field.contains("1111"), "audit row leaks digits: {r:?}");
        }
    }
}

#[tokio::test]
async fn deleted_token_is_gone_and_second_delete_is_not_found() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let token = tokenize(&mut co, "4111111111111111").await;
    co.delete_token(del_req(&token)).await.unwrap();
    let s = pay
        .detokenize(detok_req(&token, "charge"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = co.get_token_metadata(meta_req(&token)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = co.delete_token(del_req(&token)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}

#[tokio::test]
async fn tokens_survive_a_restart() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let mut tokens = Vec::new();
    for card in CARDS {
        let r = co
            .tokenize(tok_req(card.pan, card.expiry))
            .await
            .unwrap()
            .into_inner();
        tokens.push((r.token, card));
    }
    let mut gco = v.client(GLOBEX_CHECKOUT).await;
    let globex = tokenize(&mut gco, "6011111111111117").await;
    drop((co, gco));
    let dir = v.stop().await;

    let v = TestVault::start_in(dir).await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    for (token, card) in &tokens {
        let d = pay
            .detokenize(detok_req(token, "after restart"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(d.pan, card.pan);
        assert_eq!(
            d.expiry,
            card.expiry.map(|(month, year)| Expiry { month, year })
        );
    }
    let mut gpay = v.client(GLOBEX_PAYMENTS).await;
    let d = gpay
        .detokenize(detok_req(&globex, "after restart"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "6011111111111117");
    // New tokens can still be made after the restart.
    let mut co = v.client(ACME_CHECKOUT).await;
    let t = tokenize(&mut co, "5555555555554444").await;
    let d = pay
        .detokenize(detok_req(&t, "after restart"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "5555555555554444");
}

fn random_kek_b64() -> String {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).unwrap();
    B64.encode(k)
}

#[tokio::test]
async fn start_refuses_a_kek_other_than_the_pinned_one() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let token = tokenize(&mut co, "4111111111111111").await;
    drop(co);
    let dir = v.stop().await;

    // A different KEK from the environment.
    let other = random_kek_b64();
    let (dir, e) = match TestVault::try_start_in(dir, &[("VAULT_KEK", &other)]).await {
        Ok(_) => panic!("started with a foreign VAULT_KEK"),
        Err(x) => x,
    };
    assert!(
        matches!(e, StartError::Open(OpenError::KekMismatch { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("KEK"), "{e}");

    // A replaced key file (still mode 0600, so only the key differs).
    let kek_path = dir.path().join("kek.b64");
    let original = std::fs::read(&kek_path).unwrap();
    std::fs::remove_file(&kek_path).unwrap();
    tokenvault::fsutil::write_private(&kek_path, format!("{}\n", random_kek_b64()).as_bytes())
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kek_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let (dir, e) = match TestVault::try_start_in(dir, &[]).await {
        Ok(_) => panic!("started with a replaced KEK file"),
        Err(x) => x,
    };
    assert!(
        matches!(e, StartError::Open(OpenError::KekMismatch { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("KEK"), "{e}");

    // The refusals changed nothing: with the right key back, all is served.
    std::fs::remove_file(&kek_path).unwrap();
    tokenvault::fsutil::write_private(&kek_path, &original).unwrap();
    let v = TestVault::start_in(dir).await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let d = pay
        .detokenize(detok_req(&token, "after refusal"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "4111111111111111");
}

/// (caller, action, outcome, token bytes, purpose) of one expected audit row.
type ExpectedRow<'a> = (&'a str, &'a str, &'a str, Option<&'a [u8]>, Option<&'a str>);

#[tokio::test]
async fn every_call_leaves_one_accurate_audit_row() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let mut gpay = v.client(GLOBEX_PAYMENTS).await;

    let token = tokenize(&mut co, "4111111111111111").await;
    pay.detokenize(detok_req(&token, "charge order 42"))
        .await
        .unwrap();
    pay.get_token_metadata(meta_req(&token)).await.unwrap();
    let s = co
        .detokenize(detok_req(&token, "curious"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = co
        .tokenize(tok_req("4111111111111112", None))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = gpay
        .detokenize(detok_req(&token, "cross tenant"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    co.delete_token(del_req(&token)).await.unwrap();

    let rows = v.audit_rows();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.seq, i64::try_from(i).unwrap() + 1, "gapless: {rows:#?}");
    }
    let calls: Vec<_> = rows.iter().filter(|r| r.actor != "system").collect();
    let tb = token_bytes(&token);
    let t = Some(&tb[..]);
    let expect: [ExpectedRow; 7] = [
        (ACME_CHECKOUT, "tokenize", "success", t, None),
        (
            ACME_PAYMENTS,
            "detokenize",
            "success",
            t,
            Some("charge order 42"),
        ),
        (ACME_PAYMENTS, "get_metadata", "success", t, None),
        (ACME_CHECKOUT, "detokenize", "denied", t, Some("curious")),
        (ACME_CHECKOUT, "tokenize", "invalid_argument", None, None),
        (
            GLOBEX_PAYMENTS,
            "detokenize",
            "not_found",
            t,
            Some("cross tenant"),
        ),
        (ACME_CHECKOUT, "delete_token", "success", t, None),
    ];
    assert_eq!(calls.len(), expect.len(), "{rows:#?}");
    for (r, (who, action, outcome, token, purpose)) in calls.iter().zip(expect) {
        let ctx = format!("{r:?}");
        assert_eq!(r.actor, identity(who), "{ctx}");
        assert_eq!(r.action, action, "{ctx}");
        assert_eq!(r.outcome, outcome, "{ctx}");
        assert_eq!(r.token.as_deref(), token, "{ctx}");
        if action == "detokenize" && outcome == "success" {
            assert_eq!(r.purpose.as_deref(), purpose, "{ctx}");
        } else if let Some(p) = r.purpose.as_deref() {
            // A failed detokenize may keep the (screened) purpose; nothing
            // else carries one.
            assert_eq!(Some(p), purpose, "{ctx}");
        }
        let peer = r.peer.as_deref().unwrap_or_default();
        assert!(peer.starts_with("127.0.0.1"), "{ctx}");
        if outcome == "success" {
            assert_eq!(r.tenant.as_deref(), Some("acme"), "{ctx}");
        }
    }
    // Nothing in the log carries the card number.
    for r in &rows {
        let all = format!("{:?}{:?}{:?}", r.purpose, r.detail, r.actor);
        assert!(!all.contains("4111111111111111"), "{r:?}");
        assert!(!all.contains("4111111111111112"), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_each_get_their_own_cards_back() {
    const TASKS: usize = 32;
    const PER_TASK: usize = 20;
    let v = TestVault::start().await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let mut co = v.client(ACME_CHECKOUT).await;
        let mut pay = v.client(ACME_PAYMENTS).await;
        tasks.spawn(async move {
            let mut pairs = Vec::new();
            for i in 0..PER_TASK {
                let pan = with_luhn(&format!("4{t:07}{i:07}"));
                let token = tokenize(&mut co, &pan).await;
                pairs.push((pan, token));
            }
            for (pan, token) in &pairs {
                let d = pay
                    .detokenize(detok_req(token, "concurrency test"))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(&d.pan, pan);
            }
            pairs
        });
    }
    let mut all_tokens = HashSet::new();
    let mut all_pans = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        for (pan, token) in r.unwrap() {
            assert!(all_tokens.insert(token));
            assert!(all_pans.insert(pan));
        }
    }
    assert_eq!(all_tokens.len(), TASKS * PER_TASK);
    let tokenize_rows = v
        .audit_rows()
        .iter()
        .filter(|r| r.action == "tokenize" && r.outcome == "success")
        .count();
    assert_eq!(tokenize_rows, TASKS * PER_TASK);
}

#[tokio::test]
async fn oversized_request_is_refused_cleanly_and_server_keeps_serving() {
    let v = TestVault::start().await;
    let mut co = v.client(ACME_CHECKOUT).await;
    let s = co
        .tokenize(tok_req(&"4".repeat(20_000), None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            s.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{s:?}"
    );
    assert!(!s.message().contains("4444"), "{s:?}");
    // Same connection still works, and so does a new one.
    let t = tokenize(&mut co, "4111111111111111").await;
    let mut pay = v.client(ACME_PAYMENTS).await;
    let d = pay
        .detokenize(detok_req(&t, "charge"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "4111111111111111");
}
