//! The storage conformance suite: the [`Store`] port's written invariants as
//! executable checks. Every backend runs all of them (see
//! `tests/storage_conformance.rs`); a new backend is done when they pass.
//!
//! Checks return `Err(description)` instead of panicking so they can live in
//! the library, next to the trait they specify.

use std::future::Future;
use std::sync::Arc;

use crate::domain::audit::{AuditAction, AuditEvent};
use crate::domain::pan::CardBrand;
use crate::domain::store::{DekState, KekCheck, Store, StoreError, TokenRecord, WrappedDek};
use crate::domain::token::Token;

/// Opens a backend. Calling `open` again after `close` must reopen the same
/// database, so durability across restarts can be checked.
pub trait Backend {
    fn open(&self) -> impl Future<Output = Arc<dyn Store>>;
}

pub type CheckResult = Result<(), String>;

fn ensure(cond: bool, what: impl Into<String>) -> CheckResult {
    if cond { Ok(()) } else { Err(what.into()) }
}

fn ok<T>(r: Result<T, StoreError>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

pub fn token(n: u8) -> Token {
    let mut b = [0u8; 22];
    b[5] = n;
    b[21] = n;
    Token::from_bytes(b)
}

pub fn record(t: Token, tenant: &str) -> TokenRecord {
    TokenRecord {
        token: t,
        tenant: tenant.into(),
        dek_id: 1,
        ciphertext: vec![1, 0, 0, 0, 1, 9, 9, 9],
        brand: CardBrand::Visa,
        bin: "41111111".into(),
        last4: "1111".into(),
        pan_len: 16,
        exp_month: Some(12),
        exp_year: Some(2030),
        created_ms: 1_700_000_000_000,
    }
}

pub fn event(action: AuditAction, t: Option<Token>) -> AuditEvent {
    AuditEvent {
        tenant: Some("acme".into()),
        token: t,
        peer: Some("127.0.0.1:1".into()),
        ..AuditEvent::new(1_700_000_000_000, "spiffe://test/actor", action)
    }
}

pub fn dek(id: u32, tenant: &str, version: u32) -> WrappedDek {
    WrappedDek {
        id,
        tenant: tenant.into(),
        version,
        state: DekState::Active,
        wrapped: vec![7; 61],
        kek_id: "local:test".into(),
        created_ms: 1,
        reserved: 0,
    }
}

/// Stores data key 1, the active key of tenant `acme`.
async fn insert_key_1(s: &dyn Store) -> Result<(), StoreError> {
    s.insert_dek(&dek(1, "acme", 1), event(AuditAction::DekCreate, None))
        .await
}

/// Stores `t` for tenant `acme` under key 1, with its audit event.
async fn tokenize(s: &dyn Store, t: Token) -> Result<(), StoreError> {
    s.insert_token(record(t, "acme"), event(AuditAction::Tokenize, Some(t)))
        .await
}

/// Creates a running re-encryption job for tenant `acme`.
async fn start_job(s: &dyn Store, total: u64) -> Result<u64, String> {
    let job = crate::domain::store::JobRecord {
        id: 0,
        tenant: "acme".into(),
        state: crate::domain::store::JobState::Running,
        total,
        done: 0,
        checkpoint: None,
        passes: 0,
        created_ms: 1,
        updated_ms: 1,
        actor: "a".into(),
        reason: "r".into(),
        error: None,
    };
    ok(
        s.create_job(&job, event(AuditAction::ReencryptStart, None))
            .await,
        "job",
    )
}

async fn audit_all(s: &dyn Store) -> Result<Vec<crate::domain::AuditRecord>, String> {
    ok(s.audit_after(0, 1_000_000).await, "audit_after")
}

/// A token and its audit event commit together and read back unchanged.
pub async fn token_round_trip<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let rec = record(token(1), "acme");
    ok(
        s.insert_token(rec.clone(), event(AuditAction::Tokenize, Some(rec.token)))
            .await,
        "insert_token",
    )?;
    let got = ok(s.get_token(&rec.token).await, "get_token")?;
    ensure(got.as_deref() == Some(&rec), format!("read back {got:?}"))?;
    ensure(
        ok(s.get_token(&token(2)).await, "get_token")?.is_none(),
        "missing token must read as None",
    )?;
    let audit = audit_all(&*s).await?;
    ensure(
        audit.len() == 1,
        format!("one audit record, got {}", audit.len()),
    )?;
    ensure(
        audit[0].action == "tokenize" && audit[0].token == Some(rec.token),
        "audit record names action and token",
    )
}

