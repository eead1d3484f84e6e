//! The coordination keys: the cluster record, node registrations and partition owners. Every
//! key is relative to the store's prefix.
//!
//! ```text
//! cluster                              partition count, creation time
//! nodes/{node}                         address, version                  (node lease)
//! owners/{pppp}                        node id                           (node lease)
//! defs/{webhooks|segments|campaigns}/{id}
//! ```
//!
//! Partition data has its layout in the state layer ([`crate::state`]).

use crate::cluster::PartitionId;

/// The cluster metadata key.
pub const CLUSTER: &str = "cluster";
/// The prefix of node registrations.
pub const NODES: &str = "nodes/";
/// The prefix of partition owner keys.
pub const OWNERS: &str = "owners/";

/// Returns the registration key of a node.
pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}

/// Returns the owner key of a partition.
pub fn owner(partition: PartitionId) -> String {
    format!("{OWNERS}{partition:04}")
}

/// Parses a partition number out of an owner key (without the prefix).
pub fn parse_owner(key: &[u8]) -> Option<PartitionId> {
    std::str::from_utf8(key.strip_prefix(OWNERS.as_bytes())?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_parse_back() {
        assert_eq!(parse_owner(owner(12).as_bytes()), Some(12));
    }
}
