//! The single writer: group commit.
//!
//! It blocks for the first queued request, then takes every request already
//! waiting (up to `max_batch`), applies them all in one `BEGIN IMMEDIATE`
//! transaction, commits with one fsync, and only then answers each request.
//! A request that is *rejected* (a constraint violation, a precondition, a
//! row it needs is missing) fails alone: it has written nothing. Any other
//! error is *fatal*: the whole batch rolls back and every request in it
//! fails, since storage can no longer be trusted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::cache::TokenCache;
use super::ops::{self, OpError};
use super::{BUSY_TIMEOUT, map_err};
use crate::domain::audit::{AuditEvent, Checkpoint};
use crate::domain::store::{
    JobRecord, JobState, KekCheck, Reencrypted, StoreError, StoredSigningKey, TokenRecord,
    WrappedDek,
};
use crate::domain::token::Token;

pub enum Op {
    PinKek(KekCheck, AuditEvent),
    InsertDek(WrappedDek, AuditEvent),
    Reserve(u32, u64),
    /// Shared with the token cache once committed (see `update_cache`).
    InsertToken(std::sync::Arc<TokenRecord>, AuditEvent),
    DeleteToken(Token, String, AuditEvent),
    Audit(AuditEvent),
    RotateDek(Box<WrappedDek>, Option<u32>, AuditEvent),
    /// Destroy a data key that a scan, begun after commit number `.1`,
    /// found unreferenced (see `destroy_dek` in ops.rs); `None` when no
    /// scan ran because the key was not decrypt-only when looked at.
    DestroyDek(u32, Option<u64>, AuditEvent),
    ShredTenant(String, AuditEvent),
    /// After a restore from backup: retire every active data key and
    /// clear the restore marker (see `backup.rs`).
    FinishRestore(AuditEvent),
    RewrapDeks(KekCheck, Vec<(u32, Vec<u8>)>, Option<Vec<u8>>, AuditEvent),
    InsertCheckpoint(Checkpoint),
    InitSigningKey(StoredSigningKey, AuditEvent),
    CreateJob(Box<JobRecord>, AuditEvent),
    ReencryptBatch(u64, Vec<Reencrypted>, Option<Token>),
    FinishJob(u64, JobState, Option<String>, AuditEvent),
    /// Finish what is queued before this, checkpoint, and stop.
    Close,
}

impl Op {
    /// Ops that write an audit record (or sign the log's head): when their
    /// commit fails, audit logging has failed.
    fn audits(&self) -> bool {
        !matches!(self, Op::Reserve(..) | Op::ReencryptBatch(..) | Op::Close)
    }

    /// Ops that erase data: after their commit the WAL is checkpointed and
    /// truncated, so the erased rows' old page images do not linger there.
    fn erases(&self) -> bool {
        matches!(
            self,
            Op::DeleteToken(..) | Op::DestroyDek(..) | Op::ShredTenant(..) | Op::RewrapDeks(..)
        )
    }
}

#[derive(Debug)]
pub enum Done {
    Unit,
    Seq(u64),
    Deleted(bool),
    Ids(Vec<u32>),
    Count(u64),
}

pub struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Answer>,
}

/// A job's result, with its request handed back: the requesting task, not
/// the single writer, then frees the request's memory (freeing what another
/// thread allocated is the costlier kind of free, and the writer's time is
/// the one every call waits on).
pub type Answer = (Result<Done, StoreError>, Op);

impl Job {
    fn answer(self, res: Result<Done, StoreError>) {
        let _ = self.reply.send((res, self.op));
    }
}

/// What the writer keeps between batches. The audit sequence is held here
/// rather than left to SQLite so that the hash chain (computed in this same
/// ordered path) and the sequence can never disagree.
pub struct WriterState {
    pub next_seq: u64,
    /// The audit chain head after the last committed entry.
    pub chain_head: [u8; 32],
    /// Destroyed data keys: nothing may be written under them again.
    pub destroyed: HashSet<u32>,
    /// Retired (decrypt-only) data keys: no new token may be stored under
    /// them (PCI DSS 3.7.5), even one encrypted a moment before the
    /// rotation reached the caller's memory.
    pub retired: HashSet<u32>,
    /// Batches committed since this process opened the store.
    pub commits: u64,
    /// Per data key, the number of the last commit that put a token under
    /// it. With `commits`, it lets a destroy trust a reference scan made
    /// outside the writer: the key stays unreferenced if nothing was put
    /// under it after the scan's snapshot.
    pub last_added: HashMap<u32, u64>,
    /// Erased rows may still have page images in the WAL: a truncation was
    /// held back by a reader and is retried (see `truncate_wal`).
    pub pending_truncate: bool,
}