/// A duplicate token is a conflict, and its audit event is not recorded.
pub async fn duplicate_token_conflicts<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let rec = record(token(3), "acme");
    ok(
        s.insert_token(rec.clone(), event(AuditAction::Tokenize, None))
            .await,
        "first insert",
    )?;
    let second = s
        .insert_token(rec.clone(), event(AuditAction::Tokenize, None))
        .await;
    ensure(
        second == Err(StoreError::Conflict),
        format!("second insert: {second:?}"),
    )?;
    let n = audit_all(&*s).await?.len();
    ensure(
        n == 1,
        format!("conflicting insert must not audit ({n} records)"),
    )
}

/// Audit sequence numbers are 1, 2, 3 … in commit order, with no gaps, and
/// `audit_after` pages through them.
pub async fn audit_sequence_is_gapless<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    for i in 0..25u8 {
        let seq = ok(
            s.append_audit(event(AuditAction::Detokenize, Some(token(i))))
                .await,
            "append_audit",
        )?;
        ensure(seq == u64::from(i) + 1, format!("seq {seq} for append {i}"))?;
    }
    let page = ok(s.audit_after(10, 5).await, "audit_after")?;
    let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
    ensure(seqs == vec![11, 12, 13, 14, 15], format!("page {seqs:?}"))
}

/// Delete removes only the owning tenant's row; each attempt is audited,
/// with `not_found` when nothing was deleted.
pub async fn delete_is_tenant_scoped_and_audited<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let t = token(4);
    ok(tokenize(&*s, t).await, "insert")?;
    let wrong = ok(
        s.delete_token(&t, "globex", event(AuditAction::DeleteToken, Some(t)))
            .await,
        "delete other tenant",
    )?;
    ensure(!wrong, "another tenant must not delete the row")?;
    ensure(
        ok(s.get_token(&t).await, "get")?.is_some(),
        "row survives foreign delete",
    )?;
    let right = ok(
        s.delete_token(&t, "acme", event(AuditAction::DeleteToken, Some(t)))
            .await,
        "delete",
    )?;
    ensure(right, "owner deletes the row")?;
    ensure(ok(s.get_token(&t).await, "get")?.is_none(), "row is gone")?;
    let outcomes: Vec<String> = audit_all(&*s)
        .await?
        .into_iter()
        .map(|r| r.outcome)
        .collect();
    ensure(
        outcomes == ["success", "not_found", "success"],
        format!("outcomes {outcomes:?}"),
    )
}

/// Wrapped DEKs store and load; ids and (tenant, version) are unique; the
/// use reservation only ever rises.
pub async fn deks_and_counters<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    ok(
        s.insert_dek(&dek(1, "acme", 1), event(AuditAction::DekCreate, None))
            .await,
        "insert dek",
    )?;
    let dup_id = s
        .insert_dek(&dek(1, "globex", 1), event(AuditAction::DekCreate, None))
        .await;
    ensure(
        dup_id == Err(StoreError::Conflict),
        format!("dup id: {dup_id:?}"),
    )?;
    let dup_ver = s
        .insert_dek(&dek(2, "acme", 1), event(AuditAction::DekCreate, None))
        .await;
    ensure(
        dup_ver == Err(StoreError::Conflict),
        format!("dup version: {dup_ver:?}"),
    )?;
    ok(s.reserve_dek_uses(1, 1000).await, "reserve")?;
    ok(s.reserve_dek_uses(1, 10).await, "lower reserve")?;
    let deks = ok(s.load_deks().await, "load_deks")?;
    ensure(deks.len() == 1, format!("{} deks", deks.len()))?;
    let mut want = dek(1, "acme", 1);
    want.reserved = 1000;
    ensure(deks[0] == want, format!("loaded {:?}", deks[0]))?;
    ensure(
        s.reserve_dek_uses(99, 1).await.is_err(),
        "reserving an unknown key must fail",
    )?;
    let n = audit_all(&*s).await?.len();
    ensure(n == 1, format!("only the stored key is audited ({n})"))
}

