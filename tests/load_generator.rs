//! The load generator runs end to end in both server placements: it starts
//! the vault and the no-op (in a child process, or in its own), drives
//! both over mutual TLS, stops them cleanly and prints its report. Timing
//! is not judged here (that is BENCHMARKS.md's job); errors and the shape
//! of the report are.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn run_load(servers: &str) -> (String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_vault-load"))
        .args([
            "--servers",
            servers,
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--pool",
            "40",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run vault-load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "vault-load --servers {servers} failed: {stderr}\n{stdout}"
    );
    (stdout, stderr)
}

fn assert_report(servers: &str, stdout: &str, stderr: &str) {
    for line in [
        "| 1 | no-op | tokenize |",
        "| 1 | vault | tokenize |",
        "| 1 | no-op | detokenize |",
        "| 1 | vault | detokenize |",
    ] {
        assert!(
            stdout.contains(line),
            "{servers}: no row {line:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("overall: "),
        "{servers}: no verdict in\n{stdout}"
    );
    assert!(
        !stdout.contains(" error: "),
        "{servers}: calls failed:\n{stdout}"
    );
    // The vault was stopped before its database was read, and it holds an
    // audit record for every detokenize.
    let audit = stderr
        .lines()
        .find(|l| l.starts_with("audit rows in vault.db: "))
        .unwrap_or_else(|| panic!("{servers}: no audit count in\n{stderr}"));
    assert!(audit.contains("detokenize "), "{servers}: {audit}");
    assert!(stderr.contains(&format!("servers:  {servers}")), "{stderr}");
}

#[test]
fn runs_with_the_servers_in_a_child_process() {
    let (stdout, stderr) = run_load("child");
    assert_report("child", &stdout, &stderr);
}

#[test]
fn runs_with_the_servers_in_its_own_process() {
    let (stdout, stderr) = run_load("in-process");
    assert_report("in-process", &stdout, &stderr);
}
