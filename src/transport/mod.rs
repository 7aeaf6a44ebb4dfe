//! The gRPC adapter: service implementations, caller identity from the mTLS
//! client certificate, and the one mapping of domain errors to gRPC status.

pub mod audit;
pub mod auth;
pub mod grpc;
pub mod keys;
pub mod listener;
pub mod status;

/// A UTC millisecond time as a protobuf timestamp.
pub(crate) fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}
