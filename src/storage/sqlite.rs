//! SQLite adapter: WAL journal, `synchronous=FULL`, `secure_delete=ON`,
//! versioned migrations, one writer thread doing group commit, and a small
//! pool of read-only connections.
//!
//! Why a single writer thread: SQLite admits one writer at a time anyway, and
//! a commit costs one fsync (~130 µs here) whether it carries one row or a
//! thousand. The writer takes every request queued while the previous commit
//! was flushing and commits them together, so throughput rises with
//! concurrency while each caller still waits for its own durable commit.
//!
//! Why reads run inline on the async worker: they are primary-key point
//! lookups served from the page cache in microseconds; handing each to a
//! blocking pool would cost more than the read. (A std `Mutex` per reader, as
//! in mini-redis: it is never held across an `.await`.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use crate::domain::audit::{AuditAction, AuditEvent, AuditRecord, Checkpoint};
use crate::domain::store::{
    AuditFilter, DekState, JobRecord, JobState, KekCheck, Reencrypted, Store, StoreError,
    StoredSigningKey, TokenRecord, WrappedDek,
};
use crate::domain::token::Token;

mod backup;
mod cache;
mod offline;
mod ops;
mod rows;
mod schema;
mod writer;

pub use backup::{Restored, Snapshot, backup, check as check_backup, restore};
pub use offline::{OfflineAudit, read_audit_offline};
pub(crate) use rows::{AUDIT_COLUMNS, audit_from_row};
use rows::{JOB_COLUMNS, checkpoint_from_row, hash_col, job_from_row, token_from_row};

use cache::TokenCache;
use writer::{Done, Job, Op};

/// Tunables of the SQLite adapter.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read-only connections for concurrent readers.
    pub readers: usize,
    /// Most write requests committed in one transaction.
    pub max_batch: usize,
    /// Write requests that may wait for the writer before callers are slowed.
    pub queue_depth: usize,
    /// Token rows (ciphertext) kept in memory for detokenize; 0 disables.
    pub cache_entries: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            readers: 4,
            max_batch: 2048,
            queue_depth: 16_384,
            cache_entries: 100_000,
        }
    }
}

pub struct SqliteStore {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    cache: Arc<TokenCache>,
    /// Batches the writer has committed (see `WriterState::commits`).
    commits: Arc<AtomicU64>,
}

/// A store dropped without [`Store::close`] (a start that failed part-way,
/// say) still ends its writer before it is gone: the queue is closed, the
/// writer finishes the jobs already in it and stops, and its lock on the
/// database goes with it. So a store opened right after this one finds the
/// database free, and its log where this writer left it.
impl Drop for SqliteStore {
    fn drop(&mut self) {
        let handle = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else { return };
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        if handle.join().is_err() {
            error!("sqlite writer thread panicked");
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps a rusqlite error: a constraint violation is a conflict; a stored
/// value that does not decode into its column's type, or a database file
/// SQLite finds corrupt, is corruption (the caller gets DATA_LOSS, not an
/// invitation to retry); anything else means storage cannot be trusted to
/// have done the work. The value itself is never put in the message.
pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::FromSqlConversionFailure(col, ..)
        | E::InvalidColumnType(col, ..)
        | E::IntegralValueOutOfRange(col, ..) => {
            return StoreError::Corrupt(format!("a stored row's column {col} does not decode"));
        }
        _ => {}
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::Corrupt("SQLite reports the database file corrupt".into())
        }
        _ => unavailable(e),
    }
}

/// WAL pages between the writer's automatic checkpoints. A checkpoint runs
/// on the writer, between commits, and every call queued behind it waits:
/// half SQLite's default (1000) halves the longest such wait. Measured at
/// concurrency 64 (BENCHMARKS.md): p99 0.5 to 0.8 ms lower for tokenize and
/// detokenize, throughput within noise.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 500;

