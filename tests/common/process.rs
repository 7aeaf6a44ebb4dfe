//! The `vault` binary as a child process: a `vault dev` server with a kill
//! guard, SIGTERM, and bounded waits.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// Upper bound on a `vault dev` child announcing its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables that would change what a `vault` child serves or
/// reads; removed from every child's environment.
pub const VAULT_ENV: &[&str] = &[
    "VAULT_KEK",
    "VAULT_KEK_FILE",
    "VAULT_DB",
    "VAULT_LISTEN",
    "VAULT_REFLECTION",
    "VAULT_DATA_DIR",
    "VAULT_CONFIG",
    "VAULT_AS",
    "VAULT_URL",
];

/// What a finished `vault` command printed.
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `vault` binary with `args` in `dir` (its output files go
/// there too), bounded to a minute.
pub fn vault_cli(args: &[&str], dir: &Path) -> CliRun {
    let (out, err) = (dir.join("cli.stdout"), dir.join("cli.stderr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vault"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap());
    clear_vault_env(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let status = wait_or_kill(
        &mut child,
        Duration::from_secs(60),
        Duration::from_millis(10),
    )
    .unwrap_or_else(|| panic!("vault {args:?} did not exit within a minute"));
    CliRun {
        code: status.code(),
        stdout: std::fs::read_to_string(out).unwrap(),
        stderr: std::fs::read_to_string(err).unwrap(),
    }
}

/// Checks the audit log of the database at `db` (no vault running on it)
/// with `vault audit verify-db`, under the public key the file holds.
pub fn assert_audit_log_verifies(db: &Path, dir: &Path) {
    let (db, pk) = (db.to_str().unwrap(), dir.join("audit.pub"));
    let pk = pk.to_str().unwrap();
    let _ = std::fs::remove_file(pk);
    let run = vault_cli(&["audit", "public-key", "--db", db, "--out", pk], dir);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = vault_cli(&["audit", "verify-db", "--public-key", pk, db], dir);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
}

/// Removes `VAULT_ENV` from `cmd`'s environment.
pub fn clear_vault_env(cmd: &mut Command) -> &mut Command {
    for v in VAULT_ENV {
        cmd.env_remove(v);
    }
    cmd
}

/// Sends SIGTERM (a graceful stop) to `child` with `kill -TERM`.
pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}

/// Sends `name` (a signal name for kill(1), e.g. `SEGV`) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{name} failed: {status}");
}

/// Polls `child` every `poll` until it exits or `limit` has passed; on the
/// timeout kills and reaps it and returns `None`.
pub fn wait_or_kill(child: &mut Child, limit: Duration, poll: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(poll);
    }
}

/// A `vault dev` child process on 127.0.0.1. Dropping it sends SIGKILL and
/// reaps it, so a failing test never leaves a server behind.
pub struct VaultProc {
    child: Child,
    addr: SocketAddr,
    stderr_path: PathBuf,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl VaultProc {
    /// Starts `vault dev` on `data_dir` (reusing its config if it exists)
    /// with an OS-chosen port and `VAULT_LOG=log_level`, and waits (at most
    /// `START_TIMEOUT`) for its `listening on ADDR` line. Standard output is
    /// copied to `logs/<run>.stdout`, standard error goes to
    /// `logs/<run>.stderr`.
    pub fn start(data_dir: &Path, logs: &Path, run: &str, log_level: &str) -> Self {
        Self::start_via(&[], data_dir, logs, run, log_level)
    }

    /// As `start`, with the binary run through `wrapper` (a command that
    /// execs its arguments, e.g. `prlimit …`), with `logs` as its working
    /// directory.
    pub fn start_via(
        wrapper: &[&str],
        data_dir: &Path,
        logs: &Path,
        run: &str,
        log_level: &str,
    ) -> Self {
        Self::try_start_via(wrapper, data_dir, logs, run, log_level).unwrap_or_else(|stderr| {
            panic!("vault exited before announcing its address; stderr:\n{stderr}")
        })
    }

    /// As `start_via`, but a vault that exits before announcing its
    /// address (it refused to start) gives its standard error instead.
    pub fn try_start_via(
        wrapper: &[&str],
        data_dir: &Path,
        logs: &Path,
        run: &str,
        log_level: &str,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(logs).unwrap();
        let stderr_path = logs.join(format!("{run}.stderr"));
        let stdout_path = logs.join(format!("{run}.stdout"));
        let vault = env!("CARGO_BIN_EXE_vault");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(vault),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(vault);
                c
            }
        };
        cmd.current_dir(logs)
            .arg("dev")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("VAULT_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap());
        clear_vault_env(&mut cmd);
        let mut child = cmd.spawn().expect("spawn the vault binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout_reader = std::thread::spawn(move || {
            let mut copy = File::create(stdout_path).unwrap();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "{line}");
                let _ = tx.send(line);
            }
        });
        let mut proc = VaultProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_path,
            stdout_reader: Some(stdout_reader),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    // The dev help text also mentions "listening on" (indented,
                    // followed by more words); only the bare line counts.
                    if let Some(addr) = line
                        .strip_prefix("listening on ")
                        .and_then(|rest| rest.trim().parse::<SocketAddr>().ok())
                    {
                        assert!(addr.ip().is_loopback(), "vault bound {addr}, not loopback");
                        proc.addr = addr;
                        return Ok(proc);
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "vault did not print `listening on ADDR` within {START_TIMEOUT:?}; stderr:\n{}",
                    proc.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = proc.child.wait();
                    return Err(proc.stderr());
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Everything the child has written to standard error so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `signal` (a name for kill(1), e.g. `SEGV`).
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the vault");
    }

    pub fn sigterm(&self) {
        sigterm(&self.child);
    }

    /// Waits at most `limit` for the process to exit; panics (and the guard
    /// then kills it) if it does not.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stdout_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vault did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for VaultProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
