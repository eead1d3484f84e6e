//! Reads fail closed: while every read of the store fails, partitions decide nothing, and once
//! reads work again nothing was lost, reset or sent wrongly.
//!
//! The node runs in this process on a [`FlakyStore`] around its embedded store. Reads fail for
//! longer than a node ever retried a read before giving up (about 16 s), while an interval
//! campaign's timer, a follow-up wait, a scheduled run and events for an unsubscribed contact
//! all fall due.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidings_client::prost_types::{Duration as PbDuration, Struct, Timestamp, Value, value};
use tidings_client::tonic::transport::Channel;
use tidings_client::v1::{
    ActivateCampaignRequest, Audience, Campaign, Contact, CreateCampaignRequest,
    CreateWebhookRequest, DeliveryStatus, Event, EventTrigger, FollowUpTrigger, GetRunRequest,
    IntervalTrigger, ListPartitionsRequest, OnDemandTrigger, PublishRequest, RunCampaignRequest,
    RunState, Trigger, UpsertContactRequest, Webhook, trigger::Kind,
};
use tidings_client::{
    CampaignServiceClient, ClusterServiceClient, ContactServiceClient, EventServiceClient,
    WebhookServiceClient,
};
use tidings_scheduler::store::{EmbeddedStore, Store};
use tidings_server::Node;
use tidings_server::config::{Config, Overrides};
use tidings_tests::faults::FlakyStore;
use tidings_tests::{Receiver, TEST_SECRETS_KEY, wait_until};

/// Longer than the read retries of earlier versions, which then acted on a default.
const OUTAGE: Duration = Duration::from_secs(17);

/// Members of the scheduled run's audience.
const RUN_AUDIENCE: usize = 40;

fn group(name: &str) -> Option<Struct> {
    let value = Value { kind: Some(value::Kind::StringValue(name.into())) };
    Some(Struct { fields: [("group".to_string(), value)].into() })
}

fn trigger(kind: Kind) -> Option<Trigger> {
    Some(Trigger { kind: Some(kind) })
}

fn hits(receiver: &Receiver, path: &str) -> Vec<String> {
    let prefix = format!("{path}?c=");
    receiver
        .received()
        .into_iter()
        .filter_map(|r| r.path.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn count(receiver: &Receiver, path: &str, contact: &str) -> usize {
    hits(receiver, path).iter().filter(|c| *c == contact).count()
}

/// Starts a node in this process on a [`FlakyStore`] around a new embedded store in `dir`;
/// returns the store (to inject faults), the node and its URL.
async fn flaky_node(
    dir: &std::path::Path,
    change: impl FnOnce(&mut Config),
) -> (Arc<FlakyStore>, Node, String) {
    let embedded: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.join("tidings.redb")).expect("store"));
    let flaky = FlakyStore::new(embedded);
    let node = start_node_with(flaky.clone(), dir, change).await;
    let url = format!("http://{}", node.addr());
    (flaky, node, url)
}

async fn start_node_with(
    store: Arc<dyn Store>,
    dir: &std::path::Path,
    change: impl FnOnce(&mut Config),
) -> Node {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.to_path_buf()),
        node_id: Some("faults".into()),
        ..Default::default()
    };
    let mut config = Config::load(None, &overrides).expect("config");
    config.delivery.allow_networks = vec!["127.0.0.1/32".into()];
    config.secrets.key = TEST_SECRETS_KEY.into();
    change(&mut config);
    Node::start_on(config, tidings_scheduler::coordination::Coordination::over(store))
        .await
        .expect("node")
}