/// The KEK pin is absent on a new store, set once, and never replaced.
pub async fn kek_pin_is_set_once<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    ensure(
        ok(s.kek_check().await, "kek_check")?.is_none(),
        "new store has no pin",
    )?;
    let pin = KekCheck {
        kek_id: "local:abc".into(),
        check_blob: vec![1, 2, 3],
    };
    ok(
        s.pin_kek(&pin, event(AuditAction::KekInit, None)).await,
        "pin",
    )?;
    ensure(
        ok(s.kek_check().await, "kek_check")?.as_ref() == Some(&pin),
        "pin reads back",
    )?;
    let other = KekCheck {
        kek_id: "local:def".into(),
        check_blob: vec![4],
    };
    let again = s.pin_kek(&other, event(AuditAction::KekInit, None)).await;
    ensure(
        again == Err(StoreError::Conflict),
        format!("re-pin: {again:?}"),
    )?;
    ensure(
        ok(s.kek_check().await, "kek_check")?.as_ref() == Some(&pin),
        "pin unchanged",
    )
}

/// Many concurrent writers all succeed and get distinct, gapless sequence
/// numbers (group commit must not lose or duplicate anything).
pub async fn concurrent_writes_all_commit<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut raw = [0u8; 22];
            raw[..4].copy_from_slice(&i.to_be_bytes());
            raw[21] = 0xAA;
            let t = Token::from_bytes(raw);
            if i % 2 == 0 {
                s.insert_token(record(t, "acme"), event(AuditAction::Tokenize, Some(t)))
                    .await
                    .map(|_| ())
            } else {
                s.append_audit(event(AuditAction::Detokenize, Some(t)))
                    .await
                    .map(|_| ())
            }
        }));
    }
    for t in tasks {
        let res = t.await.map_err(|e| format!("writer task: {e}"))?;
        ok(res, "write")?;
    }
    let seqs: Vec<u64> = audit_all(&*s).await?.iter().map(|r| r.seq).collect();
    ensure(
        seqs == (1..=200).collect::<Vec<u64>>(),
        format!("{} records, not 1..=200 in order", seqs.len()),
    )
}

/// What was acknowledged survives close and reopen; writes after close fail.
pub async fn acknowledged_writes_survive_reopen<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let t = token(9);
    ok(tokenize(&*s, t).await, "insert")?;
    ok(s.close().await, "close")?;
    let after = s.append_audit(event(AuditAction::Detokenize, None)).await;
    ensure(
        matches!(after, Err(StoreError::Unavailable(_))),
        format!("write after close: {after:?}"),
    )?;
    drop(s);
    let s = b.open().await;
    ensure(
        ok(s.get_token(&t).await, "get")?.is_some(),
        "token survives",
    )?;
    let seq = ok(
        s.append_audit(event(AuditAction::Detokenize, None)).await,
        "append",
    )?;
    ensure(
        seq == 2,
        format!("sequence continues after reopen (got {seq})"),
    )
}

/// A request that is rejected (duplicate token, unknown key) fails alone:
/// writes committed alongside it in the same group commit still succeed.
pub async fn rejected_request_fails_alone<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    let dup = token(42);
    ok(
        s.insert_token(record(dup, "acme"), event(AuditAction::Tokenize, Some(dup)))
            .await,
        "seed",
    )?;
    let mut tasks = Vec::new();
    for i in 0..60u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                0 => s.reserve_dek_uses(9999, 10).await.err(),
                1 => s
                    .insert_token(record(dup, "acme"), event(AuditAction::Tokenize, Some(dup)))
                    .await
                    .err(),
                _ => s
                    .append_audit(event(AuditAction::Detokenize, None))
                    .await
                    .err(),
            }
            .map(|e| (i, e))
        }));
    }
    for t in tasks {
        let failure = t.await.map_err(|e| format!("task: {e}"))?;
        match failure {
            None => {}
            Some((i, _)) if i % 3 != 2 => {}
            Some((i, e)) => return Err(format!("innocent write {i} failed: {e}")),
        }
    }
    let n = audit_all(&*s).await?.len();
    ensure(
        n == 21,
        format!("seed + 20 appends expected, got {n} records"),
    )
}

