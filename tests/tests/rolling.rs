//! A rolling restart under load: three nodes on etcd and PostgreSQL take 1,000 events/s while
//! each in turn is stopped with SIGTERM and started again. No event is lost, a webhook is sent
//! twice only when its first attempt was in flight while its partition moved (a node stopping,
//! or the restarted node taking its share back), and no partition waits for a lease to expire:
//! each is handed over, ownerless only for the moments of the handoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidings_client::v1::{
    Campaign, CreateWebhookRequest, Event, EventTrigger, PublishRequest, Webhook, trigger::Kind,
};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, Receiver, setup, unique_prefix, wait_until};
use tokio_util::sync::CancellationToken;

const RATE: u64 = 1_000;
const NODES: usize = 3;

struct Nodes {
    etcd: String,
    prefix: String,
    dirs: Vec<tempfile::TempDir>,
    running: Vec<Option<NodeProcess>>,
}

impl Nodes {
    fn options(&self, i: usize) -> NodeOptions {
        NodeOptions {
            etcd: Some(self.etcd.clone()),
            prefix: Some(self.prefix.clone()),
            data_dir: Some(self.dirs[i].path().to_path_buf()),
            args: vec!["--node-id".into(), format!("node-{i}")],
            env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
            ..Default::default()
        }
    }
}

