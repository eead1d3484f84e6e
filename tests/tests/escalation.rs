//! The escalation chain from the product brief, on three node processes and a real etcd: an
//! urgent email webhook; if it is not clicked within D, an SMS webhook; if that is not actioned
//! within D, a call-center webhook. A node is killed in the middle of a wait.

use std::time::Duration;

use tidings_client::EventServiceClient;
use tidings_client::prost_types::Duration as PbDuration;
use tidings_client::v1::{
    Campaign, DeliveryStatus, Event, EventTrigger, FollowUpTrigger, PublishRequest,
    RecordInteractionRequest, Webhook, trigger::Kind,
};
use tidings_scheduler::store::Store;
use tidings_tests::{Etcd, NodeOptions, NodeProcess, Receiver, setup, unique_prefix, wait_until};

const WAIT_SECONDS: i64 = 3;

fn options(etcd: &Etcd, prefix: &str, id: &str) -> NodeOptions {
    NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.to_string()),
        args: vec!["--node-id".into(), id.into()],
        env: vec![
            ("TIDINGS_CLUSTER__LEASE_TTL".into(), "2s".into()),
            ("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into()),
        ],
        ..Default::default()
    }
}

fn follow_up(after: &str, unless: &str) -> Kind {
    Kind::FollowUp(FollowUpTrigger {
        after_campaign_id: after.into(),
        on_status: vec![DeliveryStatus::Delivered as i32],
        delay: Some(PbDuration { seconds: WAIT_SECONDS, nanos: 0 }),
        unless_interactions: vec![unless.into()],
    })
}

/// Returns the requests the receiver got on `path` for `contact`.
fn hits(receiver: &Receiver, path: &str, contact: &str) -> Vec<tidings_tests::Received> {
    let wanted = format!("{path}?c={contact}");
    receiver.received().into_iter().filter(|r| r.path == wanted).collect()
}

async fn arrival(receiver: &Receiver, path: &str, contact: &str) -> tidings_tests::Received {
    wait_until(&format!("{path} for {contact}"), Duration::from_secs(40), || async {
        hits(receiver, path, contact).into_iter().next()
    })
    .await
    .expect("arrives")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_then_sms_then_call_unless_the_contact_acts() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Some(
            NodeProcess::start(options(&etcd, &prefix, &format!("n{i}"))).await.expect("node"),
        ));
    }
    let receiver = Receiver::start().await.expect("receiver");
    let node = nodes[2].as_ref().expect("node");

    for (id, kind) in [
        (
            "email",
            Kind::Event(EventTrigger { event_type: "alert.urgent".into(), filter: String::new() }),
        ),
        ("sms", follow_up("email", "clicked")),
        ("call", follow_up("sms", "actioned")),
    ] {
        // A short timeout keeps the visibility timer of an attempt lost in the kill short.
        let webhook = Webhook {
            url: receiver.url(&format!("/{id}?c={{{{ contact.id }}}}")),
            timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
            ..Default::default()
        };
        setup::webhook(node, id, webhook).await;
        let campaign =
            Campaign { webhook_id: id.into(), trigger: setup::trigger(kind), ..Default::default() };
        setup::active_campaign(node, id, campaign).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut events = EventServiceClient::connect(node.url()).await.expect("client");
    for contact in ["ignores-all", "clicks-email", "acts-on-sms"] {
        let event = Event {
            r#type: "alert.urgent".into(),
            contact_id: contact.into(),
            ..Default::default()
        };
        events.publish(PublishRequest { event: Some(event) }).await.expect("publish");
    }

    // The contact who clicks the email: the receiver reports it by the delivery's webhook-id.
    let email = arrival(&receiver, "/email", "clicks-email").await;
    let delivery_id = email.header("webhook-id").expect("webhook-id").to_string();
    events
        .record_interaction(RecordInteractionRequest {
            delivery_id,
            kind: "clicked".into(),
            ..Default::default()
        })
        .await
        .expect("click");

    // Kill the owner of the first contact's partition while its SMS wait runs.
    let first = arrival(&receiver, "/email", "ignores-all").await;
    let partition = tidings_scheduler::state::partition_of("ignores-all", 64);
    let owner =
        store.get(format!("owners/{partition:04}").as_bytes()).await.expect("read").expect("owned");
    let index: usize =
        String::from_utf8_lossy(&owner.value).trim_start_matches('n').parse().expect("index");
    if let Some(mut victim) = nodes[index].take() {
        victim.kill();
    }
    let survivor = nodes.iter().flatten().next().expect("a survivor");
    let mut events = EventServiceClient::connect(survivor.url()).await.expect("client");

    // The contact who acts on the SMS: reported by campaign and contact.
    arrival(&receiver, "/sms", "acts-on-sms").await;
    events
        .record_interaction(RecordInteractionRequest {
            campaign_id: "sms".into(),
            contact_id: "acts-on-sms".into(),
            kind: "actioned".into(),
            ..Default::default()
        })
        .await
        .expect("action");

    // The contact who ignores everything gets the whole chain, each step after the wait.
    let sms = arrival(&receiver, "/sms", "ignores-all").await;
    let call = arrival(&receiver, "/call", "ignores-all").await;
    let wait = Duration::from_secs(WAIT_SECONDS as u64);
    assert!(
        sms.at.duration_since(first.at) >= wait,
        "the SMS waited {:?}",
        sms.at.duration_since(first.at)
    );
    assert!(
        call.at.duration_since(sms.at) >= wait,
        "the call waited {:?}",
        call.at.duration_since(sms.at)
    );

    // Give the stopped chains time to have fired if they were going to.
    tokio::time::sleep(wait + Duration::from_secs(3)).await;
    assert!(hits(&receiver, "/sms", "clicks-email").is_empty(), "a click stops the chain");
    assert!(hits(&receiver, "/call", "clicks-email").is_empty());
    assert!(hits(&receiver, "/call", "acts-on-sms").is_empty(), "an action stops the chain");
    for (path, contact) in [
        ("/email", "ignores-all"),
        ("/sms", "ignores-all"),
        ("/call", "ignores-all"),
        ("/email", "clicks-email"),
        ("/sms", "acts-on-sms"),
    ] {
        // A retry after the kill may repeat a request, always with the same webhook-id.
        let mut ids: Vec<String> = hits(&receiver, path, contact)
            .iter()
            .filter_map(|r| r.header("webhook-id").map(String::from))
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 1, "{path} for {contact}: one delivery");
    }
}

