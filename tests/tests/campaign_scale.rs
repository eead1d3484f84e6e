//! An interval campaign over a 100,000-contact segment on three node processes and one etcd:
//! every member that passes the guards gets exactly one delivery per firing (a duplicate only
//! for an attempt in flight on a node killed mid-run, and those are counted), skips are counted
//! by reason, a closed send window defers instead of dropping, and the frequency cap stops the
//! second firing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use tidings_client::prost_types::{Duration as PbDuration, Struct, Timestamp, Value};
use tidings_client::v1::{
    Audience, BatchUpsertContactsRequest, Campaign, Contact, CreateSegmentRequest, FrequencyCap,
    IntervalTrigger, ListRunsRequest, RetryPolicy, Run, Segment, SendWindow, Webhook,
    trigger::Kind,
};
use tidings_client::{ContactServiceClient, SegmentServiceClient};
use tidings_scheduler::store::Store;
use tidings_tests::{Etcd, NodeOptions, NodeProcess, Receiver, setup, unique_prefix, wait_until};

const MEMBERS: usize = 100_000;
const OTHERS: usize = 5_000;
/// Seconds between firings: the first run ends well within it on the test machine.
const EVERY_S: i64 = 120;

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

/// What contact `i` is: members are 0..MEMBERS; among them `i % 100` picks a guard.
fn contact(i: usize) -> Contact {
    let value = |kind| Value { kind: Some(kind) };
    use tidings_client::prost_types::value::Kind as V;
    Contact {
        id: format!("c{i:06}"),
        attributes: Some(Struct {
            fields: [
                ("member".to_string(), value(V::BoolValue(i < MEMBERS))),
                ("n".to_string(), value(V::NumberValue(i as f64))),
            ]
            .into(),
        }),
        // UTC+14: outside the window, whatever the time of day.
        timezone: if i % 100 == 2 { "Pacific/Kiritimati".into() } else { "UTC".into() },
        unsubscribed: i % 100 == 1,
        ..Default::default()
    }
}

/// Whether member `i` is sent to at once by the first firing.
fn delivered_at_once(i: usize) -> bool {
    i < MEMBERS && !matches!(i % 100, 1..=3)
}