impl WriterState {
    /// Reads the audit head and the destroyed keys. The chain continues
    /// from the last entry's chain hash; a last entry without a usable one
    /// is refused rather than restarted from genesis, which would make
    /// every later entry verify against nothing (fail closed).
    pub fn load(conn: &Connection) -> Result<Self, StoreError> {
        let last: Option<(i64, Option<Vec<u8>>)> = conn
            .query_row(
                "SELECT seq, chain_hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(map_err)?;
        let (last_seq, chain_head) = match last {
            None => (0, crate::audit::chain::GENESIS),
            Some((seq, None)) => {
                return Err(StoreError::Corrupt(format!(
                    "audit chain head is missing: the last audit entry (seq {seq}) has no \
                     chain hash; refusing to open rather than restart the chain"
                )));
            }
            Some((seq, Some(h))) => {
                let len = h.len();
                let head = <[u8; 32]>::try_from(h).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "audit chain head is broken: the last audit entry (seq {seq}) has a \
                         {len}-byte chain hash, not 32"
                    ))
                })?;
                (seq, head)
            }
        };
        check_signed_prefix(conn, last_seq)?;
        let destroyed = dek_ids_in(conn, "destroyed")?;
        let retired = dek_ids_in(conn, "decrypt-only")?;
        Ok(Self {
            next_seq: u64::try_from(last_seq).unwrap_or(0) + 1,
            chain_head,
            destroyed,
            retired,
            commits: 0,
            last_added: HashMap::new(),
            pending_truncate: false,
        })
    }
}

/// The ids of the data keys in `state`.
fn dek_ids_in(conn: &Connection, state: &str) -> Result<HashSet<u32>, StoreError> {
    conn.prepare("SELECT id FROM deks WHERE state = ?1")
        .and_then(|mut st| {
            st.query_map([state], |r| r.get::<_, u32>(0))?
                .collect::<rusqlite::Result<HashSet<u32>>>()
        })
        .map_err(map_err)
}

/// Refuses to open a log that no longer holds what its latest signed
/// checkpoint covers: records removed from its end (a lost WAL, or rows
/// deleted past the triggers) would otherwise let the writer hand out
/// sequence numbers already signed for, and extend a chain that can never
/// verify again. One lookup; the full chain is the verifier's job.
fn check_signed_prefix(conn: &Connection, last_seq: i64) -> Result<(), StoreError> {
    let signed: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, chain_hash FROM checkpoints ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(map_err)?;
    let Some((cp_seq, cp_hash)) = signed else {
        return Ok(());
    };
    if cp_seq > last_seq {
        return Err(StoreError::Corrupt(format!(
            "the audit log ends at seq {last_seq}, but a signed checkpoint covers it to seq              {cp_seq}: audit records were removed; refusing to open"
        )));
    }
    let at: Option<Option<Vec<u8>>> = conn
        .query_row(
            "SELECT chain_hash FROM audit WHERE seq = ?1",
            [cp_seq],
            |r| r.get(0),
        )
        .optional()
        .map_err(map_err)?;
    if at.flatten().as_deref() != Some(cp_hash.as_slice()) {
        return Err(StoreError::Corrupt(format!(
            "the audit record at seq {cp_seq} does not match the signed checkpoint of it:              the audit log was altered; refusing to open"
        )));
    }
    Ok(())
}

/// What one batch changes beyond its SQL, applied to the writer state only
/// if the batch commits.
pub struct BatchCtx<'a> {
    pub state: &'a WriterState,
    /// The audit insert, prepared at the batch's first audit row and reused
    /// for the rest (see `ops::append_audit`).
    pub audit_insert: Option<CachedStatement<'a>>,
    pub next_seq: u64,
    pub chain_head: [u8; 32],
    /// Data keys this batch put tokens under.
    pub added: HashSet<u32>,
    pub newly_destroyed: Vec<u32>,
    pub newly_retired: Vec<u32>,
    pub erased: bool,
}

