//! The Tidings node.
//!
//! - [`config`]: the configuration, from defaults, file, environment and flags;
//! - [`Node`]: a running node (store, gRPC API, graceful shutdown);
//! - [`cli`]: the `tidings` command line.
//!
//! The gRPC services live in the private `api` module: they map proto messages to the domain
//! types of `tidings-scheduler`, validate every field, and turn every error into a status in
//! one place.

mod api;
pub mod cli;
pub mod config;
mod node;

pub use node::Node;
