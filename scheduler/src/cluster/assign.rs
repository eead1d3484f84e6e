//! Which live node should own each partition: a pure function of the membership and the current
//! owners.
//!
//! Every node computes the same plan from the same view, so nodes agree without talking to each
//! other. The rules:
//!
//! 1. Each node may own at most `ceil(P / N)` partitions (the capacity).
//! 2. A partition stays with its current owner while that owner is live and within capacity;
//!    an owner over capacity keeps the partitions it ranks highest and gives up the rest.
//! 3. Every other partition goes to the live node with room that ranks highest for it by
//!    rendezvous hashing (highest `hash(node, partition)` first).
//!
//! Taking the current owners as input, rather than hashing membership alone, is what makes a
//! change move only what it must: when a node leaves, only its partitions move; when a node
//! joins, only the partitions above the new capacity move, and each moves once. Pure rendezvous
//! hashing cannot bound the load (64 partitions on 3 nodes can land 27/20/17), and bounded-load
//! hashing without the current owners can cascade moves across unrelated partitions.

use std::collections::BTreeMap;

/// A partition number.
pub type PartitionId = u32;

/// Returns the rendezvous score of `node` for `partition` (higher wins).
pub fn score(node: &str, partition: PartitionId) -> u64 {
    // FNV-1a over the node id and the partition, then a 64-bit finalizer so that similar ids
    // spread well. Stable across processes, platforms and versions: nodes must agree.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain(partition.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// Returns the most partitions one node may own.
pub fn capacity(partitions: u32, nodes: usize) -> usize {
    if nodes == 0 { 0 } else { (partitions as usize).div_ceil(nodes) }
}

/// Returns the owner each partition should have: index `p` holds the node for partition `p`,
/// or `None` when there are no live nodes. `current` maps partitions to their current owners
/// (owners that are not live are ignored).
pub fn plan(
    partitions: u32,
    live: &[String],
    current: &BTreeMap<PartitionId, String>,
) -> Vec<Option<String>> {
    let mut nodes: Vec<&str> = live.iter().map(String::as_str).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut target: Vec<Option<String>> = vec![None; partitions as usize];
    if nodes.is_empty() {
        return target;
    }
    let cap = capacity(partitions, nodes.len());
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (*n, 0)).collect();

    // Rule 2: owners keep their highest-ranked partitions up to capacity.
    let mut kept: BTreeMap<&str, Vec<PartitionId>> = BTreeMap::new();
    for (&partition, owner) in current {
        if partition < partitions && load.contains_key(owner.as_str()) {
            kept.entry(owner.as_str()).or_default().push(partition);
        }
    }
    for (owner, mut owned) in kept {
        owned.sort_by_key(|p| std::cmp::Reverse(score(owner, *p)));
        owned.truncate(cap);
        for partition in owned {
            target[partition as usize] = Some(owner.to_string());
        }
        if let Some(count) = load.get_mut(owner) {
            *count = target.iter().filter(|t| t.as_deref() == Some(owner)).count();
        }
    }

    // Rule 3: the rest go to the best-ranked node with room.
    for partition in 0..partitions {
        if target[partition as usize].is_some() {
            continue;
        }
        let best = nodes
            .iter()
            .filter(|n| load.get(**n).copied().unwrap_or(cap) < cap)
            .max_by_key(|n| (score(n, partition), std::cmp::Reverse(**n)));
        if let Some(node) = best {
            target[partition as usize] = Some((*node).to_string());
            if let Some(count) = load.get_mut(*node) {
                *count += 1;
            }
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owners(target: &[Option<String>]) -> BTreeMap<PartitionId, String> {
        target
            .iter()
            .enumerate()
            .filter_map(|(p, o)| o.clone().map(|o| (p as PartitionId, o)))
            .collect()
    }

    /// The plan reached from nothing, then re-planned until it no longer changes.
    fn settled(partitions: u32, nodes: &[String]) -> BTreeMap<PartitionId, String> {
        let mut current = BTreeMap::new();
        for _ in 0..4 {
            let next = owners(&plan(partitions, nodes, &current));
            if next == current {
                break;
            }
            current = next;
        }
        current
    }

    fn node_names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z]{1,6}-[0-9]{1,3}", 1..8)
            .prop_map(|set| set.into_iter().collect())
    }

    proptest! {
        #[test]
        fn deterministic_and_independent_of_order(partitions in 1u32..256, nodes in node_names()) {
            let current = settled(partitions, &nodes);
            let mut reversed = nodes.clone();
            reversed.reverse();
            prop_assert_eq!(plan(partitions, &nodes, &current), plan(partitions, &reversed, &current));
            prop_assert_eq!(plan(partitions, &nodes, &BTreeMap::new()), plan(partitions, &nodes, &BTreeMap::new()));
        }

        #[test]
        fn every_partition_owned_and_balanced(partitions in 1u32..256, nodes in node_names()) {
            let target = plan(partitions, &nodes, &BTreeMap::new());
            prop_assert!(target.iter().all(Option::is_some));
            let cap = capacity(partitions, nodes.len());
            for node in &nodes {
                let load = target.iter().filter(|t| t.as_deref() == Some(node.as_str())).count();
                prop_assert!(load <= cap, "{} owns {} > {}", node, load, cap);
                prop_assert!(load <= (partitions as usize).div_ceil(nodes.len()) + 1);
            }
        }

        #[test]
        fn a_settled_plan_is_a_fixed_point(partitions in 1u32..256, nodes in node_names()) {
            let current = settled(partitions, &nodes);
            prop_assert_eq!(owners(&plan(partitions, &nodes, &current)), current);
        }

        #[test]
        fn a_leave_moves_only_the_leavers_partitions(
            partitions in 1u32..256, nodes in node_names(), pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(nodes.len() >= 2);
            let before = settled(partitions, &nodes);
            let leaver = nodes[pick.index(nodes.len())].clone();
            let rest: Vec<String> = nodes.iter().filter(|n| **n != leaver).cloned().collect();
            let after = owners(&plan(partitions, &rest, &before));
            prop_assert_eq!(after.len(), partitions as usize);
            for (p, owner) in &before {
                if *owner != leaver {
                    prop_assert_eq!(after.get(p), Some(owner), "partition {} moved", p);
                }
            }
        }

        #[test]
        fn a_join_moves_only_the_excess(partitions in 1u32..256, nodes in node_names()) {
            let before = settled(partitions, &nodes);
            let mut joined = nodes.clone();
            joined.push("zz-new".into());
            let after = owners(&plan(partitions, &joined, &before));
            let cap = capacity(partitions, joined.len());
            let excess: usize = nodes
                .iter()
                .map(|n| before.values().filter(|o| *o == n).count().saturating_sub(cap))
                .sum();
            let moved = before.iter().filter(|(p, o)| after.get(p) != Some(o)).count();
            prop_assert_eq!(moved, excess);
            prop_assert_eq!(after.len(), partitions as usize);
        }
    }

    #[test]
    fn owners_that_are_not_live_are_ignored() {
        let current: BTreeMap<PartitionId, String> =
            (0..8).map(|p| (p, "gone".to_string())).collect();
        let target = plan(8, &["a".to_string()], &current);
        assert!(target.iter().all(|t| t.as_deref() == Some("a")));
    }

    #[test]
    fn no_nodes_means_no_owners() {
        assert!(plan(4, &[], &BTreeMap::new()).iter().all(Option::is_none));
    }
}