/// A re-encrypted row reads back with its new key and ciphertext at once
/// (no stale copy survives anywhere, e.g. in a read cache).
pub async fn reencrypted_row_reads_back_new<B: Backend>(b: &B) -> CheckResult {
    use crate::domain::store::Reencrypted;
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    let t = token(50);
    ok(tokenize(&*s, t).await, "insert")?;
    ok(s.get_token(&t).await, "warm read")?;
    let id = start_job(&*s, 1).await?;
    let row = Reencrypted {
        token: t,
        old_dek: 1,
        new_dek: 2,
        ciphertext: vec![9; 8],
    };
    let n = ok(s.reencrypt_batch(id, vec![row], Some(t)).await, "reencrypt")?;
    ensure(n == 1, format!("{n} rows re-encrypted"))?;
    let got = ok(s.get_token(&t).await, "read")?.ok_or("row vanished")?;
    ensure(
        got.dek_id == 2 && got.ciphertext == vec![9; 8],
        format!("stale row read back: dek {}", got.dek_id),
    )
}

/// A re-encryption batch prepared before a crypto-shred and committed after
/// it (under a key made after the shred) must not move its rows: that would
/// bring the shredded card numbers back.
pub async fn reencryption_never_revives_a_shredded_row<B: Backend>(b: &B) -> CheckResult {
    use crate::domain::store::Reencrypted;
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    let t = token(60);
    ok(tokenize(&*s, t).await, "insert")?;
    let id = start_job(&*s, 1).await?;
    let before = ok(s.get_token(&t).await, "read")?.ok_or("row vanished")?;
    let gone = ok(
        s.shred_tenant("acme", event(AuditAction::TenantShred, None))
            .await,
        "shred",
    )?;
    ensure(gone.contains(&1), format!("shred destroyed {gone:?}"))?;
    // The tenant's next use makes a fresh key, as tokenize would.
    ok(
        s.insert_dek(&dek(2, "acme", 2), event(AuditAction::DekCreate, None))
            .await,
        "fresh dek",
    )?;
    let row = Reencrypted {
        token: t,
        old_dek: 1,
        new_dek: 2,
        ciphertext: vec![9; 8],
    };
    let moved = s.reencrypt_batch(id, vec![row], None).await.unwrap_or(0);
    ensure(moved == 0, format!("{moved} shredded rows re-encrypted"))?;
    let after = ok(s.get_token(&t).await, "read")?;
    ensure(
        after
            .as_ref()
            .is_none_or(|r| r.dek_id == 1 && r.ciphertext == before.ciphertext),
        "a shredded row was moved under a live key",
    )
}

/// Once a delete is acknowledged, the row never reads back, even with
/// readers racing the delete.
pub async fn deleted_row_never_reads_back<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    for i in 0..40u8 {
        let t = token(100 + i);
        ok(tokenize(&*s, t).await, "insert")?;
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let _ = s.get_token(&t).await;
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let deleted = ok(
            s.delete_token(&t, "acme", event(AuditAction::DeleteToken, Some(t)))
                .await,
            "delete",
        )?;
        ensure(deleted, "delete")?;
        ensure(
            ok(s.get_token(&t).await, "read")?.is_none(),
            format!("token {i} read back right after its delete"),
        )?;
        for r in readers {
            r.await.map_err(|e| format!("reader: {e}"))?;
        }
        ensure(
            ok(s.get_token(&t).await, "read")?.is_none(),
            format!("token {i} read back after racing readers"),
        )?;
    }
    Ok(())
}