/// How long a connection waits for a lock another holds before "busy".
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Settings every connection gets. `temp_store=MEMORY` keeps sorts and
/// temporary tables out of temp files. (Memory-mapped I/O was measured and
/// rejected: with WAL and frequent checkpoints it made detokenize ~25 %
/// slower here; see BENCHMARKS.md.)
fn common_pragmas(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

impl SqliteStore {
    /// Checkpoints by a `WHERE … ORDER BY …` tail whose `?1` (if any) is
    /// `after`.
    fn checkpoints_query(&self, tail: &str, after: u64) -> Result<Vec<Checkpoint>, StoreError> {
        let sql =
            format!("SELECT seq, chain_hash, time_ms, signature, key_id FROM checkpoints {tail}");
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.read(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let map = checkpoint_from_row;
            if sql.contains("?1") {
                st.query_map(params![after], map)?.collect()
            } else {
                st.query_map([], map)?.collect()
            }
        })
    }

    /// Opens (creating if needed) the database at `path`, migrates it to the
    /// current schema and starts the writer.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<Self, StoreError> {
        let lock = lock_exclusive(path)?;
        create_private(path).map_err(unavailable)?;
        let mut conn = Connection::open(path).map_err(unavailable)?;
        common_pragmas(&conn).map_err(unavailable)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(unavailable(format!("cannot enable WAL (got {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(unavailable)?;
        // `INSERT OR REPLACE` deletes before it inserts; with this on, that
        // delete fires the append-only triggers of audit and checkpoints.
        conn.pragma_update(None, "recursive_triggers", "ON")
            .map_err(unavailable)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .map_err(unavailable)?;
        schema::migrate(&mut conn).map_err(unavailable)?;

        let mut readers = Vec::with_capacity(opts.readers.max(1));
        for _ in 0..opts.readers.max(1) {
            let r = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(unavailable)?;
            common_pragmas(&r).map_err(unavailable)?;
            r.pragma_update(None, "query_only", "ON")
                .map_err(unavailable)?;
            readers.push(Mutex::new(r));
        }

        let (tx, rx) = mpsc::channel(opts.queue_depth.max(1));
        let state = writer::WriterState::load(&conn)?;
        let max_batch = opts.max_batch.max(1);
        let cache = Arc::new(TokenCache::new(opts.cache_entries));
        let writer_cache = cache.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let writer_commits = commits.clone();
        let handle = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                writer::run(conn, rx, max_batch, state, &writer_cache, &writer_commits);
                // The exclusive lock on `<db>.lock` lives exactly as long as
                // the writer, not the store: a store dropped without `close`
                // leaves its writer finishing queued jobs, and no other
                // writer may open the database until it has.
                drop(lock);
            })
            .map_err(unavailable)?;
        Ok(Self {
            path: path.to_owned(),
            tx,
            writer: Mutex::new(Some(handle)),
            readers,
            next_reader: AtomicUsize::new(0),
            cache,
            commits,
        })
    }

    /// Submits a write and waits until it is durable.
    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { op, reply })
            .await
            .map_err(|_| unavailable("store is closed"))?;
        let (res, _request) = rx
            .await
            .map_err(|_| unavailable("writer stopped before committing"))?;
        res
    }

    /// Tokens per data key (only `dek`, if given), counted by a scan on a
    /// connection of its own in a blocking thread: the table has no index on
    /// the key, and a scan must not hold up an async worker or a pooled
    /// reader. Admin operations only.
    async fn count_tokens(&self, dek: Option<u32>) -> Result<HashMap<u32, u64>, StoreError> {
        self.read_apart(move |c| {
            let mut st = c.prepare(
                "SELECT dek_id, count(*) FROM tokens WHERE ?1 IS NULL OR dek_id = ?1
                 GROUP BY dek_id",
            )?;
            let rows = st
                .query_map(params![dek], |r| {
                    Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows
                .into_iter()
                .map(|(id, n)| (id, u64::try_from(n).unwrap_or(0)))
                .collect())
        })
        .await
    }

    /// Runs a read that may scan many rows (audit queries, re-encryption
    /// batches, counts) on a connection of its own in a blocking thread, so
    /// it holds up neither an async worker nor a pooled reader that a
    /// detokenize's point read is waiting for.
    async fn read_apart<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            common_pragmas(&c)?;
            f(&c)
        })
        .await
        .map_err(unavailable)?
        .map_err(map_err)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&conn).map_err(map_err)
    }
}

