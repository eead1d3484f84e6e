//! Each contact's standing in each campaign, under `p/{p}/status/{contact}/{campaign}`, written
//! only by the partition's owner. Follow-ups read it to see whether the contact interacted, and
//! business rules will read it as `campaigns`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A contact's standing in one campaign.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignStatus {
    /// Status of the latest finished delivery (`delivered`, `failed`).
    pub last_status: String,
    /// Id of that delivery.
    pub last_delivery: String,
    /// When it finished, Unix milliseconds.
    pub last_at_ms: i64,
    /// Deliveries finished.
    pub sends: u64,
    /// Latest time of each interaction kind, Unix milliseconds.
    pub interactions: BTreeMap<String, i64>,
    /// When an exit event last arrived for the contact, ending its pending follow-ups.
    #[serde(default)]
    pub exited_at_ms: Option<i64>,
    /// When the latest sends were queued, at most [`SEND_HISTORY`] within [`SEND_HISTORY_MS`]
    /// (kept while a frequency cap needs them).
    #[serde(default)]
    pub sent_at_ms: Vec<i64>,
}

/// Most send times kept per contact and campaign: frequency caps allow at most this many sends.
pub const SEND_HISTORY: usize = 100;

/// How long send times are kept: the longest frequency cap period.
pub const SEND_HISTORY_MS: i64 = 365 * 24 * 3600 * 1000;
