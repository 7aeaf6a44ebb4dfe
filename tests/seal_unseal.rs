//! Sealing and unsealing a vault whose KEK comes from a file: an unseal that
//! finds a tampered wrapped data key fails closed and leaves the vault
//! sealed, and a seal reason the vault refuses is never recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::calls::call;
use common::*;
use tokenvault::proto::{
    DetokenizeRequest, GetSealStatusRequest, SealRequest, TokenizeRequest, UnsealRequest,
};
use tonic::Code;

/// A test card number, as a person might paste it into a free-text field.
const SPACED_CARD: &str = "4111 1111 1111 1111";

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_wrapped_data_key_fails_unseal_with_data_loss_and_stays_sealed() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    let mut admin = v.keys(ADMIN).await;
    let token = call(checkout.tokenize(TokenizeRequest {
        pan: "4111111111111111".into(),
        expiry: None,
    }))
    .await
    .unwrap()
    .token;
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();

    // Flip one byte of every wrapped data key behind the vault's back.
    let db = rusqlite::Connection::open(v.db_path()).unwrap();
    let keys: Vec<(i64, Vec<u8>)> = db
        .prepare("SELECT id, wrapped FROM deks WHERE wrapped IS NOT NULL")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!keys.is_empty(), "no wrapped data key to tamper with");
    for (id, mut wrapped) in keys {
        let last = wrapped.len() - 1;
        wrapped[last] ^= 1;
        db.execute(
            "UPDATE deks SET wrapped = ?1 WHERE id = ?2",
            rusqlite::params![wrapped, id],
        )
        .unwrap();
    }
    drop(db);

    let err = call(admin.unseal(UnsealRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let st = call(admin.get_seal_status(GetSealStatusRequest {}))
        .await
        .unwrap();
    assert!(st.sealed, "the vault unsealed with a tampered data key");
    let res = call(payments.detokenize(DetokenizeRequest {
        token,
        purpose: "charge order 42".into(),
    }))
    .await;
    assert_eq!(res.unwrap_err().code(), Code::Unavailable);

    let unseals: Vec<_> = v
        .audit_rows()
        .into_iter()
        .filter(|r| r.action == "unseal")
        .collect();
    assert_eq!(unseals.len(), 1, "{unseals:?}");
    assert_eq!(unseals[0].outcome, "data_loss");
    drop((checkout, payments, admin));
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seal_reason_holding_a_card_number_is_refused_and_never_recorded() {
    let v = TestVault::start().await;
    let mut admin = v.keys(ADMIN).await;
    let err = call(admin.seal(SealRequest {
        reason: format!("customer dispute {SPACED_CARD}"),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().contains("1111"), "{err:?}");
    let st = call(admin.get_seal_status(GetSealStatusRequest {}))
        .await
        .unwrap();
    assert!(!st.sealed);

    // A clean reason is accepted and recorded.
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();
    drop(admin);
    let db = v.db_path();
    let dir = v.stop().await;

    let seals: Vec<_> = audit_rows(&db)
        .into_iter()
        .filter(|r| r.action == "seal")
        .collect();
    assert_eq!(seals.len(), 2, "{seals:?}");
    assert_eq!(seals[0].outcome, "invalid_argument");
    assert_eq!(seals[1].outcome, "success");
    let c = rusqlite::Connection::open(&db).unwrap();
    let reasons: Vec<Option<String>> = c
        .prepare("SELECT reason FROM audit WHERE action = 'seal' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reasons[1].as_deref(), Some("maintenance window"));
    // The refused reason is recorded only as refused.
    let refused = reasons[0].as_deref().unwrap_or("");
    assert!(!refused.contains("1111"), "{refused}");
    drop(c);

    // Nor anywhere else in the files: the database, its WAL and shm.
    let plain = SPACED_CARD.replace(' ', "");
    for entry in std::fs::read_dir(db.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for needle in [SPACED_CARD, plain.as_str()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds the refused reason's card number",
                path.display()
            );
        }
    }
    drop(dir);
}

/// The unseal record is written before the keys are installed: when it
/// cannot be written, the vault stays sealed (no unaudited unseal).
#[tokio::test(flavor = "multi_thread")]
async fn an_unseal_whose_audit_record_cannot_be_written_leaves_the_vault_sealed() {
    let v = TestVault::start().await;
    let mut admin = v.keys(ADMIN).await;
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();

    // Storage refuses exactly the successful unseal's audit record.
    let db = rusqlite::Connection::open(v.db_path()).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_unseal BEFORE INSERT ON audit \
         WHEN NEW.action = 'unseal' AND NEW.outcome = 'success' \
         BEGIN SELECT RAISE(ABORT, 'audit refused'); END;",
    )
    .unwrap();
    let e = call(admin.unseal(UnsealRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let st = call(admin.get_seal_status(GetSealStatusRequest {}))
        .await
        .unwrap();
    assert!(st.sealed, "the vault unsealed without its audit record");

    db.execute_batch("DROP TRIGGER refuse_unseal;").unwrap();
    drop(db);
    let st = call(admin.unseal(UnsealRequest::default())).await.unwrap();
    assert!(!st.sealed);
    drop(admin);
    v.stop().await;
}

/// A vault in `dir` running a slow re-encryption job (small batches, long
/// pauses, so it is still running seconds later), with the admin client
/// watching it; the watch's first message has been read.
async fn watched_job(
    dir: tempfile::TempDir,
    cards_from: u64,
) -> (
    TestVault,
    KeysClient,
    tonic::Streaming<tokenvault::proto::Job>,
) {
    use tokenvault::proto::{GetJobRequest, RotateDataKeyRequest, StartReencryptionRequest};
    append_config(
        dir.path(),
        "[keys]\nreencrypt_batch = 5\nreencrypt_pause_ms = 200\n",
    );
    let v = TestVault::start_in(dir).await;
    let checkout = v.client(ACME_CHECKOUT).await;
    let mut admin = v.keys(ADMIN).await;
    common::calls::tokenize_many(&checkout, cards_from, 200).await;
    call(admin.rotate_data_key(RotateDataKeyRequest {
        tenant: "acme".into(),
        reason: "scheduled rotation".into(),
    }))
    .await
    .unwrap();
    let job = call(admin.start_reencryption(StartReencryptionRequest {
        tenant: "acme".into(),
        reason: "move tokens to the new key".into(),
    }))
    .await
    .unwrap();
    let mut watch = admin
        .watch_job(GetJobRequest { job_id: job.job_id })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.job_id, job.job_id);
    (v, admin, watch)
}

/// Reads `watch` until it ends; its end.
async fn end_of(
    watch: &mut tonic::Streaming<tokenvault::proto::Job>,
    what: &str,
) -> Result<Option<tokenvault::proto::Job>, tonic::Status> {
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"))
}

/// A job watch ends (UNAVAILABLE) when the vault is sealed, instead of
/// reporting a paused job as "running" for as long as the vault stays
/// sealed.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_watch_ends_when_the_vault_is_sealed() {
    let (v, mut admin, mut watch) = watched_job(tempfile::tempdir().unwrap(), 8_200_000).await;
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();
    let end = end_of(&mut watch, "the watch outlived the seal").await;
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    drop((watch, admin));
    v.stop().await;
}

/// A job watch ends (UNAVAILABLE) when the server begins to drain, instead
/// of holding the drain to its deadline: the shutdown is as quick as the
/// calls really in flight.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_watch_ends_when_the_server_drains() {
    let dir = tempfile::tempdir().unwrap();
    with_drain_seconds(dir.path(), 120);
    let (v, admin, mut watch) = watched_job(dir, 8_300_000).await;
    let stopping = tokio::spawn(v.stop());
    // Without the fix the watch (and the stop) would last the whole 120 s
    // drain; the bounds only guard the suite.
    let e = end_of(&mut watch, "the watch held the drain")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    drop((watch, admin));
    tokio::time::timeout(std::time::Duration::from_secs(60), stopping)
        .await
        .expect("the stop waited out the drain")
        .unwrap();
}

/// Sealing signs the log up to its own Seal record: while sealed no
/// checkpoint can be made, and an unsigned tail could be cut unseen.
#[tokio::test(flavor = "multi_thread")]
async fn sealing_signs_a_checkpoint_covering_the_seal_record() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut admin = v.keys(ADMIN).await;
    call(checkout.tokenize(TokenizeRequest {
        pan: "4111111111111111".into(),
        expiry: None,
    }))
    .await
    .unwrap();
    call(admin.seal(SealRequest {
        reason: "maintenance window".into(),
    }))
    .await
    .unwrap();
    let seal_seq = v
        .audit_rows()
        .iter()
        .rfind(|r| r.action == "seal")
        .unwrap()
        .seq;
    let db = rusqlite::Connection::open(v.db_path()).unwrap();
    let covered: i64 = db
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM checkpoints", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(covered, seal_seq, "the seal left its record unsigned");
    drop((db, checkout, admin));
    v.stop().await;
}
