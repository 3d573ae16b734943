//! The herald.v1 gRPC API (Router and Presence services), generated from
//! `herald/v1/herald.proto` at build time, and the Hooks service that
//! applications implement for the edges to call (`herald/v1/hooks.proto`).

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("herald.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
}
