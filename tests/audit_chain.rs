//! Proves the audit log end to end over gRPC: auditor-only reads that are themselves audited, filters and paging, a gapless verifiable chain under concurrent load, continuity across a restart, and signed checkpoints at shutdown and by policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::calls::{CALL_TIMEOUT, call};
use common::cards::with_luhn;
use common::*;
use prost_types::Timestamp;
use tokenvault::audit::signer::{parse_public_key_pem, verify_checkpoint};
use tokenvault::audit::verify::{verify_export, verify_records};
use tokenvault::proto::audit_service_client::AuditServiceClient;
use tokenvault::proto::{
    AuditEvent, DetokenizeRequest, EventKind, ExportLogRequest, GetJobRequest, GetKeyStatusRequest,
    GetLatestCheckpointRequest, GetPublicKeyRequest, GetSealStatusRequest, GetTokenMetadataRequest,
    ListEventsRequest, RotateDataKeyRequest, TokenizeRequest,
};
use tonic::Code;
use tonic::transport::Channel;

type AuditClient = AuditServiceClient<Channel>;

/// The data-access and read actions; every other action is a key lifecycle
/// event.
const DATA_ACTIONS: [&str; 6] = [
    "tokenize",
    "detokenize",
    "get_metadata",
    "delete_token",
    "audit_read",
    "key_read",
];

async fn audit_client(v: &TestVault, name: &str) -> AuditClient {
    AuditServiceClient::new(
        tokenvault::client::channel(&v.url(), &v.pki(name))
            .await
            .unwrap(),
    )
}

/// The `i`th distinct 16-digit Visa test number.
fn pan(i: usize) -> String {
    with_luhn(&format!("411111{i:09}"))
}

async fn tokenize(c: &mut Client, pan: &str) -> String {
    call(c.tokenize(TokenizeRequest {
        pan: pan.into(),
        expiry: None,
    }))
    .await
    .unwrap_or_else(|s| panic!("tokenize: {s:?}"))
    .token
}

async fn detokenize(c: &mut Client, token: &str) -> Result<String, tonic::Status> {
    call(c.detokenize(DetokenizeRequest {
        token: token.into(),
        purpose: "refund".into(),
    }))
    .await
    .map(|mut r| std::mem::take(&mut r.pan))
}

fn ts(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap(),
    }
}

fn ms_of(t: &Option<Timestamp>) -> i64 {
    let t = t.as_ref().unwrap();
    t.seconds * 1000 + i64::from(t.nanos / 1_000_000)
}

/// Every event matching `req`, walking pages of `req.page_size`.
async fn list_all(a: &mut AuditClient, mut req: ListEventsRequest) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    req.page_token = String::new();
    for _ in 0..10_000 {
        let r = call(a.list_events(req.clone()))
            .await
            .unwrap_or_else(|s| panic!("list events {req:?}: {s:?}"));
        out.extend(r.events);
        if r.next_page_token.is_empty() {
            return out;
        }
        req.page_token = r.next_page_token;
    }
    panic!("paging did not end");
}

/// Exports the whole log over `ExportLog` as JSON Lines text.
async fn export_text(a: &mut AuditClient) -> String {
    let mut stream = call(a.export_log(ExportLogRequest { after_seq: 0 }))
        .await
        .unwrap();
    let mut text = String::new();
    loop {
        let msg = tokio::time::timeout(CALL_TIMEOUT, stream.message())
            .await
            .expect("export stream stalled")
            .unwrap();
        match msg {
            Some(line) => {
                assert!(!line.json.contains('\n'), "one line per message");
                text.push_str(&line.json);
                text.push('\n');
            }
            None => return text,
        }
    }
}

async fn public_key(a: &mut AuditClient) -> [u8; 32] {
    let pem = call(a.get_public_key(GetPublicKeyRequest {}))
        .await
        .unwrap()
        .pem;
    parse_public_key_pem(&pem).unwrap()
}

