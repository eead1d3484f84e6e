//! Tidings core: everything below the gRPC surface.
//!
//! - [`store`]: the key-value contract with etcd's semantics, on etcd and on a local redb file;
//! - [`defs`]: typed definitions (webhooks, segments, campaigns) over the store, with etags;
//! - [`webhook`]: the webhook definition and its signing secrets;
//! - [`secrets`]: encryption of secrets at rest;
//! - [`template`]: Liquid templates.

pub mod defs;
pub mod secrets;
pub mod store;
pub mod template;
pub mod webhook;

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
