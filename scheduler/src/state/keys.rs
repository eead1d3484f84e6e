//! The key-value layout of partition data (see the state layer's module documentation).

use crate::cluster::PartitionId;

pub fn applied(partition: PartitionId) -> String {
    format!("p/{partition:04}/applied")
}

pub fn inbox_prefix(partition: PartitionId) -> String {
    format!("p/{partition:04}/inbox/")
}

pub fn inbox_entry(partition: PartitionId, id: &str) -> String {
    format!("p/{partition:04}/inbox/{id}")
}

pub fn timers_prefix(partition: PartitionId) -> String {
    format!("p/{partition:04}/timers/")
}

pub fn timer(partition: PartitionId, due_ms: i64, id: &str) -> String {
    format!("p/{partition:04}/timers/{:013}/{id}", due_ms.max(0))
}

/// Returns the first key after every timer due at or before `due_ms`.
pub fn timers_until(partition: PartitionId, due_ms: i64) -> String {
    format!("p/{partition:04}/timers/{:013}0", due_ms.max(0))
}

/// Parses the due time and id out of a timer key.
pub fn parse_timer(key: &[u8]) -> Option<(i64, String)> {
    let text = std::str::from_utf8(key).ok()?;
    let rest = text.split("/timers/").nth(1)?;
    let due = rest.get(..13)?.parse().ok()?;
    let id = rest.get(14..)?.to_string();
    Some((due, id))
}

/// Parses the due time out of a timer key.
pub fn timer_due(key: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(key).ok()?;
    text.split("/timers/").nth(1)?.get(..13)?.parse().ok()
}

pub fn contacts_prefix(partition: PartitionId) -> String {
    format!("p/{partition:04}/contacts/")
}

pub fn contact(partition: PartitionId, id: &str) -> String {
    format!("p/{partition:04}/contacts/{id}")
}

pub fn deliveries_prefix(partition: PartitionId) -> String {
    format!("p/{partition:04}/deliveries/")
}

pub fn delivery(partition: PartitionId, id: &str) -> String {
    format!("p/{partition:04}/deliveries/{id}")
}

pub fn contact_standings_prefix(partition: PartitionId, contact: &str) -> String {
    format!("p/{partition:04}/status/{contact}/")
}

pub fn standing(partition: PartitionId, contact: &str, campaign: &str) -> String {
    format!("p/{partition:04}/status/{contact}/{campaign}")
}

pub fn run(campaign: &str, run: &str) -> String {
    format!("runs/{campaign}/{run}")
}

pub fn shard(campaign: &str, run: &str, partition: PartitionId) -> String {
    format!("shards/{campaign}/{run}/{partition:04}")
}

pub fn run_shards_prefix(campaign: &str, run: &str) -> String {
    format!("shards/{campaign}/{run}/")
}

pub fn idempotency(key: &str) -> String {
    format!("idem/{key}")
}

/// Returns the partition that holds a contact's state (or a campaign's interval timer).
pub fn partition_of(id: &str, partitions: u32) -> PartitionId {
    // FNV-1a: stable across processes and versions, which placement requires.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
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
        assert_eq!(timer_due(late.as_bytes()), Some(1000));
        assert_eq!(parse_timer(late.as_bytes()), Some((1000, "a".to_string())));
        assert!(late < timers_until(3, 1000));
        assert!(timer(3, 1001, "a") > timers_until(3, 1000));
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