impl<'a> BatchCtx<'a> {
    /// A batch starting from what the writer has committed so far.
    pub fn new(state: &'a WriterState) -> Self {
        Self {
            state,
            audit_insert: None,
            next_seq: state.next_seq,
            chain_head: state.chain_head,
            added: HashSet::new(),
            newly_destroyed: Vec::new(),
            newly_retired: Vec::new(),
            erased: false,
        }
    }

    pub fn is_retired(&self, id: u32) -> bool {
        self.state.retired.contains(&id) || self.newly_retired.contains(&id)
    }

    pub fn is_destroyed(&self, id: u32) -> bool {
        self.state.destroyed.contains(&id) || self.newly_destroyed.contains(&id)
    }

    /// Whether a token may have been put under `id` after commit `since`
    /// (by a committed batch or earlier in this one).
    pub fn added_since(&self, id: u32, since: u64) -> bool {
        self.added.contains(&id) || self.state.last_added.get(&id).is_some_and(|&c| c > since)
    }
}

pub fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    mut state: WriterState,
    cache: &TokenCache,
    commits: &AtomicU64,
) {
    // A WAL left by a process that died with a truncation pending may
    // still hold erased pages.
    truncate_wal(&conn, &mut state, true);
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    let mut closing = false;
    while !closing {
        let Some(first) = next_job(&mut rx, &conn, &mut state) else {
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
                late.answer(Err(StoreError::Unavailable("store is closed".into())));
            }
        }
        commit_batch(&mut conn, &mut batch, &mut state, cache, commits);
    }
    rx.close();
    while let Ok(late) = rx.try_recv() {
        late.answer(Err(StoreError::Unavailable("store is closed".into())));
    }
    // The closing checkpoint, whether or not anything was erased.
    truncate_wal(&conn, &mut state, true);
    if state.pending_truncate {
        warn!(
            "closing with the WAL truncation still held back by a reader: erased rows' \
             old page images stay in the WAL until the next start"
        );
    }
    info!("sqlite writer stopped");
}

/// How often a held-back WAL truncation is retried while no write comes.
const TRUNCATE_RETRY_EVERY: Duration = Duration::from_millis(50);

