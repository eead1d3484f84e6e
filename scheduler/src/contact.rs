//! The contact record, kept in its partition under `p/{p}/contacts/{id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::PartitionId;

/// A contact as stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    /// Attributes, a JSON object.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// IANA time zone; empty for UTC.
    pub timezone: String,
    /// Opted out of every campaign.
    pub unsubscribed: bool,
    /// Creation, Unix milliseconds.
    pub created_ms: i64,
    /// Last change.
    pub updated_ms: i64,
}

/// Returns the key of a contact.
pub fn key(partition: PartitionId, id: &str) -> String {
    format!("p/{partition:04}/contacts/{id}")
}

impl Contact {
    /// Returns the contact as templates and rules see it.
    pub fn view(&self, id: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "attributes": self.attributes,
            "timezone": if self.timezone.is_empty() { "UTC" } else { self.timezone.as_str() },
            "unsubscribed": self.unsubscribed,
        })
    }
}
