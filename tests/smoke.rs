mod common;

use common::*;
use tokenvault::proto::{DetokenizeRequest, TokenizeRequest};

#[tokio::test]
async fn tokenize_then_detokenize_over_mtls() {
    let v = TestVault::start().await;
    let mut checkout = v.client(ACME_CHECKOUT).await;
    let t = checkout
        .tokenize(TokenizeRequest {
            pan: "4111 1111 1111 1111".into(),
            expiry: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.token.starts_with("tok_"));
    let mut payments = v.client(ACME_PAYMENTS).await;
    let d = payments
        .detokenize(DetokenizeRequest {
            token: t.token.clone(),
            purpose: "charge".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "4111111111111111");
    let dir = v.stop().await;
    let v = TestVault::start_in(dir).await;
    let mut payments = v.client(ACME_PAYMENTS).await;
    let d = payments
        .detokenize(DetokenizeRequest {
            token: t.token,
            purpose: "charge".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pan, "4111111111111111");
}
