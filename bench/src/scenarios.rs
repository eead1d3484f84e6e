//! The scenarios and the table they print.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tidings_client::v1::{Event, ListPartitionsRequest, PublishBatchRequest};
use tidings_scheduler::cluster::{Cluster, ClusterOptions, PartitionId};
use tidings_scheduler::engine::{Effects, Engine, EngineResult};
use tidings_scheduler::inbox::Event as InboxEvent;
use tidings_scheduler::now_ms;
use tidings_scheduler::state::postgres::PgOptions;
use tidings_scheduler::state::{State, Write, partition_of};
use tidings_scheduler::store::{EmbeddedStore, Store};
use tidings_scheduler::timers::{Timer, TimerKind};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, unique_prefix, wait_until};
use tokio_util::sync::CancellationToken;

use crate::proc_stats::{cpu_seconds, kib, memory, mib};

/// Parsed command line.
struct Args {
    scenario: String,
    store: String,
    count: u64,
    seconds: u64,
    lease_ttl: u64,
    rate: u64,
    retention: u64,
    telemetry: bool,
    targets: Option<std::path::PathBuf>,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut parsed = Args {
        scenario: args.first().cloned().unwrap_or_else(|| "all".into()),
        store: "both".into(),
        count: 1_000_000,
        seconds: 10,
        lease_ttl: 10,
        rate: 1000,
        retention: 120,
        telemetry: false,
        targets: None,
    };
    let mut rest = args.iter().skip(1);
    while let Some(flag) = rest.next() {
        let value = rest.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--store" => parsed.store = value.clone(),
            "--count" => parsed.count = value.parse().context("--count")?,
            "--seconds" => parsed.seconds = value.parse().context("--seconds")?,
            "--lease-ttl" => parsed.lease_ttl = value.parse().context("--lease-ttl")?,
            "--rate" => parsed.rate = value.parse().context("--rate")?,
            "--retention" => parsed.retention = value.parse().context("--retention")?,
            "--targets" => {
                parsed.targets = Some(value.into());
                parsed.telemetry = true;
            }
            "--telemetry" => {
                parsed.telemetry = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => bail!("--telemetry must be on or off"),
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if !["embedded", "postgres", "both"].contains(&parsed.store.as_str()) {
        bail!("--store must be embedded, postgres (a cluster node: etcd + PostgreSQL) or both");
    }
    Ok(parsed)
}

fn stores(args: &Args) -> Vec<&'static str> {
    match args.store.as_str() {
        "embedded" => vec!["embedded"],
        "postgres" => vec!["postgres"],
        _ => vec!["embedded", "postgres"],
    }
}

/// Runs the scenario named on the command line.
pub async fn run(raw: &[String]) -> anyhow::Result<()> {
    let args = parse(raw)?;
    header(raw);
    // Child nodes are this very binary (see main).
    // SAFETY: set before any other thread of this program reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("TIDINGS_NODE_BIN", std::env::current_exe()?);
    }
    if args.telemetry {
        let collector = tidings_tests::otlp::Collector::start().await?;
        println!(
            "telemetry on: every node exports traces and metrics over OTLP/gRPC to a collector in this process ({}) and serves /metrics",
            collector.endpoint()
        );
        println!();
        let _ = TELEMETRY.set(collector);
        if let Some(path) = &args.targets {
            std::fs::write(path, "[]")
                .with_context(|| format!("--targets: cannot write {}", path.display()))?;
            println!("the nodes' /metrics addresses go to {} (Prometheus file_sd)", path.display());
            let _ = TARGETS.set(path.clone());
        }
    }
    let all = args.scenario == "all";
    let mut ceiling_rate = None;
    if all || args.scenario == "ceiling" || args.scenario == "deliver" {
        ceiling_rate = Some(ceiling(args.seconds.min(10)).await?);
    }
    if all || args.scenario == "deliver" {
        let count = if args.count == 1_000_000 { 100_000 } else { args.count };
        for store in stores(&args) {
            deliver(store, count, ceiling_rate).await?;
        }
    }
    if all || args.scenario == "latency" {
        for store in stores(&args) {
            latency(store, args.rate, args.seconds).await?;
        }
    }
    if all || args.scenario == "timers" {
        for store in stores(&args) {
            timers(store, args.count).await?;
        }
    }
    if all || args.scenario == "publish" {
        for store in stores(&args) {
            publish(store, args.seconds).await?;
        }
    }
    if all || args.scenario == "fanout" {
        for store in stores(&args) {
            fanout(store, args.count).await?;
        }
    }
    if all || args.scenario == "failover" {
        failover(args.lease_ttl).await?;
    }
    if all || args.scenario == "queries" {
        queries(args.count).await?;
    }
    if args.scenario == "rolling" {
        rolling(args.rate, if args.seconds == 10 { 5 } else { args.seconds }).await?;
    }
    if args.scenario == "contacts" {
        let count = if args.count == 1_000_000 { 10_000_000 } else { args.count };
        contacts(count).await?;
    }
    if args.scenario == "sustained" {
        let rate = if args.rate == 1000 { 3000 } else { args.rate };
        let seconds = if args.seconds == 10 { 300 } else { args.seconds };
        sustained(rate, seconds, args.retention).await?;
    }
    if ![
        "all",
        "timers",
        "publish",
        "failover",
        "deliver",
        "latency",
        "ceiling",
        "fanout",
        "queries",
        "sustained",
        "rolling",
        "contacts",
    ]
    .contains(&args.scenario.as_str())
    {
        bail!(
            "unknown scenario {}; one of deliver, latency, timers, fanout, publish, failover, rolling, queries, sustained, contacts, ceiling, all",
            args.scenario
        );
    }
    Ok(())
}

