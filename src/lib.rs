pub mod crypto;
pub mod domain;
pub mod fsutil;
pub mod storage;

pub mod proto {
    tonic::include_proto!("vault.v1");
}
