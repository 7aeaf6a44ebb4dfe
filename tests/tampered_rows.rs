//! Fail closed on tampered storage, over gRPC: a token row whose ciphertext
//! was altered, swapped with another row's, or whose metadata no longer
//! decodes answers DATA_LOSS, never a wrong card number and never an
//! invitation to retry; the untouched rows still work. A row naming a key
//! the vault never held is tampering too (DATA_LOSS); a row whose tenant
//! was altered reveals nothing to any tenant's caller (NOT_FOUND).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::calls::call;
use common::cards::visa_pan;
use common::*;
use tokenvault::proto::{DetokenizeRequest, GetTokenMetadataRequest, TokenizeRequest};
use tonic::Code;

fn token_bytes(token: &str) -> Vec<u8> {
    bs58::decode(token.strip_prefix("tok_").unwrap())
        .into_vec()
        .unwrap()
}

/// `n` cards tokenized by acme's checkout, then the vault stopped (so no
/// row is served from its cache after a restart): the cards, their
/// tokens, the database and the data directory to restart in.
async fn tokenized_then_stopped(
    base: u64,
    n: u64,
) -> (
    Vec<String>,
    Vec<String>,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let pans: Vec<String> = (0..n).map(|i| visa_pan(base, i)).collect();
    let mut tokens = Vec::new();
    for pan in &pans {
        let t = call(checkout.tokenize(TokenizeRequest {
            pan: pan.clone(),
            expiry: None,
        }))
        .await
        .unwrap()
        .token;
        tokens.push(t);
    }
    drop(checkout);
    let db_path = v.db_path();
    let dir = v.stop().await;
    (pans, tokens, db_path, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_token_rows_answer_data_loss_and_never_a_card_number() {
    let (pans, tokens, db_path, dir) = tokenized_then_stopped(7_300_000, 5).await;

    let db = rusqlite::Connection::open(&db_path).unwrap();
    let ciphertext = |t: &str| -> Vec<u8> {
        db.query_row(
            "SELECT ciphertext FROM tokens WHERE token = ?1",
            [token_bytes(t)],
            |r| r.get(0),
        )
        .unwrap()
    };
    let set = |t: &str, c: &[u8]| {
        db.execute(
            "UPDATE tokens SET ciphertext = ?1 WHERE token = ?2",
            rusqlite::params![c, token_bytes(t)],
        )
        .unwrap();
    };
    // 0: one flipped byte of the tag.
    let mut c0 = ciphertext(&tokens[0]);
    *c0.last_mut().unwrap() ^= 0x01;
    set(&tokens[0], &c0);
    // 1 and 2: ciphertexts swapped between two rows of the same tenant.
    let (c1, c2) = (ciphertext(&tokens[1]), ciphertext(&tokens[2]));
    set(&tokens[1], &c2);
    set(&tokens[2], &c1);
    // 3: metadata that no longer fits its type.
    db.execute(
        "UPDATE tokens SET pan_len = 300 WHERE token = ?1",
        [token_bytes(&tokens[3])],
    )
    .unwrap();
    drop(db);

    let v = TestVault::start_in(dir).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    for (i, t) in tokens.iter().enumerate().take(4) {
        let err = call(payments.detokenize(DetokenizeRequest {
            token: t.clone(),
            purpose: "charge order 42".into(),
        }))
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "row {i}: {err:?}");
        for pan in &pans {
            assert!(!err.message().contains(&pan[6..12]), "row {i}: {err:?}");
        }
    }
    let err = call(checkout.get_token_metadata(GetTokenMetadataRequest {
        token: tokens[3].clone(),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");

    // The untouched row still opens, to its own card number.
    let mut ok = call(payments.detokenize(DetokenizeRequest {
        token: tokens[4].clone(),
        purpose: "charge order 42".into(),
    }))
    .await
    .unwrap();
    assert_eq!(std::mem::take(&mut ok.pan), pans[4]);

    let losses = v
        .audit_rows()
        .into_iter()
        .filter(|r| r.action == "detokenize" && r.outcome == "data_loss")
        .count();
    assert_eq!(losses, 4);
    drop((payments, checkout));
    v.stop().await;
}

/// A token row pointed at a data key the vault never held answers
/// DATA_LOSS (tampering), not the FAILED_PRECONDITION a destroyed key
/// gives; a row whose tenant was altered answers NOT_FOUND to every
/// tenant's caller, as a missing token does, and DATA_LOSS to an
/// administrator of all tenants.
#[tokio::test(flavor = "multi_thread")]
async fn rows_naming_an_unknown_key_or_tenant_fail_closed() {
    let (pans, tokens, db_path, dir) = tokenized_then_stopped(7_400_000, 2).await;

    let db = rusqlite::Connection::open(&db_path).unwrap();
    db.execute(
        "UPDATE tokens SET dek_id = 4242 WHERE token = ?1",
        [token_bytes(&tokens[0])],
    )
    .unwrap();
    db.execute(
        "UPDATE tokens SET tenant = 'ACME!' WHERE token = ?1",
        [token_bytes(&tokens[1])],
    )
    .unwrap();
    drop(db);

    let v = TestVault::start_in(dir).await;
    let detokenize = |token: &str| DetokenizeRequest {
        token: token.to_owned(),
        purpose: "charge order 42".into(),
    };
    let mut payments = v.client(ACME_PAYMENTS).await;
    let err = call(payments.detokenize(detokenize(&tokens[0])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");

    for caller in [ACME_PAYMENTS, GLOBEX_PAYMENTS] {
        let mut c = v.client(caller).await;
        let err = call(c.detokenize(detokenize(&tokens[1])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{caller}: {err:?}");
    }
    let mut admin = v.client(ADMIN).await;
    let err = call(admin.get_token_metadata(GetTokenMetadataRequest {
        token: tokens[1].clone(),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    for pan in &pans {
        assert!(!err.message().contains(&pan[6..12]), "{err:?}");
    }
    drop((payments, admin));
    v.stop().await;
}
