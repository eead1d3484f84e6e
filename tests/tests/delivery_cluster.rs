//! Delivery across node processes on a real etcd: the rate limit holds across the cluster, a
//! delivery in flight on a killed node is attempted again by the new owner with the same
//! webhook-id, and circuits open and close.

use std::time::{Duration, Instant};

use tidings_client::prost_types::Duration as PbDuration;
use tidings_client::v1::{
    Campaign, CreateWebhookRequest, Event, EventTrigger, PublishBatchRequest, PublishRequest,
    RetryPolicy, Trigger, Webhook, trigger::Kind,
};
use tidings_scheduler::store::Store;
use tidings_tests::{
    Etcd, NodeOptions, NodeProcess, Receiver, Reply, setup, unique_prefix, wait_until,
};

fn options(etcd: &Etcd, prefix: &str, id: &str, extra: &[(&str, &str)]) -> NodeOptions {
    let mut env = vec![
        ("TIDINGS_CLUSTER__LEASE_TTL".to_string(), "2s".to_string()),
        ("TIDINGS_DELIVERY__ALLOW_NETWORKS".to_string(), r#"["127.0.0.1/32"]"#.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.to_string()),
        args: vec!["--node-id".into(), id.into()],
        env,
        ..Default::default()
    }
}

async fn setup(node: &NodeProcess, webhook: Webhook) {
    let mut webhooks = node.webhooks().await.expect("client");
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "hook".into(), webhook: Some(webhook) })
        .await
        .expect("webhook");
    let campaign = Campaign {
        webhook_id: "hook".into(),
        trigger: Some(Trigger {
            kind: Some(Kind::Event(EventTrigger {
                event_type: "go".into(),
                filter: String::new(),
            })),
        }),
        ..Default::default()
    };
    setup::active_campaign(node, "c", campaign).await;
    // The nodes' definition caches follow the store through a watch.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_three_nodes() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            NodeProcess::start(options(&etcd, &prefix, &format!("n{i}"), &[])).await.expect("node"),
        );
    }
    setup::settled(&store, 3).await;
    let receiver = Receiver::start().await.expect("receiver");
    let rate = 20.0;
    setup(
        &nodes[0],
        Webhook { url: receiver.url("/limited"), rate_limit: rate, ..Default::default() },
    )
    .await;
    let total = 120;
    let mut events = nodes[1].events().await.expect("client");
    let batch = (0..total)
        .map(|i| Event {
            r#type: "go".into(),
            contact_id: format!("contact-{i}"),
            ..Default::default()
        })
        .collect();
    events.publish_batch(PublishBatchRequest { events: batch }).await.expect("publish");
    let received = receiver.wait_for(total, Duration::from_secs(60)).await.expect("all arrive");
    let times: Vec<Instant> = received.iter().map(|r| r.at).collect();
    let mut worst = 0;
    for (i, start) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        worst = worst.max(within);
    }
    let span = times.last().expect("some").duration_since(times[0]);
    println!("{total} requests at {rate}/s across 3 nodes: busiest second {worst}, span {span:?}");
    // Each node's bucket starts with one token: a burst of at most one request per node.
    assert!(worst as f64 <= rate + 4.0, "busiest second had {worst} requests");
    assert!(
        span.as_secs_f64() >= (total as f64 - rate - 4.0) / rate,
        "the whole load took {span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_in_flight_on_a_killed_node_is_retried_by_the_new_owner() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let mut nodes = Vec::new();
    for i in 0..2 {
        nodes.push(Some(
            NodeProcess::start(options(&etcd, &prefix, &format!("n{i}"), &[])).await.expect("node"),
        ));
    }
    setup::settled(&store, 2).await;
    let receiver = Receiver::start().await.expect("receiver");
    // The first request hangs until the node that sent it is dead; the next ones succeed.
    receiver.script([Reply::Delay(Duration::from_secs(30), 200)]);
    let webhook = Webhook {
        url: receiver.url("/slow"),
        timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
        retry_policy: Some(RetryPolicy {
            delays: vec![PbDuration { seconds: 0, nanos: 0 }],
            jitter: None,
        }),
        ..Default::default()
    };
    let any = nodes.iter().flatten().next().expect("a node");
    setup(any, webhook).await;
    let contact = "the-contact";
    let partition = tidings_scheduler::state::partition_of(contact, 64);
    let owner =
        store.get(format!("owners/{partition:04}").as_bytes()).await.expect("read").expect("owned");
    let owner = String::from_utf8_lossy(&owner.value).into_owned();
    let mut events = any.events().await.expect("client");
    events
        .publish(PublishRequest {
            event: Some(Event {
                r#type: "go".into(),
                contact_id: contact.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("publish");
    let first =
        receiver.wait_for(1, Duration::from_secs(15)).await.expect("first attempt")[0].clone();
    let index: usize = owner.trim_start_matches('n').parse().expect("node index");
    if let Some(mut node) = nodes[index].take() {
        node.kill();
    }
    let killed = std::time::Instant::now();
    // The new owner attempts it again: from the inbox when the node died before recording the
    // dispatch (it waits up to 20 ms for a quick answer first), else when the attempt's
    // visibility timer fires.
    let again = receiver.wait_for(2, Duration::from_secs(40)).await.expect("attempted again");
    assert_eq!(again[1].header("webhook-id"), first.header("webhook-id"), "the same webhook-id");
    assert!(again[1].at >= killed, "made by the new owner, after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_handoff_records_the_attempts_in_flight_instead_of_sending_them_again() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let mut leaving = NodeProcess::start(options(&etcd, &prefix, "n0", &[])).await.expect("node");
    let staying = NodeProcess::start(options(&etcd, &prefix, "n1", &[])).await.expect("node");
    setup::settled(&store, 2).await;
    let receiver = Receiver::start().await.expect("receiver");
    // Every answer takes a second, so attempts are in flight on both nodes when n0 leaves.
    receiver.default_reply(Reply::Delay(Duration::from_secs(1), 200));
    let webhook = Webhook {
        url: receiver.url("/slow?c={{ contact.id }}"),
        timeout: Some(PbDuration { seconds: 3, nanos: 0 }),
        ..Default::default()
    };
    setup(&staying, webhook).await;
    const CONTACTS: usize = 40;
    let events = (0..CONTACTS)
        .map(|i| Event { r#type: "go".into(), contact_id: format!("c{i}"), ..Default::default() })
        .collect();
    let mut publisher = staying.events().await.expect("client");
    publisher.publish_batch(PublishBatchRequest { events }).await.expect("publish");
    receiver.wait_for(1, Duration::from_secs(15)).await.expect("attempts under way");
    leaving.terminate().await.expect("n0 leaves gracefully");

    // Every contact's delivery arrives; once n1 is quiet (no inbox entry, no timer: no
    // attempt waits to be made again) nothing more will.
    wait_until("a delivery to every contact", Duration::from_secs(30), || async {
        let contacts: std::collections::BTreeSet<String> =
            receiver.received().into_iter().map(|r| r.path).collect();
        (contacts.len() == CONTACTS).then_some(())
    })
    .await
    .expect("all delivered");
    staying.quiet(Duration::from_secs(60)).await.expect("quiet");
    let mut per_id: std::collections::BTreeMap<String, usize> = Default::default();
    for request in receiver.received() {
        *per_id.entry(request.header("webhook-id").unwrap_or_default().to_string()).or_default() +=
            1;
    }
    let again: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(again.is_empty(), "sent again after the handoff: {again:?}");
    assert_eq!(per_id.len(), CONTACTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_opens_its_circuit_and_a_probe_closes_it() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let node = NodeProcess::start(options(
        &etcd,
        &prefix,
        "n0",
        &[
            ("TIDINGS_DELIVERY__CIRCUIT_THRESHOLD", "3"),
            ("TIDINGS_DELIVERY__CIRCUIT_COOLDOWN", "2s"),
        ],
    ))
    .await
    .expect("node");
    let receiver = Receiver::start().await.expect("receiver");
    receiver.default_reply(Reply::Status(500));
    let webhook = Webhook {
        url: receiver.url("/down"),
        max_in_flight: 1,
        retry_policy: Some(RetryPolicy {
            delays: (0..10).map(|_| PbDuration { seconds: 0, nanos: 100_000_000 }).collect(),
            jitter: Some(0.0),
        }),
        ..Default::default()
    };
    setup(&node, webhook).await;
    let mut events = node.events().await.expect("client");
    let batch = (0..10)
        .map(|i| Event { r#type: "go".into(), contact_id: format!("u{i}"), ..Default::default() })
        .collect();
    events.publish_batch(PublishBatchRequest { events: batch }).await.expect("publish");
    receiver.wait_for(3, Duration::from_secs(10)).await.expect("failures");
    wait_until("the circuit to open", Duration::from_secs(10), || async {
        node.logs().contains("circuit opened").then_some(())
    })
    .await
    .expect("opened");
    // While open, nothing reaches the endpoint until the cooldown ends.
    let at_open = receiver.received().len();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let during = receiver.received().len() - at_open;
    assert!(during <= 1, "{during} requests while the circuit was open");
    receiver.default_reply(Reply::Status(200));
    wait_until("a probe to close the circuit", Duration::from_secs(20), || async {
        node.logs().contains("circuit closed").then_some(())
    })
    .await
    .expect("closed");
    let state = tidings_tests::cluster_state(&etcd.endpoint(), &prefix).await.expect("state");
    wait_until("every delivery to succeed", Duration::from_secs(30), || async {
        let filter = tidings_scheduler::state::DeliveryFilter {
            status: Some(tidings_scheduler::delivery::record::Status::Delivered),
            ..Default::default()
        };
        let (found, _) = state.deliveries(&filter, (0, None), 64, 100).await.ok()?;
        let delivered = found.len();
        (delivered == 10).then_some(())
    })
    .await
    .expect("all delivered");
}
