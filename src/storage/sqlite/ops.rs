//! The SQL of each write request, applied inside the writer's batch
//! transaction. Single-statement requests rely on SQLite aborting just the
//! failing statement; multi-statement administrative requests run inside a
//! savepoint so that a rejected one leaves nothing behind.

use rusqlite::{Connection, OptionalExtension, params};

use super::map_err;
use super::writer::{BatchCtx, Done, Op};
use crate::audit::chain::{Entry, link};
use crate::domain::audit::{AuditEvent, Outcome};
use crate::domain::store::{JobRecord, KekCheck, Reencrypted, StoreError, TokenRecord, WrappedDek};
use crate::domain::token::Token;

/// Why one request in a batch failed.
pub enum OpError {
    /// This request alone fails; it wrote nothing.
    Rejected(StoreError),
    /// The batch must roll back.
    Fatal(StoreError),
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        match map_err(e) {
            StoreError::Conflict => Self::Rejected(StoreError::Conflict),
            other => Self::Fatal(other),
        }
    }
}

fn rejected(msg: impl Into<String>) -> OpError {
    OpError::Rejected(StoreError::Precondition(msg.into()))
}

/// For statements after the first of a request: by then something was
/// written, so even a constraint violation cannot be failed alone.
fn fatal(e: rusqlite::Error) -> OpError {
    OpError::Fatal(match map_err(e) {
        // The store's own bookkeeping went wrong, not stored data: an
        // outage (UNAVAILABLE), not DATA_LOSS.
        StoreError::Conflict => StoreError::Unavailable("constraint violated mid-request".into()),
        other => other,
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn apply<'a>(tx: &'a Connection, op: &Op, ctx: &mut BatchCtx<'a>) -> Result<Done, OpError> {
    match op {
        Op::PinKek(check, audit) => {
            let mut st = tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            st.execute(params!["kek_id", check.kek_id.as_bytes()])?;
            st.execute(params!["kek_check", &check.check_blob])
                .map_err(fatal)?;
            audit_unit(tx, audit, ctx)
        }
        Op::InsertDek(d, audit) => {
            insert_dek(tx, d)?;
            audit_unit(tx, audit, ctx)
        }
        Op::Reserve(id, reserved) => {
            let n = tx
                .prepare_cached("UPDATE deks SET reserved = MAX(reserved, ?2) WHERE id = ?1")?
                .execute(params![id, to_i64(*reserved)])?;
            if n == 1 {
                Ok(Done::Unit)
            } else {
                Err(rejected(format!("no data key {id}")))
            }
        }
        Op::InsertToken(r, audit) => insert_token(tx, r, audit, ctx),
        Op::DeleteToken(token, tenant, audit) => delete_token(tx, token, tenant, audit, ctx),
        Op::Audit(audit) => append_audit(tx, audit, ctx)
            .map(Done::Seq)
            .map_err(OpError::Fatal),
        Op::RotateDek(new, retire, audit) => savepoint(tx, ctx, |tx, ctx| {
            if let Some(old) = retire {
                let n = tx
                    .prepare_cached(
                        "UPDATE deks SET state = 'decrypt-only' WHERE id = ?1 AND state = 'active'",
                    )?
                    .execute(params![old])?;
                if n != 1 {
                    return Err(rejected(format!("data key {old} is not active")));
                }
                ctx.newly_retired.push(*old);
            }
            insert_dek(tx, new)?;
            audit_unit(tx, audit, ctx)
        }),
        Op::DestroyDek(id, since, audit) => {
            savepoint(tx, ctx, |tx, ctx| destroy_dek(tx, *id, *since, audit, ctx))
        }
        Op::FinishRestore(audit) => savepoint(tx, ctx, |tx, ctx| finish_restore(tx, audit, ctx)),
        Op::ShredTenant(tenant, audit) => {
            savepoint(tx, ctx, |tx, ctx| shred_tenant(tx, tenant, audit, ctx))
        }
        Op::RewrapDeks(pin, rows, signing, audit) => savepoint(tx, ctx, |tx, ctx| {
            if let Some(w) = signing {
                let n = tx
                    .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'audit_signing_key'")?
                    .execute(params![w])?;
                if n != 1 {
                    return Err(rejected("no audit signing key to re-wrap"));
                }
            }
            rewrap(tx, pin, rows, audit, ctx)
        }),
        Op::InsertCheckpoint(cp) => {
            tx.prepare_cached(
                "INSERT INTO checkpoints (seq, chain_hash, time_ms, signature, key_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                to_i64(cp.seq),
                &cp.chain_hash[..],
                cp.time_ms,
                cp.signature,
                cp.key_id
            ])?;
            Ok(Done::Unit)
        }
        Op::InitSigningKey(key, audit) => savepoint(tx, ctx, |tx, ctx| {
            let mut st = tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            st.execute(params!["audit_signing_key", key.wrapped])?;
            st.execute(params!["audit_public_key", key.public])?;
            audit_unit(tx, audit, ctx)
        }),
        Op::CreateJob(job, audit) => savepoint(tx, ctx, |tx, ctx| {
            let id = create_job(tx, job)?;
            append_audit(tx, audit, ctx).map_err(OpError::Fatal)?;
            Ok(Done::Seq(id))
        }),
        Op::ReencryptBatch(job, rows, checkpoint) => reencrypt(tx, *job, rows, checkpoint, ctx),
        Op::FinishJob(id, state, error, audit) => savepoint(tx, ctx, |tx, ctx| {
            let n = tx
                .prepare_cached(
                    "UPDATE jobs SET state = ?2, error = ?3, updated_ms = ?4 WHERE id = ?1",
                )?
                .execute(params![to_i64(*id), state.as_str(), error, audit.time_ms])?;
            if n != 1 {
                return Err(rejected(format!("no job {id}")));
            }
            audit_unit(tx, audit, ctx)
        }),
        Op::Close => Ok(Done::Unit),
    }
}

/// Runs `f` inside a savepoint: a rejected request is rolled back to it, so
/// it leaves nothing behind even after some of its statements succeeded.
fn savepoint<'a>(
    tx: &'a Connection,
    ctx: &mut BatchCtx<'a>,
    f: impl FnOnce(&'a Connection, &mut BatchCtx<'a>) -> Result<Done, OpError>,
) -> Result<Done, OpError> {
    let (seq, head, destroyed, retired) = (
        ctx.next_seq,
        ctx.chain_head,
        ctx.newly_destroyed.len(),
        ctx.newly_retired.len(),
    );
    tx.execute_batch("SAVEPOINT op").map_err(fatal)?;
    match f(tx, ctx) {
        Ok(d) => {
            tx.execute_batch("RELEASE op").map_err(fatal)?;
            Ok(d)
        }
        Err(OpError::Rejected(e)) => {
            tx.execute_batch("ROLLBACK TO op; RELEASE op")
                .map_err(fatal)?;
            ctx.next_seq = seq;
            ctx.chain_head = head;
            ctx.newly_destroyed.truncate(destroyed);
            ctx.newly_retired.truncate(retired);
            Err(OpError::Rejected(e))
        }
        Err(fatal) => Err(fatal),
    }
}

