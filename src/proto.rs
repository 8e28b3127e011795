//! The protobuf messages of `session_authority.v1` (defined once, in the client crate), the server
//! traits generated here against them, and the descriptor set that server reflection serves.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    pub use session_authority_client::proto::v1::*;
    tonic::include_proto!("session_authority.v1");
}

/// Encoded `FileDescriptorSet` of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/session_authority_descriptor.bin"
));