/// Waits for the next request. While a truncation is pending it wakes every
/// `TRUNCATE_RETRY_EVERY` to retry it, so erased pages leave the WAL soon
/// after the reader that held them finishes, even if no write follows.
fn next_job(
    rx: &mut mpsc::Receiver<Job>,
    conn: &Connection,
    state: &mut WriterState,
) -> Option<Job> {
    while state.pending_truncate {
        let deadline = std::time::Instant::now() + TRUNCATE_RETRY_EVERY;
        loop {
            match rx.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        truncate_wal(conn, state, false);
    }
    rx.blocking_recv()
}

/// Brings the token cache in line with what this batch committed, before
/// anyone is answered: rows written are added, rows deleted or rewritten
/// removed (see `cache.rs` for why only the writer may do this).
fn update_cache(cache: &TokenCache, batch: &[Job], results: &[Result<Done, StoreError>]) {
    let mut gone = Vec::new();
    for (job, res) in batch.iter().zip(results) {
        if res.is_err() {
            continue;
        }
        match &job.op {
            Op::InsertToken(rec, _) => cache.put(rec.clone()),
            Op::DeleteToken(t, _, _) => gone.push(*t),
            Op::ReencryptBatch(_, rows, _) => gone.extend(rows.iter().map(|r| r.token)),
            _ => {}
        }
    }
    if !gone.is_empty() {
        cache.remove(gone);
    }
}

/// Tries at most this many times, `TRUNCATE_PAUSE` apart, on the writer's
/// path: about 10 ms of waiting at worst, where every write is held up.
const TRUNCATE_ATTEMPTS: u32 = 3;
const TRUNCATE_PAUSE: Duration = Duration::from_millis(4);

/// Checkpoints the WAL into the database and truncates it, so erased rows'
/// old page images do not linger there. `erased` says the WAL may hold
/// erased pages now (a batch just erased something, or the writer is
/// starting or closing); otherwise this only retries a pending truncation.
///
/// A reader holding a snapshot older than the last commit makes the
/// checkpoint "busy". Waiting for it here would hold up every write (the
/// busy handler alone waits 5 s, and a re-encryption count scan can take far
/// longer), so the wait is bounded: no busy handler, a few short retries.
/// If the reader is still there, the truncation stays pending and is
/// retried after later commits, while the writer is idle, and at close.
fn truncate_wal(conn: &Connection, state: &mut WriterState, erased: bool) {
    if !erased && !state.pending_truncate {
        return;
    }
    let was_pending = state.pending_truncate;
    // Right after an erasure a few short retries; a retry of a pending one
    // gets a single try, so a long reader does not slow every commit.
    let attempts = if erased { TRUNCATE_ATTEMPTS } else { 1 };
    match checkpoint_truncate(conn, attempts) {
        Ok(true) => {
            state.pending_truncate = false;
            if was_pending {
                info!("deferred WAL truncation done: erased rows' old page images are gone");
            }
        }
        Ok(false) => {
            state.pending_truncate = true;
            if !was_pending {
                warn!(
                    "WAL truncation deferred: a reader holds an older snapshot; erased rows' \
                     old page images stay in the WAL until it finishes"
                );
            }
        }
        Err(e) => {
            state.pending_truncate = true;
            if !was_pending {
                warn!(error = %e, "WAL checkpoint failed; it will be retried");
            }
        }
    }
}

/// Up to `attempts` tries without a busy handler: `Ok(true)` once the WAL
/// is checkpointed and truncated, `Ok(false)` if a reader kept it busy.
fn checkpoint_truncate(conn: &Connection, attempts: u32) -> rusqlite::Result<bool> {
    conn.busy_timeout(Duration::ZERO)?;
    let mut result = Ok(false);
    for attempt in 0..attempts {
        if attempt > 0 {
            std::thread::sleep(TRUNCATE_PAUSE);
        }
        result = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|busy| busy == 0);
        if !matches!(result, Ok(false)) {
            break;
        }
    }
    conn.busy_timeout(BUSY_TIMEOUT)?;
    result
}

