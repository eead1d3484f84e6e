//! The segment definition: a named CEL filter over contacts.

use serde::{Deserialize, Serialize};

/// A segment as stored under `defs/segments/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Free text.
    pub description: String,
    /// CEL expression over `contact` that is true for members.
    pub filter: String,
    /// Creation, Unix milliseconds.
    pub created_at_ms: i64,
    /// Last change.
    pub updated_at_ms: i64,
}
