//! `vault.v1.TokenService` over the domain vault: decode, identify the
//! caller, call the core, encode. No policy lives here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::Authenticator;
use super::status::logged;
use crate::domain::{CardBrand, CardMetadata, Expiry, Vault};
use crate::proto;
use crate::proto::token_service_server::TokenService;

pub struct TokenServiceImpl {
    vault: Arc<Vault>,
    auth: Arc<Authenticator>,
}

impl TokenServiceImpl {
    pub fn new(vault: Arc<Vault>, auth: Arc<Authenticator>) -> Self {
        Self { vault, auth }
    }
}

fn brand(b: CardBrand) -> proto::CardBrand {
    match b {
        CardBrand::Unknown => proto::CardBrand::Unknown,
        CardBrand::Visa => proto::CardBrand::Visa,
        CardBrand::Mastercard => proto::CardBrand::Mastercard,
        CardBrand::Amex => proto::CardBrand::Amex,
        CardBrand::Discover => proto::CardBrand::Discover,
        CardBrand::Jcb => proto::CardBrand::Jcb,
        CardBrand::DinersClub => proto::CardBrand::DinersClub,
        CardBrand::UnionPay => proto::CardBrand::Unionpay,
        CardBrand::Maestro => proto::CardBrand::Maestro,
    }
}

fn expiry(e: Expiry) -> proto::Expiry {
    proto::Expiry {
        month: u32::from(e.month),
        year: u32::from(e.year),
    }
}

fn metadata(m: CardMetadata) -> proto::CardMetadata {
    proto::CardMetadata {
        brand: brand(m.brand).into(),
        bin: m.bin,
        last4: m.last4,
        pan_length: u32::from(m.pan_len),
        expiry: m.expiry.map(expiry),
        created_at: super::timestamp(m.created_ms),
    }
}

#[tonic::async_trait]
impl TokenService for TokenServiceImpl {
    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        // The decoded request is the one copy of the card number this layer
        // owns. It wipes the number when dropped (`crate::codec`), on every
        // path: a refused caller, an error, or a call cancelled mid-await.
        let caller = self.auth.caller(&request)?;
        let req = request.into_inner();
        let exp = req.expiry.map(|e| (e.month, e.year));
        let res = self.vault.tokenize(&caller, &req.pan, exp).await;
        drop(req);
        let (token, meta) = logged("Tokenize", &caller, res)?;
        Ok(Response::new(proto::TokenizeResponse {
            token: token.to_string(),
            metadata: Some(metadata(meta)),
        }))
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let req = request.into_inner();
        let res = self
            .vault
            .detokenize(&caller, &req.token, &req.purpose)
            .await;
        let out = logged("Detokenize", &caller, res)?;
        // prost needs an owned String; the codec wipes it once encoded
        // (`crate::codec`).
        Ok(Response::new(proto::DetokenizeResponse {
            pan: out.pan.digits().to_owned(),
            expiry: out.expiry.map(expiry),
        }))
    }

    async fn get_token_metadata(
        &self,
        request: Request<proto::GetTokenMetadataRequest>,
    ) -> Result<Response<proto::GetTokenMetadataResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let req = request.into_inner();
        let res = self.vault.metadata(&caller, &req.token).await;
        let meta = logged("GetTokenMetadata", &caller, res)?;
        Ok(Response::new(proto::GetTokenMetadataResponse {
            metadata: Some(metadata(meta)),
        }))
    }

    async fn delete_token(
        &self,
        request: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let req = request.into_inner();
        let res = self.vault.delete(&caller, &req.token).await;
        logged("DeleteToken", &caller, res)?;
        Ok(Response::new(proto::DeleteTokenResponse {}))
    }
}
