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
/// retry never meets a half-written file. (Only a crash between the link
/// and the unlink leaves the temporary name behind: a 0600 file beside the
/// target with the same contents.)
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    create_private(path, |f| f.write_all(bytes))
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
    cleaned?;
    sync_dir(dir)
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

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no-such-folder/kek.b64");
        assert!(write_private(&missing, b"x").is_err());
        assert!(names(d.path()).is_empty());
    }
}
