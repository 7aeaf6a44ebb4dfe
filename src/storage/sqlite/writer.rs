//! The single writer: group commit.
//!
//! It blocks for the first queued request, then takes every request already
//! waiting (up to `max_batch`), applies them all in one `BEGIN IMMEDIATE`
//! transaction, commits with one fsync, and only then answers each request.
//! A request that is *rejected* (a constraint violation, or a row it needs is
//! missing) fails alone: it has written nothing, and SQLite aborts only the
//! failing statement. Any other error is *fatal*: the whole batch rolls back
//! and every request in it fails, since storage can no longer be trusted.

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use super::map_err;
use crate::domain::audit::{AuditEvent, Outcome};
use crate::domain::store::{KekCheck, StoreError, TokenRecord, WrappedDek};
use crate::domain::token::Token;

pub enum Op {
    PinKek(KekCheck, AuditEvent),
    InsertDek(WrappedDek, AuditEvent),
    Reserve(u32, u64),
    InsertToken(Box<TokenRecord>, AuditEvent),
    DeleteToken(Token, String, AuditEvent),
    Audit(AuditEvent),
    /// Finish what is queued before this, checkpoint, and stop.
    Close,
}

#[derive(Debug)]
pub enum Done {
    Unit,
    Seq(u64),
    Deleted(bool),
}

pub struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// What the writer keeps between batches: the next audit sequence number.
/// Held here rather than left to SQLite so that the hash chain (computed in
/// this same ordered path) and the sequence can never disagree.
pub struct WriterState {
    next_seq: u64,
}

impl WriterState {
    pub fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let max: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
        Ok(Self {
            next_seq: u64::try_from(max).unwrap_or(0) + 1,
        })
    }
}

pub fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    mut state: WriterState,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    let mut closing = false;
    while !closing {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Some(pos) = batch.iter().position(|j| matches!(j.op, Op::Close)) {
            // Everything queued after the close request is refused.
            closing = true;
            for late in batch.drain(pos + 1..) {
                let _ = late
                    .reply
                    .send(Err(StoreError::Unavailable("store is closed".into())));
            }
        }
        commit_batch(&mut conn, &mut batch, &mut state);
    }
    rx.close();
    while let Ok(late) = rx.try_recv() {
        let _ = late
            .reply
            .send(Err(StoreError::Unavailable("store is closed".into())));
    }
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        error!(error = %e, "final WAL checkpoint failed");
    }
    info!("sqlite writer stopped");
}

/// Why one request in a batch failed.
enum OpError {
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

/// For statements after the first of a request: by then something was
/// written, so even a constraint violation cannot be failed alone.
fn fatal(e: rusqlite::Error) -> OpError {
    OpError::Fatal(match map_err(e) {
        StoreError::Conflict => StoreError::Corrupt("constraint violated mid-request".into()),
        other => other,
    })
}

fn commit_batch(conn: &mut Connection, batch: &mut Vec<Job>, state: &mut WriterState) {
    let saved_seq = state.next_seq;
    let outcome = (|| -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(map_err)?;
        let mut results = Vec::with_capacity(batch.len());
        for job in batch.iter() {
            match apply(&tx, &job.op, state) {
                Ok(d) => results.push(Ok(d)),
                Err(OpError::Rejected(e)) => results.push(Err(e)),
                Err(OpError::Fatal(e)) => return Err(e),
            }
        }
        tx.commit().map_err(map_err)?;
        Ok(results)
    })();
    match outcome {
        Ok(results) => {
            for (job, res) in batch.drain(..).zip(results) {
                let _ = job.reply.send(res);
            }
        }
        Err(e) => {
            error!(error = %e, jobs = batch.len(), "batch rolled back");
            state.next_seq = saved_seq;
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

fn apply(tx: &Connection, op: &Op, state: &mut WriterState) -> Result<Done, OpError> {
    match op {
        Op::PinKek(check, audit) => {
            let mut st = tx.prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            st.execute(params!["kek_id", check.kek_id.as_bytes()])?;
            st.execute(params!["kek_check", &check.check_blob])
                .map_err(fatal)?;
            append_audit(tx, audit, state).map_err(OpError::Fatal)?;
            Ok(Done::Unit)
        }
        Op::InsertDek(d, audit) => {
            tx.prepare_cached(
                "INSERT INTO deks (id, tenant, version, state, wrapped, kek_id, created_ms, reserved)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            ?
            .execute(params![
                d.id,
                d.tenant,
                d.version,
                d.state.as_str(),
                d.wrapped,
                d.kek_id,
                d.created_ms,
                i64::try_from(d.reserved).unwrap_or(i64::MAX),
            ])
            ?;
            append_audit(tx, audit, state).map_err(OpError::Fatal)?;
            Ok(Done::Unit)
        }
        Op::Reserve(id, reserved) => {
            let n = tx
                .prepare_cached("UPDATE deks SET reserved = MAX(reserved, ?2) WHERE id = ?1")?
                .execute(params![id, i64::try_from(*reserved).unwrap_or(i64::MAX)])?;
            if n == 1 {
                Ok(Done::Unit)
            } else {
                Err(OpError::Rejected(StoreError::Corrupt(format!(
                    "no data key {id}"
                ))))
            }
        }
        Op::InsertToken(r, audit) => {
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
            append_audit(tx, audit, state).map_err(OpError::Fatal)?;
            Ok(Done::Unit)
        }
        Op::DeleteToken(token, tenant, audit) => {
            let n = tx
                .prepare_cached("DELETE FROM tokens WHERE token = ?1 AND tenant = ?2")?
                .execute(params![&token.as_bytes()[..], tenant])?;
            let mut audit = audit.clone();
            if n == 0 {
                audit.outcome = Outcome::failed("not_found");
            }
            append_audit(tx, &audit, state).map_err(OpError::Fatal)?;
            Ok(Done::Deleted(n > 0))
        }
        Op::Audit(audit) => append_audit(tx, audit, state)
            .map(Done::Seq)
            .map_err(OpError::Fatal),
        Op::Close => Ok(Done::Unit),
    }
}

fn append_audit(
    tx: &Connection,
    e: &AuditEvent,
    state: &mut WriterState,
) -> Result<u64, StoreError> {
    let seq = state.next_seq;
    tx.prepare_cached(
        "INSERT INTO audit (seq, time_ms, actor, tenant, action, token, outcome, peer, purpose, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(map_err)?
    .execute(params![
        i64::try_from(seq).unwrap_or(i64::MAX),
        e.time_ms,
        e.actor,
        e.tenant,
        e.action.as_str(),
        e.token.as_ref().map(|t| t.as_bytes().to_vec()),
        e.outcome.as_str(),
        e.peer,
        e.purpose,
        e.detail,
    ])
    .map_err(|err| match map_err(err) {
        // A duplicate sequence number means the writer's view is wrong:
        // never treat that as an ordinary conflict.
        StoreError::Conflict => StoreError::Corrupt("audit sequence collision".into()),
        other => other,
    })?;
    state.next_seq += 1;
    Ok(seq)
}
