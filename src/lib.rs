//! The Tidings gRPC protocol.
//!
//! - [`v1`]: the generated messages, clients (feature `client`) and servers (feature `server`)
//!   of the `tidings.v1` package;
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every service, for server reflection;
//! - [`json`]: JSON to and from the protobuf `Struct` that carries event data and attributes;
//! - constructors and setters on the common messages (`Event::new(…).data(…)`), in `build`.

/// The `tidings.v1` package: resources, requests, responses, clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tidings.v1");
}

mod build;
pub mod json;

/// Returns the encoded `FileDescriptorSet` of the whole API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tidings_descriptor");