/// The lock file beside the database: `<db>.lock`.
fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes an exclusive advisory lock on `<db>.lock`, without waiting. The
/// writer keeps the audit sequence and chain head in memory (see
/// `WriterState`), so a second writing process on the same database would
/// make both stale and fork the chain; it is refused here instead. The lock
/// goes with the file (the kernel drops it if the process dies, so a crash
/// leaves nothing to clean up). Read-only tools (`offline.rs`) take no
/// lock and still open a running vault's database.
fn lock_exclusive(db: &Path) -> Result<std::fs::File, StoreError> {
    use rustix::fs::{FlockOperation, flock};
    let path = lock_path(db);
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
        // A symlink planted at the lock's name is refused, not followed.
        let nofollow = i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0);
        opts.custom_flags(nofollow);
    }
    let file = opts
        .open(&path)
        .map_err(|e| unavailable(format!("cannot open lock file {}: {e}", path.display())))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(unavailable(format!(
            "database {} is in use by another vault process (lock {} is held); \
             stop that process first",
            db.display(),
            path.display()
        ))),
        Err(e) => Err(unavailable(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// The database holds ciphertext only, but it is still cardholder-data
/// environment: owner-only access (PCI DSS 7.2.6). Creating the file 0600
/// before SQLite opens it matters: SQLite gives the `-wal` and `-shm` files
/// the database file's mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        opts.open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    }
    #[cfg(not(unix))]
    {
        opts.open(path).map(|_| ())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn kek_check(&self) -> Result<Option<KekCheck>, StoreError> {
        self.read(|c| {
            let id: Option<Vec<u8>> = c
                .query_row("SELECT value FROM meta WHERE key = 'kek_id'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            let blob: Option<Vec<u8>> = c
                .query_row("SELECT value FROM meta WHERE key = 'kek_check'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(id.zip(blob).map(|(id, check_blob)| KekCheck {
                kek_id: String::from_utf8_lossy(&id).into_owned(),
                check_blob,
            }))
        })
    }

    async fn pin_kek(&self, check: &KekCheck, audit: AuditEvent) -> Result<(), StoreError> {
        self.write(Op::PinKek(check.clone(), audit))
            .await
            .map(|_| ())
    }

    async fn load_deks(&self) -> Result<Vec<WrappedDek>, StoreError> {
        let rows = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, tenant, version, state, wrapped, kek_id, created_ms, reserved
                 FROM deks ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(
                |(id, tenant, version, state, wrapped, kek_id, created_ms, reserved)| {
                    Ok(WrappedDek {
                        id,
                        tenant,
                        version,
                        state: DekState::parse(&state)
                            .ok_or_else(|| StoreError::Corrupt(format!("dek {id} state")))?,
                        wrapped: wrapped.unwrap_or_default(),
                        kek_id,
                        created_ms,
                        reserved: u64::try_from(reserved)
                            .map_err(|_| StoreError::Corrupt(format!("dek {id} counter")))?,
                    })
                },
            )
            .collect()
    }

    async fn insert_dek(&self, dek: &WrappedDek, audit: AuditEvent) -> Result<(), StoreError> {
        self.write(Op::InsertDek(dek.clone(), audit))
            .await
            .map(|_| ())
    }

    async fn reserve_dek_uses(&self, dek_id: u32, reserved: u64) -> Result<(), StoreError> {
        self.write(Op::Reserve(dek_id, reserved)).await.map(|_| ())
    }

    async fn insert_token(&self, rec: TokenRecord, audit: AuditEvent) -> Result<(), StoreError> {
        self.write(Op::InsertToken(Arc::new(rec), audit))
            .await
            .map(|_| ())
    }

    async fn get_token(&self, token: &Token) -> Result<Option<Arc<TokenRecord>>, StoreError> {
        if let Some(rec) = self.cache.get(token) {
            return Ok(Some(rec));
        }
        let epoch = self.cache.epoch();
        let rec = self.read(|c| {
            c.prepare_cached(
                "SELECT token, tenant, dek_id, ciphertext, brand, bin, last4, pan_len,
                        exp_month, exp_year, created_ms
                 FROM tokens WHERE token = ?1",
            )?
            .query_row(params![&token.as_bytes()[..]], token_from_row)
            .optional()
        })?;
        let rec = rec.map(Arc::new);
        if let Some(r) = &rec {
            self.cache.fill(epoch, Arc::clone(r));
        }
        Ok(rec)
    }

    async fn delete_token(
        &self,
        token: &Token,
        tenant: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        match self
            .write(Op::DeleteToken(*token, tenant.to_owned(), audit))
            .await?
        {
            Done::Deleted(d) => Ok(d),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<u64, StoreError> {
        match self.write(Op::Audit(event)).await? {
            Done::Seq(s) => Ok(s),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let rows = st.query_map(params![after, limit], audit_from_row)?;
            rows.collect()
        })
    }

    async fn rotate_dek(
        &self,
        new: &WrappedDek,
        retire: Option<u32>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(Op::RotateDek(Box::new(new.clone()), retire, audit))
            .await
            .map(|_| ())
    }

    async fn token_counts(&self) -> Result<HashMap<u32, u64>, StoreError> {
        self.count_tokens(None).await
    }

    async fn destroy_dek(&self, id: u32, audit: AuditEvent) -> Result<(), StoreError> {
        // Only a decrypt-only key is counted; anything else gets the
        // writer's precise refusal without a scan.
        let state: Option<String> = self.read(|c| {
            c.prepare_cached("SELECT state FROM deks WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()
        })?;
        // Read before the scan starts, so the scan's snapshot includes at
        // least every commit up to `since`.
        let since = self.commits.load(Ordering::Acquire);
        let scanned = state.as_deref() == Some(DekState::DecryptOnly.as_str());
        if scanned {
            let refs = self
                .count_tokens(Some(id))
                .await?
                .get(&id)
                .copied()
                .unwrap_or(0);
            if refs > 0 {
                return Err(StoreError::Precondition(format!(
                    "{refs} tokens still reference data key {id}; re-encrypt them first"
                )));
            }
        }
        self.write(Op::DestroyDek(id, scanned.then_some(since), audit))
            .await
            .map(|_| ())
    }

    async fn shred_tenant(&self, tenant: &str, audit: AuditEvent) -> Result<Vec<u32>, StoreError> {
        match self
            .write(Op::ShredTenant(tenant.to_owned(), audit))
            .await?
        {
            Done::Ids(ids) => Ok(ids),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn restore_marker(&self) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row(params![backup::RESTORE_MARKER], |r| r.get::<_, Vec<u8>>(0))
                .optional()
                .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
        })
    }

    async fn finish_restore(&self, audit: AuditEvent) -> Result<Vec<u32>, StoreError> {
        match self.write(Op::FinishRestore(audit)).await? {
            Done::Ids(ids) => Ok(ids),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn rewrap_deks(
        &self,
        pin: &KekCheck,
        rewrapped: Vec<(u32, Vec<u8>)>,
        signing_key: Option<Vec<u8>>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(Op::RewrapDeks(pin.clone(), rewrapped, signing_key, audit))
            .await
            .map(|_| ())
    }

    async fn audit_head(&self) -> Result<(u64, [u8; 32]), StoreError> {
        let row: Option<(i64, Option<Vec<u8>>)> = self.read(|c| {
            c.prepare_cached("SELECT seq, chain_hash FROM audit ORDER BY seq DESC LIMIT 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })?;
        match row {
            None => Ok((0, crate::audit::chain::GENESIS)),
            Some((seq, h)) => Ok((
                u64::try_from(seq).unwrap_or(0),
                hash_col(h)
                    .ok_or_else(|| StoreError::Corrupt(format!("audit {seq} has no chain hash")))?,
            )),
        }
    }

    async fn query_audit(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        use rusqlite::types::Value;
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?");
        let mut args: Vec<Value> = vec![Value::Integer(i64::try_from(after).unwrap_or(i64::MAX))];
        let mut eq = |col: &str, v: &Option<String>, sql: &mut String| {
            if let Some(v) = v {
                sql.push_str(&format!(" AND {col} = ?"));
                args.push(Value::Text(v.clone()));
            }
        };
        eq("tenant", &filter.tenant, &mut sql);
        eq("actor", &filter.actor, &mut sql);
        eq("outcome", &filter.outcome, &mut sql);
        if let Some(from) = filter.from_ms {
            sql.push_str(" AND time_ms >= ?");
            args.push(Value::Integer(from));
        }
        if let Some(to) = filter.to_ms {
            sql.push_str(" AND time_ms < ?");
            args.push(Value::Integer(to));
        }
        if let Some(key) = filter.key_events {
            // The domain decides which actions are key lifecycle events.
            let data = AuditAction::ALL
                .iter()
                .filter(|a| !a.is_key_event())
                .map(|a| format!("'{}'", a.as_str()))
                .collect::<Vec<_>>()
                .join(",");
            sql.push_str(&format!(
                " AND action {} ({data})",
                if key { "NOT IN" } else { "IN" }
            ));
        }
        sql.push_str(" ORDER BY seq LIMIT ?");
        args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        // A filter on tenant, actor or outcome has no index to use.
        self.read_apart(move |c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(args), audit_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        self.write(Op::InsertCheckpoint(cp.clone()))
            .await
            .map(|_| ())
    }

    async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .checkpoints_query("ORDER BY seq DESC LIMIT 1", 0)?
            .pop())
    }

    async fn checkpoints_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.checkpoints_query(&format!("WHERE seq > ?1 ORDER BY seq LIMIT {limit}"), after)
    }

    async fn export_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Vec<Checkpoint>), StoreError> {
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            // One read transaction: entries and checkpoints from the same
            // snapshot, so a checkpoint signed between two reads cannot
            // appear to cover entries the page does not have.
            let tx = c.unchecked_transaction()?;
            let entries = {
                let mut st = tx.prepare_cached(&format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))?;
                let rows = st.query_map(params![after_i, limit_i], audit_from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let upto = if entries.len() == limit {
                entries
                    .last()
                    .map_or(after_i, |e| i64::try_from(e.seq).unwrap_or(i64::MAX))
            } else {
                i64::MAX
            };
            let cps = {
                let mut st = tx.prepare_cached(
                    "SELECT seq, chain_hash, time_ms, signature, key_id FROM checkpoints
                     WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                )?;
                let rows = st.query_map(params![after_i, upto], checkpoint_from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok((entries, cps))
        })
    }

    async fn signing_key(&self) -> Result<Option<StoredSigningKey>, StoreError> {
        self.read(|c| {
            let get = |k: &str| -> rusqlite::Result<Option<Vec<u8>>> {
                c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                    .query_row(params![k], |r| r.get(0))
                    .optional()
            };
            Ok(get("audit_signing_key")?
                .zip(get("audit_public_key")?)
                .map(|(wrapped, public)| StoredSigningKey { wrapped, public }))
        })
    }

    async fn init_signing_key(
        &self,
        key: &StoredSigningKey,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(Op::InitSigningKey(key.clone(), audit))
            .await
            .map(|_| ())
    }

    async fn scan_tokens(
        &self,
        tenant: &str,
        after: Option<Token>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let after = after.map(|t| t.as_bytes().to_vec()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let tenant = tenant.to_owned();
        // Walks the table in token order, skipping other tenants' rows.
        self.read_apart(move |c| {
            let mut st = c.prepare(
                "SELECT token, tenant, dek_id, ciphertext, brand, bin, last4, pan_len,
                        exp_month, exp_year, created_ms
                 FROM tokens WHERE token > ?1 AND tenant = ?2 ORDER BY token LIMIT ?3",
            )?;
            let rows = st.query_map(params![after, tenant, limit], token_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn create_job(&self, job: &JobRecord, audit: AuditEvent) -> Result<u64, StoreError> {
        match self
            .write(Op::CreateJob(Box::new(job.clone()), audit))
            .await?
        {
            Done::Seq(id) => Ok(id),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn get_job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        self.read(|c| {
            c.prepare_cached(&format!("{JOB_COLUMNS} WHERE id = ?1"))?
                .query_row(params![id], job_from_row)
                .optional()
        })
    }

    async fn running_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "{JOB_COLUMNS} WHERE state = 'running' ORDER BY id"
            ))?;
            let rows = st.query_map([], job_from_row)?;
            rows.collect()
        })
    }

    async fn reencrypt_batch(
        &self,
        job_id: u64,
        rows: Vec<Reencrypted>,
        checkpoint: Option<Token>,
    ) -> Result<u64, StoreError> {
        match self
            .write(Op::ReencryptBatch(job_id, rows, checkpoint))
            .await?
        {
            Done::Count(n) => Ok(n),
            _ => Err(unavailable("unexpected writer reply")),
        }
    }

    async fn finish_job(
        &self,
        id: u64,
        state: JobState,
        error: Option<String>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(Op::FinishJob(id, state, error, audit))
            .await
            .map(|_| ())
    }

    async fn close(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Job {
                op: Op::Close,
                reply,
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || {
                if h.join().is_err() {
                    error!("sqlite writer thread panicked");
                }
            })
            .await
            .map_err(unavailable)?;
        }
        // The writer is gone, and its lock with it: another process may
        // now open the database.
        debug!(path = %self.path.display(), "sqlite store closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::audit::AuditAction;
    use crate::storage::conformance::{dek, event, record, token};

    fn wal_len(db: &Path) -> u64 {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
    }

    /// A reader holding an old snapshot keeps the WAL from being truncated
    /// after an erasure. That used to stall the writer (and so every write)
    /// for up to ~100 s; now the delete is answered at once and the
    /// truncation follows when the reader lets go, with no further write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_reader_delays_the_wal_truncation_not_the_delete() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.db");
        let s = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        for n in 1..=3 {
            let t = token(n);
            s.insert_token(record(t, "acme"), event(AuditAction::Tokenize, Some(t)))
                .await
                .expect("insert");
        }
        let reader =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let n: i64 = reader
            .query_row("SELECT count(*) FROM tokens", [], |r| r.get(0))
            .expect("snapshot");
        assert_eq!(n, 3);

        // The delete completes while the reader still holds its snapshot
        // (it is ended only below). Waiting for the reader would stall it
        // for at least a whole busy timeout (5 s); the bound is half of
        // that, far from the few milliseconds the delete takes, so it
        // tells waiting apart from not waiting rather than judging speed.
        let t = token(1);
        let deleted = tokio::time::timeout(
            BUSY_TIMEOUT / 2,
            s.delete_token(&t, "acme", event(AuditAction::DeleteToken, Some(t))),
        )
        .await
        .expect("the delete waited for the reader")
        .expect("delete");
        assert!(deleted);
        assert!(wal_len(&path) > 0, "the reader's snapshot holds the WAL");

        reader.execute_batch("COMMIT").expect("end the read");
        drop(reader);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wal_len(&path) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not truncated after the reader finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        s.close().await.expect("close");
    }

    /// The lock lives as long as the writer: a store dropped without
    /// `close` cannot be reopened while its writer may still commit, and
    /// the next writer continues the log where it ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_dropped_without_close_keeps_its_lock_until_its_writer_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.db");
        let s = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        s.append_audit(event(AuditAction::Detokenize, None))
            .await
            .expect("write");
        drop(s);
        // The writer ends once its queue is drained and closed; only then
        // may another open, and it continues the log where it ended.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let again = loop {
            match SqliteStore::open(&path, SqliteOptions::default()) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("in use"), "{e}");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(e) => panic!("never reopened: {e}"),
            }
        };
        again
            .append_audit(event(AuditAction::Detokenize, None))
            .await
            .expect("the log continues");
        again.close().await.expect("close");
        let (entries, _, _) = read_audit_offline(&path).expect("read");
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
    }

    /// Two processes writing one database would each keep their own audit
    /// sequence and chain head. The second open is refused, naming the
    /// database; read-only offline tools still open it; after `close` the
    /// database may be opened again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_writer_on_the_same_database_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.db");
        let s = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        s.append_audit(event(AuditAction::Detokenize, None))
            .await
            .expect("write");
        let e = SqliteStore::open(&path, SqliteOptions::default())
            .expect_err("a second open must be refused")
            .to_string();
        assert!(
            e.contains("in use by another vault process")
                && e.contains(&path.display().to_string()),
            "{e}"
        );
        let (entries, _, _) = read_audit_offline(&path).expect("offline read while open");
        assert_eq!(entries.len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(lock_path(&path))
                .expect("lock file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        s.close().await.expect("close");
        let again = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen after close");
        again.close().await.expect("close");
    }

    /// A symlink planted at the lock file's name is refused, not followed
    /// (it could point the lock, created 0600, at any file).
    #[cfg(unix)]
    #[test]
    fn a_symlinked_lock_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.db");
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, lock_path(&path)).expect("symlink");
        let e = SqliteStore::open(&path, SqliteOptions::default())
            .expect_err("a symlinked lock must be refused")
            .to_string();
        assert!(e.contains("lock file"), "{e}");
        assert!(!elsewhere.exists(), "the symlink was followed");
    }

    /// A destroy that found the key active (so ran no reference scan) must
    /// not go through if the key was retired before the writer got to it:
    /// it may hold tokens no one counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destroy_whose_key_was_retired_unscanned_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s =
            SqliteStore::open(&dir.path().join("v.db"), SqliteOptions::default()).expect("open");
        s.insert_dek(&dek(1, "acme", 1), event(AuditAction::DekCreate, None))
            .await
            .expect("dek");
        s.insert_token(
            record(token(1), "acme"),
            event(AuditAction::Tokenize, Some(token(1))),
        )
        .await
        .expect("token");
        // The adapter looked while key 1 was active; then it was retired.
        s.rotate_dek(
            &dek(2, "acme", 2),
            Some(1),
            event(AuditAction::DekRotate, None),
        )
        .await
        .expect("rotate");
        let refused = s
            .write(Op::DestroyDek(
                1,
                None,
                event(AuditAction::DekDestroy, None),
            ))
            .await;
        assert!(
            matches!(&refused, Err(StoreError::Precondition(m)) if m.contains("changed state")),
            "{refused:?}"
        );
        // Through the trait, the scan now runs and counts the token.
        let e = s
            .destroy_dek(1, event(AuditAction::DekDestroy, None))
            .await
            .expect_err("a key with a token was destroyed");
        assert!(e.to_string().contains("1 tokens still reference"), "{e}");
        s.close().await.expect("close");
    }

    /// The reference scan behind a destroy runs outside the writer. A token
    /// put under the key after the scan's snapshot must make the writer
    /// refuse the destroy, or the key would be destroyed under a live
    /// token. (The writer refuses new tokens under a retired key, so this
    /// guard is a second line; the test puts the token in just before the
    /// rotation, after the snapshot it claims.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn destroy_is_refused_if_a_token_was_added_after_the_scan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s =
            SqliteStore::open(&dir.path().join("v.db"), SqliteOptions::default()).expect("open");
        s.insert_dek(&dek(1, "acme", 1), event(AuditAction::DekCreate, None))
            .await
            .expect("dek");

        // A scan of key 1 claimed as of `since`; then a tokenize under key 1
        // commits, and key 1 is retired.
        let since = s.commits.load(Ordering::Acquire);
        let late = token(7);
        s.insert_token(
            record(late, "acme"),
            event(AuditAction::Tokenize, Some(late)),
        )
        .await
        .expect("late insert");
        s.rotate_dek(
            &dek(2, "acme", 2),
            Some(1),
            event(AuditAction::DekRotate, None),
        )
        .await
        .expect("rotate");
        let refused = s
            .write(Op::DestroyDek(
                1,
                Some(since),
                event(AuditAction::DekDestroy, None),
            ))
            .await;
        assert!(
            matches!(&refused, Err(StoreError::Precondition(m)) if m.contains("retry")),
            "{refused:?}"
        );
        let deks = s.load_deks().await.expect("load");
        assert!(
            deks.iter()
                .any(|d| d.id == 1 && d.state == DekState::DecryptOnly)
        );

        // Once the token is gone, a destroy checked after that succeeds.
        s.delete_token(&late, "acme", event(AuditAction::DeleteToken, Some(late)))
            .await
            .expect("delete");
        s.destroy_dek(1, event(AuditAction::DekDestroy, None))
            .await
            .expect("destroy");
        s.close().await.expect("close");
    }
}
