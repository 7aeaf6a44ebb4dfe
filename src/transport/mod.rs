//! The gRPC adapter: service implementations, caller identity from the mTLS
//! client certificate, and the one mapping of domain errors to gRPC status.

pub mod audit;
pub mod auth;
pub mod grpc;
pub mod keys;
pub mod status;