/// Commits one batch and answers its requests. A batch that erased data
/// truncates the WAL before answering, so an acknowledged destruction is
/// gone from every file, unless a reader holds the WAL (see
/// `truncate_wal`).
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
    state: &mut WriterState,
    cache: &TokenCache,
    commits: &AtomicU64,
) {
    // BEGIN and COMMIT run as cached statements, like everything else in
    // the batch: `Connection::transaction` would parse them anew each time.
    // On any failure the transaction, if still open, is rolled back.
    let tx: &Connection = conn;
    let outcome = (|| {
        tx.prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut st| st.execute([]))
            .map_err(map_err)?;
        let mut ctx = BatchCtx::new(state);
        let mut results = Vec::with_capacity(batch.len());
        for job in batch.iter() {
            match ops::apply(tx, &job.op, &mut ctx) {
                Ok(d) => {
                    ctx.erased |= job.op.erases();
                    results.push(Ok(d));
                }
                Err(OpError::Rejected(e)) => results.push(Err(e)),
                Err(OpError::Fatal(e)) => return Err(e),
            }
        }
        let BatchCtx {
            next_seq,
            chain_head,
            newly_destroyed,
            newly_retired,
            added,
            erased,
            audit_insert,
            ..
        } = ctx;
        // Back to the statement cache before COMMIT (it is reset after
        // every row, so it holds nothing open, but nothing should be in use).
        drop(audit_insert);
        tx.prepare_cached("COMMIT")
            .and_then(|mut st| st.execute([]))
            .map_err(map_err)?;
        Ok((
            results,
            (next_seq, chain_head),
            (newly_destroyed, newly_retired, added),
            erased,
        ))
    })();
    if outcome.is_err()
        && !tx.is_autocommit()
        && let Err(e) = tx.execute_batch("ROLLBACK")
    {
        error!(error = %e, "rolling back a failed batch failed");
    }
    match outcome {
        Ok((results, (next_seq, chain_head), (destroyed, retired, added), erased)) => {
            state.next_seq = next_seq;
            state.chain_head = chain_head;
            state.destroyed.extend(destroyed);
            state.retired.extend(retired);
            state.commits += 1;
            for id in added {
                state.last_added.insert(id, state.commits);
            }
            commits.store(state.commits, Ordering::Release);
            truncate_wal(conn, state, erased);
            update_cache(cache, batch, &results);
            for (job, res) in batch.drain(..).zip(results) {
                job.answer(res);
            }
        }
        Err(e) => {
            let audited = batch.iter().filter(|j| j.op.audits()).count();
            if audited > 0 {
                // PCI DSS 10.7.2: a failure of audit logging is alerted.
                // Every call in the batch fails; none is answered as done.
                error!(
                    alert = "audit_write_failed",
                    error = %e,
                    jobs = batch.len(),
                    audit_records = audited,
                    "a commit failed and was rolled back: its audit records were not written, and every call in it fails"
                );
            } else {
                error!(error = %e, jobs = batch.len(), "batch rolled back");
            }
            for job in batch.drain(..) {
                job.answer(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(last_added: &[(u32, u64)]) -> WriterState {
        WriterState {
            next_seq: 1,
            chain_head: crate::audit::chain::GENESIS,
            destroyed: HashSet::new(),
            retired: HashSet::new(),
            commits: 10,
            last_added: last_added.iter().copied().collect(),
            pending_truncate: false,
        }
    }

    #[test]
    fn a_destroy_sees_tokens_added_after_its_scan_began() {
        let st = state(&[(1, 7), (2, 3)]);
        let c = BatchCtx::new(&st);
        // Key 1 got a token in commit 7: a scan from commit 6 missed it.
        assert!(c.added_since(1, 6));
        // A scan from commit 7 on saw it.
        assert!(!c.added_since(1, 7));
        assert!(!c.added_since(2, 6));
        // Never added under since this process started: scans are trusted.
        assert!(!c.added_since(3, 0));
    }

    fn migrated() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut c = Connection::open(dir.path().join("v.db")).expect("open");
        super::super::schema::migrate(&mut c).expect("migrate");
        (dir, c)
    }

    fn job(op: Op) -> (Job, oneshot::Receiver<Answer>) {
        let (reply, rx) = oneshot::channel();
        (Job { op, reply }, rx)
    }

    fn answer(rx: &mut oneshot::Receiver<Answer>) -> Result<Done, StoreError> {
        rx.try_recv().expect("answered").0
    }

    /// A re-encryption batch for a job that is no longer running used to
    /// be fatal and roll back every write in its group commit.
    #[test]
    fn a_batch_for_a_stopped_job_fails_alone_in_its_group_commit() {
        use crate::domain::audit::AuditAction;
        use crate::domain::store::Reencrypted;
        use crate::storage::conformance::{event, record, token};
        let (_dir, mut conn) = migrated();
        conn.execute_batch(
            "INSERT INTO jobs (id, kind, tenant, state, total, created_ms, updated_ms, actor,
                               reason)
             VALUES (7, 'reencrypt', 'acme', 'completed', 1, 0, 0, 'a', 'r')",
        )
        .expect("job");
        let mut state = WriterState::load(&conn).expect("load");
        let insert = |n: u8| {
            let t = token(n);
            Op::InsertToken(
                std::sync::Arc::new(record(t, "acme")),
                event(AuditAction::Tokenize, Some(t)),
            )
        };
        let moved = Reencrypted {
            token: token(1),
            old_dek: 1,
            new_dek: 2,
            ciphertext: vec![9; 8],
        };
        let (a, mut ra) = job(insert(1));
        let (b, mut rb) = job(Op::ReencryptBatch(7, vec![moved], None));
        let (c, mut rc) = job(insert(2));
        let mut batch = vec![a, b, c];
        let cache = TokenCache::new(0);
        commit_batch(
            &mut conn,
            &mut batch,
            &mut state,
            &cache,
            &AtomicU64::new(0),
        );
        assert!(answer(&mut ra).is_ok());
        let refused = answer(&mut rb);
        assert!(
            matches!(&refused, Err(StoreError::Precondition(m)) if m.contains("job 7 is not running")),
            "{refused:?}"
        );
        assert!(answer(&mut rc).is_ok());
        let n: i64 = conn
            .query_row("SELECT count(*) FROM tokens WHERE dek_id = 1", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(n, 2, "both tokens committed, neither moved");
    }

    /// A fatal error mid-batch fails every request in it and leaves nothing
    /// behind: the rows written before it are rolled back, no transaction
    /// stays open, and the writer's state is unchanged, so the next batch
    /// commits normally.
    #[test]
    fn a_fatal_error_rolls_back_the_whole_batch() {
        use crate::domain::audit::AuditAction;
        use crate::storage::conformance::{event, record, token};
        let (_dir, mut conn) = migrated();
        let insert = |n: u8| {
            let t = token(n);
            Op::InsertToken(
                std::sync::Arc::new(record(t, "acme")),
                event(AuditAction::Tokenize, Some(t)),
            )
        };
        let cache = TokenCache::new(0);
        let commits = AtomicU64::new(0);
        let mut state = WriterState::load(&conn).expect("load");
        let (a, mut ra) = job(insert(1));
        commit_batch(&mut conn, &mut vec![a], &mut state, &cache, &commits);
        assert!(answer(&mut ra).is_ok());
        // A writer whose sequence fell behind the table: its next audit row
        // collides, which is fatal.
        let mut stale = WriterState::load(&conn).expect("load");
        stale.next_seq -= 1;
        let (b, mut rb) = job(insert(2));
        let (c, mut rc) = job(Op::Audit(event(AuditAction::Detokenize, Some(token(1)))));
        commit_batch(&mut conn, &mut vec![b, c], &mut stale, &cache, &commits);
        for rx in [&mut rb, &mut rc] {
            let res = answer(rx);
            assert!(
                matches!(&res, Err(StoreError::Unavailable(m)) if m.contains("UNIQUE constraint failed: audit.seq")),
                "{res:?}"
            );
        }
        assert!(conn.is_autocommit(), "the failed transaction was left open");
        let rows: (i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM tokens), (SELECT count(*) FROM audit)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("count");
        assert_eq!(rows, (1, 1), "the failed batch left rows behind");
        assert_eq!(commits.load(Ordering::Acquire), 1);
        let (d, mut rd) = job(insert(3));
        commit_batch(&mut conn, &mut vec![d], &mut state, &cache, &commits);
        assert!(answer(&mut rd).is_ok());
        assert_eq!(commits.load(Ordering::Acquire), 2);
    }

    /// A last audit row without a chain hash used to restart the chain from
    /// genesis; now the store refuses to open.
    #[test]
    fn a_missing_chain_head_is_refused() {
        let (_dir, conn) = migrated();
        conn.execute_batch(
            "INSERT INTO audit (seq, time_ms, actor, action, outcome, chain_hash)
             VALUES (1, 0, 'a', 'x', 'success', zeroblob(32));
             INSERT INTO audit (seq, time_ms, actor, action, outcome) VALUES (2, 0, 'a', 'x', 'success');",
        )
        .expect("rows");
        let Err(e) = WriterState::load(&conn) else {
            panic!("opened with a broken chain head");
        };
        assert!(
            matches!(&e, StoreError::Corrupt(m) if m.contains("audit chain head is missing") && m.contains("seq 2")),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_chain_head_is_refused() {
        let (_dir, conn) = migrated();
        conn.execute_batch(
            "INSERT INTO audit (seq, time_ms, actor, action, outcome, chain_hash)
             VALUES (1, 0, 'a', 'x', 'success', zeroblob(31));",
        )
        .expect("row");
        let Err(e) = WriterState::load(&conn) else {
            panic!("opened with a broken chain head");
        };
        assert!(e.to_string().contains("31-byte chain hash"), "{e}");
    }

    #[test]
    fn an_empty_log_starts_from_genesis() {
        let (_dir, conn) = migrated();
        let st = WriterState::load(&conn).expect("load");
        assert_eq!(
            (st.next_seq, st.chain_head),
            (1, crate::audit::chain::GENESIS)
        );
    }

    #[test]
    fn a_destroy_sees_tokens_added_earlier_in_its_own_batch() {
        let st = state(&[]);
        let mut c = BatchCtx::new(&st);
        c.added.insert(4);
        assert!(c.added_since(4, 10));
        assert!(!c.added_since(5, 10));
    }
}
