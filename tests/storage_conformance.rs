//! Runs the storage conformance suite (`tokenvault::storage::conformance`)
//! against every backend: today SQLite on a real file in a temp directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;

use tokenvault::domain::Store;
use tokenvault::storage::conformance::{self as suite, Backend};
use tokenvault::storage::{SqliteOptions, SqliteStore};

struct Sqlite {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Sqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        Self { _dir: dir, path }
    }
}

impl Backend for Sqlite {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&self.path, SqliteOptions::default()).unwrap())
    }
}

macro_rules! conformance {
    ($backend:expr => $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let b = $backend;
                if let Err(e) = suite::$check(&b).await {
                    panic!("{}: {e}", stringify!($check));
                }
            }
        )*
    };
}

conformance!(Sqlite::new() =>
    token_round_trip,
    duplicate_token_conflicts,
    audit_sequence_is_gapless,
    delete_is_tenant_scoped_and_audited,
    deks_and_counters,
    kek_pin_is_set_once,
    concurrent_writes_all_commit,
    acknowledged_writes_survive_reopen,
    rejected_request_fails_alone,
    reencrypted_row_reads_back_new,
    reencryption_never_revives_a_shredded_row,
    deleted_row_never_reads_back,
    token_counts_follow_writes,
    destroy_only_unreferenced_decrypt_only_keys,
    no_token_is_stored_under_a_retired_key,
    batch_for_a_stopped_job_fails_alone,
    finishing_a_restore_retires_every_active_key,
);
