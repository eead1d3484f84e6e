//! What enters a partition from outside: accepted events and timers to schedule.
//!
//! Any node may append to any partition's inbox (an append changes no state the owner has
//! read, so it needs no fencing). Only the owner consumes the inbox, in revision order, each
//! batch in one transaction guarded by its epoch that deletes the entries and writes their
//! consequences. A Publish that returned has therefore been written durably, and is consumed
//! at least once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::timers::Timer;

/// An event as accepted by Publish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Identifier given at acceptance.
    pub id: String,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Contact it concerns.
    pub contact_id: String,
    /// Event data, a JSON object.
    pub data: BTreeMap<String, serde_json::Value>,
    /// When it happened, Unix milliseconds.
    pub occurred_ms: i64,
    /// When Tidings accepted it, Unix milliseconds.
    pub accepted_ms: i64,
    /// Set when the event's campaigns did not fit one transaction: the campaigns (by id, in
    /// order) up to this one have already been handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_after: Option<String>,
    /// Set when the campaigns listing the event as an exit event did not fit one transaction:
    /// those (by id, in order) up to this one have already been exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exits_after: Option<String>,
    /// The W3C trace context (`traceparent`) of the call that published it, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

/// One inbox entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum InboxEntry {
    /// An accepted event.
    Event(Event),
    /// A timer to add to the partition.
    Schedule(Timer),
    /// Fan a run out to partitions `from` and on: a shard entry to each, as many as one
    /// transaction holds, then this entry again for the rest.
    FanOut {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
        /// The first partition still to get its shard.
        from: u32,
    },
    /// Evaluate a run's audience over this partition's contacts, from after `after` (a
    /// contact key; empty for the start). A shard re-queues itself with its progress until
    /// every contact is done, so a failover resumes where it stopped.
    RunShard {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
        /// Key of the last contact evaluated.
        after: String,
    },
    /// What a contact did with a delivery, reported by a downstream system.
    Interaction {
        /// Contact; empty when only the delivery is known.
        contact: String,
        /// Campaign; empty when only the delivery is known.
        campaign: String,
        /// Delivery id, when known.
        delivery: String,
        /// `delivered`, `opened`, `clicked`, `actioned`, `converted`, or a custom name.
        kind: String,
        /// When it happened, Unix milliseconds.
        at_ms: i64,
    },
    /// Send a finished delivery again.
    Redeliver {
        /// Delivery id.
        delivery: String,
    },
}

/// The record kept for an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The id given to the first call.
    pub event_id: String,
    /// When the key was first seen, Unix milliseconds.
    pub created_ms: i64,
}

/// Returns a new id for an inbox entry, `{prefix}_{ulid}`: ids sort by creation time.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}
