//! A history checker: timers, interval occurrences and events under kill -9 of nodes, an etcd
//! restart and a PostgreSQL crash and restart. Every timer fires at least once and never early,
//! every interval occurrence fires, every accepted event is consumed, and duplicates are
//! counted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tidings_client::prost_types::{Duration as PbDuration, Timestamp};
use tidings_client::v1::{
    Campaign, CreateWebhookRequest, Event, IntervalTrigger, ListRunsRequest, MisfirePolicy,
    OnDemandTrigger, PublishBatchRequest, Run, RunCampaignRequest, RunState, Webhook,
    trigger::Kind,
};
use tidings_tests::postgres::Postgres;
use tidings_tests::{Etcd, NodeOptions, NodeProcess, setup, unique_prefix, wait_until};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(t: &Option<Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Three node slots; each keeps its data directory (and its logs) across restarts.
struct Nodes {
    etcd: String,
    prefix: String,
    postgres: String,
    dirs: Vec<tempfile::TempDir>,
    running: Vec<Option<NodeProcess>>,
    logs: String,
}

impl Nodes {
    fn options(&self, i: usize) -> NodeOptions {
        NodeOptions {
            etcd: Some(self.etcd.clone()),
            prefix: Some(self.prefix.clone()),
            postgres: Some(self.postgres.clone()),
            data_dir: Some(self.dirs[i].path().to_path_buf()),
            args: vec!["--node-id".into(), format!("node-{i}")],
            env: vec![("TIDINGS_CLUSTER__LEASE_TTL".into(), "2s".into())],
            ..Default::default()
        }
    }

    async fn start(&mut self, i: usize) {
        self.running[i] = Some(NodeProcess::start(self.options(i)).await.expect("node"));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.running[i].take() {
            node.kill();
            self.logs.push_str(&node.logs());
        }
    }

    fn any(&self) -> &NodeProcess {
        self.running.iter().flatten().next().expect("a running node")
    }
}

async fn runs(node: &NodeProcess, campaign: &str) -> Vec<Run> {
    let mut api = node.campaigns().await.expect("client");
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list_runs(ListRunsRequest {
                campaign_id: campaign.into(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("runs")
            .into_inner();
        all.extend(page.runs);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_and_events_survive_kills_and_etcd_and_postgres_restarts() {
    let mut etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    // A server of its own, to crash: what it answered as committed outlives the crash.
    let mut postgres = Postgres::start_crash_safe().await.expect("postgres");
    let url = postgres.database().await.expect("database");
    let dirs = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Nodes {
        etcd: etcd.endpoint(),
        prefix,
        postgres: url.clone(),
        dirs,
        running: vec![None, None, None],
        logs: String::new(),
    };
    for i in 0..3 {
        nodes.start(i).await;
    }

    let node = nodes.any();
    let mut webhooks = node.webhooks().await.expect("client");
    let webhook = Webhook { url: "https://example.com/hook".into(), ..Default::default() };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "hook".into(), webhook: Some(webhook) })
        .await
        .expect("webhook");
    let mut campaigns = node.campaigns().await.expect("client");
    let interval = Kind::Interval(IntervalTrigger {
        every: Some(PbDuration { seconds: 1, nanos: 0 }),
        misfire_policy: MisfirePolicy::FireAll as i32,
        misfire_limit: 1000,
        ..Default::default()
    });
    for (id, kind) in [("tick", interval), ("later", Kind::OnDemand(OnDemandTrigger {}))] {
        let campaign = Campaign {
            webhook_id: "hook".into(),
            trigger: setup::trigger(kind),
            ..Default::default()
        };
        setup::active_campaign(node, id, campaign).await;
    }
    let activated = now_ms();

    // 60 one-shot timers due over the next 14 seconds, in a pseudo-random order.
    let mut due: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..60u64 {
        let at = now_ms() + 1500 + ((i * 7919) % 60) as i64 * 210;
        let scheduled = Timestamp { seconds: at / 1000, nanos: ((at % 1000) * 1_000_000) as i32 };
        let run = campaigns
            .run_campaign(RunCampaignRequest {
                id: "later".into(),
                scheduled_time: Some(scheduled),
                ..Default::default()
            })
            .await
            .expect("schedule")
            .into_inner();
        due.insert(run.id, at);
    }

    // Publish all along; remember what was accepted.
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let started = Instant::now();
    let mut round = 0;
    let mut chaos = vec![
        (Duration::from_secs(2), "kill node-0"),
        (Duration::from_secs(5), "start node-0"),
        (Duration::from_secs(7), "restart etcd"),
        (Duration::from_millis(8500), "crash and restart postgres"),
        (Duration::from_secs(10), "kill node-1"),
        (Duration::from_secs(12), "start node-1"),
    ];
    chaos.reverse();
    while started.elapsed() < Duration::from_secs(16) {
        if let Some((at, action)) = chaos.last().copied()
            && started.elapsed() >= at
        {
            chaos.pop();
            println!("{:>5} ms: {action}", started.elapsed().as_millis());
            match action {
                "kill node-0" => nodes.kill(0),
                "start node-0" => nodes.start(0).await,
                "kill node-1" => nodes.kill(1),
                "start node-1" => nodes.start(1).await,
                "crash and restart postgres" => postgres.restart().await.expect("postgres"),
                _ => etcd.restart().await.expect("etcd restart"),
            }
        }
        let batch: Vec<Event> = (0..50)
            .map(|i| Event {
                r#type: "tick".into(),
                contact_id: format!("c-{round}-{i}"),
                ..Default::default()
            })
            .collect();
        if let Ok(mut events) = nodes.any().events().await
            && let Ok(response) = events.publish_batch(PublishBatchRequest { events: batch }).await
        {
            accepted.extend(response.into_inner().results.into_iter().map(|r| r.event_id));
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every one-shot timer fired, none early.
    let node = nodes.any();
    let later = wait_until("every scheduled run to start", Duration::from_secs(30), || async {
        let runs = runs(node, "later").await;
        runs.iter()
            .all(|r| r.state == RunState::Running as i32 || r.state == RunState::Completed as i32)
            .then_some(runs)
    })
    .await
    .expect("all fired");
    assert_eq!(later.len(), due.len());
    for run in &later {
        let lateness = ms(&run.start_time) - due[&run.id];
        assert!(lateness >= 0, "run {} started {} ms early", run.id, -lateness);
    }

    // Every interval occurrence from the first to the last fired, once each as a run.
    let ticks = runs(node, "tick").await;
    let times: Vec<i64> = ticks.iter().map(|r| ms(&r.scheduled_time)).collect();
    assert!(times.first().is_some_and(|t| *t - activated < 2000), "the chain started: {times:?}");
    assert!(times.windows(2).all(|w| w[1] - w[0] == 1000), "no occurrence missing: {times:?}");
    assert!(times.len() >= 15, "{} occurrences", times.len());
    for run in &ticks {
        assert!(ms(&run.start_time) >= ms(&run.scheduled_time), "occurrence fired early");
    }

    // Every accepted event was consumed: only its owner removes an inbox entry, once it has
    // applied it, and every partition's inbox in PostgreSQL ends empty.
    let options = tidings_scheduler::state::postgres::PgOptions {
        url: url.clone(),
        pool_size: 4,
        ..Default::default()
    };
    let state = tidings_scheduler::state::State::postgres(options).await.expect("state");
    wait_until("every inbox to drain", Duration::from_secs(30), || async {
        (inbox_total(&state).await == 0).then_some(())
    })
    .await
    .expect("drained");
    drop(store);

    // Duplicates: occurrences fired more than once across all node logs.
    for i in 0..3 {
        nodes.kill(i);
    }
    let mut fired: BTreeMap<String, usize> = BTreeMap::new();
    for line in nodes.logs.lines().filter(|l| l.contains("interval fired")) {
        if let Some(run) = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["run"].as_str().map(String::from))
        {
            *fired.entry(run).or_default() += 1;
        }
    }
    let duplicates: usize = fired.values().map(|n| n - 1).sum();
    println!(
        "history: {} one-shot timers, {} interval occurrences, {} events accepted and consumed, {} duplicate firings",
        due.len(),
        ticks.len(),
        accepted.len(),
        duplicates
    );
}

async fn inbox_total(state: &tidings_scheduler::state::State) -> u64 {
    let mut total = 0;
    for p in 0..64 {
        total += state.inbox_backlog(p).await.unwrap_or(1);
    }
    total
}