fn audit_unit<'a>(
    tx: &'a Connection,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    append_audit(tx, audit, ctx).map_err(OpError::Fatal)?;
    Ok(Done::Unit)
}

fn insert_dek(tx: &Connection, d: &WrappedDek) -> Result<(), OpError> {
    tx.prepare_cached(
        "INSERT INTO deks (id, tenant, version, state, wrapped, kek_id, created_ms, reserved)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        d.id,
        d.tenant,
        d.version,
        d.state.as_str(),
        d.wrapped,
        d.kek_id,
        d.created_ms,
        to_i64(d.reserved),
    ])?;
    Ok(())
}

fn insert_token<'a>(
    tx: &'a Connection,
    r: &TokenRecord,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    // A tokenize that picked its key just before the key was destroyed must
    // not store a ciphertext nobody can ever open.
    if ctx.is_destroyed(r.dek_id) {
        return Err(rejected("the data key was destroyed; retry"));
    }
    // Nor under a key retired meanwhile (PCI DSS 3.7.5): the caller
    // encrypts again under the tenant's active key.
    if ctx.is_retired(r.dek_id) {
        return Err(OpError::Rejected(StoreError::KeyRetired));
    }
    tx.prepare_cached(
        "INSERT INTO tokens (token, tenant, dek_id, ciphertext, brand, bin, last4,
                             pan_len, exp_month, exp_year, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        &r.token.as_bytes()[..],
        r.tenant,
        r.dek_id,
        r.ciphertext,
        r.brand.as_str(),
        r.bin,
        r.last4,
        r.pan_len,
        r.exp_month,
        r.exp_year,
        r.created_ms,
    ])?;
    append_audit(tx, audit, ctx).map_err(OpError::Fatal)?;
    ctx.added.insert(r.dek_id);
    Ok(Done::Unit)
}

fn delete_token<'a>(
    tx: &'a Connection,
    token: &Token,
    tenant: &str,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    let dek: Option<u32> = tx
        .prepare_cached("DELETE FROM tokens WHERE token = ?1 AND tenant = ?2 RETURNING dek_id")?
        .query_row(params![&token.as_bytes()[..], tenant], |r| r.get(0))
        .optional()
        .map_err(fatal)?;
    let mut audit = audit.clone();
    if dek.is_none() {
        audit.outcome = Outcome::failed("not_found");
    }
    append_audit(tx, &audit, ctx).map_err(OpError::Fatal)?;
    Ok(Done::Deleted(dek.is_some()))
}

