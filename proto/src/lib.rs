//! Generated messages and services of `failback.v1`.
//!
//! gRPC (tonic) and QUIC (quinn) carry the same prost messages; see `failback.proto`.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("failback.v1");
}

/// The protocol version this build speaks; a handshake with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
