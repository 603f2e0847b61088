//! The patchflow wire contract (`proto/patchflow/v1/patchflow.proto`) as Rust types, with the
//! tonic client and server stubs, shared by the daemon and every Rust client so that both sides
//! always agree on the protocol.
//!
//! It owns the wire contract, the bearer token's rule and the pool of recycled batch buffers
//! both ends fill. It must not hold any behaviour of the daemon or of a client beyond the
//! generated code, the token's checks and the pool.
//!
//! Byte fields are [`bytes::Bytes`], so batch buffers move between the sampler, the transport
//! and the caller without being copied.

pub mod buffers;
pub mod token;

/// Package `patchflow.v1`: messages, enums, `patchflow_client` and `patchflow_server`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("patchflow.v1");
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("patchflow_descriptor");

/// Fully qualified name of the service, as used by gRPC health checks.
pub const SERVICE_NAME: &str = "patchflow.v1.Patchflow";

pub use v1::*;