/// Polls the latest checkpoint until it covers `seq` (at most 8 s).
async fn wait_checkpoint(a: &mut AuditClient, seq: u64) -> tokenvault::proto::Checkpoint {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let cp = call(a.get_latest_checkpoint(GetLatestCheckpointRequest {}))
            .await
            .unwrap()
            .checkpoint;
        if let Some(cp) = cp.filter(|c| c.seq >= seq) {
            return cp;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint reached seq {seq} in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The entries of an export as JSON values, in file order.
fn export_entries(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "entry")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_auditors_read_the_log_and_every_read_is_audited() {
    let v = TestVault::start().await;

    // The auditor may call everything.
    let mut a = audit_client(&v, AUDITOR).await;
    let listed = call(a.list_events(ListEventsRequest::default()))
        .await
        .unwrap();
    assert!(!listed.events.is_empty());
    // The vault's own start-up events are on the record.
    let actions: HashSet<&str> = listed.events.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains("kek_init"), "{actions:?}");
    call(a.get_latest_checkpoint(GetLatestCheckpointRequest {}))
        .await
        .unwrap();
    let text = export_text(&mut a).await;
    assert!(text.starts_with("{\"type\":\"header\""), "{text}");
    let pem = call(a.get_public_key(GetPublicKeyRequest {}))
        .await
        .unwrap();
    let pk = parse_public_key_pem(&pem.pem).unwrap();
    assert_eq!(pem.key_id, tokenvault::audit::signer::key_id(&pk));

    // Nobody else may, whatever their other powers.
    let others = [ACME_CHECKOUT, ACME_PAYMENTS, ADMIN, CUSTODIANS[0]];
    for name in others {
        let mut c = audit_client(&v, name).await;
        let denied = |r: Result<(), tonic::Status>, rpc: &str| {
            let s = r.expect_err(&format!("{name} may not call {rpc}"));
            assert_eq!(s.code(), Code::PermissionDenied, "{name} {rpc}: {s:?}");
        };
        denied(
            call(c.list_events(ListEventsRequest::default()))
                .await
                .map(|_| ()),
            "ListEvents",
        );
        denied(
            call(c.get_latest_checkpoint(GetLatestCheckpointRequest {}))
                .await
                .map(|_| ()),
            "GetLatestCheckpoint",
        );
        denied(
            call(c.export_log(ExportLogRequest { after_seq: 0 }))
                .await
                .map(|_| ()),
            "ExportLog",
        );
        denied(
            call(c.get_public_key(GetPublicKeyRequest {}))
                .await
                .map(|_| ()),
            "GetPublicKey",
        );
    }

    // Each auditor read is on the record, by the auditor…
    let mine = list_all(
        &mut a,
        ListEventsRequest {
            actor: identity(AUDITOR).into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    assert!(
        mine.iter()
            .all(|e| e.action == "audit_read" && e.outcome == "success"),
        "{mine:#?}"
    );
    let details: Vec<&str> = mine.iter().map(|e| e.detail.as_str()).collect();
    // list, checkpoint, export, public key: this list's own record is
    // written after the list is read, with its outcome.
    assert_eq!(mine.len(), 4, "{details:?}");
    assert!(details[0].starts_with("list"), "{details:?}");
    assert_eq!(details[1], "latest checkpoint");
    assert!(details[2].starts_with("export"), "{details:?}");
    assert_eq!(details[3], "public key");

    // …and so is each refusal, as a denied audit read by the caller.
    for name in others {
        let theirs = list_all(
            &mut a,
            ListEventsRequest {
                actor: identity(name).into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(theirs.len(), 4, "{name}: {theirs:#?}");
        for e in &theirs {
            assert_eq!(e.action, "audit_read", "{name}: {e:?}");
            assert_eq!(e.outcome, "denied", "{name}: {e:?}");
            assert_eq!(e.actor, identity(name));
        }
    }
    let denied_reads = list_all(
        &mut a,
        ListEventsRequest {
            outcome: "denied".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied_reads.len(), others.len() * 4, "{denied_reads:#?}");
    v.stop().await;
}

/// Reads of key state are administrative actions (PCI DSS 10.2.1.2): each
/// is on the record with what was read and how it ended, and a refused one
/// as denied, before the caller is answered.
#[tokio::test(flavor = "multi_thread")]
async fn reads_of_key_state_are_audited_with_their_outcome() {
    let v = TestVault::start().await;
    let mut admin = v.keys(ADMIN).await;
    call(admin.get_key_status(GetKeyStatusRequest {}))
        .await
        .unwrap();
    call(admin.get_seal_status(GetSealStatusRequest {}))
        .await
        .unwrap();
    let missing = call(admin.get_job(GetJobRequest { job_id: 999 }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let mut checkout = v.keys(ACME_CHECKOUT).await;
    let refused = call(checkout.get_key_status(GetKeyStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let reads: Vec<(String, String, String)> = v
        .audit_rows()
        .into_iter()
        .filter(|r| r.action == "key_read")
        .map(|r| (r.actor, r.outcome, r.detail.unwrap_or_default()))
        .collect();
    assert_eq!(reads.len(), 4, "{reads:#?}");
    let admin_id = identity(ADMIN).to_owned();
    assert_eq!(
        reads[0],
        (admin_id.clone(), "success".into(), "key status".into())
    );
    assert_eq!(
        reads[1],
        (admin_id.clone(), "success".into(), "seal status".into())
    );
    assert_eq!((&reads[2].0, reads[2].1.as_str()), (&admin_id, "not_found"));
    assert!(reads[2].2.starts_with("job 999"), "{reads:#?}");
    assert_eq!(
        (reads[3].0.as_str(), reads[3].1.as_str()),
        (identity(ACME_CHECKOUT), "denied")
    );
    drop((admin, checkout));
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_and_paging_select_exactly_the_matching_events() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    let mut globex = v.client(GLOBEX_CHECKOUT).await;
    let mut keys = v.keys(ADMIN).await;
    let mut a = audit_client(&v, AUDITOR).await;

    // Phase A: a scripted mix.
    let t1 = tokenize(&mut checkout, &pan(1)).await;
    let t2 = tokenize(&mut checkout, &pan(2)).await;
    tokenize(&mut globex, &pan(3)).await;
    assert_eq!(detokenize(&mut payments, &t1).await.unwrap(), pan(1));
    call(payments.get_token_metadata(GetTokenMetadataRequest { token: t2.clone() }))
        .await
        .unwrap();
    let reason = "quarterly rotation, change CHG-4711";
    call(keys.rotate_data_key(RotateDataKeyRequest {
        tenant: "acme".into(),
        reason: reason.into(),
    }))
    .await
    .unwrap();
    let denied = detokenize(&mut checkout, &t1).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Phase B: a time window holding only tokenizes.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let from = now_ms();
    for i in 10..14 {
        tokenize(&mut checkout, &pan(i)).await;
    }
    let to = now_ms() + 1;
    tokio::time::sleep(Duration::from_millis(30)).await;

    // Phase C: more after the window.
    assert_eq!(detokenize(&mut payments, &t2).await.unwrap(), pan(2));

    // Everything, at once, as the reference.
    let all = call(a.list_events(ListEventsRequest {
        page_size: 1000,
        ..Default::default()
    }))
    .await
    .unwrap()
    .events;
    let last = all.last().unwrap().seq;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "the log is gapless");
    // A read is recorded once it has run, with its outcome: the reference
    // list's own record is the next one.
    let next = call(a.list_events(ListEventsRequest {
        page_token: last.to_string(),
        page_size: 1,
        ..Default::default()
    }))
    .await
    .unwrap()
    .events;
    assert_eq!(
        (
            next[0].seq,
            next[0].action.as_str(),
            next[0].outcome.as_str()
        ),
        (last + 1, "audit_read", "success"),
        "{next:?}"
    );
    let upto = |v: Vec<AuditEvent>| -> Vec<AuditEvent> {
        v.into_iter().filter(|e| e.seq <= last).collect()
    };

    // Kind: key lifecycle.
    let key = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                kind: EventKind::KeyLifecycle.into(),
                page_size: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    for e in &key {
        assert!(!DATA_ACTIONS.contains(&e.action.as_str()), "{e:?}");
    }
    let key_actions: HashSet<&str> = key.iter().map(|e| e.action.as_str()).collect();
    for want in ["kek_init", "dek_create", "dek_rotate", "audit_key_create"] {
        assert!(key_actions.contains(want), "{want} in {key_actions:?}");
    }
    let rot = key.iter().find(|e| e.action == "dek_rotate").unwrap();
    assert_eq!(rot.reason, reason);
    assert_eq!(rot.actor, identity(ADMIN));
    assert_eq!(rot.tenant, "acme");
    assert!(rot.key_id.is_some() && rot.key_version.is_some(), "{rot:?}");

    // Kind: data access.
    let data = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                kind: EventKind::DataAccess.into(),
                page_size: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    for e in &data {
        assert!(DATA_ACTIONS.contains(&e.action.as_str()), "{e:?}");
    }
    let data_actions: HashSet<&str> = data.iter().map(|e| e.action.as_str()).collect();
    for want in ["tokenize", "detokenize", "get_metadata"] {
        assert!(data_actions.contains(want), "{want} in {data_actions:?}");
    }
    // The two kinds partition the log.
    let mut both: Vec<u64> = key.iter().chain(&data).map(|e| e.seq).collect();
    both.sort_unstable();
    assert_eq!(both, seqs);

    // Tenant.
    for tenant in ["acme", "globex"] {
        let got = upto(
            list_all(
                &mut a,
                ListEventsRequest {
                    tenant: tenant.into(),
                    page_size: 1000,
                    ..Default::default()
                },
            )
            .await,
        );
        let want: Vec<u64> = all
            .iter()
            .filter(|e| e.tenant == tenant)
            .map(|e| e.seq)
            .collect();
        assert!(!want.is_empty(), "{tenant}");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), want);
    }

    // Actor.
    let by_payments = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                actor: identity(ACME_PAYMENTS).into(),
                page_size: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        by_payments
            .iter()
            .map(|e| (e.action.as_str(), e.outcome.as_str()))
            .collect::<Vec<_>>(),
        [
            ("detokenize", "success"),
            ("get_metadata", "success"),
            ("detokenize", "success")
        ],
        "{by_payments:#?}"
    );

    // Outcome.
    let denials = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                outcome: "denied".into(),
                page_size: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(denials.len(), 1, "{denials:#?}");
    assert_eq!(denials[0].action, "detokenize");
    assert_eq!(denials[0].actor, identity(ACME_CHECKOUT));
    assert_eq!(denials[0].token, t1);
    // Filters combine.
    let none = call(a.list_events(ListEventsRequest {
        outcome: "denied".into(),
        actor: identity(ACME_PAYMENTS).into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(none.events.is_empty(), "{none:?}");

    // Paging by 3 walks the whole log with no duplicate and no gap (the
    // walk's own reads are appended as it goes, and it reaches them too).
    let mut walked = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = call(a.list_events(ListEventsRequest {
            page_size: 3,
            page_token: token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        assert!(r.events.len() <= 3);
        walked.extend(r.events.iter().map(|e| e.seq));
        pages += 1;
        assert!(pages < 1000, "paging did not end");
        if r.next_page_token.is_empty() {
            break;
        }
        assert_eq!(
            r.next_page_token,
            r.events.last().unwrap().seq.to_string(),
            "the page token resumes after the last event"
        );
        token = r.next_page_token;
    }
    let n = walked.len() as u64;
    assert!(n > last, "the walk reaches its own reads");
    assert_eq!(walked, (1..=n).collect::<Vec<_>>());
    assert!(pages as u64 >= last / 3);

    // Paging with a filter: page boundaries fall on matching events only.
    let paged_key = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                kind: EventKind::KeyLifecycle.into(),
                page_size: 3,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        paged_key.iter().map(|e| e.seq).collect::<Vec<_>>(),
        key.iter().map(|e| e.seq).collect::<Vec<_>>()
    );

    // A malformed page token is refused.
    let bad = call(a.list_events(ListEventsRequest {
        page_token: "not-a-number".into(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Time range: [from, to) holds exactly phase B.
    let window = list_all(
        &mut a,
        ListEventsRequest {
            from: Some(ts(from)),
            to: Some(ts(to)),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    let want: Vec<u64> = all
        .iter()
        .filter(|e| (from..to).contains(&ms_of(&e.time)))
        .map(|e| e.seq)
        .collect();
    assert_eq!(window.len(), 4, "{window:#?}");
    assert_eq!(window.iter().map(|e| e.seq).collect::<Vec<_>>(), want);
    assert!(window.iter().all(|e| e.action == "tokenize"));
    // Open-ended ranges.
    let after = upto(
        list_all(
            &mut a,
            ListEventsRequest {
                from: Some(ts(to)),
                page_size: 1000,
                ..Default::default()
            },
        )
        .await,
    );
    assert!(after.iter().all(|e| ms_of(&e.time) >= to));
    assert!(after.iter().any(|e| e.action == "detokenize"));
    let before = list_all(
        &mut a,
        ListEventsRequest {
            to: Some(ts(from)),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    assert!(before.iter().all(|e| ms_of(&e.time) < from));
    assert!(before.iter().any(|e| e.action == "dek_rotate"));
    assert_eq!(
        before.len() + window.len() + after.len(),
        last as usize,
        "the three ranges partition the log"
    );
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_detokenizes_leave_a_gapless_verifiable_chain() {
    const CALLERS: usize = 64;
    const CALLS_EACH: usize = 3;
    const CONNECTIONS: usize = 8;
    let v = TestVault::start().await;

    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut cards = Vec::new();
    for i in 0..CALLERS {
        let p = pan(100 + i);
        cards.push((tokenize(&mut checkout, &p).await, p));
    }
    let cards = Arc::new(cards);

    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(v.client(ACME_PAYMENTS).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let mut c = conns[i % CONNECTIONS].clone();
        let cards = cards.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for j in 0..CALLS_EACH {
                let (token, p) = &cards[(i + j) % cards.len()];
                assert_eq!(&detokenize(&mut c, token).await.unwrap(), p);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("detokenize tasks finished")
            .unwrap();
    }

    let mut a = audit_client(&v, AUDITOR).await;
    let text = export_text(&mut a).await;
    let pk = public_key(&mut a).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log.jsonl");
    std::fs::File::create(&file)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();

    let verdict = verify_export(
        std::io::BufReader::new(std::fs::File::open(&file).unwrap()),
        &pk,
    );
    assert!(verdict.ok(), "{}", verdict.summary());
    let entries = export_entries(&text);
    assert_eq!(verdict.entries, entries.len() as u64);
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=verdict.entries).collect::<Vec<_>>());
    let detok_ok = entries
        .iter()
        .filter(|e| e["action"] == "detokenize" && e["outcome"] == "success")
        .count();
    assert_eq!(detok_ok, CALLERS * CALLS_EACH);
    let tokenized = entries
        .iter()
        .filter(|e| e["action"] == "tokenize" && e["outcome"] == "success")
        .count();
    assert_eq!(tokenized, CALLERS);
    // Every detokenize names its caller and a token that was issued.
    let issued: HashSet<&str> = cards.iter().map(|(t, _)| t.as_str()).collect();
    for e in entries.iter().filter(|e| e["action"] == "detokenize") {
        assert_eq!(e["actor"], identity(ACME_PAYMENTS));
        assert!(issued.contains(e["token"].as_str().unwrap()), "{e}");
        assert_eq!(e["purpose"], "refund");
    }
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chain_continues_across_a_restart_and_shutdown_signs_a_checkpoint() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        let t = tokenize(&mut checkout, &pan(i)).await;
        detokenize(&mut payments, &t).await.unwrap();
        tokens.push(t);
    }
    drop((checkout, payments));
    let db = v.db_path();
    let dir = v.stop().await;

    let (entries, cps, public) = tokenvault::storage::sqlite::read_audit_offline(&db).unwrap();
    let pk: [u8; 32] = public.unwrap().try_into().unwrap();
    let first_run = entries.last().unwrap().seq;
    assert_eq!(entries.len() as u64, first_run);
    let last_cp = cps.last().expect("a checkpoint at shutdown");
    assert_eq!(
        last_cp.seq, first_run,
        "the shutdown checkpoint covers the final entry"
    );
    assert_eq!(Some(last_cp.chain_hash), entries.last().unwrap().chain_hash);
    let verdict = verify_records(&entries, &cps, &pk);
    assert!(verdict.ok(), "{}", verdict.summary());
    assert_eq!(verdict.covered_to, Some(first_run));

    // Restart on the same directory and carry on.
    let v = TestVault::start_in(dir).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(detokenize(&mut payments, t).await.unwrap(), pan(i));
    }
    tokenize(&mut checkout, &pan(99)).await;
    let mut a = audit_client(&v, AUDITOR).await;
    assert_eq!(public_key(&mut a).await, pk, "the signing key survives");
    drop((checkout, payments, a));
    let dir = v.stop().await;

    let (entries, cps, public) = tokenvault::storage::sqlite::read_audit_offline(&db).unwrap();
    assert_eq!(public.unwrap(), pk.to_vec());
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    let last = *seqs.last().unwrap();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "no gap across restart"
    );
    assert!(last >= first_run + 7, "{first_run} → {last}");
    let second_run = &entries[usize::try_from(first_run).unwrap()..];
    assert_eq!(
        second_run
            .iter()
            .filter(|e| e.action == "detokenize" && e.outcome == "success")
            .count(),
        tokens.len()
    );
    assert!(
        cps.iter().any(|c| c.seq == first_run),
        "the first shutdown checkpoint is kept"
    );
    assert_eq!(cps.last().unwrap().seq, last, "and a second one was signed");
    let verdict = verify_records(&entries, &cps, &pk);
    assert!(verdict.ok(), "{}", verdict.summary());
    assert_eq!(verdict.entries, last);
    assert_eq!(verdict.covered_to, Some(last));
    drop(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_signed_periodically_by_entry_count() {
    let dir = tempfile::tempdir().unwrap();
    append_config(
        dir.path(),
        "[audit]\ncheckpoint_every_entries = 5\ncheckpoint_every_seconds = 3600\n",
    );
    let v = TestVault::start_in(dir).await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let mut a = audit_client(&v, AUDITOR).await;
    let pk = public_key(&mut a).await;
    // The first checkpoint is due at once (none was ever signed).
    let first = wait_checkpoint(&mut a, 1).await;
    // Then one every 5 entries (the time policy is an hour): 20 more
    // entries must move it on within a tick or two.
    for i in 0..20 {
        tokenize(&mut checkout, &pan(i)).await;
    }
    let cp = wait_checkpoint(&mut a, first.seq + 20).await;
    // The checkpoint verifies with the public key alone.
    let head: [u8; 32] = hex::decode(&cp.chain_hash).unwrap().try_into().unwrap();
    let sig = hex::decode(&cp.signature).unwrap();
    assert!(verify_checkpoint(&pk, cp.seq, &head, ms_of(&cp.time), &sig));
    assert!(!verify_checkpoint(
        &pk,
        cp.seq + 1,
        &head,
        ms_of(&cp.time),
        &sig
    ));
    assert_eq!(cp.key_id, tokenvault::audit::signer::key_id(&pk));

    // More than one was signed along the way, and all of them verify.
    let text = export_text(&mut a).await;
    let verdict = verify_export(text.as_bytes(), &pk);
    assert!(verdict.ok(), "{}", verdict.summary());
    assert!(verdict.checkpoints >= 2, "{}", verdict.summary());
    assert!(verdict.covered_to.unwrap() >= cp.seq);
    let cp_seqs: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "checkpoint")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert!(cp_seqs.windows(2).all(|w| w[0] < w[1]), "{cp_seqs:?}");
    // The chain head each checkpoint signs is the one recorded with its entry.
    let heads: std::collections::HashMap<u64, String> = export_entries(&text)
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["chain_hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(heads[&cp.seq], cp.chain_hash);
    v.stop().await;
}

/// An export ends at its own record, however busy the vault is while it
/// streams: rows committed meanwhile belong to the next export. (Without an
/// end, a steady flow of calls could keep an export going for ever.)
#[tokio::test(flavor = "multi_thread")]
async fn an_export_ends_at_its_own_record_while_writes_go_on() {
    let v = TestVault::start().await;
    let checkout = v.client(ACME_CHECKOUT).await;
    // More than one export page (500 entries) before the export starts.
    common::calls::tokenize_many(&checkout, 9_600_000, 700).await;
    let mut a = audit_client(&v, AUDITOR).await;
    let mut stream = call(a.export_log(ExportLogRequest { after_seq: 0 }))
        .await
        .unwrap();
    let header = stream.message().await.unwrap().unwrap();
    let header: serde_json::Value = serde_json::from_str(&header.json).unwrap();
    assert!(header.get("action").is_none(), "{header}");
    // The stream holds the first page; these commit before the next one.
    common::calls::tokenize_many(&checkout, 9_700_000, 100).await;
    let mut text = String::new();
    let mut seqs = Vec::new();
    let mut signed = Vec::new();
    let mut tokenized = 0;
    while let Some(line) = tokio::time::timeout(CALL_TIMEOUT, stream.message())
        .await
        .expect("export stream stalled")
        .unwrap()
    {
        let v: serde_json::Value = serde_json::from_str(&line.json).unwrap();
        if v.get("action").is_some() {
            seqs.push(v["seq"].as_u64().unwrap());
            tokenized += usize::from(v["action"] == "tokenize");
        } else if v.get("signature").is_some() {
            signed.push(v["seq"].as_u64().unwrap());
        }
        text.push_str(&line.json);
        text.push('\n');
    }
    let last = *seqs.last().unwrap();
    let own = v
        .audit_rows()
        .into_iter()
        .find(|r| r.action == "audit_read" && r.detail.as_deref() == Some("export after=0"))
        .unwrap();
    assert!(
        last >= u64::try_from(own.seq).unwrap(),
        "the export stopped short of its own record"
    );
    assert_eq!(
        tokenized, 700,
        "the export ran on into calls made while it streamed"
    );
    assert_eq!(signed.last(), Some(&last), "the export does not end signed");
    assert_eq!(seqs.len() as u64, last, "the export has gaps");
    let pk = public_key(&mut a).await;
    let verdict = verify_export(text.as_bytes(), &pk);
    assert!(verdict.ok(), "{}", verdict.summary());
    assert!(
        !verdict.summary().contains("not yet covered"),
        "{}",
        verdict.summary()
    );
    drop((checkout, a));
    v.stop().await;
}
