//! The secret scanner CI runs (PCI DSS 3.7.3, ASVS 13.3.1): no file in the repository holds key material — no PEM private key with a real body, no KEK (32 bytes of base64 next to a KEK name), no cloud or forge access token, and no file named like a key, key store or database. A control plants one of each, built at run time so the repository never holds them, and the scanner must find every one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Base64 characters a PEM body needs before it is a key rather than a
/// placeholder (a real RSA-2048 key has over 1 600; tests write stubs).
const PEM_BODY_MIN: usize = 100;

/// File names that hold secrets or data, never source.
const SECRET_NAMES: &[&str] = &[
    ".key",
    ".p12",
    ".pfx",
    ".jks",
    ".keystore",
    ".db",
    ".sqlite",
    ".db-wal",
    ".b64",
];

/// The repository's files: what git tracks, or, without git, every file
/// outside build output and local data.
fn repo_files(root: &Path) -> Vec<PathBuf> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        return out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
            .filter(|p| p.is_file())
            .collect();
    }
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if !["target", ".git", "vault-data", "corpus", "artifacts"].contains(&name.as_str())
                {
                    dirs.push(p);
                }
            } else {
                files.push(p);
            }
        }
    }
    files
}

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

/// What in `text` looks like a secret, one line per finding.
fn findings(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    // PEM private keys (PKCS#8, RSA, EC, OpenSSH, encrypted) with a body:
    // BEGIN, then END within 16 KB, with at least `PEM_BODY_MIN` base64
    // characters between them in runs of 40 or more (key lines are 64
    // long; a `\n` escape in source separates lines too).
    let unescaped = text.replace("\\n", "\n");
    let mut rest = unescaped.as_str();
    while let Some(i) = rest.find("-----BEGIN ") {
        let block = &rest[i + 11..];
        let Some(h) = block.find("-----") else { break };
        let label = &block[..h];
        let after = &block[h + 5..];
        rest = after;
        if !label.ends_with("PRIVATE KEY") || label.len() > 40 {
            continue;
        }
        let window = &after[..after.len().min(16 * 1024)];
        let Some(end) = window.find("-----END") else {
            continue;
        };
        let body: usize = window[..end]
            .split(|c: char| !is_b64(c as u8) || !c.is_ascii())
            .map(str::len)
            .filter(|&n| n >= 40)
            .sum();
        if body >= PEM_BODY_MIN {
            found.push(format!("PEM private key ({label})"));
        }
    }
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        // A KEK: 32 bytes of base64 (43 characters and one '=') on a line
        // that names a KEK.
        if lower.contains("kek") {
            let b = line.as_bytes();
            let mut run = 0;
            for (i, &c) in b.iter().enumerate() {
                if is_b64(c) {
                    run += 1;
                    continue;
                }
                if c == b'=' && run == 43 && b.get(i + 1) != Some(&b'=') {
                    found.push("a KEK in base64".into());
                }
                run = 0;
            }
        }
        // Cloud and forge tokens.
        for (prefix, len, what) in [
            ("AKIA", 16, "an AWS access key id"),
            ("ghp_", 36, "a GitHub token"),
            ("github_pat_", 60, "a GitHub token"),
            ("xoxb-", 20, "a Slack token"),
            ("sk_live_", 20, "a Stripe live secret key"),
        ] {
            let mut from = 0;
            while let Some(i) = line[from..].find(prefix) {
                let start = from + i + prefix.len();
                let tail = line[start..]
                    .bytes()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
                    .count();
                if tail >= len {
                    found.push(what.into());
                }
                from = start;
            }
        }
    }
    found
}

#[test]
fn no_key_material_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = repo_files(root);
    assert!(
        files.iter().any(|f| f.ends_with("Cargo.toml")),
        "no files found under {}",
        root.display()
    );
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        if SECRET_NAMES.iter().any(|s| rel.ends_with(s)) {
            problems.push(format!("{rel}: a file named like a key or database"));
        }
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for what in findings(&text) {
            problems.push(format!("{rel}: {what}"));
        }
    }
    assert!(
        problems.is_empty(),
        "key material in the repository:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_scanner_finds_planted_secrets() {
    let b64 = |n: usize| "Ab3+/".repeat(n).chars().take(n).collect::<String>();
    let pem = format!(
        "-----BEGIN {} KEY-----\n{}\n{}\n-----END PRIVATE KEY-----\n",
        "PRIVATE",
        b64(64),
        b64(64)
    );
    // The same key as a one-line string literal in source, `\n` escaped.
    let escaped = format!(
        "let k = \"-----BEGIN RSA {} KEY-----\\n{}\\n{}\\n-----END RSA PRIVATE KEY-----\";",
        "PRIVATE",
        b64(64),
        b64(64)
    );
    let kek = format!("VAULT_{}={}=\n", "KEK", b64(43));
    let aws = format!("id = \"{}{}\"\n", "AK", "IAABCDEFGHIJKLMNOP");
    let gh = format!("token: gh{}{}\n", "p_", "a".repeat(36));
    for (text, want) in [
        (pem.as_str(), "PEM private key"),
        (escaped.as_str(), "PEM private key (RSA PRIVATE KEY)"),
        (kek.as_str(), "a KEK in base64"),
        (aws.as_str(), "an AWS access key id"),
        (gh.as_str(), "a GitHub token"),
    ] {
        let f = findings(text);
        assert!(
            f.iter().any(|x| x.contains(want)),
            "{want} not found in {text:?}: {f:?}"
        );
    }
    // Placeholders and lookalikes are not secrets.
    for text in [
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n-----END PRIVATE KEY-----\n",
        "kek = \"kek.b64\"",
        "VAULT_KEK=$(cat kek.b64)",
        "let s = \"AKIA\";",
    ] {
        assert!(findings(text).is_empty(), "{text:?}: {:?}", findings(text));
    }
}
