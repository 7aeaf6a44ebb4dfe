//! Process hardening: every `vault` command makes itself unable to dump
//! core or be attached to before it touches a key, a share or a card
//! number; the server can also lock all its memory.
//!
//! A crash must not write keys or card numbers to a core file, and no other
//! process of the same user may attach a debugger or read `/proc/PID/mem`.
//! Locking memory (`server.lock_memory`) keeps key schedules and plaintext
//! out of swap; it needs `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`
//! (systemd `LimitMEMLOCK=infinity`), so it is opt-in, and once asked for it
//! must succeed. `rustix` wraps the system calls safely, so this module
//! needs no `unsafe`.

use rustix::mm::{MlockAllFlags, mlockall};
use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};

#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error("cannot disable core dumps: {0}")]
    CoreLimit(rustix::io::Errno),
    #[error("cannot make the process non-dumpable: {0}")]
    Dumpable(rustix::io::Errno),
    #[error(
        "cannot lock memory ({0}); grant CAP_IPC_LOCK or LimitMEMLOCK=infinity, \
         or set server.lock_memory = false"
    )]
    LockMemory(rustix::io::Errno),
}

/// No core dumps, not dumpable. Lowering a limit and the dumpable flag is
/// always permitted, so a failure means something is badly wrong: the
/// caller stops.
pub fn harden_process() -> Result<(), HardeningError> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(HardeningError::CoreLimit)?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(HardeningError::Dumpable)
}

/// Raises the soft limit on open files towards `wanted`, as far as the hard
/// limit allows (raising the soft limit up to the hard one needs no
/// privilege), and returns the soft limit now in force. Every connection is
/// a file descriptor: a limit below `limits.max_connections` would turn a
/// busy vault's accepts into EMFILE errors.
pub fn raise_open_files(wanted: u64) -> Result<u64, rustix::io::Errno> {
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return Ok(current);
    }
    let target = now.maximum.map_or(wanted, |hard| wanted.min(hard));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: now.maximum,
        },
    )?;
    Ok(target)
}

/// Locks every page, present and future, in memory.
pub fn lock_memory() -> Result<(), HardeningError> {
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE).map_err(HardeningError::LockMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::process::dumpable_behavior;

    // Changes the test process itself: harmless for the other tests (they
    // neither dump core nor get traced), and nextest runs each test in a
    // process of its own anyway.
    #[test]
    fn a_hardened_process_dumps_no_core_and_cannot_be_attached_to() {
        harden_process().unwrap();
        let core = getrlimit(Resource::Core);
        assert_eq!(core.current, Some(0));
        assert_eq!(core.maximum, Some(0));
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
        // Idempotent.
        harden_process().unwrap();
    }

    #[test]
    fn the_open_files_limit_is_raised_within_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);
        let soft = before.current.unwrap_or(u64::MAX);
        assert_eq!(
            raise_open_files(soft.min(16)).unwrap(),
            soft,
            "never lowered"
        );
        let got = raise_open_files(u64::MAX).unwrap();
        assert_eq!(Some(got), before.maximum.or(Some(u64::MAX)));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(got));
        assert_eq!(getrlimit(Resource::Nofile).maximum, before.maximum);
    }
}