fn header(raw: &[String]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(|| "?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0));
    let profile =
        if cfg!(debug_assertions) { "debug (use --release for real figures)" } else { "release" };
    println!("# tidings-bench {}", raw.join(" "));
    println!(
        "# machine: {cores} cores, {memory} memory; build: {profile}; durability: every write is committed (fsync) before it is acknowledged"
    );
    println!();
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Opens the stores of `kind`: the coordination store and the state layer (on PostgreSQL for
/// a cluster, on the same redb file for a single node).
async fn open_store(
    kind: &str,
) -> anyhow::Result<(Arc<dyn Store>, State, Option<Etcd>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    if kind == "postgres" {
        let etcd = Etcd::start().await?;
        let prefix = unique_prefix();
        let store = etcd.store_at(&prefix).await?;
        let url = postgres_url(&prefix).await?;
        let state = State::postgres(PgOptions { url, ..Default::default() }).await?;
        Ok((Arc::new(store), state, Some(etcd), dir))
    } else {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb"))?);
        Ok((store.clone(), State::new(store), None, dir))
    }
}

/// Returns a fresh database of the benchmark's PostgreSQL server, which runs with PostgreSQL's
/// durable defaults: every commit is flushed before it is acknowledged.
async fn postgres_url(prefix: &str) -> anyhow::Result<String> {
    let name: String = prefix.chars().filter(char::is_ascii_alphanumeric).collect();
    tidings_tests::postgres::durable().await?.database_named(&format!("b{name}")).await
}

/// Records when each timer fired relative to its due time.
#[derive(Default)]
struct Recorder {
    lateness: Mutex<Vec<i64>>,
    fired: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

struct Counting(Arc<Recorder>);

#[async_trait::async_trait]
impl Engine for Counting {
    async fn on_event(&self, _: PartitionId, _: &InboxEvent, _: &mut Effects) -> EngineResult {
        Ok(())
    }

    async fn on_timer(&self, _: PartitionId, timer: &Timer, _: &mut Effects) -> EngineResult {
        let now = now_ms();
        if let Ok(mut lateness) = self.0.lateness.lock() {
            lateness.push(now - timer.due_ms);
        }
        self.0.fired.fetch_add(1, Ordering::Relaxed);
        let _ = self.0.first.compare_exchange(0, now as u64, Ordering::Relaxed, Ordering::Relaxed);
        self.0.last.store(now as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes `count` timers due from `start_ms`, spread evenly over `window_ms`.
async fn write_timers(
    state: &State,
    count: u64,
    start_ms: i64,
    window_ms: i64,
    partitions: u32,
) -> anyhow::Result<()> {
    let per_txn = 120u64;
    let chunks: Vec<u64> = (0..count.div_ceil(per_txn)).collect();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (state, next, chunks) = (state.clone(), next.clone(), chunks.len() as u64);
        tasks.spawn(async move {
            loop {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    return Ok::<_, anyhow::Error>(());
                }
                let writes = (chunk * per_txn..((chunk + 1) * per_txn).min(count))
                    .map(|i| {
                        let due = start_ms + (i as i64 * window_ms) / count.max(1) as i64;
                        let id = format!("t{i}");
                        let timer = Timer {
                            id: id.clone(),
                            due_ms: due,
                            kind: TimerKind::Run { campaign: "bench".into(), run: id.clone() },
                        };
                        let partition = (i % u64::from(partitions)) as u32;
                        Ok(Write::timer(partition, &timer)?)
                    })
                    .collect::<anyhow::Result<Vec<Write>>>()?;
                state.write(writes).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn timers(kind: &str, count: u64) -> anyhow::Result<()> {
    let partitions = 64;
    let (store, state, _etcd, _dir) = open_store(kind).await?;
    let me = std::process::id();

    // Phase 1: `count` timers due over a minute, starting once they are all written and loaded.
    let written = Instant::now();
    let window_ms = 60_000;
    let estimate_ms = 5_000 + (count as i64) / 20;
    let start_ms = now_ms() + estimate_ms;
    write_timers(&state, count, start_ms, window_ms, partitions).await?;
    let write_secs = written.elapsed().as_secs_f64();
    // Measured after writing, so the figure is what loading and holding the timers costs.
    let (rss_before, _) = memory(me);
    let recorder = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let options = ClusterOptions {
        node_id: "bench".into(),
        address: "in-process".into(),
        partitions,
        lease_ttl: Duration::from_secs(10),
        handoff_timeout: Duration::from_secs(5),
        live_nodes: Default::default(),
        max_in_flight: 4096,
    };
    let loading = Instant::now();
    let engine_recorder = recorder.clone();
    let (cluster, task) = Cluster::start(
        &tidings_scheduler::coordination::Coordination::over(store.clone()),
        state.clone(),
        |_| Arc::new(Counting(engine_recorder)),
        options,
        shutdown.clone(),
    )
    .await?;
    wait_until("the node to load every partition", Duration::from_secs(600), || async {
        let status = cluster.partition_status().await.ok()?;
        let pending: u64 = status.iter().map(|p| p.pending_timers).sum();
        (cluster.owned().len() == partitions as usize
            && pending >= count.saturating_sub(recorder.fired.load(Ordering::Relaxed)))
        .then_some(())
    })
    .await?;
    let load_secs = loading.elapsed().as_secs_f64();
    let (rss_loaded, _) = memory(me);
    if now_ms() > start_ms {
        println!("warning: loading took longer than planned; the first timers fired late");
    }
    wait_until("every timer to fire", Duration::from_secs(900), || async {
        (recorder.fired.load(Ordering::Relaxed) >= count).then_some(())
    })
    .await?;
    let mut lateness =
        std::mem::take(&mut *recorder.lateness.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    lateness.sort_unstable();
    let early = lateness.iter().filter(|l| **l < 0).count();

    // Phase 2: as many timers already due, to measure the firing rate alone.
    let burst = Arc::new(Recorder::default());
    shutdown.cancel();
    let _ = task.await;
    write_timers(&state, count, now_ms() - 1000, 0, partitions).await?;
    let shutdown = CancellationToken::new();
    let options = ClusterOptions {
        node_id: "bench-2".into(),
        address: "in-process".into(),
        partitions,
        lease_ttl: Duration::from_secs(10),
        handoff_timeout: Duration::from_secs(5),
        live_nodes: Default::default(),
        max_in_flight: 4096,
    };
    let engine_burst = burst.clone();
    let (_cluster, task) = Cluster::start(
        &tidings_scheduler::coordination::Coordination::over(store.clone()),
        state.clone(),
        |_| Arc::new(Counting(engine_burst)),
        options,
        shutdown.clone(),
    )
    .await?;
    let began = Instant::now();
    wait_until("every due timer to fire", Duration::from_secs(900), || async {
        (burst.fired.load(Ordering::Relaxed) >= count).then_some(())
    })
    .await?;
    let burst_rate = count as f64 / began.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = task.await;

    println!("timers ({kind} store, in-process node, {partitions} partitions, {count} timers)");
    println!(
        "  write {count} timers:          {:>10.0} timers/s ({write_secs:.1} s, 120 per transaction, 16 writers)",
        count as f64 / write_secs
    );
    println!("  load on claim:                {load_secs:>10.1} s");
    println!(
        "  memory with all pending:      {:>10} ({} added by loading them, {:.1} bytes per pending timer)",
        mib(rss_loaded),
        mib(rss_loaded.saturating_sub(rss_before)),
        rss_loaded.saturating_sub(rss_before) as f64 / count as f64
    );
    println!(
        "  due over 60 s, lateness:      p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {} early",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.9),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(0),
        early
    );
    println!("  all due at once, fire rate:   {burst_rate:>10.0} fires/s");
    println!();
    Ok(())
}

/// Returns how many partitions the node's cluster has.
async fn partition_count(node: &NodeProcess) -> anyhow::Result<usize> {
    let list = node.cluster().await?.list_partitions(ListPartitionsRequest {}).await?;
    Ok(list.into_inner().partitions.len())
}

async fn start_node(
    kind: &str,
    etcd: Option<&Etcd>,
    prefix: &str,
    id: &str,
    ttl: u64,
) -> anyhow::Result<NodeProcess> {
    start_node_with(kind, etcd, prefix, id, ttl, Vec::new()).await
}

/// The collector nodes export to with `--telemetry on`.
static TELEMETRY: std::sync::OnceLock<tidings_tests::otlp::Collector> = std::sync::OnceLock::new();

/// The Prometheus file_sd file each started node's /metrics address is added to (`--targets`).
static TARGETS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Returns the settings that turn a node's telemetry on, with `--telemetry on`.
fn telemetry_env() -> Vec<(String, String)> {
    let Some(collector) = TELEMETRY.get() else { return Vec::new() };
    let port = tidings_tests::free_port().unwrap_or(0);
    if let Some(path) = TARGETS.get() {
        let mut targets: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        targets.push(serde_json::json!({ "targets": [format!("127.0.0.1:{port}")] }));
        let _ = std::fs::write(path, serde_json::Value::Array(targets).to_string());
    }
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint()),
        ("TIDINGS_METRICS__LISTEN".into(), format!("127.0.0.1:{port}")),
    ]
}

/// Starts a node process with extra environment settings.
async fn start_node_with(
    kind: &str,
    etcd: Option<&Etcd>,
    prefix: &str,
    id: &str,
    ttl: u64,
    extra: Vec<(String, String)>,
) -> anyhow::Result<NodeProcess> {
    let postgres = match etcd {
        Some(_) => Some(postgres_url(prefix).await?),
        None => None,
    };
    // Calls carry a token, as in production: a cluster's first node makes the admin token,
    // and the nodes started after it on the same prefix are given it.
    let token = TOKENS.lock().ok().and_then(|tokens| tokens.get(prefix).cloned());
    let options = NodeOptions {
        etcd: etcd.map(Etcd::endpoint),
        prefix: Some(prefix.to_string()),
        postgres,
        auth: true,
        token,
        args: vec!["--node-id".into(), id.into()],
        log_level: Some("warn,tidings_server::node=info".into()),
        env: [
            ("TIDINGS_CLUSTER__LEASE_TTL".into(), format!("{ttl}s")),
            ("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into()),
        ]
        .into_iter()
        .chain(telemetry_env())
        .chain(extra)
        .collect(),
        ..Default::default()
    };
    let _ = kind;
    let node = NodeProcess::start(options).await?;
    let token = node.token().context("the node wrote no admin token")?.to_string();
    if let Ok(mut tokens) = TOKENS.lock() {
        tokens.entry(prefix.to_string()).or_insert(token);
    }
    Ok(node)
}

/// The admin token of each cluster (by etcd prefix) the bench started.
static TOKENS: std::sync::LazyLock<Mutex<std::collections::HashMap<String, String>>> =
    std::sync::LazyLock::new(Default::default);

async fn publish(kind: &str, seconds: u64) -> anyhow::Result<()> {
    let etcd = if kind == "postgres" { Some(Etcd::start().await?) } else { None };
    let node = start_node(kind, etcd.as_ref(), &unique_prefix(), "bench", 10).await?;
    let pid = node_pid(&node)?;
    let cpu_before = cpu_seconds(pid);
    let clients = 8;
    let batch = 500;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let accepted = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (transport, accepted, latencies) =
            (node.transport().await?, accepted.clone(), latencies.clone());
        let unavailable = unavailable.clone();
        tasks.spawn(async move {
            let mut api = tidings_client::EventServiceClient::new(transport);
            let mut round = 0u64;
            while Instant::now() < deadline {
                let events = (0..batch)
                    .map(|i| Event {
                        r#type: "bench".into(),
                        contact_id: format!("c{client}-{round}-{i}"),
                        ..Default::default()
                    })
                    .collect();
                let sent = Instant::now();
                // A store that does not answer in time makes the call UNAVAILABLE, with
                // nothing written: a caller retries it; the bench counts it.
                let response = match api.publish_batch(PublishBatchRequest { events }).await {
                    Ok(response) => response.into_inner(),
                    Err(status) if status.code() == tidings_client::tonic::Code::Unavailable => {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(status) => return Err(status.into()),
                };
                latencies
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(sent.elapsed().as_micros() as i64);
                accepted.fetch_add(
                    response.results.iter().filter(|r| r.error.is_empty()).count() as u64,
                    Ordering::Relaxed,
                );
                round += 1;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let began = Instant::now();
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let (_, peak) = memory(pid);
    let mut latencies =
        std::mem::take(&mut *latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    latencies.sort_unstable();
    let total = accepted.load(Ordering::Relaxed);
    // Consumption: wait until the inboxes drain.
    let drained = Instant::now();
    let mut cluster = node.cluster().await?;
    wait_until("the inboxes to drain", Duration::from_secs(300), || {
        let mut cluster = cluster.clone();
        async move {
            let list = cluster.list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
            (list.partitions.iter().map(|p| p.inbox_backlog).sum::<u64>() == 0).then_some(())
        }
    })
    .await?;
    let _ = &mut cluster;
    println!("publish ({kind} store, node process, {clients} clients x PublishBatch of {batch})");
    println!(
        "  accepted (durable):           {:>10.0} events/s ({total} in {elapsed:.1} s)",
        total as f64 / elapsed
    );
    println!(
        "  PublishBatch latency:         p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.5) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0
    );
    println!(
        "  node CPU:                     {:>10.0} % of one core; peak memory {}",
        cpu / elapsed * 100.0,
        mib(peak)
    );
    println!("  inbox drained after the load: {:>10.1} s", drained.elapsed().as_secs_f64());
    println!(
        "  batches refused UNAVAILABLE:  {:>10} (the store did not answer in time)",
        unavailable.load(Ordering::Relaxed)
    );
    println!();
    Ok(())
}

fn node_pid(node: &NodeProcess) -> anyhow::Result<u32> {
    node.pid().context("the node is not running")
}

async fn failover(ttl: u64) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start_node("postgres", Some(&etcd), &prefix, &format!("node-{i}"), ttl).await?);
    }
    wait_until("64 partitions owned by 3 nodes", Duration::from_secs(60), || async {
        let owners = owners(&store).await?;
        let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
        for owner in owners.values() {
            *counts.entry(owner).or_default() += 1;
        }
        (owners.len() == 64 && counts.len() == 3 && counts.values().all(|c| *c <= 22)).then_some(())
    })
    .await?;
    // Load: events published at a steady rate through the survivors, each sending one
    // webhook whose body is the event id.
    let (url, arrivals) = crate::receiver::start().await?;
    bench_campaign(&nodes[1], &url).await?;
    arrivals.record.store(true, Ordering::Relaxed);
    const RATE: u64 = 500;
    let stop = CancellationToken::new();
    let published: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let clients = [
        tidings_client::EventServiceClient::new(nodes[1].transport().await?),
        tidings_client::EventServiceClient::new(nodes[2].transport().await?),
    ];
    let publisher = {
        let (stop, published) = (stop.clone(), published.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let mut calls = tokio::task::JoinSet::new();
            for i in 0u64.. {
                let at = began + Duration::from_secs_f64(i as f64 / RATE as f64);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                let mut api = clients[(i % 2) as usize].clone();
                let published = published.clone();
                calls.spawn(async move {
                    let contact = format!("c{i}");
                    let event = Event {
                        r#type: "bench".into(),
                        contact_id: contact.clone(),
                        ..Default::default()
                    };
                    let request = tidings_client::v1::PublishRequest { event: Some(event) };
                    if let Ok(response) = api.publish(request).await
                        && let Ok(mut published) = published.lock()
                    {
                        published.push((response.into_inner().event_id, contact, Instant::now()));
                    }
                });
            }
            while calls.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = owners(&store).await.unwrap_or_default();
    let victims: std::collections::BTreeSet<u32> =
        before.iter().filter(|(_, owner)| *owner == "node-0").map(|(p, _)| *p).collect();
    nodes[0].kill();
    let killed = Instant::now();
    wait_until("the survivors to own every partition", Duration::from_secs(120), || async {
        let owners = owners(&store).await?;
        (owners.len() == 64 && owners.values().all(|o| o != "node-0")).then_some(())
    })
    .await?;
    let failover = killed.elapsed();
    // Keep publishing a while after the takeover, then wait for every delivery.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    publisher.await?;
    let published =
        std::mem::take(&mut *published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let all_arrived = || {
        let at = arrivals.at.lock().ok()?;
        published.iter().all(|(id, _, _)| at.contains_key(id.as_bytes())).then_some(())
    };
    let _ =
        wait_until("every delivery to arrive", Duration::from_secs(60), || async { all_arrived() })
            .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let arrived = arrivals.at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let lost = published.iter().filter(|(id, _, _)| !arrived.contains_key(id.as_bytes())).count();
    let duplicates = arrivals.count.load(Ordering::Relaxed).saturating_sub(arrived.len() as u64);
    // A killed node's partition delivers again when an event published after the kill for
    // one of its contacts arrives; the figure is the last of its partitions to do so.
    let mut first: BTreeMap<u32, Instant> = BTreeMap::new();
    for (id, contact, at) in &published {
        let partition = partition_of(contact, 64);
        if *at < killed || !victims.contains(&partition) {
            continue;
        }
        if let Some(arrival) = arrived.get(id.as_bytes()) {
            let entry = first.entry(partition).or_insert(*arrival);
            *entry = (*entry).min(*arrival);
        }
    }
    let delivering = (first.len() == victims.len())
        .then(|| first.values().max().map(|last| last.duration_since(killed)))
        .flatten();
    let signed =
        |secs: f64| if secs < 0.0 { format!("- {:.2}", -secs) } else { format!("+ {secs:.2}") };
    println!(
        "failover (3 node processes on etcd + PostgreSQL, 64 partitions, lease TTL {ttl} s, {RATE} events/s published through the 2 survivors)"
    );
    println!(
        "  kill -9 of a node owning {} partitions: all owned again after {:.2} s (TTL {} s)",
        victims.len(),
        failover.as_secs_f64(),
        signed(failover.as_secs_f64() - ttl as f64)
    );
    match delivering {
        Some(after) => println!(
            "  its partitions delivering again:  after {:.2} s (TTL {} s; the last of them to deliver an event published after the kill)",
            after.as_secs_f64(),
            signed(after.as_secs_f64() - ttl as f64)
        ),
        None => println!(
            "  its partitions delivering again:  {} of {} delivered an event published after the kill",
            first.len(),
            victims.len()
        ),
    }
    println!(
        "  events published: {}; delivered: {}; lost: {lost}; duplicates: {duplicates}",
        published.len(),
        published.len() - lost
    );
    println!();
    Ok(())
}

/// A rolling restart: three nodes take `rate` events/s while each in turn is stopped with
/// SIGTERM and started again (`pause` seconds of load before the first stop and after the last
/// start); every event is published through a running node (a call a
/// stopping node refuses goes to the next, with the same idempotency key).
async fn rolling(rate: u64, pause: u64) -> anyhow::Result<()> {
    type Client = tidings_client::EventServiceClient<tidings_client::Transport>;
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start_node("postgres", Some(&etcd), &prefix, &format!("node-{i}"), 10).await?);
    }
    let settled = |store: &tidings_scheduler::store::EtcdStore, nodes: usize| {
        let store = store.clone();
        async move {
            wait_until("64 partitions owned and spread", Duration::from_secs(60), || async {
                let owners = owners(&store).await?;
                let distinct: std::collections::BTreeSet<&String> = owners.values().collect();
                (owners.len() == 64 && distinct.len() == nodes).then_some(())
            })
            .await
        }
    };
    settled(&store, 3).await?;
    let (url, arrivals) = crate::receiver::start().await?;
    bench_campaign(&nodes[0], &url).await?;
    arrivals.record.store(true, Ordering::Relaxed);

    // How long each partition had no owner, from the owner keys polled every 10 ms.
    let stop = CancellationToken::new();
    let gaps: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let watcher = {
        let (store, stop, gaps) = (store.clone(), stop.clone(), gaps.clone());
        tokio::spawn(async move {
            let mut since: BTreeMap<u32, Instant> = BTreeMap::new();
            while !stop.is_cancelled() {
                if let Some(owned) = owners(&store).await {
                    let now = Instant::now();
                    for p in 0..64u32 {
                        if owned.contains_key(&p) {
                            if let Some(from) = since.remove(&p)
                                && let Ok(mut gaps) = gaps.lock()
                            {
                                gaps.push(now - from);
                            }
                        } else {
                            since.entry(p).or_insert(now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut list = Vec::new();
    for node in &nodes {
        list.push(Some(Client::new(node.transport().await?)));
    }
    let clients: Arc<Mutex<Vec<Option<Client>>>> = Arc::new(Mutex::new(list));
    let published: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, clients, published, refused) =
            (stop.clone(), clients.clone(), published.clone(), refused.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let mut calls = tokio::task::JoinSet::new();
            for i in 0u64.. {
                let at = began + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                let (clients, published, refused) =
                    (clients.clone(), published.clone(), refused.clone());
                calls.spawn(async move {
                    let event = Event {
                        r#type: "bench".into(),
                        contact_id: format!("c{}", i % 10_000),
                        idempotency_key: format!("e{i}"),
                        ..Default::default()
                    };
                    for attempt in 0..50usize {
                        let client = clients.lock().ok().and_then(|clients| {
                            let n = clients.len();
                            (0..n).find_map(|k| clients[(i as usize + attempt + k) % n].clone())
                        });
                        if let Some(mut client) = client {
                            let request =
                                tidings_client::v1::PublishRequest { event: Some(event.clone()) };
                            if let Ok(response) = client.publish(request).await {
                                if let Ok(mut published) = published.lock() {
                                    published.push(response.into_inner().event_id);
                                }
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    refused.fetch_add(1, Ordering::Relaxed);
                });
            }
            while calls.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(pause)).await;
    let mut stops = Vec::new();
    for i in 0..3 {
        if let Ok(mut clients) = clients.lock() {
            clients[i] = None;
        }
        let stopping = Instant::now();
        nodes[i].terminate().await?;
        stops.push(stopping.elapsed());
        settled(&store, 2).await?;
        let node = start_node("postgres", Some(&etcd), &prefix, &format!("node-{i}"), 10).await?;
        let client = Client::new(node.transport().await?);
        nodes[i] = node;
        if let Ok(mut clients) = clients.lock() {
            clients[i] = Some(client);
        }
        settled(&store, 3).await?;
    }
    tokio::time::sleep(Duration::from_secs(pause)).await;
    stop.cancel();
    publisher.await?;
    watcher.await?;
    let published =
        std::mem::take(&mut *published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let all_arrived = || {
        let at = arrivals.at.lock().ok()?;
        published.iter().all(|id| at.contains_key(id.as_bytes())).then_some(())
    };
    let _ =
        wait_until("every delivery to arrive", Duration::from_secs(60), || async { all_arrived() })
            .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let arrived = arrivals.at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let lost = published.iter().filter(|id| !arrived.contains_key(id.as_bytes())).count();
    let duplicates = arrivals.count.load(Ordering::Relaxed).saturating_sub(arrived.len() as u64);
    let gaps = gaps.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    let total: Duration = gaps.iter().sum();
    let mean = if gaps.is_empty() { Duration::ZERO } else { total / gaps.len() as u32 };
    let stops: Vec<String> = stops.iter().map(|d| format!("{:.2} s", d.as_secs_f64())).collect();
    println!(
        "rolling restart (3 node processes on etcd + PostgreSQL, 64 partitions, {rate} events/s through the running nodes)"
    );
    println!(
        "  each node stopped with SIGTERM and started again, one at a time; the stops took {}",
        stops.join(", ")
    );
    println!(
        "  partitions without an owner: {} handoffs, longest {:.0} ms, mean {:.0} ms",
        gaps.len(),
        longest.as_secs_f64() * 1000.0,
        mean.as_secs_f64() * 1000.0
    );
    println!(
        "  events published: {}; refused by every node: {}; delivered: {}; lost: {lost}; duplicates: {duplicates}",
        published.len(),
        refused.load(Ordering::Relaxed),
        published.len() - lost
    );
    println!();
    Ok(())
}

/// Returns each owned partition with its owner, from the owner keys; `None` when etcd does not
/// answer.
async fn owners(store: &tidings_scheduler::store::EtcdStore) -> Option<BTreeMap<u32, String>> {
    let page = store.range_prefix(b"owners/", 0).await.ok()?;
    Some(
        page.kvs
            .into_iter()
            .filter_map(|kv| {
                let partition: u32 =
                    String::from_utf8_lossy(&kv.key).rsplit('/').next()?.parse().ok()?;
                Some((partition, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect(),
    )
}

/// The hardware's ceiling: the same receiver driven by a plain HTTP load loop.
/// `count` deliveries stored in a cluster's PostgreSQL, then ListDeliveries pages of 10 filtered
/// by contact, by campaign and by a status nothing has, timed through the gRPC API.
async fn queries(count: u64) -> anyhow::Result<()> {
    use tidings_client::v1::{DeliveryFilter, DeliveryStatus, ListDeliveriesRequest};
    use tidings_scheduler::delivery::record::{Delivery, Status, derived_id};
    const CONTACTS: u64 = 100_000;
    const CAMPAIGNS: u64 = 100;
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix();
    let node = start_node("postgres", Some(&etcd), &prefix, "bench", 10).await?;
    let url = postgres_url(&prefix).await?;
    let state = State::postgres(PgOptions { url, ..Default::default() }).await?;
    let written = Instant::now();
    let base_ms = now_ms() - 86_400_000;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (state, next) = (state.clone(), next.clone());
        tasks.spawn(async move {
            const BATCH: u64 = 2_000;
            loop {
                let start = next.fetch_add(BATCH, Ordering::Relaxed);
                if start >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let writes = (start..(start + BATCH).min(count))
                    .map(|i| {
                        let partition = (i % 64) as PartitionId;
                        let created_ms = base_ms + (i as i64) * 50;
                        let id = derived_id(partition, created_ms, &format!("bench-{i}"));
                        let status = if i % 50 == 0 { Status::Failed } else { Status::Delivered };
                        let delivery: Delivery = serde_json::from_value(serde_json::json!({
                            "id": id, "partition": partition, "webhook_id": "hook",
                            "campaign_id": format!("camp{}", i % CAMPAIGNS), "run_id": "",
                            "contact_id": format!("u{}", i % CONTACTS), "event_id": "",
                            "status": status, "reason": "", "request": null, "attempts": [],
                            "retry_index": 0, "dispatch_seq": 0, "next_attempt_ms": null,
                            "created_ms": created_ms, "updated_ms": created_ms,
                        }))?;
                        Ok(Write::delivery(&delivery)?)
                    })
                    .collect::<anyhow::Result<Vec<Write>>>()?;
                state.write(writes).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let write_secs = written.elapsed().as_secs_f64();
    let mut api = tidings_client::DeliveryServiceClient::new(node.transport().await?);
    println!(
        "queries (a cluster node on etcd + PostgreSQL, {count} deliveries over 64 partitions, {CONTACTS} contacts, {CAMPAIGNS} campaigns; ListDeliveries pages of 10 through the API)"
    );
    println!(
        "  deliveries written:          {:>10.0} /s ({count} in {write_secs:.1} s)",
        count as f64 / write_secs
    );
    let filters = [
        ("by contact", DeliveryFilter { contact_id: "u4242".into(), ..Default::default() }),
        ("by campaign", DeliveryFilter { campaign_id: "camp7".into(), ..Default::default() }),
        (
            "by a status nothing has",
            DeliveryFilter { status: DeliveryStatus::Skipped as i32, ..Default::default() },
        ),
        ("no filter", DeliveryFilter::default()),
    ];
    for (name, filter) in filters {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..20 {
            let asked = Instant::now();
            let page = api
                .list_deliveries(ListDeliveriesRequest {
                    filter: Some(filter.clone()),
                    page_size: 10,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            times.push(asked.elapsed().as_micros() as i64);
            found = page.deliveries.len();
        }
        times.sort_unstable();
        println!(
            "  {name:<24} p50 {:>7.2} ms, max {:>7.2} ms ({found} found)",
            percentile(&times, 0.5) as f64 / 1000.0,
            *times.last().unwrap_or(&0) as f64 / 1000.0
        );
    }
    console_pages(
        &node,
        &[
            ("by contact", "contact=u4242"),
            ("by campaign", "campaign=camp7"),
            ("failed, of a webhook", "webhook=hook&status=failed"),
            ("no filter", ""),
        ],
    )
    .await?;
    println!();
    Ok(())
}

/// Times the console's deliveries page (50 rows rendered as HTML) for each query, then the
/// page after the first of the last one.
async fn console_pages(node: &NodeProcess, queries: &[(&str, &str)]) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    println!("  the console's /deliveries page, 50 rows as HTML:");
    let mut last = String::new();
    for (name, query) in queries {
        last = console_page(&http, node, name, query).await?;
    }
    let next = last
        .split_once("rel=\"next\" href=\"/deliveries?")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(query, _)| query.replace("&amp;", "&"));
    if let Some(query) = next {
        console_page(&http, node, "the second page", &query).await?;
    }
    Ok(())
}

async fn console_page(
    http: &reqwest::Client,
    node: &NodeProcess,
    name: &str,
    query: &str,
) -> anyhow::Result<String> {
    let mut times = Vec::new();
    let mut html = String::new();
    for _ in 0..20 {
        let asked = Instant::now();
        html = http
            .get(format!("{}/deliveries?{query}", node.url()))
            .header("cookie", format!("tidings_token={}", node.token().unwrap_or_default()))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        times.push(asked.elapsed().as_micros() as i64);
    }
    times.sort_unstable();
    let rows = html.matches("<tr>").count().saturating_sub(1);
    println!(
        "    {name:<22} p50 {:>7.2} ms, max {:>7.2} ms ({rows} rows, {} KiB)",
        percentile(&times, 0.5) as f64 / 1000.0,
        *times.last().unwrap_or(&0) as f64 / 1000.0,
        html.len() / 1024
    );
    Ok(html)
}

async fn ceiling(seconds: u64) -> anyhow::Result<f64> {
    let (url, arrivals) = crate::receiver::start().await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true).build()?;
    let deadline = Instant::now() + Duration::from_secs(seconds.max(1));
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let _ = client.post(&url).body("x").send().await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = arrivals.count.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();
    println!(
        "ceiling (plain HTTP load loop in this process, 64 connections, receiver answering 204)"
    );
    println!("  requests:                     {rate:>10.0} /s");
    println!();
    Ok(rate)
}

/// Creates the webhook (its body is the event id) and an event campaign on `bench`.
async fn bench_campaign(node: &NodeProcess, url: &str) -> anyhow::Result<()> {
    use tidings_client::v1::{
        ActivateCampaignRequest, Campaign, CreateCampaignRequest, CreateWebhookRequest,
        EventTrigger, Trigger, Webhook, trigger::Kind,
    };
    let mut webhooks = tidings_client::WebhookServiceClient::new(node.transport().await?);
    let webhook = Webhook {
        url: url.to_string(),
        body: "{{ event.id }}".into(),
        max_in_flight: 256,
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "bench".into(), webhook: Some(webhook) })
        .await?;
    let mut campaigns = tidings_client::CampaignServiceClient::new(node.transport().await?);
    let campaign = Campaign {
        webhook_id: "bench".into(),
        trigger: Some(Trigger {
            kind: Some(Kind::Event(EventTrigger {
                event_type: "bench".into(),
                filter: String::new(),
            })),
        }),
        ..Default::default()
    };
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "bench".into(),
            campaign: Some(campaign),
        })
        .await?;
    campaigns.activate_campaign(ActivateCampaignRequest { id: "bench".into() }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn deliver(kind: &str, count: u64, ceiling: Option<f64>) -> anyhow::Result<()> {
    let etcd = if kind == "postgres" { Some(Etcd::start().await?) } else { None };
    let node = start_node(kind, etcd.as_ref(), &unique_prefix(), "bench", 10).await?;
    let pid = node_pid(&node)?;
    let (url, arrivals) = crate::receiver::start().await?;
    bench_campaign(&node, &url).await?;
    let cpu_before = cpu_seconds(pid);
    let began = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let batch = 500u64;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (transport, next) = (node.transport().await?, next.clone());
        tasks.spawn(async move {
            let mut api = tidings_client::EventServiceClient::new(transport);
            loop {
                let start = next.fetch_add(batch, Ordering::Relaxed);
                if start >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let events = (start..(start + batch).min(count))
                    .map(|i| Event {
                        r#type: "bench".into(),
                        contact_id: format!("c{client}-{i}"),
                        ..Default::default()
                    })
                    .collect();
                api.publish_batch(PublishBatchRequest { events }).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let published = began.elapsed().as_secs_f64();
    wait_until("every delivery to arrive", Duration::from_secs(60), || async {
        (arrivals.count.load(Ordering::Relaxed) >= count).then_some(())
    })
    .await
    .with_context(|| {
        format!("{} arrived; node logs:\n{}", arrivals.count.load(Ordering::Relaxed), node.logs())
    })?;
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let (_, peak) = memory(pid);
    let rate = count as f64 / elapsed;
    println!(
        "deliver ({kind} store, node process, {count} events published with PublishBatch, one webhook each)"
    );
    println!(
        "  deliveries arriving:          {rate:>10.0} /s ({count} in {elapsed:.1} s; all published after {published:.1} s)"
    );
    if let Some(ceiling) = ceiling {
        println!("  fraction of the ceiling:      {:>10.1} %", rate / ceiling * 100.0);
    }
    println!(
        "  node CPU:                     {:>10.0} % of one core; peak memory {}",
        cpu / elapsed * 100.0,
        mib(peak)
    );
    println!();
    Ok(())
}

async fn latency(kind: &str, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let etcd = if kind == "postgres" { Some(Etcd::start().await?) } else { None };
    let node = start_node(kind, etcd.as_ref(), &unique_prefix(), "bench", 10).await?;
    let (url, arrivals) = crate::receiver::start().await?;
    bench_campaign(&node, &url).await?;
    arrivals.record.store(true, Ordering::Relaxed);
    let returned: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let total = rate * seconds;
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let api = tidings_client::EventServiceClient::new(node.transport().await?);
    for i in 0..total {
        // Open loop: event i is sent at its scheduled time whatever the previous calls did.
        let at = began + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at.into()).await;
        let (mut api, returned) = (api.clone(), returned.clone());
        tasks.spawn(async move {
            let event =
                Event { r#type: "bench".into(), contact_id: format!("c{i}"), ..Default::default() };
            if let Ok(response) =
                api.publish(tidings_client::v1::PublishRequest { event: Some(event) }).await
                && let Ok(mut returned) = returned.lock()
            {
                returned.push((response.into_inner().event_id, Instant::now()));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    wait_until("every delivery to arrive", Duration::from_secs(120), || async {
        (arrivals.count.load(Ordering::Relaxed) >= total).then_some(())
    })
    .await?;
    let arrived = arrivals.at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut latencies: Vec<i64> = returned
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .filter_map(|(id, at)| {
            let arrival = arrived.get(id.as_bytes())?;
            Some(
                arrival.saturating_duration_since(*at).as_micros() as i64
                    - at.saturating_duration_since(*arrival).as_micros() as i64,
            )
        })
        .collect();
    latencies.sort_unstable();
    let ms = |us: i64| us as f64 / 1000.0;
    println!(
        "latency ({kind} store, node process, {rate} events/s for {seconds} s, Publish returning -> request at the receiver)"
    );
    println!(
        "  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} deliveries",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or(0)),
        latencies.len()
    );
    println!();
    Ok(())
}

/// One cluster node on etcd + PostgreSQL taking `rate` events/s for `seconds`, each event one
/// delivery, with `delivery.retention` at `retention` seconds: what arrived, what was refused,
/// etcd's database size and the deliveries PostgreSQL keeps, every 30 s and at the end.
async fn sustained(rate: u64, seconds: u64, retention: u64) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix();
    let env = vec![("TIDINGS_DELIVERY__RETENTION".to_string(), format!("{retention}s"))];
    let node = start_node_with("postgres", Some(&etcd), &prefix, "bench", 10, env).await?;
    let pid = node_pid(&node)?;
    let url = postgres_url(&prefix).await?;
    let state = State::postgres(PgOptions { url, ..Default::default() }).await?;
    let (hook, arrivals) = crate::receiver::start().await?;
    bench_campaign(&node, &hook).await?;
    let partitions = partition_count(&node).await? as PartitionId;
    let kept = || async {
        let mut total = 0;
        for partition in 0..partitions {
            total += state.kept_deliveries(partition).await?;
        }
        Ok::<_, anyhow::Error>(total)
    };
    println!(
        "sustained (a cluster node on etcd + PostgreSQL, {rate} events/s for {seconds} s with PublishBatch every 100 ms, one webhook each, delivery.retention {retention} s)"
    );
    println!(
        "  {:>6} {:>10} {:>10} {:>8} {:>10} {:>12} {:>9}",
        "s", "published", "arrived", "refused", "etcd db", "deliveries", "node RSS"
    );
    let published = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let api = tidings_client::EventServiceClient::new(node.transport().await?);
    let per_tick = rate / 10;
    let ticks = seconds * 10;
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let report = |at: u64| {
        let (published, refused, arrivals) = (published.clone(), refused.clone(), arrivals.clone());
        let etcd_size = etcd.db_size();
        async move {
            let kept = kept().await?;
            let (rss, _) = memory(pid);
            println!(
                "  {at:>6} {:>10} {:>10} {:>8} {:>10} {:>12} {:>9}",
                published.load(Ordering::Relaxed),
                arrivals.count.load(Ordering::Relaxed),
                refused.load(Ordering::Relaxed),
                kib(etcd_size),
                kept,
                mib(rss)
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    for tick in 0..ticks {
        tokio::time::sleep_until((began + Duration::from_millis(tick * 100)).into()).await;
        if tick > 0 && tick % 300 == 0 {
            report(tick / 10).await?;
        }
        let (mut api, published, refused) = (api.clone(), published.clone(), refused.clone());
        tasks.spawn(async move {
            let events = (0..per_tick)
                .map(|i| Event {
                    r#type: "bench".into(),
                    contact_id: format!("c{tick}-{i}"),
                    ..Default::default()
                })
                .collect();
            match api.publish_batch(PublishBatchRequest { events }).await {
                Ok(_) => published.fetch_add(per_tick, Ordering::Relaxed),
                Err(_) => refused.fetch_add(per_tick, Ordering::Relaxed),
            };
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let total = published.load(Ordering::Relaxed);
    let _ = wait_until("every delivery to arrive", Duration::from_secs(120), || async {
        (arrivals.count.load(Ordering::Relaxed) >= total).then_some(())
    })
    .await;
    report(began.elapsed().as_secs()).await?;
    let arrived = arrivals.count.load(Ordering::Relaxed);
    println!(
        "  {total} published, {} refused, {arrived} arrived ({} missing); etcd database {}; {} deliveries kept for a retention of {retention} s (about {} at {rate}/s)",
        refused.load(Ordering::Relaxed),
        total.saturating_sub(arrived),
        kib(etcd.db_size()),
        kept().await?,
        rate * retention
    );
    println!();
    Ok(())
}

/// Imports `count` contacts through BatchUpsertContacts streams, 1,000 per message.
async fn import_contacts(node: &NodeProcess, count: u64) -> anyhow::Result<f64> {
    import_contacts_through(&[node], 4, count).await
}

/// Imports `count` contacts through `per_node` BatchUpsertContacts streams to each of `nodes`,
/// 1,000 per message, built as they are sent. Contact `i` has `plan` pro or free (every other
/// one) and `score` `i % 100`.
async fn import_contacts_through(
    nodes: &[&NodeProcess],
    per_node: u64,
    count: u64,
) -> anyhow::Result<f64> {
    use tidings_client::prost_types::{Struct, Value, value::Kind as V};
    use tidings_client::v1::{BatchUpsertContactsRequest, Contact};
    let began = Instant::now();
    let streams = per_node * nodes.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let transport = nodes[(stream % nodes.len() as u64) as usize].transport().await?;
        tasks.spawn(async move {
            let mut api = tidings_client::ContactServiceClient::new(transport);
            let mut ids = (stream..count).step_by(streams as usize);
            let messages = std::iter::from_fn(move || {
                let contacts: Vec<Contact> = ids
                    .by_ref()
                    .take(1000)
                    .map(|i| Contact {
                        id: format!("c{i:07}"),
                        attributes: Some(Struct {
                            fields: [
                                (
                                    "plan".to_string(),
                                    Value {
                                        kind: Some(V::StringValue(
                                            if i % 2 == 0 { "pro" } else { "free" }.into(),
                                        )),
                                    },
                                ),
                                (
                                    "score".to_string(),
                                    Value { kind: Some(V::NumberValue((i % 100) as f64)) },
                                ),
                            ]
                            .into(),
                        }),
                        timezone: "Europe/Paris".into(),
                        ..Default::default()
                    })
                    .collect();
                (!contacts.is_empty()).then_some(BatchUpsertContactsRequest { contacts })
            });
            let done = api.batch_upsert_contacts(tokio_stream::iter(messages)).await?.into_inner();
            anyhow::ensure!(done.rejected_count == 0, "{} contacts rejected", done.rejected_count);
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(began.elapsed().as_secs_f64())
}

/// Contacts at scale: `count` contacts imported through three nodes on etcd + PostgreSQL,
/// then on-demand runs: one nobody matches, twice (owners read their partitions' contacts from
/// PostgreSQL page by page; the second run finds them in PostgreSQL's cache), and one whose
/// audience is a tenth of the contacts, sent to a receiver that answers at once.
async fn contacts(count: u64) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start_node("postgres", Some(&etcd), &prefix, &format!("node-{i}"), 10).await?);
    }
    let cluster = nodes[0].cluster().await?;
    wait_until("the partitions spread over the three nodes", Duration::from_secs(60), || {
        let mut cluster = cluster.clone();
        async move {
            let list = cluster.list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
            let owners: std::collections::BTreeSet<String> =
                list.partitions.iter().map(|p| p.owner.clone()).collect();
            (owners.len() == 3 && !owners.contains("")).then_some(())
        }
    })
    .await?;
    let pids: Vec<u32> = nodes.iter().map(node_pid).collect::<anyhow::Result<_>>()?;
    let rss = |pids: &[u32]| pids.iter().map(|pid| memory(*pid).0).collect::<Vec<u64>>();
    let show = |sizes: &[u64]| sizes.iter().map(|s| mib(*s)).collect::<Vec<_>>().join(", ");
    let rss_empty = rss(&pids);
    let refs: Vec<&NodeProcess> = nodes.iter().collect();
    let import_secs = import_contacts_through(&refs, 2, count).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_imported = rss(&pids);

    let arrivals = fanout_webhook(&nodes[0]).await?;
    let nobody = "contact.attributes.score > 1000.0";
    let (load_secs, _, _) = run_campaign(&nodes[0], "warm", nobody, 0, &arrivals).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_cached = rss(&pids);
    let (eval_secs, _, _) = run_campaign(&nodes[0], "nobody", nobody, 0, &arrivals).await?;
    let tenth = count / 10;
    let cpu_before: Vec<f64> = pids.iter().map(|pid| cpu_seconds(*pid)).collect();
    let (evaluated, delivered, run) =
        run_campaign(&nodes[0], "tenth", "contact.attributes.score < 10.0", tenth, &arrivals)
            .await?;
    let cpu: Vec<f64> =
        pids.iter().zip(&cpu_before).map(|(pid, before)| cpu_seconds(*pid) - before).collect();
    let peaks: Vec<u64> = pids.iter().map(|pid| memory(*pid).1).collect();
    anyhow::ensure!(run.delivered == tenth, "delivered {} of {tenth}: {run:?}", run.delivered);

    println!(
        "contacts (three nodes on etcd + PostgreSQL, 64 partitions, {count} contacts, on-demand runs)"
    );
    println!(
        "  import (BatchUpsert, 2 streams per node):{:>9.0} contacts/s ({import_secs:.1} s)",
        count as f64 / import_secs
    );
    println!(
        "  node RSS: {} empty; {} after the import; {} after the first run",
        show(&rss_empty),
        show(&rss_imported),
        show(&rss_cached)
    );
    println!(
        "  first run (nobody matches):     {:>9.0} contacts/s ({load_secs:.1} s)",
        count as f64 / load_secs
    );
    println!(
        "  second run, audience evaluation: {:>9.0} contacts/s, {:.0} per node ({eval_secs:.1} s, nobody matches)",
        count as f64 / eval_secs,
        count as f64 / eval_secs / 3.0
    );
    println!(
        "  run to a tenth ({tenth} contacts): {delivered:.1} s to deliver all ({evaluated:.1} s to evaluate and queue); {:.0} deliveries/s",
        tenth as f64 / delivered
    );
    println!(
        "  node CPU during that run: {} % of one core; peak memory {}",
        cpu.iter().map(|c| format!("{:.0}", c / delivered * 100.0)).collect::<Vec<_>>().join(", "),
        show(&peaks)
    );
    println!();
    Ok(())
}

/// Starts a receiver and creates the `fanout` webhook that the runs of `run_campaign` send to.
async fn fanout_webhook(node: &NodeProcess) -> anyhow::Result<Arc<crate::receiver::Arrivals>> {
    use tidings_client::v1::{CreateWebhookRequest, Webhook};
    let (url, arrivals) = crate::receiver::start().await?;
    let mut webhooks = tidings_client::WebhookServiceClient::new(node.transport().await?);
    let webhook = Webhook {
        url,
        body: r#"{"contact": "{{ contact.id }}", "plan": "{{ contact.attributes.plan }}"}"#.into(),
        max_in_flight: 256,
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest {
            webhook_id: "fanout".into(),
            webhook: Some(webhook),
        })
        .await?;
    Ok(arrivals)
}

/// Creates an on-demand campaign over the contacts matching `filter`, runs it, and waits for
/// every partition to finish evaluating and `expected` deliveries to arrive. Returns the
/// seconds until evaluation ended and until the last delivery arrived.
async fn run_campaign(
    node: &NodeProcess,
    id: &str,
    filter: &str,
    expected: u64,
    arrivals: &crate::receiver::Arrivals,
) -> anyhow::Result<(f64, f64, tidings_client::v1::Run)> {
    use tidings_client::v1::{
        ActivateCampaignRequest, Audience, Campaign, CreateCampaignRequest, GetRunRequest,
        OnDemandTrigger, RunCampaignRequest, Trigger, trigger::Kind,
    };
    let mut campaigns = tidings_client::CampaignServiceClient::new(node.transport().await?);
    let campaign = Campaign {
        webhook_id: "fanout".into(),
        audience: Some(Audience { segment_id: String::new(), filter: filter.into() }),
        trigger: Some(Trigger { kind: Some(Kind::OnDemand(OnDemandTrigger {})) }),
        ..Default::default()
    };
    campaigns
        .create_campaign(CreateCampaignRequest { campaign_id: id.into(), campaign: Some(campaign) })
        .await?;
    campaigns.activate_campaign(ActivateCampaignRequest { id: id.into() }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = arrivals.count.load(Ordering::Relaxed);
    let began = Instant::now();
    let run = campaigns
        .run_campaign(RunCampaignRequest { id: id.into(), ..Default::default() })
        .await?
        .into_inner();
    let mut evaluated = None;
    loop {
        let current = campaigns
            .get_run(GetRunRequest { campaign_id: id.into(), run_id: run.id.clone() })
            .await?
            .into_inner();
        if evaluated.is_none() && current.partitions_done == current.partitions {
            evaluated = Some(began.elapsed().as_secs_f64());
        }
        let arrived = arrivals.count.load(Ordering::Relaxed) - before;
        if let Some(evaluated) = evaluated
            && arrived >= expected
            && current.delivered + current.failed >= expected
        {
            return Ok((evaluated, began.elapsed().as_secs_f64(), current));
        }
        anyhow::ensure!(
            began.elapsed() < Duration::from_secs(1800),
            "run stalled: {current:?}, {arrived} arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fanout(kind: &str, count: u64) -> anyhow::Result<()> {
    let etcd = if kind == "postgres" { Some(Etcd::start().await?) } else { None };
    let node = start_node(kind, etcd.as_ref(), &unique_prefix(), "bench", 10).await?;
    let pid = node_pid(&node)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_empty, _) = memory(pid);
    let import_secs = import_contacts(&node, count).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_imported, _) = memory(pid);

    let arrivals = fanout_webhook(&node).await?;

    // The first run loads each partition's contacts into its owner's cache (reading the store
    // while they load); the second evaluates from the cache alone. No contact is in either
    // audience, so nothing is sent.
    let nobody = "contact.attributes.score > 1000.0";
    let (load_secs, _, _) = run_campaign(&node, "warm", nobody, 0, &arrivals).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_cached, _) = memory(pid);
    let (eval_secs, _, _) = run_campaign(&node, "nobody", nobody, 0, &arrivals).await?;
    // The whole run: every contact evaluated, sent to, and the outcome recorded.
    let cpu_before = cpu_seconds(pid);
    let (evaluated, delivered, run) =
        run_campaign(&node, "everyone", "contact.attributes.score >= 0.0", count, &arrivals)
            .await?;
    let cpu = cpu_seconds(pid) - cpu_before;
    let (_, peak) = memory(pid);
    anyhow::ensure!(run.delivered == count, "delivered {} of {count}: {run:?}", run.delivered);

    let partitions = partition_count(&node).await?;
    println!(
        "fanout ({kind} store, node process, {partitions} partitions, {count} contacts, on-demand run)"
    );
    println!(
        "  import (BatchUpsert, 4 streams):{:>9.0} contacts/s ({import_secs:.1} s)",
        count as f64 / import_secs
    );
    println!(
        "  memory for the cached contacts:{:>10} (node RSS {} empty, {} after the import, {} with the contacts cached; {:.0} bytes per contact)",
        mib(rss_cached.saturating_sub(rss_imported)),
        mib(rss_empty),
        mib(rss_imported),
        mib(rss_cached),
        rss_cached.saturating_sub(rss_imported) as f64 / count as f64
    );
    println!(
        "  first run, loading the cache:  {:>10.0} contacts/s ({load_secs:.1} s, nobody matches)",
        count as f64 / load_secs
    );
    println!(
        "  audience evaluation alone:     {:>10.0} contacts/s ({eval_secs:.1} s, nobody matches)",
        count as f64 / eval_secs
    );
    println!(
        "  run over everyone:             {delivered:>10.1} s to deliver all ({evaluated:.1} s to evaluate and queue); {:.0} deliveries/s",
        count as f64 / delivered
    );
    println!(
        "  node CPU during the run:       {:>10.0} % of one core; peak memory {}",
        cpu / delivered * 100.0,
        mib(peak)
    );
    println!();
    Ok(())
}
