//! Writing files that hold secrets: created with mode 0600 from the start, so
//! there is no window where another user could read them; complete or absent
//! (never half-written); durable before the call returns; never overwritten.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Creates `path` holding `bytes`, or fails if it already exists.
///
/// The bytes go to a new temporary file in the same folder (created 0600,
/// so never readable by others), which is synced and then hard-linked to
/// `path`. A link, unlike a rename, fails if the target exists, so nothing
/// is ever replaced. The folder is then synced too: without that, a power
/// cut can lose the new name even though its contents were flushed, and a
/// KEK file could vanish while the database that depends on it survives.
///
/// A crash at any point leaves `path` either absent or complete, so a
/// retry never meets a half-written file. (A crash after the temporary
/// file is written and before it is removed leaves it behind: a hidden
/// 0600 file beside the target, `.<name>.tmp-<random>`, that a retry does
/// not trip over and an operator may delete.)
///
/// On a file system without hard links (FAT or exFAT media for share
/// files, some network mounts) the file is created in place instead,
/// still 0600, never replacing one, and synced; there an interrupted write
/// can leave a partial file that must be removed before a retry.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match create_private(path, |f| f.write_all(bytes)) {
        Err(e) if links_unsupported(&e) => {
            tracing::warn!(
                path = %path.display(),
                "this file system has no hard links: writing the file in place"
            );
            write_synced(path, |f| f.write_all(bytes))?;
            sync_dir_if_supported(parent(path))
        }
        other => other,
    }
}

/// The errors `link(2)` gives where the file system has no hard links.
fn links_unsupported(e: &std::io::Error) -> bool {
    const EPERM: i32 = 1;
    e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(EPERM)
}

/// Syncs a folder, accepting a file system that cannot sync folders
/// (EINVAL): there the name is as durable as that file system allows.
fn sync_dir_if_supported(dir: &Path) -> std::io::Result<()> {
    const EINVAL: i32 = 22;
    match sync_dir(dir) {
        Err(e)
            if e.raw_os_error() == Some(EINVAL) || e.kind() == std::io::ErrorKind::Unsupported =>
        {
            Ok(())
        }
        other => other,
    }
}

/// [`write_private`] with the contents written by `fill`. If `fill` fails
/// (an interrupted write), `path` is not created.
fn create_private(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = parent(path);
    let tmp = temp_name(path)?;
    let placed = write_synced(&tmp, fill).and_then(|()| std::fs::hard_link(&tmp, path));
    // Whatever happened, the temporary name goes: on success `path` holds
    // the file, on failure the bytes must not linger.
    let cleaned = std::fs::remove_file(&tmp);
    placed?;
    if let Err(e) = cleaned {
        // The file is in place; failing now would only make a retry meet
        // "already exists". Say where the stray copy is instead.
        tracing::warn!(
            path = %tmp.display(),
            error = %e,
            "could not remove the temporary copy of a private file (mode 0600); delete it"
        );
    }
    sync_dir_if_supported(dir)
}

/// Writes a non-secret file, creating or replacing it.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Flushes a folder's entries (new, renamed or removed names) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.tmp-<random>` beside `path`: same folder (so same file system,
/// for the link), hidden, and unique per attempt so that a temporary file
/// left by a crash never blocks a retry.
fn temp_name(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{}", hex::encode(nonce)));
    Ok(parent(path).join(tmp))
}

fn write_synced(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    fill(&mut f)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_a_private_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kek.b64");
        write_private(&p, b"secret\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"secret\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(names(d.path()), ["kek.b64"]);
    }

    #[test]
    fn never_replaces_an_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kek.b64");
        std::fs::write(&p, b"original").unwrap();
        let e = write_private(&p, b"new").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"original");
        assert_eq!(
            names(d.path()),
            ["kek.b64"],
            "the refused bytes must not linger in a temporary file"
        );
    }

    /// An interrupted write used to leave a partial file under the
    /// target's name, which then refused every retry ("File exists").
    #[test]
    fn an_interrupted_write_leaves_no_file_and_the_retry_succeeds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("server.key");
        let cut = create_private(&p, |f| {
            f.write_all(b"-----BEGIN PRIV")?;
            Err(std::io::Error::other("power cut"))
        });
        assert!(cut.is_err());
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
        write_private(&p, b"complete").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"complete");
    }

    /// What a crash can still leave (a stray temporary file, see
    /// `write_private`) does not block a retry either.
    #[test]
    fn a_stray_temporary_file_does_not_block_a_retry() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("server.key");
        std::fs::write(d.path().join(".server.key.tmp-0011223344556677"), b"x").unwrap();
        write_private(&p, b"complete").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"complete");
    }

    /// Only "no hard links here" switches to writing in place; an existing
    /// target is never overwritten that way.
    #[test]
    fn only_missing_link_support_falls_back_to_writing_in_place() {
        use std::io::{Error, ErrorKind};
        assert!(links_unsupported(&Error::from_raw_os_error(1)));
        assert!(links_unsupported(&Error::from(ErrorKind::Unsupported)));
        assert!(!links_unsupported(&Error::from_raw_os_error(17)));
        assert!(!links_unsupported(&Error::from(ErrorKind::AlreadyExists)));
        assert!(!links_unsupported(&Error::from_raw_os_error(13)));
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no-such-folder/kek.b64");
        assert!(write_private(&missing, b"x").is_err());
        assert!(names(d.path()).is_empty());
    }
}
