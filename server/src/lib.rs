//! The Tidings node.
//!
//! - [`config`]: the configuration, from defaults, file, environment and flags;
//! - [`Node`]: a running node (store, gRPC API, graceful shutdown);
//! - [`auth`]: bearer tokens with scopes, checked in front of every service;
//! - [`cli`]: the `tidings` command line;
//! - the web console, in the private `console` module: pages over the same services.
//!
//! The gRPC services live in the private `api` module: they map proto messages to the domain
//! types of `tidings-scheduler`, validate every field, and turn every error into a status in
//! one place.

mod api;
pub mod auth;
pub mod cli;
pub mod config;
mod console;
mod files;
mod node;
pub mod telemetry;
pub mod tls;

pub use node::Node;