/// Destroys a decrypt-only key. Whether tokens still reference it was
/// checked by a scan outside the writer (the tokens table has no index on
/// the key, so that nothing but the primary key is updated per tokenize);
/// the scan's snapshot included every commit up to `since`. The key is
/// still unreferenced now unless a token was put under it after that, which
/// the writer knows, so such a destroy is refused and can be retried.
fn destroy_dek<'a>(
    tx: &'a Connection,
    id: u32,
    since: Option<u64>,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM deks WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    let Some(state) = state else {
        return Err(rejected(format!("no data key {id}")));
    };
    match state.as_str() {
        "active" => {
            return Err(rejected(format!(
                "data key {id} is active; rotate the tenant's key first"
            )));
        }
        "destroyed" => return Err(rejected(format!("data key {id} is already destroyed"))),
        _ => {}
    }
    // A key that was not decrypt-only when the adapter looked was never
    // scanned for references: it was retired meanwhile, and may hold
    // tokens.
    let Some(since) = since else {
        return Err(rejected(format!(
            "data key {id} changed state while it was being checked; retry"
        )));
    };
    if ctx.added_since(id, since) {
        return Err(rejected(format!(
            "tokens were put under data key {id} while it was being checked; retry"
        )));
    }
    tx.prepare_cached("UPDATE deks SET state = 'destroyed', wrapped = NULL WHERE id = ?1")?
        .execute(params![id])?;
    append_audit(tx, audit, ctx).map_err(OpError::Fatal)?;
    ctx.newly_destroyed.push(id);
    Ok(Done::Unit)
}

fn shred_tenant<'a>(
    tx: &'a Connection,
    tenant: &str,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    let ids = tx
        .prepare_cached(
            "UPDATE deks SET state = 'destroyed', wrapped = NULL
             WHERE tenant = ?1 AND state != 'destroyed' RETURNING id",
        )?
        .query_map(params![tenant], |r| r.get::<_, u32>(0))?
        .collect::<rusqlite::Result<Vec<u32>>>()?;
    let mut audit = audit.clone();
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let note = format!("destroyed dek_ids=[{}]", list.join(","));
    audit.detail = Some(match audit.detail.take() {
        Some(d) => format!("{d} {note}"),
        None => note,
    });
    append_audit(tx, &audit, ctx).map_err(OpError::Fatal)?;
    ctx.newly_destroyed.extend(&ids);
    Ok(Done::Ids(ids))
}

/// Retires every active data key and clears the restore marker, with the
/// audit record naming the keys, in one commit.
fn finish_restore<'a>(
    tx: &'a Connection,
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    let mut ids = tx
        .prepare_cached(
            "UPDATE deks SET state = 'decrypt-only' WHERE state = 'active' RETURNING id",
        )?
        .query_map([], |r| r.get::<_, u32>(0))?
        .collect::<rusqlite::Result<Vec<u32>>>()?;
    ids.sort_unstable();
    ctx.newly_retired.extend(&ids);
    tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?
        .execute(params![super::backup::RESTORE_MARKER])?;
    let mut audit = audit.clone();
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let note = format!("retired dek_ids=[{}]", list.join(","));
    audit.detail = Some(match audit.detail.take() {
        Some(d) => format!("{d} {note}"),
        None => note,
    });
    append_audit(tx, &audit, ctx).map_err(OpError::Fatal)?;
    Ok(Done::Ids(ids))
}

fn rewrap<'a>(
    tx: &'a Connection,
    pin: &KekCheck,
    rows: &[(u32, Vec<u8>)],
    audit: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    let mut live: Vec<u32> = tx
        .prepare_cached("SELECT id FROM deks WHERE state != 'destroyed' ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<u32>>>()?;
    let mut given: Vec<u32> = rows.iter().map(|(id, _)| *id).collect();
    live.sort_unstable();
    given.sort_unstable();
    if live != given {
        return Err(rejected(
            "the data keys changed during KEK rotation; retry the rotation",
        ));
    }
    let mut st = tx.prepare_cached("UPDATE deks SET wrapped = ?2, kek_id = ?3 WHERE id = ?1")?;
    for (id, wrapped) in rows {
        st.execute(params![id, wrapped, pin.kek_id])?;
    }
    let mut meta = tx.prepare_cached("REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
    meta.execute(params!["kek_id", pin.kek_id.as_bytes()])?;
    meta.execute(params!["kek_check", &pin.check_blob])?;
    audit_unit(tx, audit, ctx)
}

fn create_job(tx: &Connection, j: &JobRecord) -> Result<u64, OpError> {
    tx.prepare_cached(
        "INSERT INTO jobs (kind, tenant, state, total, done, checkpoint, passes,
                           created_ms, updated_ms, actor, reason)
         VALUES ('reencrypt', ?1, ?2, ?3, 0, NULL, 0, ?4, ?4, ?5, ?6)",
    )?
    .execute(params![
        j.tenant,
        j.state.as_str(),
        to_i64(j.total),
        j.created_ms,
        j.actor,
        j.reason,
    ])?;
    Ok(u64::try_from(tx.last_insert_rowid()).unwrap_or(0))
}

