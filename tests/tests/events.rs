//! EventService: validation, idempotency, durability and consumption.

use std::time::Duration;

use tidings_client::prost_types::{Struct, Value, value::Kind};
use tidings_client::tonic::Code;
use tidings_client::v1::{Event, ListPartitionsRequest, PublishBatchRequest, PublishRequest};
use tidings_tests::{NodeOptions, NodeProcess, wait_until};
use tonic_types::StatusExt;

fn event(contact: &str) -> Event {
    Event { r#type: "order.shipped".into(), contact_id: contact.into(), ..Default::default() }
}

fn fields(status: &tidings_client::tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn backlog(node: &NodeProcess) -> Option<u64> {
    let mut cluster = node.cluster().await.ok()?;
    let partitions = cluster.list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
    Some(partitions.partitions.iter().map(|p| p.inbox_backlog).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_refused_naming_the_field() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let mut api = node.events().await.expect("client");
    let big = Struct {
        fields: [("blob".to_string(), Value { kind: Some(Kind::StringValue("x".repeat(70_000))) })]
            .into(),
    };
    let cases = [
        ("event.contact_id", event("")),
        ("event.contact_id", event("has space")),
        ("event.type", Event { r#type: String::new(), ..event("u1") }),
        ("event.type", Event { r#type: "no spaces allowed".into(), ..event("u1") }),
        ("event.data", Event { data: Some(big), ..event("u1") }),
        ("event.idempotency_key", Event { idempotency_key: "k".repeat(300), ..event("u1") }),
    ];
    for (field, event) in cases {
        let status = api.publish(PublishRequest { event: Some(event) }).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(fields(&status), vec![field.to_string()], "{}", status.message());
    }
    let status = api.publish(PublishRequest { event: None }).await.expect_err("no event");
    assert_eq!(fields(&status), vec!["event".to_string()]);

    let status =
        api.publish_batch(PublishBatchRequest { events: vec![] }).await.expect_err("empty");
    assert_eq!(fields(&status), vec!["events".to_string()]);
    let results = api
        .publish_batch(PublishBatchRequest { events: vec![event("a"), event(""), event("c")] })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert!(!results[0].event_id.is_empty() && results[0].error.is_empty());
    assert!(results[1].event_id.is_empty());
    assert!(results[1].error.contains("events[1].contact_id"), "{}", results[1].error);
    assert!(!results[2].event_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_survive_restarts_and_events_are_consumed() {
    let data = tempfile::tempdir().expect("temp dir");
    let options = NodeOptions { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    let mut api = node.events().await.expect("client");
    let keyed = Event { idempotency_key: "order-42-shipped".into(), ..event("u42") };
    let first = api.publish(PublishRequest { event: Some(keyed.clone()) }).await.expect("first");
    let first = first.into_inner();
    assert!(!first.duplicate);
    let again = api.publish(PublishRequest { event: Some(keyed.clone()) }).await.expect("again");
    assert_eq!(again.get_ref().event_id, first.event_id);
    assert!(again.get_ref().duplicate);

    // Accepted events are durable: a kill -9 right after Publish loses none of them.
    let batch: Vec<Event> = (0..500).map(|i| event(&format!("user-{i}"))).collect();
    api.publish_batch(PublishBatchRequest { events: batch }).await.expect("batch");
    node.kill();
    let node = NodeProcess::start(options).await.expect("restart");
    let mut api = node.events().await.expect("client");
    let again = api.publish(PublishRequest { event: Some(keyed) }).await.expect("after restart");
    assert_eq!(again.get_ref().event_id, first.event_id, "the key outlives the process");
    wait_until("every accepted event to be consumed", Duration::from_secs(20), || async {
        (backlog(&node).await? == 0).then_some(())
    })
    .await
    .expect("consumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_idempotency_keys_accepts_each_key_once() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let mut api = node.events().await.expect("client");
    let keyed = |key: &str| Event { idempotency_key: key.into(), ..event("u1") };
    let first = api
        .publish_batch(PublishBatchRequest { events: vec![keyed("a"), keyed("b"), event("u2")] })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert!(first.iter().all(|r| !r.duplicate && !r.event_id.is_empty()));
    let second = api
        .publish_batch(PublishBatchRequest { events: vec![keyed("b"), keyed("c"), keyed("c")] })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(second[0].event_id, first[1].event_id);
    assert!(second[0].duplicate);
    assert!(!second[1].duplicate);
    assert_eq!(
        second[2].event_id, second[1].event_id,
        "a key repeated in one batch is accepted once"
    );
    assert!(second[2].duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_expire_and_are_swept() {
    use tidings_scheduler::inbox::IdempotencyRecord;
    use tidings_scheduler::state::Key;
    let etcd = tidings_tests::Etcd::start().await.expect("etcd");
    let prefix = tidings_tests::unique_prefix();
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        env: vec![("TIDINGS_EVENTS__IDEMPOTENCY_RETENTION".into(), "1s".into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut api = node.events().await.expect("client");
    let keyed = Event { idempotency_key: "once".into(), ..event("u1") };
    let first = api
        .publish(PublishRequest { event: Some(keyed.clone()) })
        .await
        .expect("first")
        .into_inner();
    let state = tidings_tests::cluster_state(&etcd.endpoint(), &prefix).await.expect("state");
    let key = Key::Idempotency { key: "once".into() };
    let stored = state.versioned::<IdempotencyRecord>(&key).await.expect("read");
    assert!(stored.is_some());
    wait_until("the expired key to be swept", Duration::from_secs(20), || async {
        let stored = state.versioned::<IdempotencyRecord>(&key).await.ok()?;
        stored.is_none().then_some(())
    })
    .await
    .expect("swept");
    let again =
        api.publish(PublishRequest { event: Some(keyed) }).await.expect("again").into_inner();
    assert!(!again.duplicate, "past the retention the key is new again");
    assert_ne!(again.event_id, first.event_id);
}

/// An event that more campaigns send for than one etcd transaction can hold (each send takes
/// two or three writes, and etcd allows 128) is handled over several transactions: every
/// campaign sends exactly once, and the partition is never refused a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_eighty_campaigns_sends_eighty_times() {
    use tidings_client::v1::{Campaign, EventTrigger, Webhook, trigger::Kind as TriggerKind};
    use tidings_tests::{Etcd, Receiver, setup, unique_prefix};
    let etcd = Etcd::start().await.expect("etcd");
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(unique_prefix()),
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let receiver = Receiver::start().await.expect("receiver");
    for i in 0..80 {
        let id = format!("c{i:02}");
        let hook = Webhook { url: receiver.url(&format!("/{id}")), ..Default::default() };
        setup::webhook(&node, &id, hook).await;
        let campaign = Campaign {
            webhook_id: id.clone(),
            trigger: setup::trigger(TriggerKind::Event(EventTrigger {
                event_type: "order.shipped".into(),
                filter: String::new(),
            })),
            ..Default::default()
        };
        setup::active_campaign(&node, &id, campaign).await;
    }
    let mut events = node.events().await.expect("client");
    events.publish(PublishRequest { event: Some(event("u1")) }).await.expect("publish");
    receiver.wait_for(80, Duration::from_secs(20)).await.expect("eighty deliveries");
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    let mut paths: Vec<String> = receiver.received().into_iter().map(|r| r.path).collect();
    paths.sort();
    let expected: Vec<String> = (0..80).map(|i| format!("/c{i:02}")).collect();
    assert_eq!(paths, expected, "each campaign once");
    assert!(!node.logs().contains("partition write refused"), "{}", node.logs());
}
