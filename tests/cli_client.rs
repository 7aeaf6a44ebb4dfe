//! `vault client …` against a real vault: the card number goes in on
//! standard input (never argv) and comes back from detokenize; metadata and
//! delete work from the shell; oversized input is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::process::clear_vault_env;
use common::*;

/// Runs `vault client <args>` as `--as name`, feeding `stdin`.
fn client(v: &TestVault, name: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vault"));
    clear_vault_env(&mut cmd)
        .arg("client")
        .arg("--data-dir")
        .arg(v.dir.path())
        .args(["--server", &v.url(), "--as", name])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shell_client_tokenizes_from_stdin_and_detokenizes() {
    let v = TestVault::start().await;
    let out = tokio::task::block_in_place(|| {
        client(
            &v,
            ACME_CHECKOUT,
            &["tokenize", "--exp-month", "12", "--exp-year", "2030"],
            b"4111 1111 1111 1111\n",
        )
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout.lines().next().unwrap().to_owned();
    assert!(token.starts_with("tok_"), "{stdout}");
    assert!(stdout.contains("brand: visa"), "{stdout}");
    assert!(stdout.contains("last4: 1111"), "{stdout}");
    assert!(stdout.contains("expiry: 12/2030"), "{stdout}");
    // Neither the number as sent (spaced) nor as stored is echoed.
    for out in [stdout.as_str(), text(&out.stderr).as_str()] {
        for form in ["4111 1111 1111", "4111111111111"] {
            assert!(!out.contains(form), "{out}");
        }
    }

    let out = tokio::task::block_in_place(|| {
        client(
            &v,
            ACME_PAYMENTS,
            &["detokenize", &token, "--purpose", "charge order 42"],
            b"",
        )
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().next(), Some("4111111111111111"));

    let out = tokio::task::block_in_place(|| client(&v, ACME_CHECKOUT, &["metadata", &token], b""));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bin: 411111"));

    // The checkout identity may not detokenize: the refusal is the vault's.
    let out = tokio::task::block_in_place(|| {
        client(
            &v,
            ACME_CHECKOUT,
            &["detokenize", &token, "--purpose", "charge order 42"],
            b"",
        )
    });
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied: "),
        "{}",
        text(&out.stderr)
    );

    let out = tokio::task::block_in_place(|| client(&v, ACME_CHECKOUT, &["delete", &token], b""));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = tokio::task::block_in_place(|| client(&v, ACME_CHECKOUT, &["metadata", &token], b""));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("NotFound"),
        "{}",
        text(&out.stderr)
    );
    v.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shell_client_refuses_oversized_input_without_echoing_it() {
    let v = TestVault::start().await;
    let big = "4111 1111 1111 1111\n".repeat(20);
    let out =
        tokio::task::block_in_place(|| client(&v, ACME_CHECKOUT, &["tokenize"], big.as_bytes()));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("more than 256 bytes"), "{err}");
    assert!(!err.contains("1111"), "{err}");

    // A bad card number: the vault's INVALID_ARGUMENT, with no digits.
    let out = tokio::task::block_in_place(|| {
        client(&v, ACME_CHECKOUT, &["tokenize"], b"4111 1111 1111 1112\n")
    });
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(!err.contains("1112") && !err.contains("4111"), "{err}");
    assert!(err.contains("InvalidArgument: "), "{err}");
    v.stop().await;
}

/// A custodian's share file that another account could read is refused
/// before anything is sent, like the KEK file.
#[test]
fn unseal_refuses_a_share_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("custodian-1.share");
    std::fs::write(&share, "not a share: never sent\n").unwrap();
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = common::process::vault_cli(
        &[
            "unseal",
            "--share-file",
            share.to_str().unwrap(),
            "--server",
            "https://127.0.0.1:9",
        ],
        dir.path(),
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("share file") && run.stderr.contains("readable by group or others"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("never sent"), "{}", run.stderr);
}
