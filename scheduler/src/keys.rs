//! The key layout, in one place. Every key is relative to the store's prefix.
//!
//! ```text
//! cluster                              partition count, creation time
//! nodes/{node}                         address, version                  (node lease)
//! owners/{pppp}                        node id                           (node lease)
//! p/{pppp}/applied                     `{node}/{epoch}` of the last write to the partition
//! p/{pppp}/inbox/{id}                  accepted input not yet processed
//! p/{pppp}/timers/{due_ms:013}/{id}    timers, ordered by due time
//! idem/{key}                           idempotency keys of Publish
//! defs/{webhooks|segments|campaigns}/{id}
//! runs/{campaign}/{run}
//! shards/{campaign}/{run}/{pppp}       a run's counters in one partition (written by its owner)
//! p/{pppp}/contacts/{contact}
//! p/{pppp}/deliveries/{id}             deliveries with their attempt log
//! ```
//!
//! Partition numbers are zero-padded to four digits so keys sort by partition.

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

/// Returns the prefix of a partition's inbox.
pub fn inbox(partition: PartitionId) -> String {
    format!("p/{partition:04}/inbox/")
}

/// Returns the key of one inbox entry.
pub fn inbox_entry(partition: PartitionId, id: &str) -> String {
    format!("p/{partition:04}/inbox/{id}")
}

/// Returns the key each partition write stamps with `{node}/{epoch}`.
pub fn applied(partition: PartitionId) -> String {
    format!("p/{partition:04}/applied")
}

/// Returns the prefix of a partition's timers.
pub fn timers(partition: PartitionId) -> String {
    format!("p/{partition:04}/timers/")
}

/// Returns the key of a timer.
pub fn timer(partition: PartitionId, due_ms: i64, id: &str) -> String {
    format!("p/{partition:04}/timers/{:013}/{id}", due_ms.max(0))
}

/// Returns the first key after every timer due at or before `due_ms`.
pub fn timers_until(partition: PartitionId, due_ms: i64) -> String {
    format!("p/{partition:04}/timers/{:013}0", due_ms.max(0))
}

/// Parses the due time out of a timer key.
pub fn parse_timer_due(key: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(key).ok()?;
    let rest = text.split("/timers/").nth(1)?;
    rest.get(..13)?.parse().ok()
}

/// Returns the key of an idempotency record.
pub fn idempotency(key: &str) -> String {
    format!("idem/{key}")
}

/// Returns the partition that holds a contact's state.
pub fn partition_of(contact: &str, partitions: u32) -> PartitionId {
    // FNV-1a: stable across processes and versions, which placement requires.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in contact.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as PartitionId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_sort_by_due_time_and_parse_back() {
        let early = timer(3, 999, "b");
        let late = timer(3, 1000, "a");
        assert!(early < late);
        assert_eq!(parse_timer_due(late.as_bytes()), Some(1000));
        assert!(late < timers_until(3, 1000));
        assert!(timer(3, 1001, "a") > timers_until(3, 1000));
        assert_eq!(parse_owner(owner(12).as_bytes()), Some(12));
    }

    #[test]
    fn contacts_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(&format!("user-{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