/// Token counts per key follow inserts, re-encryption moves and deletes.
pub async fn token_counts_follow_writes<B: Backend>(b: &B) -> CheckResult {
    use crate::domain::store::Reencrypted;
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    let none = ok(s.token_counts().await, "counts of an empty store")?;
    ensure(
        none.values().all(|&n| n == 0),
        format!("empty store counts {none:?}"),
    )?;
    for i in 0..5u8 {
        let t = token(100 + i);
        ok(tokenize(&*s, t).await, "insert")?;
    }
    let counts = ok(s.token_counts().await, "counts")?;
    ensure(
        counts.get(&1) == Some(&5),
        format!("after 5 inserts: {counts:?}"),
    )?;
    let id = start_job(&*s, 2).await?;
    let moved = (100..102u8)
        .map(|i| Reencrypted {
            token: token(i),
            old_dek: 1,
            new_dek: 2,
            ciphertext: vec![9; 8],
        })
        .collect();
    ok(s.reencrypt_batch(id, moved, None).await, "reencrypt")?;
    ok(
        s.delete_token(
            &token(104),
            "acme",
            event(AuditAction::DeleteToken, Some(token(104))),
        )
        .await,
        "delete",
    )?;
    let counts = ok(s.token_counts().await, "counts")?;
    ensure(
        counts.get(&1) == Some(&2) && counts.get(&2) == Some(&2),
        format!("after moving 2 and deleting 1: {counts:?}"),
    )
}

/// A key is destroyed only when it is decrypt-only and no token references
/// it; a refused destroy changes nothing.
pub async fn destroy_only_unreferenced_decrypt_only_keys<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    let t = token(120);
    ok(tokenize(&*s, t).await, "insert")?;
    let active = s.destroy_dek(1, event(AuditAction::DekDestroy, None)).await;
    ensure(
        matches!(active, Err(StoreError::Precondition(_))),
        format!("destroying the active key: {active:?}"),
    )?;
    ok(
        s.rotate_dek(
            &dek(2, "acme", 2),
            Some(1),
            event(AuditAction::DekRotate, None),
        )
        .await,
        "rotate",
    )?;
    let referenced = s.destroy_dek(1, event(AuditAction::DekDestroy, None)).await;
    ensure(
        matches!(&referenced, Err(StoreError::Precondition(m)) if m.contains("1 tokens")),
        format!("destroying a referenced key: {referenced:?}"),
    )?;
    let deks = ok(s.load_deks().await, "load_deks")?;
    ensure(
        deks.iter()
            .any(|d| d.id == 1 && d.state == DekState::DecryptOnly && !d.wrapped.is_empty()),
        "a refused destroy left the key intact",
    )?;
    ok(
        s.delete_token(&t, "acme", event(AuditAction::DeleteToken, Some(t)))
            .await,
        "delete",
    )?;
    ok(
        s.destroy_dek(1, event(AuditAction::DekDestroy, None)).await,
        "destroy the unreferenced key",
    )?;
    let deks = ok(s.load_deks().await, "load_deks")?;
    ensure(
        deks.iter()
            .any(|d| d.id == 1 && d.state == DekState::Destroyed && d.wrapped.is_empty()),
        "destroyed key keeps no wrapped bytes",
    )?;
    let late = record(token(121), "acme");
    let refused = s
        .insert_token(late, event(AuditAction::Tokenize, Some(token(121))))
        .await;
    ensure(
        refused.is_err(),
        format!("a token was stored under a destroyed key: {refused:?}"),
    )
}

/// A token is never stored under a key retired before its commit (PCI DSS
/// 3.7.5), after a restart too; the refusal says so, so the caller can
/// encrypt again under the active key. The active key still takes tokens.
pub async fn no_token_is_stored_under_a_retired_key<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    ok(
        tokenize(&*s, token(130)).await,
        "insert under the active key",
    )?;
    ok(
        s.rotate_dek(
            &dek(2, "acme", 2),
            Some(1),
            event(AuditAction::DekRotate, None),
        )
        .await,
        "rotate",
    )?;
    let late = s
        .insert_token(
            record(token(131), "acme"),
            event(AuditAction::Tokenize, Some(token(131))),
        )
        .await;
    ensure(
        matches!(late, Err(StoreError::KeyRetired)),
        format!("a token was stored under a retired key: {late:?}"),
    )?;
    ok(s.close().await, "close")?;
    let s = b.open().await;
    let again = s
        .insert_token(
            record(token(132), "acme"),
            event(AuditAction::Tokenize, Some(token(132))),
        )
        .await;
    ensure(
        matches!(again, Err(StoreError::KeyRetired)),
        format!("after a restart, a token was stored under a retired key: {again:?}"),
    )?;
    let mut current = record(token(133), "acme");
    current.dek_id = 2;
    ok(
        s.insert_token(current, event(AuditAction::Tokenize, Some(token(133))))
            .await,
        "insert under the new active key",
    )?;
    ensure(
        ok(s.get_token(&token(131)).await, "get")?.is_none(),
        "the refused token is stored",
    )
}