fn reencrypt<'a>(
    tx: &'a Connection,
    job: u64,
    rows: &[Reencrypted],
    checkpoint: &Option<Token>,
    ctx: &mut BatchCtx<'a>,
) -> Result<Done, OpError> {
    if rows.iter().any(|r| ctx.is_destroyed(r.new_dek)) {
        return Err(rejected("the target data key was destroyed"));
    }
    // Checked before any row is touched, so a finished or failed job is
    // refused alone instead of rolling back the batch it shares with
    // unrelated writes.
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
        .query_row(params![to_i64(job)], |r| r.get(0))
        .optional()?;
    match state.as_deref() {
        Some("running") => {}
        Some(other) => return Err(rejected(format!("job {job} is not running ({other})"))),
        None => return Err(rejected(format!("no job {job}"))),
    }
    let mut applied = 0u64;
    let mut st = tx.prepare_cached(
        "UPDATE tokens SET dek_id = ?3, ciphertext = ?4 WHERE token = ?1 AND dek_id = ?2",
    )?;
    for r in rows {
        // Opened under a key destroyed since (a tenant shred that landed
        // while the job worked): writing it back under a newer key would
        // bring a crypto-shredded card number back. Left as it is, under
        // its destroyed key, where nothing can open it.
        if ctx.is_destroyed(r.old_dek) {
            continue;
        }
        let n = st
            .execute(params![
                &r.token.as_bytes()[..],
                r.old_dek,
                r.new_dek,
                r.ciphertext
            ])
            .map_err(fatal)?;
        if n == 1 {
            applied += 1;
            ctx.added.insert(r.new_dek);
        }
    }
    let new_pass = i64::from(checkpoint.is_none());
    let n = tx
        .prepare_cached(
            "UPDATE jobs SET done = done + ?2, checkpoint = ?3, passes = passes + ?4,
                             updated_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER)
             WHERE id = ?1 AND state = 'running'",
        )?
        .execute(params![
            to_i64(job),
            to_i64(applied),
            checkpoint.map(|t| t.as_bytes().to_vec()),
            new_pass
        ])
        .map_err(fatal)?;
    if n != 1 {
        // Only the writer changes jobs, and it found this one running above.
        return Err(OpError::Fatal(StoreError::Corrupt(format!(
            "job {job} stopped running mid-request"
        ))));
    }
    Ok(Done::Count(applied))
}

pub fn append_audit<'a>(
    tx: &'a Connection,
    e: &AuditEvent,
    ctx: &mut BatchCtx<'a>,
) -> Result<u64, StoreError> {
    let seq = ctx.next_seq;
    // The chain is computed here, in the one ordered write path, so sequence
    // and chain can never disagree.
    let entry_hash = Entry::of_event(seq, e).hash();
    let chain_hash = link(&ctx.chain_head, &entry_hash);
    // Prepared (from the connection's cache) once per batch: fetching it
    // from the cache per row hashes the SQL text twice on the writer's
    // serial path.
    let insert = match &mut ctx.audit_insert {
        Some(st) => st,
        empty => empty.insert(
            tx.prepare_cached(
                "INSERT INTO audit (seq, time_ms, actor, tenant, action, token, outcome, peer,
                                    purpose, detail, key_id, key_version, reason, approvers,
                                    entry_hash, chain_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(map_err)?,
        ),
    };
    insert
        .execute(params![
            to_i64(seq),
            e.time_ms,
            e.actor,
            e.tenant,
            e.action.as_str(),
            e.token.as_ref().map(|t| &t.as_bytes()[..]),
            e.outcome.as_str(),
            e.peer,
            e.purpose,
            e.detail,
            e.key_id,
            e.key_version,
            e.reason,
            e.approvers,
            &entry_hash[..],
            &chain_hash[..],
        ])
        .map_err(|err| {
            // SQLite's text names the constraint or trigger, never a value.
            let why = err.to_string();
            match map_err(err) {
                // A duplicate sequence number means the writer's view is
                // wrong, and a trigger or check refusing the row is no
                // caller's doing: never an ordinary conflict.
                StoreError::Conflict => {
                    StoreError::Unavailable(format!("the database refused an audit record: {why}"))
                }
                other => other,
            }
        })?;
    ctx.next_seq += 1;
    ctx.chain_head = chain_hash;
    Ok(seq)
}
