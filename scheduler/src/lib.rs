//! Tidings core: everything below the gRPC surface.
//!
//! - [`app`]: the application layer the adapters (gRPC, console) call: ingest, …;
//! - [`store`]: the key-value contract with etcd's semantics, on etcd and on a local redb file;
//! - [`cluster`]: membership, partition assignment, ownership with epoch fencing, and the
//!   per-partition workers that consume inboxes and fire timers;
//! - [`state`]: partition data as typed tables (keys, records, fenced writes);
//! - [`keys`]: the coordination keys (cluster, nodes, owners);
//! - [`inbox`], [`timers`]: what partitions hold; [`engine`]: what events and timers mean;
//! - [`defs`]: typed definitions (webhooks, segments, campaigns) over the store, with etags;
//! - [`webhook`], [`campaign`]: definitions of webhooks, campaigns and runs;
//! - [`rules`]: CEL expressions;
//! - [`clock`]: the time engine decisions read, injectable for tests;

//! - [`schedule`]: interval math (periods, cron in a time zone, misfires);
//! - [`secrets`]: encryption of secrets at rest;

//! - [`template`]: Liquid templates.

pub mod app;
pub mod campaign;
pub mod clock;
pub mod cluster;
pub mod contact;

pub mod defs;
pub mod delivery;
pub mod engine;
pub mod inbox;
pub mod keys;
pub mod rules;
pub mod schedule;

pub mod secrets;
pub mod segment;
pub mod state;
pub mod status;
pub mod store;
pub mod template;
pub mod timers;
pub mod webhook;

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
