//! Bounded gRPC calls and concurrent tokenize/detokenize batches.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenvault::proto::key_service_client::KeyServiceClient;
use tokenvault::proto::token_service_client::TokenServiceClient;
use tokenvault::proto::{
    DataKey, DetokenizeRequest, GetKeyStatusRequest, GetKeyStatusResponse, TokenizeRequest,
};
use tonic::Status;
use tonic::transport::Channel;

use super::cards::visa_pan;

/// Upper bound on any single call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent calls used to tokenize or detokenize a batch of cards.
pub const PARALLEL: usize = 8;

/// Awaits a unary call, bounded by `CALL_TIMEOUT`, returning its message.
pub async fn call<T>(
    f: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .expect("call timed out")
        .map(tonic::Response::into_inner)
}

/// Tokenizes `visa_pan(base, 0..n)` with `PARALLEL` concurrent calls; every
/// call must succeed. Returns (token, PAN) pairs.
pub async fn tokenize_many(
    c: &TokenServiceClient<Channel>,
    base: u64,
    n: u64,
) -> Vec<(String, String)> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let mut c = c.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                let p = visa_pan(base, i);
                let t = call(c.tokenize(TokenizeRequest {
                    pan: p.clone(),
                    expiry: None,
                }))
                .await
                .unwrap_or_else(|s| panic!("tokenize: {s:?}"))
                .token;
                out.push((t, p));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), usize::try_from(n).unwrap());
    all
}

/// Detokenizes every pair (with `purpose`) using `PARALLEL` concurrent
/// calls; returns a line per token that did not come back as its own card
/// number.
pub async fn detokenize_failures(
    c: &TokenServiceClient<Channel>,
    pairs: &[(String, String)],
    purpose: &'static str,
) -> Vec<String> {
    let work = Arc::new(Mutex::new(pairs.to_vec()));
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let mut c = c.clone();
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let Some((token, pan)) = work.lock().unwrap().pop() else {
                    return failures;
                };
                let r = call(c.detokenize(DetokenizeRequest {
                    token: token.clone(),
                    purpose: purpose.into(),
                }))
                .await;
                match r {
                    Ok(r) if r.pan == pan => {}
                    Ok(_) => failures.push(format!("{token}: a different card number")),
                    Err(s) => failures.push(format!("{token}: {:?}: {}", s.code(), s.message())),
                }
            }
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("detokenize task did not end")
                .unwrap(),
        );
    }
    failures
}

/// Asserts every pair detokenizes (with `purpose`) to its own card number.
pub async fn assert_all_detokenize(
    c: &TokenServiceClient<Channel>,
    pairs: &[(String, String)],
    purpose: &'static str,
) {
    let failures = detokenize_failures(c, pairs, purpose).await;
    assert!(
        failures.is_empty(),
        "{} of {} tokens did not detokenize to their card number, e.g. {:?}",
        failures.len(),
        pairs.len(),
        &failures[..failures.len().min(5)]
    );
}

/// The key service's status, as seen by an administrator client.
pub async fn key_status(k: &mut KeyServiceClient<Channel>) -> GetKeyStatusResponse {
    call(k.get_key_status(GetKeyStatusRequest {}))
        .await
        .unwrap()
}

/// The data key `id` of a status response.
pub fn key_by_id(s: &GetKeyStatusResponse, id: u32) -> DataKey {
    s.data_keys
        .iter()
        .find(|d| d.id == id)
        .cloned()
        .unwrap_or_else(|| panic!("no data key {id} in {s:?}"))
}
