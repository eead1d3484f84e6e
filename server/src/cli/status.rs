//! `tidings status`: the nodes, the partitions each owns, backlogs, timers and the deliveries
//! of the last minute.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use tidings_client::v1::{DeliveryFilter, DeliveryStatus};

use super::remote::{Format, Remote, Table, count, print_json};

/// Deliveries counted for the last minute at most: the count stops there, printed with a `+`.
const COUNTED: usize = 10_000;

pub(crate) async fn status(remote: Remote) -> anyhow::Result<()> {
    let client = remote.connect().await?;
    let nodes = client.cluster().nodes().await?;
    let partitions = client.cluster().partitions().await?;
    let since = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    let recent: Vec<_> = client
        .deliveries()
        .list(DeliveryFilter { start_time: Some(since.into()), ..Default::default() })
        .page_size(1000)
        .stream()
        .take(COUNTED)
        .try_collect()
        .await?;
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    for delivery in &recent {
        let name = match delivery.status() {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Skipped => "skipped",
            _ => "pending",
        };
        *by_status.entry(name).or_default() += 1;
    }
    let backlog: u64 = partitions.iter().map(|p| p.inbox_backlog).sum();
    let timers: u64 = partitions.iter().map(|p| p.pending_timers).sum();
    let owned = partitions.iter().filter(|p| !p.owner.is_empty()).count();
    let capped = recent.len() >= COUNTED;

    if remote.output == Format::Json {
        let nodes: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id,
                    "address": n.address,
                    "version": n.version,
                    "partitions": n.partitions.len(),
                    "lease_left_ms": n.lease_time_left.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "nodes": nodes,
            "partitions": partitions.len(),
            "owned_partitions": owned,
            "inbox_backlog": backlog,
            "pending_timers": timers,
            "deliveries_last_minute": {
                "total": recent.len(),
                "capped": capped,
                "by_status": by_status,
            },
        }));
        return Ok(());
    }
    let mut table = Table::new(["NODE", "ADDRESS", "PARTITIONS", "LEASE LEFT", "VERSION"]);
    for node in &nodes {
        table.row(vec![
            node.id.clone(),
            node.address.clone(),
            node.partitions.len().to_string(),
            super::remote::millis(node.lease_time_left.as_ref()),
            node.version.clone(),
        ]);
    }
    table.print();
    println!();
    println!("partitions  {} ({} owned)", partitions.len(), owned);
    println!("backlog     {} events waiting in inboxes", count(backlog));
    println!("timers      {} pending", count(timers));
    let breakdown: Vec<String> =
        by_status.iter().map(|(k, v)| format!("{} {k}", count(*v))).collect();
    println!(
        "deliveries  {}{} in the last minute{}",
        count(recent.len() as u64),
        if capped { "+" } else { "" },
        if breakdown.is_empty() { String::new() } else { format!(" ({})", breakdown.join(", ")) }
    );
    Ok(())
}
