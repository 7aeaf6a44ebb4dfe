//! A key lifecycle step that commits to the store and then updates the key
//! ring runs to its end even when its call is cancelled (a client that hangs
//! up, a deadline): the store and memory never disagree about which keys
//! exist. Each test polls a step once, as a cancelled gRPC handler would
//! have, drops it, and checks the outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokenvault::domain::access::{Caller, Grant, Role, RoleSet, TenantId, TenantScope};
use tokenvault::server::{load_kek, open_vault};

fn caller(identity: &str, scope: TenantScope, roles: &[Role]) -> Caller {
    Caller {
        identity: identity.into(),
        peer: Some("127.0.0.1:50000".into()),
        grant: Some(Grant {
            scope,
            roles: RoleSet::new(roles.iter().copied()),
        }),
    }
}

fn acme() -> TenantScope {
    TenantScope::One(TenantId::parse("acme").unwrap())
}

/// Polls `step` exactly once and drops it, as tonic drops the handler of
/// a call cancelled while the step waits for its commit.
async fn poll_once_then_cancel<F: std::future::Future>(step: F) {
    let mut step = std::pin::pin!(step);
    std::future::poll_fn(|cx| {
        let _ = step.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

/// Waits until `done` holds (at most 10 s).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_seal_still_drops_the_keys_it_recorded_dropping() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::dev_config(tmp.path(), &[]);
    let kek = load_kek(&cfg, &HashMap::<String, String>::new()).unwrap();
    let vault = open_vault(&cfg, kek).await.unwrap();
    let admin = caller("admin", TenantScope::All, &[Role::Admin]);

    poll_once_then_cancel(vault.seal(&admin, "maintenance window")).await;
    eventually("the seal was recorded but the vault kept its keys", || {
        vault.is_sealed()
    })
    .await;
    drop(vault);
    let rows = common::audit_rows(&cfg.storage.path);
    let seals: Vec<_> = rows.iter().filter(|r| r.action == "seal").collect();
    assert_eq!(seals.len(), 1, "{seals:?}");
    assert_eq!(seals[0].outcome, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rotation_still_installs_the_key_it_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::dev_config(tmp.path(), &[]);
    let kek = load_kek(&cfg, &HashMap::<String, String>::new()).unwrap();
    let vault = open_vault(&cfg, kek).await.unwrap();
    let admin = caller("admin", TenantScope::All, &[Role::Admin]);
    let checkout = caller("acme-checkout", acme(), &[Role::Tokenize]);
    let pan = common::cards::visa_pan(9_400_000, 1);

    // Key 1 made by the first tokenize; its rotation is cancelled at once.
    vault.tokenize(&checkout, &pan, None).await.unwrap();
    poll_once_then_cancel(vault.rotate_dek(&admin, "acme", "scheduled rotation")).await;
    eventually("the rotation never completed", || {
        common::audit_rows(&cfg.storage.path)
            .iter()
            .any(|r| r.action == "dek_rotate")
    })
    .await;
    // The ring follows the store: tokenize keeps working, under the new key.
    let st = vault.key_status(&admin).await.unwrap();
    let active: Vec<_> = st
        .deks
        .iter()
        .filter(|d| d.state == tokenvault::domain::store::DekState::Active)
        .collect();
    assert_eq!(active.len(), 1, "{:?}", st.deks);
    assert_eq!(active[0].version, 2, "{:?}", st.deks);
    let new_key = active[0].id;
    // The audit row is committed a moment before the key reaches memory:
    // wait for memory, which is what the cancelled step must not skip.
    eventually("the committed key never reached the key ring", || {
        vault.active_key_id("acme") == Some(new_key)
    })
    .await;
    vault.tokenize(&checkout, &pan, None).await.unwrap();
    let st = vault.key_status(&admin).await.unwrap();
    let under_new = st.deks.iter().find(|d| d.id == new_key).unwrap().tokens;
    assert_eq!(
        under_new, 1,
        "a tokenize after the rotation still encrypted under the retired key: {:?}",
        st.deks
    );
}