/// A node that stops after sending a delivery but before recording it leaves its event in the
/// inbox; a click on that delivery reported meanwhile lands behind it. The next owner handles
/// both in order: the click is not lost for naming a delivery its event creates, and the
/// follow-up it cancels is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_queued_behind_its_event_stops_the_chain() {
    use std::sync::Arc;
    use tidings_scheduler::app::{Ingest, Publish};
    use tidings_scheduler::inbox::{Event as Queued, InboxEntry};

    let data = tempfile::tempdir().expect("temp dir");
    let options = NodeOptions {
        data_dir: Some(data.path().to_path_buf()),
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let receiver = Receiver::start().await.expect("receiver");
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    for (id, kind) in [
        (
            "email",
            Kind::Event(EventTrigger { event_type: "alert.urgent".into(), filter: String::new() }),
        ),
        ("sms", follow_up("email", "clicked")),
    ] {
        let webhook = Webhook {
            url: receiver.url(&format!("/{id}?c={{{{ contact.id }}}}")),
            ..Default::default()
        };
        setup::webhook(&node, id, webhook).await;
        let campaign =
            Campaign { webhook_id: id.into(), trigger: setup::trigger(kind), ..Default::default() };
        setup::active_campaign(&node, id, campaign).await;
    }
    node.terminate().await.expect("stop");

    // What the stopped node left: the event, and behind it a click on the delivery it makes
    // (an embedded node has 8 partitions).
    {
        let store =
            tidings_scheduler::store::EmbeddedStore::open(&data.path().join("tidings.redb"))
                .expect("store");
        let state = tidings_scheduler::state::State::new(Arc::new(store));
        let ingest = Ingest::new(state, 8, Duration::from_secs(3600));
        let now = tidings_scheduler::now_ms();
        let contact = "clicks-early";
        let event = Queued {
            id: tidings_scheduler::inbox::new_id("evt"),
            kind: "alert.urgent".into(),
            contact_id: contact.into(),
            data: Default::default(),
            occurred_ms: now,
            accepted_ms: now,
            resume_after: None,
            exits_after: None,
            traceparent: String::new(),
        };
        let partition = ingest.partition_of(contact);
        let delivery = tidings_scheduler::delivery::record::derived_id(
            partition,
            now,
            &format!("e/{}/email", event.id),
        );
        ingest.publish(&Publish { event, idempotency_key: String::new() }).await.expect("event");
        let click = InboxEntry::Interaction {
            contact: String::new(),
            campaign: String::new(),
            delivery,
            kind: "clicked".into(),
            at_ms: now + 1,
        };
        ingest.interaction(partition, click).await.expect("click");
    }

    let _node = NodeProcess::start(options).await.expect("restart");
    arrival(&receiver, "/email", "clicks-early").await;
    tokio::time::sleep(Duration::from_secs(WAIT_SECONDS as u64 + 3)).await;
    assert!(hits(&receiver, "/sms", "clicks-early").is_empty(), "the click stops the chain");
}