async fn create(
    webhooks: &mut WebhookServiceClient<Channel>,
    campaigns: &mut CampaignServiceClient<Channel>,
    receiver: &Receiver,
    id: &str,
    campaign: Campaign,
) {
    let webhook = Webhook {
        url: receiver.url(&format!("/{id}?c={{{{ contact.id }}}}")),
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
        .await
        .expect("create webhook");
    let campaign = Campaign { webhook_id: id.into(), ..campaign };
    campaigns
        .create_campaign(CreateCampaignRequest { campaign_id: id.into(), campaign: Some(campaign) })
        .await
        .expect("create campaign");
    campaigns.activate_campaign(ActivateCampaignRequest { id: id.into() }).await.expect("activate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reads_lose_reset_and_misdirect_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (flaky, node, url) = flaky_node(dir.path(), |_| {}).await;
    let receiver = Receiver::start().await.expect("receiver");
    let mut webhooks = WebhookServiceClient::connect(url.clone()).await.expect("client");
    let mut campaigns = CampaignServiceClient::connect(url.clone()).await.expect("client");
    let mut contacts = ContactServiceClient::connect(url.clone()).await.expect("client");
    let mut events = EventServiceClient::connect(url.clone()).await.expect("client");
    let cluster = ClusterServiceClient::connect(url.clone()).await.expect("client");

    let mut people = vec![
        Contact { id: "alice".into(), attributes: group("tick"), ..Default::default() },
        Contact { id: "bob".into(), unsubscribed: true, ..Default::default() },
    ];
    people.extend((0..RUN_AUDIENCE).map(|i| Contact {
        id: format!("member-{i:02}"),
        attributes: group("run"),
        ..Default::default()
    }));
    for contact in people {
        contacts
            .upsert_contact(UpsertContactRequest { contact: Some(contact), etag: String::new() })
            .await
            .expect("upsert");
    }

    let audience = |filter: &str| Some(Audience { filter: filter.into(), ..Default::default() });
    let on_event = |event_type: &str| {
        trigger(Kind::Event(EventTrigger { event_type: event_type.into(), filter: String::new() }))
    };
    let every_second = trigger(Kind::Interval(IntervalTrigger {
        every: Some(PbDuration { seconds: 1, nanos: 0 }),
        ..Default::default()
    }));
    let follow_up = trigger(Kind::FollowUp(FollowUpTrigger {
        after_campaign_id: "email".into(),
        on_status: vec![DeliveryStatus::Delivered as i32],
        delay: Some(PbDuration { seconds: 2, nanos: 0 }),
        unless_interactions: vec!["clicked".into()],
    }));
    let on_demand = trigger(Kind::OnDemand(OnDemandTrigger::default()));
    let (w, c, r) = (&mut webhooks, &mut campaigns, &receiver);
    let tick = Campaign {
        trigger: every_second,
        audience: audience(r#"contact.attributes.group == "tick""#),
        ..Default::default()
    };
    create(w, c, r, "tick", tick).await;
    create(w, c, r, "email", Campaign { trigger: on_event("signup"), ..Default::default() }).await;
    create(w, c, r, "sms", Campaign { trigger: follow_up, ..Default::default() }).await;
    create(w, c, r, "notice", Campaign { trigger: on_event("notice"), ..Default::default() }).await;
    let batch = Campaign {
        trigger: on_demand,
        audience: audience(r#"contact.attributes.group == "run""#),
        ..Default::default()
    };
    create(w, c, r, "batch", batch).await;

    // Before the outage: the interval fires, and the email that starts the follow-up's wait
    // is delivered.
    wait_until("a first interval send", Duration::from_secs(20), || async {
        (count(&receiver, "/tick", "alice") > 0).then_some(())
    })
    .await
    .expect("interval fires");
    let event = |kind: &str, contact: &str| PublishRequest {
        event: Some(Event {
            r#type: kind.into(),
            contact_id: contact.into(),
            ..Default::default()
        }),
    };
    events.publish(event("signup", "alice")).await.expect("publish");
    wait_until("the email", Duration::from_secs(20), || async {
        (count(&receiver, "/email", "alice") > 0).then_some(())
    })
    .await
    .expect("email");
    let soon = std::time::SystemTime::now() + Duration::from_secs(3);
    let soon = soon.duration_since(std::time::UNIX_EPOCH).expect("clock");
    let run = campaigns
        .run_campaign(RunCampaignRequest {
            id: "batch".into(),
            scheduled_time: Some(Timestamp { seconds: soon.as_secs() as i64, nanos: 0 }),
            ..Default::default()
        })
        .await
        .expect("run")
        .into_inner();

    // The outage: the follow-up's wait ends, the run's time comes, the interval falls due, and
    // events arrive for a contact who unsubscribed and for one who did not.
    flaky.fail_reads(true);
    let outage = Instant::now();
    events.publish(event("notice", "bob")).await.expect("publish during the outage");
    events.publish(event("notice", "alice")).await.expect("publish during the outage");
    let ticks_before = count(&receiver, "/tick", "alice");
    let sent_before = receiver.received().len();
    tokio::time::sleep(OUTAGE).await;
    assert!(flaky.failed_reads() > 0, "the outage failed no read");
    assert!(
        count(&receiver, "/tick", "alice") <= ticks_before + 1,
        "interval runs went on without reading their campaign"
    );
    assert!(receiver.received().len() <= sent_before + 1, "sends decided without reads");
    flaky.fail_reads(false);
    let healed = Instant::now();
    eprintln!("reads failed for {:?}: {} failed reads", healed - outage, flaky.failed_reads());

    // After it: the follow-up is sent, the interval chain goes on, the run delivers to its
    // whole audience with exact counters, and the subscribed contact's event is sent.
    wait_until("the follow-up", Duration::from_secs(30), || async {
        (count(&receiver, "/sms", "alice") > 0).then_some(())
    })
    .await
    .expect("the follow-up wait survived the outage");
    wait_until("interval sends after the outage", Duration::from_secs(30), || async {
        (count(&receiver, "/tick", "alice") >= ticks_before + 3).then_some(())
    })
    .await
    .expect("the interval chain survived the outage");
    wait_until("the notice to alice", Duration::from_secs(30), || async {
        (count(&receiver, "/notice", "alice") > 0).then_some(())
    })
    .await
    .expect("alice's notice");
    let done = wait_until("the run to complete", Duration::from_secs(60), || {
        let mut campaigns = campaigns.clone();
        let request = GetRunRequest { campaign_id: "batch".into(), run_id: run.id.clone() };
        async move {
            let run = campaigns.get_run(request).await.ok()?.into_inner();
            (run.state == RunState::Completed as i32).then_some(run)
        }
    })
    .await
    .expect("the scheduled run survived the outage");
    assert_eq!(
        (done.audience, done.queued, done.delivered, done.failed),
        (RUN_AUDIENCE as u64, RUN_AUDIENCE as u64, RUN_AUDIENCE as u64, 0),
        "run counters: {done:?}"
    );
    let mut per_member: BTreeMap<String, usize> = BTreeMap::new();
    for contact in hits(&receiver, "/batch") {
        *per_member.entry(contact).or_default() += 1;
    }
    assert_eq!(per_member.len(), RUN_AUDIENCE, "run recipients: {per_member:?}");
    assert!(per_member.values().all(|n| *n == 1), "a member got the run twice: {per_member:?}");

    // Every inbox is empty: the unsubscribed contact's event was decided, and sent nothing.
    wait_until("every inbox to drain", Duration::from_secs(30), || {
        let mut cluster = cluster.clone();
        async move {
            let partitions =
                cluster.list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
            partitions.partitions.iter().all(|p| p.inbox_backlog == 0).then_some(())
        }
    })
    .await
    .expect("inboxes drain");
    assert_eq!(count(&receiver, "/notice", "bob"), 0, "an unsubscribed contact was sent to");
    assert_eq!(count(&receiver, "/email", "alice"), 1);
    assert_eq!(count(&receiver, "/sms", "alice"), 1);

    node.stop().await.expect("stop");
}

/// Returns one partition as ListPartitions shows it.
/// Waits until the partition of `contact` is owned, and returns it.
async fn owned_partition_of(cluster: &ClusterServiceClient<Channel>, contact: &str) -> u32 {
    let partition = tidings_scheduler::state::partition_of(contact, 8);
    wait_until("the partition to be owned", Duration::from_secs(20), || async {
        partition_state(cluster, partition).await.filter(|p| !p.owner.is_empty())
    })
    .await
    .expect("owned");
    partition
}

async fn partition_state(
    cluster: &ClusterServiceClient<Channel>,
    partition: u32,
) -> Option<tidings_client::v1::Partition> {
    let partitions =
        cluster.clone().list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
    partitions.partitions.into_iter().find(|p| p.id == partition)
}

/// A write the store refuses as invalid (as it refuses one too large) does not leave its
/// partition owned and idle: the owner releases it and claims it again only a lease's time
/// later, and once the store takes the writes, the event is delivered, under one webhook-id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_releases_the_partition_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (flaky, _node, url) = flaky_node(dir.path(), |config| {
        config.cluster.lease_ttl = Duration::from_secs(2);
    })
    .await;
    let receiver = Receiver::start().await.expect("receiver");
    let mut webhooks = WebhookServiceClient::connect(url.clone()).await.expect("client");
    let mut campaigns = CampaignServiceClient::connect(url.clone()).await.expect("client");
    let mut events = EventServiceClient::connect(url.clone()).await.expect("client");
    let on_event =
        trigger(Kind::Event(EventTrigger { event_type: "e".into(), filter: String::new() }));
    let campaign = Campaign { trigger: on_event, ..Default::default() };
    create(&mut webhooks, &mut campaigns, &receiver, "email", campaign).await;

    let cluster = ClusterServiceClient::connect(url.clone()).await.expect("client");
    let partition = owned_partition_of(&cluster, "c1").await;
    let state = || partition_state(&cluster, partition);
    flaky.refuse_partition_writes(true);
    let event = Event { r#type: "e".into(), contact_id: "c1".into(), ..Default::default() };
    events.publish(PublishRequest { event: Some(event) }).await.expect("publish");
    wait_until("the refused partition to be released", Duration::from_secs(20), || async {
        state().await.filter(|p| p.owner.is_empty())
    })
    .await
    .expect("released");

    flaky.refuse_partition_writes(false);
    wait_until("the event's delivery", Duration::from_secs(30), || async {
        state().await.filter(|p| {
            !p.owner.is_empty() && p.inbox_backlog == 0 && count(&receiver, "/email", "c1") > 0
        })
    })
    .await
    .expect("delivered");
    let ids: std::collections::BTreeSet<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(String::from))
        .collect();
    assert_eq!(ids.len(), 1, "one delivery, however often it was sent: {ids:?}");
}

/// A batch the store refuses for its size is taken again one entry at a time: the entries the
/// store takes alone go on, the one it refuses alone is set aside, and the partition keeps its
/// owner throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_store_refuses_alone_is_set_aside_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (flaky, _node, url) = flaky_node(dir.path(), |_| {}).await;
    let receiver = Receiver::start().await.expect("receiver");
    let mut webhooks = WebhookServiceClient::connect(url.clone()).await.expect("client");
    let mut campaigns = CampaignServiceClient::connect(url.clone()).await.expect("client");
    let mut events = EventServiceClient::connect(url.clone()).await.expect("client");
    let webhook = Webhook {
        url: receiver.url("/hook?n={{ event.data.n }}"),
        body: "{{ event.data | json }}".into(),
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "w".into(), webhook: Some(webhook) })
        .await
        .expect("create webhook");
    let on_event =
        trigger(Kind::Event(EventTrigger { event_type: "e".into(), filter: String::new() }));
    let campaign = Campaign { webhook_id: "w".into(), trigger: on_event, ..Default::default() };
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "c".into(),
            campaign: Some(campaign),
        })
        .await
        .expect("create campaign");
    campaigns
        .activate_campaign(ActivateCampaignRequest { id: "c".into() })
        .await
        .expect("activate");
    let cluster = ClusterServiceClient::connect(url.clone()).await.expect("client");
    let partition = owned_partition_of(&cluster, "c1").await;
    let state = || partition_state(&cluster, partition);

    // Three events of one contact, so one partition's inbox holds them together; the second
    // carries 40 KiB, and its delivery record makes any batch with it too large.
    flaky.refuse_partition_writes_over(32 * 1024);
    let event = |n: u32, blob: usize| {
        let mut fields = BTreeMap::new();
        fields.insert("n".to_string(), Value { kind: Some(value::Kind::NumberValue(n.into())) });
        fields.insert(
            "blob".to_string(),
            Value { kind: Some(value::Kind::StringValue("x".repeat(blob))) },
        );
        Event {
            r#type: "e".into(),
            contact_id: "c1".into(),
            data: Some(Struct { fields }),
            ..Default::default()
        }
    };
    let batch = vec![event(1, 10), event(2, 40 * 1024), event(3, 10)];
    events
        .publish_batch(tidings_client::v1::PublishBatchRequest { events: batch })
        .await
        .expect("publish");
    let sent = |n: &str| {
        let path = format!("/hook?n={n}");
        receiver.received().iter().filter(|r| r.path == path).count()
    };
    wait_until("the entries the store takes", Duration::from_secs(30), || async {
        state().await.filter(|p| p.inbox_backlog == 0 && sent("1") > 0 && sent("3") > 0)
    })
    .await
    .expect("delivered, the large one set aside");
    let owner = state().await.expect("partition").owner;
    assert!(!owner.is_empty(), "the partition kept its owner");

    // The partition goes on with what comes next.
    events.publish(PublishRequest { event: Some(event(4, 10)) }).await.expect("publish");
    wait_until("the next event", Duration::from_secs(20), || async {
        (sent("4") > 0).then_some(())
    })
    .await
    .expect("delivered");
    let deliveries =
        tidings_client::DeliveryServiceClient::connect(url.clone()).await.expect("client");
    let urls = wait_until("the deliveries recorded", Duration::from_secs(20), || {
        let mut deliveries = deliveries.clone();
        async move {
            let request =
                tidings_client::v1::ListDeliveriesRequest { page_size: 100, ..Default::default() };
            let listed = deliveries.list_deliveries(request).await.ok()?.into_inner().deliveries;
            let urls: Vec<String> =
                listed.into_iter().filter_map(|d| d.request.map(|r| r.url)).collect();
            (urls.len() >= 3).then_some(urls)
        }
    })
    .await
    .expect("recorded");
    assert_eq!(urls.len(), 3, "{urls:?}");
    assert!(!urls.iter().any(|url| url.ends_with("n=2")), "the set-aside entry wrote nothing");
}