/// Re-encrypting for a job that is no longer running is refused alone: it
/// moves no row, and writes committed alongside it still succeed.
pub async fn batch_for_a_stopped_job_fails_alone<B: Backend>(b: &B) -> CheckResult {
    use crate::domain::store::{JobState, Reencrypted};
    let s = b.open().await;
    ok(insert_key_1(&*s).await, "dek")?;
    let moved = token(60);
    ok(tokenize(&*s, moved).await, "insert")?;
    let id = start_job(&*s, 1).await?;
    ok(
        s.finish_job(
            id,
            JobState::Completed,
            None,
            event(AuditAction::ReencryptComplete, None),
        )
        .await,
        "finish job",
    )?;
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            if i == 20 {
                let row = Reencrypted {
                    token: moved,
                    old_dek: 1,
                    new_dek: 2,
                    ciphertext: vec![9; 8],
                };
                s.reencrypt_batch(id, vec![row], None).await.map(|_| ())
            } else {
                tokenize(&*s, token(150 + i)).await
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let res = t.await.map_err(|e| format!("task: {e}"))?;
        match (i, res) {
            (20, Err(StoreError::Precondition(m))) if m.contains("not running") => {}
            (20, other) => return Err(format!("batch for a finished job: {other:?}")),
            (_, Err(e)) => return Err(format!("innocent tokenize {i} failed: {e}")),
            (_, Ok(())) => {}
        }
    }
    let row = ok(s.get_token(&moved).await, "read")?.ok_or("row vanished")?;
    ensure(row.dek_id == 1, "a refused batch moved a row")
}

/// Finishing a restore retires every active key (of every tenant), leaves
/// other states alone, names the retired keys in its audit record, and
/// leaves no restore marker behind.
pub async fn finishing_a_restore_retires_every_active_key<B: Backend>(b: &B) -> CheckResult {
    let s = b.open().await;
    ensure(
        ok(s.restore_marker().await, "restore_marker")?.is_none(),
        "a new store says it was restored",
    )?;
    for (id, tenant) in [(1, "acme"), (2, "globex")] {
        ok(
            s.insert_dek(&dek(id, tenant, 1), event(AuditAction::DekCreate, None))
                .await,
            "insert dek",
        )?;
    }
    ok(
        s.rotate_dek(
            &dek(3, "acme", 2),
            Some(1),
            event(AuditAction::DekRotate, None),
        )
        .await,
        "rotate",
    )?;
    let ids = ok(
        s.finish_restore(event(AuditAction::Restore, None)).await,
        "finish_restore",
    )?;
    ensure(ids == vec![2, 3], format!("retired {ids:?}, want [2, 3]"))?;
    let deks = ok(s.load_deks().await, "load_deks")?;
    ensure(
        deks.iter().all(|d| d.state == DekState::DecryptOnly),
        format!(
            "states after: {:?}",
            deks.iter().map(|d| d.state).collect::<Vec<_>>()
        ),
    )?;
    let last = audit_all(&*s).await?.pop().ok_or("no audit record")?;
    ensure(
        last.action == AuditAction::Restore.as_str()
            && last.detail.as_deref() == Some("retired dek_ids=[2,3]"),
        format!("audit record: {:?} {:?}", last.action, last.detail),
    )?;
    ensure(
        ok(s.restore_marker().await, "restore_marker")?.is_none(),
        "a marker after finishing",
    )
}