/// Waits until no partition has changed owner for two seconds: every handoff has finished.
async fn owners_steady(store: &dyn tidings_scheduler::store::Store) {
    let mut last = Vec::new();
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(page) = store.range_prefix(b"owners/", 0).await {
            let owners: Vec<(Vec<u8>, Vec<u8>)> =
                page.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            if owners != last {
                last = owners;
                since = Instant::now();
            } else if since.elapsed() >= Duration::from_secs(2) && last.len() == 64 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("partitions still changed owners a minute after the node rejoined: {last:?}");
}

/// Ownerless time per partition, from polling the owner keys.
#[derive(Default)]
struct Ownerless {
    since: BTreeMap<u32, Instant>,
    total: BTreeMap<u32, Duration>,
    longest: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() {
    let etcd = Etcd::start().await.expect("etcd");
    let mut nodes = Nodes {
        etcd: etcd.endpoint(),
        prefix: unique_prefix(),
        dirs: (0..NODES).map(|_| tempfile::tempdir().expect("dir")).collect(),
        running: (0..NODES).map(|_| None).collect(),
    };
    for i in 0..NODES {
        nodes.running[i] = Some(NodeProcess::start(nodes.options(i)).await.expect("node"));
    }
    let store = etcd.store_at(&nodes.prefix).await.expect("store");
    setup::settled(&store, NODES).await;

    let receiver = Receiver::start().await.expect("receiver");
    let began = Instant::now();
    let first = nodes.running[0].as_ref().expect("running");
    first
        .webhooks()
        .await
        .expect("client")
        .create_webhook(CreateWebhookRequest {
            webhook_id: "roll".into(),
            webhook: Some(Webhook {
                url: receiver.url("/roll"),
                body: "{{ event.id }}".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("webhook");
    setup::active_campaign(
        first,
        "roll",
        Campaign {
            webhook_id: "roll".into(),
            trigger: setup::trigger(Kind::Event(EventTrigger {
                event_type: "roll".into(),
                filter: String::new(),
            })),
            ..Default::default()
        },
    )
    .await;

    // Owner keys, polled: how long each partition had no owner.
    let stop = CancellationToken::new();
    let ownerless = Arc::new(Mutex::new(Ownerless::default()));
    let watcher = {
        let (store, stop, ownerless) = (store.clone(), stop.clone(), ownerless.clone());
        tokio::spawn(async move {
            use tidings_scheduler::store::Store;
            while !stop.is_cancelled() {
                if let Ok(page) = store.range_prefix(b"owners/", 0).await {
                    let owned: std::collections::BTreeSet<u32> = page
                        .kvs
                        .iter()
                        .filter_map(|kv| {
                            String::from_utf8_lossy(&kv.key).rsplit('/').next()?.parse().ok()
                        })
                        .collect();
                    let now = Instant::now();
                    let mut o = ownerless.lock().expect("lock");
                    for p in 0..64u32 {
                        if owned.contains(&p) {
                            if let Some(since) = o.since.remove(&p) {
                                let gap = now - since;
                                *o.total.entry(p).or_default() += gap;
                                o.longest = o.longest.max(gap);
                            }
                        } else {
                            o.since.entry(p).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The load: events at RATE per second, each through a running node; a call a stopping
    // node refuses goes to the next one, with the same idempotency key.
    let clients: Arc<
        Mutex<Vec<Option<tidings_client::EventServiceClient<tidings_client::Transport>>>>,
    > = Arc::new(Mutex::new(Vec::new()));
    for node in nodes.running.iter().flatten() {
        let client = node.events().await.expect("client");
        clients.lock().expect("lock").push(Some(client));
    }
    let published: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let publisher = {
        let (stop, clients, published) = (stop.clone(), clients.clone(), published.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let mut calls = tokio::task::JoinSet::new();
            for i in 0u64.. {
                let at = began + Duration::from_secs_f64(i as f64 / RATE as f64);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                let (clients, published) = (clients.clone(), published.clone());
                calls.spawn(async move {
                    let event = Event {
                        r#type: "roll".into(),
                        contact_id: format!("c{}", i % 5_000),
                        idempotency_key: format!("e{i}"),
                        ..Default::default()
                    };
                    for attempt in 0..20usize {
                        let client = {
                            let clients = clients.lock().expect("lock");
                            let n = clients.len();
                            (0..n).find_map(|k| clients[(i as usize + attempt + k) % n].clone())
                        };
                        let Some(mut client) = client else { continue };
                        let request = PublishRequest { event: Some(event.clone()) };
                        match client.publish(request).await {
                            Ok(response) => {
                                let id = response.into_inner().event_id;
                                published.lock().expect("lock").insert(id, Instant::now());
                                return;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                    panic!("event e{i} was refused by every node for a second");
                });
            }
            while let Some(call) = calls.join_next().await {
                call.expect("every event is accepted");
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Each node in turn: SIGTERM, a moment down, started again with its data directory.
    let mut stops = Vec::new();
    for i in 0..NODES {
        clients.lock().expect("lock")[i] = None;
        let mut node = nodes.running[i].take().expect("running");
        let stopping = Instant::now();
        node.terminate().await.expect("a graceful stop");
        let stopped = Instant::now();
        setup::settled(&store, NODES - 1).await;
        let node = NodeProcess::start(nodes.options(i)).await.expect("restart");
        let client = node.events().await.expect("client");
        clients.lock().expect("lock")[i] = Some(client);
        nodes.running[i] = Some(node);
        setup::settled(&store, NODES).await;
        // The restarted node takes its share from the others through handoffs, which move
        // partitions (and may resend what was in flight) just as a stop does.
        owners_steady(&store).await;
        stops.push((stopping, stopped, Instant::now()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    publisher.await.expect("publisher");
    watcher.await.expect("watcher");

    let published = published.lock().expect("lock").clone();
    let arrived = wait_until("every event's webhook", Duration::from_secs(60), || async {
        let received = receiver.received();
        let events: std::collections::HashSet<String> =
            received.iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
        published.keys().all(|id| events.contains(id)).then_some(received)
    })
    .await
    .unwrap_or_else(|error| {
        let diagnosis = futures::executor::block_on(async {
            let node = nodes.running[0].as_ref().expect("running");
            let mut cluster = node.cluster().await.expect("client");
            let partitions = cluster
                .list_partitions(tidings_client::v1::ListPartitionsRequest::default())
                .await
                .expect("partitions")
                .into_inner()
                .partitions;
            let backlog: u64 = partitions.iter().map(|p| p.inbox_backlog).sum();
            let timers: u64 = partitions.iter().map(|p| p.pending_timers).sum();
            let mut api =
                tidings_client::DeliveryServiceClient::connect(node.url()).await.expect("client");
            let mut statuses: BTreeMap<i32, usize> = BTreeMap::new();
            let mut token = String::new();
            loop {
                let page = api
                    .list_deliveries(tidings_client::v1::ListDeliveriesRequest {
                        filter: None,
                        page_size: 1000,
                        page_token: token,
                    })
                    .await
                    .expect("list")
                    .into_inner();
                for d in &page.deliveries {
                    *statuses.entry(d.status).or_default() += 1;
                }
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            let stuck: Vec<String> = partitions
                .iter()
                .filter(|p| p.inbox_backlog > 0)
                .map(|p| format!("{}@{}:{}", p.id, p.owner, p.inbox_backlog))
                .collect();
            let mut warnings = String::new();
            for node in nodes.running.iter().flatten() {
                for line in node.logs().lines().filter(|l| !l.contains("\"INFO\"")) {
                    warnings.push_str(line);
                    warnings.push('\n');
                }
            }
            format!("inbox backlog {backlog} ({stuck:?}), pending timers {timers}, deliveries by status {statuses:?}\n{warnings}")
        });
        let events: std::collections::HashSet<String> = receiver
            .received()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect();
        let missing: Vec<&String> = published.keys().filter(|id| !events.contains(*id)).collect();
        panic!(
            "{error}: {diagnosis}; {} of {} events have no webhook, for example {:?}",
            missing.len(),
            published.len(),
            &missing[..missing.len().min(5)]
        )
    });

    // A second arrival of a webhook is an attempt that was in flight on a stopping node: its
    // first arrival falls while a node was stopping (within the handoff bound after it).
    let mut first_arrival: HashMap<&str, Instant> = HashMap::new();
    let mut duplicates = 0;
    let since = |at: Instant| at.saturating_duration_since(began);
    for request in &arrived {
        let id = request.header("webhook-id").expect("webhook-id");
        if let Some(first) = first_arrival.get(id) {
            duplicates += 1;
            let during_a_stop = stops.iter().any(|(from, _, rejoined)| {
                *first + Duration::from_secs(1) >= *from
                    && *first <= *rejoined + Duration::from_secs(6)
            });
            let windows: Vec<String> = stops
                .iter()
                .map(|(from, to, rejoined)| {
                    format!(
                        "{:?}..{:?} (rejoined {:?})",
                        since(*from),
                        since(*to),
                        since(*rejoined)
                    )
                })
                .collect();
            assert!(
                during_a_stop,
                "{id} was sent twice outside any stop: first at {:?}, again at {:?}; stops {windows:?}",
                since(*first),
                since(request.at)
            );
        } else {
            first_arrival.insert(id, request.at);
        }
    }
    let ownerless = ownerless.lock().expect("lock");
    println!(
        "rolling restart at {RATE} events/s: {} events, 0 lost, {duplicates} duplicates; longest ownerless partition {:?}, {} partitions moved",
        published.len(),
        ownerless.longest,
        ownerless.total.len()
    );
    assert!(
        ownerless.longest < Duration::from_secs(5),
        "a partition waited {:?} for an owner: handoffs must not wait for a lease to expire",
        ownerless.longest
    );
}
