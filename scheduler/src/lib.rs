//! Tidings core: everything below the gRPC surface, from the top down.
//!
//! - [`app`]: the application layer the adapters (gRPC, console) call: ingest, contacts and
//!   audiences, the campaign life cycle, runs, deliveries;
//! - [`engine`]: what events, timers and attempt outcomes mean, returned as typed effects, one
//!   module per concern (events, runs, intervals, follow-ups, deliveries, standing);
//! - [`cluster`]: membership, partition assignment, ownership with epoch fencing, and the
//!   per-partition workers that commit the engine's effects and start attempts;
//! - [`delivery`]: rendering, signing, sending, retries, limits and the attempt log;
//! - [`state`]: partition data as typed tables (keys, records, reads that fail closed, the
//!   fenced partition transaction);
//! - [`coordination`]: the coordination store a node runs on (definitions, membership,
//!   ownership), the one handle on it the server holds;
//! - [`store`]: the key-value contract with etcd's semantics, on etcd and on a local redb file;
//! - [`keys`]: the coordination keys (cluster, nodes, owners);
//! - [`defs`]: typed definitions (webhooks, segments, campaigns) over the store, with etags;
//! - [`inbox`], [`timers`]: what partitions hold;
//! - [`webhook`], [`campaign`], [`contact`], [`segment`], [`status`]: the domain records;
//! - [`rules`]: CEL expressions; [`template`]: Liquid templates;
//! - [`schedule`]: interval math (periods, cron in a time zone, misfires);
//! - [`secrets`]: encryption of secrets at rest;
//! - [`telemetry`]: the metric instruments and the trace context records carry;
//! - [`clock`]: the time engine decisions read, injectable for tests;
//! - [`backoff`]: the pause between tries of every retry loop.

pub mod app;
pub(crate) mod backoff;
pub mod campaign;
pub(crate) mod clock;
pub mod cluster;
pub mod contact;
pub mod coordination;

pub mod defs;
pub mod delivery;
pub mod engine;
pub mod inbox;
pub(crate) mod keys;
pub mod rules;
pub mod schedule;

pub mod secrets;
pub mod segment;
pub mod state;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod timers;
pub mod webhook;

/// Returns the current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