fn hh_mm(minutes: i64) -> String {
    let m = minutes.rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

async fn runs(node: &NodeProcess) -> Vec<Run> {
    let mut campaigns = node.campaigns().await.expect("client");
    let mut runs = campaigns
        .list_runs(ListRunsRequest { campaign_id: "weekly".into(), ..Default::default() })
        .await
        .map(|r| r.into_inner().runs)
        .unwrap_or_default();
    runs.sort_by(|a, b| a.id.cmp(&b.id));
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_campaign_over_100k_contacts_sends_once_per_firing() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            NodeProcess::start(options(&etcd, &prefix, &format!("n{i}"))).await.expect("node"),
        );
    }
    setup::settled(&store, 3).await;

    let mut started = Instant::now();
    let mut imports = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");
        let mine: Vec<usize> = (0..MEMBERS + OTHERS).filter(|i| i % 3 == n).collect();
        imports.push(tokio::spawn(async move {
            let messages: Vec<BatchUpsertContactsRequest> = mine
                .chunks(1000)
                .map(|c| BatchUpsertContactsRequest {
                    contacts: c.iter().map(|i| contact(*i)).collect(),
                })
                .collect();
            contacts
                .batch_upsert_contacts(tokio_stream::iter(messages))
                .await
                .expect("import")
                .into_inner()
        }));
    }
    for import in imports {
        let imported = import.await.expect("import task");
        assert_eq!(imported.rejected_count, 0);
    }
    println!("imported {} contacts in {:?}", MEMBERS + OTHERS, started.elapsed());

    let receiver = Receiver::start().await.expect("receiver");
    let mut segments = SegmentServiceClient::connect(nodes[0].url()).await.expect("client");
    segments
        .create_segment(CreateSegmentRequest {
            segment_id: "members".into(),
            segment: Some(Segment {
                filter: "contact.attributes.member".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("segment");
    setup::webhook(
        &nodes[0],
        "bulk",
        Webhook {
            url: receiver.url("/bulk"),
            body: r#"{"contact": "{{ contact.id }}", "run": "{{ run.id }}"}"#.into(),
            // A loaded test machine can slow the receiver down: generous time to answer, and
            // quick retries, so that the figures measure the campaign rather than the backoff.
            timeout: Some(PbDuration { seconds: 60, nanos: 0 }),
            retry_policy: Some(RetryPolicy {
                delays: (0..10).map(|_| PbDuration { seconds: 1, nanos: 0 }).collect(),
                jitter: None,
            }),
            ..Default::default()
        },
    )
    .await;
    // The window is open from an hour ago to three hours from now in UTC; in UTC+14 it is
    // closed now, whatever the time of day.
    let now = Utc::now();
    let minute = (now.hour() * 60 + now.minute()) as i64;
    let first = now.timestamp() + 20;
    let campaign = Campaign {
        webhook_id: "bulk".into(),
        audience: Some(Audience { segment_id: "members".into(), filter: String::new() }),
        trigger: setup::trigger(Kind::Interval(IntervalTrigger {
            every: Some(PbDuration { seconds: EVERY_S, nanos: 0 }),
            start_time: Some(Timestamp { seconds: first, nanos: 0 }),
            end_time: Some(Timestamp { seconds: first + EVERY_S + 1, nanos: 0 }),
            ..Default::default()
        })),
        rules: vec!["int(contact.attributes.n) % 100 != 3".into()],
        frequency_cap: Some(FrequencyCap {
            max_sends: 1,
            period: Some(PbDuration { seconds: 3600, nanos: 0 }),
            across_campaigns: false,
        }),
        send_window: Some(SendWindow {
            days: vec![],
            start: hh_mm(minute - 60),
            end: hh_mm(minute + 180),
        }),
        ..Default::default()
    };
    setup::active_campaign(&nodes[0], "weekly", campaign).await;
    started = Instant::now() + Duration::from_secs(20);

    // Kill a node once the first run is well under way.
    let expected = (0..MEMBERS).filter(|i| delivered_at_once(*i)).count();
    if let Err(error) = receiver.wait_for(expected / 5, Duration::from_secs(120)).await {
        let logs: String = nodes.iter().map(|n| n.logs()).collect::<Vec<_>>().join("\n");
        let logs: Vec<&str> = logs
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("dropping")
                    || l.contains("released")
            })
            .take(30)
            .collect();
        panic!(
            "first run under way: {error}; runs {:?}\n{}",
            runs(&nodes[0]).await,
            logs.join("\n")
        );
    }
    let killed_at = receiver.received().len();
    let owners = store.range_prefix(b"owners/", 0).await.expect("owners");
    let killed: std::collections::HashSet<u32> = owners
        .kvs
        .iter()
        .filter(|kv| kv.value == b"n2")
        .filter_map(|kv| std::str::from_utf8(&kv.key[b"owners/".len()..]).ok()?.parse().ok())
        .collect();
    nodes[2].kill();
    println!("killed n2 after {killed_at} arrivals");

    let first = wait_until("the first run to deliver", Duration::from_secs(300), || async {
        let runs = runs(&nodes[0]).await;
        let run = runs.first()?.clone();
        (run.partitions_done == run.partitions && run.delivered + run.failed >= expected as u64)
            .then_some(run)
    })
    .await;
    let run = match first {
        Ok(run) => run,
        Err(error) => {
            let logs: String = nodes[..2].iter().map(|n| n.logs()).collect::<Vec<_>>().join("\n");
            let notable: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(40)
                .collect();
            panic!("{error}: {:?}\n{}", runs(&nodes[0]).await, notable.join("\n"));
        }
    };
    let first_elapsed = Instant::now();
    println!("first run: {run:?} after {:?}", started.elapsed());
    assert_eq!(run.audience, MEMBERS as u64);
    assert_eq!(run.skipped.get("unsubscribed"), Some(&1000));
    assert_eq!(run.skipped.get("rule"), Some(&1000));
    assert_eq!(run.queued, (MEMBERS - 2000) as u64);
    assert_eq!(run.delivered, expected as u64);
    assert_eq!(run.failed, 0);

    // Every member that passes the guards, once; the deferred ones not yet.
    let mut per_contact: HashMap<String, Vec<String>> = HashMap::new();
    for request in receiver.received() {
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json body");
        assert_eq!(body["run"], run.id.as_str());
        let webhook_id = request.header("webhook-id").expect("webhook-id").to_string();
        let contact = body["contact"].as_str().expect("contact").to_string();
        per_contact.entry(contact).or_default().push(webhook_id);
    }
    let wanted: Vec<String> =
        (0..MEMBERS).filter(|i| delivered_at_once(*i)).map(|i| format!("c{i:06}")).collect();
    let missing: Vec<&String> = wanted.iter().filter(|id| !per_contact.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} members got nothing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(per_contact.len(), expected, "no one outside the audience and guards");
    // A contact hears twice only when an attempt of its delivery was in flight (or its outcome
    // not yet recorded) on the killed node: the same delivery, with the same webhook-id, in
    // one of that node's partitions.
    let mut duplicates = 0;
    for (contact, ids) in &per_contact {
        if ids.len() > 1 {
            duplicates += ids.len() - 1;
            assert!(ids.iter().all(|id| *id == ids[0]), "{contact} got two deliveries: {ids:?}");
            let partition = tidings_scheduler::state::partition_of(contact, 64);
            assert!(killed.contains(&partition), "{contact} (partition {partition}) got {ids:?}");
        }
    }
    println!("duplicates, all of one delivery on the killed node's partitions: {duplicates}");

    // The second firing: the cap of one send per hour skips everyone the first one queued.
    let second = wait_until(
        "the second run to finish",
        Duration::from_secs(EVERY_S as u64 + 120),
        || async {
            let runs = runs(&nodes[0]).await;
            let run = runs.get(1)?.clone();
            (run.partitions_done == run.partitions).then_some(run)
        },
    )
    .await
    .expect("second run");
    println!("second run: {second:?} ({:?} after the first)", first_elapsed.elapsed());
    assert_eq!(second.audience, MEMBERS as u64);
    assert_eq!(second.queued, 0);
    assert_eq!(second.skipped.get("frequency_cap"), Some(&((MEMBERS - 2000) as u64)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.received().len(), expected + duplicates, "the second firing sent nothing");
}
