//! The overview: this node's attempts over the last hour, the backlog, nodes and partitions.

use std::sync::Arc;

use axum::extract::State;
use maud::html;
use tidings_api::v1 as pb;
use tidings_api::v1::cluster_service_server::ClusterService;

use super::view::{self, Area};
use super::{Console, Page, Who, method};

pub(crate) async fn page(State(console): State<Arc<Console>>, who: Who) -> Page {
    let nodes = console
        .call(
            &who,
            &method("ClusterService", "ListNodes"),
            console.api.cluster.list_nodes(tonic::Request::new(pb::ListNodesRequest {})),
        )
        .await?
        .nodes;
    let partitions = console
        .call(
            &who,
            &method("ClusterService", "ListPartitions"),
            console.api.cluster.list_partitions(tonic::Request::new(pb::ListPartitionsRequest {})),
        )
        .await?
        .partitions;
    let now = tidings_scheduler::now_ms();
    let hour = console.api.dispatcher.pulse().hour(now);
    let label = |start_ms: i64| {
        chrono::DateTime::from_timestamp_millis(start_ms)
            .map(|t| t.format("%H:%M").to_string())
            .unwrap_or_default()
    };
    let rate: Vec<_> = hour.iter().map(|m| (label(m.start_ms), Some(m.per_second()))).collect();
    let success: Vec<_> =
        hour.iter().map(|m| (label(m.start_ms), m.success_rate().map(|r| r * 100.0))).collect();
    let latency: Vec<_> =
        hour.iter().map(|m| (label(m.start_ms), m.p95_ms.map(|v| v as f64))).collect();
    let attempts: u64 = hour.iter().map(|m| m.attempts).sum();
    let succeeded: u64 = hour.iter().map(|m| m.succeeded).sum();
    let timers: u64 = partitions.iter().map(|p| p.pending_timers).sum();
    let inbox: u64 = partitions.iter().map(|p| p.inbox_backlog).sum();
    let unowned = partitions.iter().filter(|p| p.owner.is_empty()).count();
    let body = html! {
        section.cards aria-label="Figures" {
            div.card { span.figure { (attempts) } span { "attempts in the last hour" } }
            div.card { span.figure { @if attempts > 0 { (format!("{:.1}%", succeeded as f64 * 100.0 / attempts as f64)) } @else { "–" } } span { "succeeded" } }
            div.card { span.figure #backlog { (timers) } span { "timers waiting (retries, follow-ups, schedules)" } }
            div.card { span.figure { (inbox) } span { "events not yet processed" } }
            div.card { span.figure { (nodes.len()) } span { "nodes" } }
            div.card.bad[unowned > 0] { span.figure { (partitions.len() - unowned) "/" (partitions.len()) } span { "partitions owned" } }
        }
        p.hint { "Charts show the attempts this node made, minute by minute; each node shows its own." }
        div.charts {
            (view::chart("Attempts per second", &rate, None, |v| format!("{v:.2}/s")))
            (view::chart("Success rate", &success, Some(100.0), |v| format!("{v:.1}%")))
            (view::chart("Latency, 95th percentile", &latency, None, |v| format!("≤ {v:.0} ms")))
        }
        h2 { "Nodes" }
        div.scroll {
            table {
                thead { tr { th { "Node" } th { "Address" } th { "Version" } th { "Partitions" } th { "Lease left" } } }
                tbody {
                    @for node in &nodes {
                        tr {
                            td { code { (node.id) } }
                            td { (node.address) }
                            td { (node.version) }
                            td { (node.partitions.len()) }
                            td { (view::duration(node.lease_time_left.as_ref())) }
                        }
                    }
                }
            }
        }
        h2 { "Partitions" }
        div.scroll {
            table {
                thead { tr { th { "Partition" } th { "Owner" } th { "Epoch" } th { "Timers" } th { "Inbox" } } }
                tbody {
                    @for p in &partitions {
                        tr {
                            td { (p.id) }
                            td { @if p.owner.is_empty() { (view::badge("unowned")) } @else { code { (p.owner) } } }
                            td { (p.epoch) }
                            td { (p.pending_timers) }
                            td { (p.inbox_backlog) }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&who, Area::Overview, "Overview", body))
}
