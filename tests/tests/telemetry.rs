//! Observability end to end: traces exported over OTLP to a real collector (a tonic server of
//! the collector's services), Prometheus text on `metrics.listen` parsed by a Prometheus text
//! parser, and JSON logs carrying the trace.

use std::time::Duration;

use tidings_client::v1::{
    Campaign, EventTrigger, PublishRequest, RetryPolicy, Webhook, trigger::Kind,
};
use tidings_tests::otlp::{Collector, Span, SpanKind, attribute, hex};
use tidings_tests::setup::{active_campaign, trigger, webhook};
use tidings_tests::{
    NodeOptions, NodeProcess, Receiver, Reply, free_port, http_request, wait_until,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn options(collector: Option<&Collector>, metrics_port: u16) -> NodeOptions {
    let mut env = vec![
        ("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into()),
        ("TIDINGS_METRICS__LISTEN".into(), format!("127.0.0.1:{metrics_port}")),
        ("TIDINGS_TELEMETRY__METRICS_INTERVAL".into(), "1s".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_SERVICE_NAME".into(), "tidings-under-test".into()),
        ("OTEL_RESOURCE_ATTRIBUTES".into(), "deployment.environment=test".into()),
    ];
    if let Some(collector) = collector {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint()));
    }
    NodeOptions { env, log_level: Some("info,tidings::rpc=debug".into()), ..Default::default() }
}

async fn on_event(node: &NodeProcess, receiver: &Receiver) {
    webhook(
        node,
        "ship",
        Webhook {
            url: receiver.url("/hook?token={{ contact.id }}"),
            retry_policy: Some(RetryPolicy {
                delays: vec![tidings_client::prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }],
                jitter: Some(0.0),
            }),
            ..Default::default()
        },
    )
    .await;
    active_campaign(
        node,
        "notice",
        Campaign {
            webhook_id: "ship".into(),
            trigger: trigger(Kind::Event(EventTrigger {
                event_type: "order.shipped".into(),
                filter: String::new(),
            })),
            ..Default::default()
        },
    )
    .await;
}

async fn publish_traced(node: &NodeProcess, contact: &str) {
    let mut call = tidings_client::tonic::Request::new(PublishRequest {
        event: Some(tidings_client::v1::Event {
            r#type: "order.shipped".into(),
            contact_id: contact.into(),
            ..Default::default()
        }),
    });
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    call.metadata_mut().insert("traceparent", traceparent.parse().expect("metadata"));
    node.events().await.expect("client").publish(call).await.expect("publish");
}

fn attr(span: &Span, key: &str) -> Option<String> {
    attribute(&span.attributes, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_publish_exports_its_server_span_and_a_client_span_per_attempt() {
    let collector = Collector::start().await.expect("collector");
    let receiver = Receiver::start().await.expect("receiver");
    // The first attempt fails, the retry succeeds.
    receiver.script([Reply::Status(500), Reply::Status(200)]);
    let node = NodeProcess::start(options(Some(&collector), free_port().expect("port")))
        .await
        .expect("node");
    on_event(&node, &receiver).await;
    publish_traced(&node, "user-1").await;

    let received = receiver.wait_for(2, Duration::from_secs(20)).await.expect("two attempts");
    let sent: Vec<String> =
        received.iter().map(|r| r.header("traceparent").expect("traceparent").into()).collect();
    for traceparent in &sent {
        assert!(traceparent.starts_with(&format!("00-{TRACE}-")), "{traceparent}");
    }

    let spans = wait_until("the attempts' spans", Duration::from_secs(20), || async {
        let spans = collector.spans();
        let clients = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).count();
        (clients >= 2).then_some(spans)
    })
    .await
    .expect("spans exported");

    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32 && s.name == "tidings.v1.EventService/Publish")
        .expect("a SERVER span for Publish");
    assert_eq!(hex(&server.trace_id), TRACE, "the call's trace is continued");
    assert_eq!(hex(&server.parent_span_id), PARENT, "the caller's span is the parent");
    assert_eq!(attr(server, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(server, "rpc.service").as_deref(), Some("tidings.v1.EventService"));
    assert_eq!(attr(server, "rpc.method").as_deref(), Some("Publish"));
    assert_eq!(attr(server, "rpc.grpc.status_code").as_deref(), Some("0"));

    let mut clients: Vec<&Span> =
        spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    clients.sort_by_key(|s| s.start_time_unix_nano);
    let port = receiver.port().to_string();
    for (i, client) in clients.iter().enumerate() {
        assert_eq!(hex(&client.trace_id), TRACE, "attempt {i} is in the call's trace");
        assert_eq!(client.name, "POST");
        assert_eq!(attr(client, "http.request.method").as_deref(), Some("POST"));
        assert_eq!(
            attr(client, "url.full"),
            Some(format!("http://127.0.0.1:{port}/hook?token=REDACTED")),
            "query values are left out"
        );
        assert_eq!(attr(client, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(attr(client, "server.port"), Some(port.clone()));
        assert_eq!(attr(client, "tidings.webhook.id").as_deref(), Some("ship"));
        assert_eq!(
            sent[i],
            format!("00-{TRACE}-{}-01", hex(&client.span_id)),
            "the webhook's traceparent is the CLIENT span"
        );
    }
    assert_eq!(attr(clients[0], "http.response.status_code").as_deref(), Some("500"));
    assert_eq!(attr(clients[0], "error.type").as_deref(), Some("500"));
    assert_eq!(attr(clients[0], "http.request.resend_count"), None);
    assert_eq!(attr(clients[1], "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(clients[1], "error.type"), None);
    assert_eq!(attr(clients[1], "http.request.resend_count").as_deref(), Some("1"));

    let resource = collector.resources().into_iter().next().expect("a resource");
    assert_eq!(attribute(&resource, "service.name").as_deref(), Some("tidings-under-test"));
    assert_eq!(attribute(&resource, "deployment.environment").as_deref(), Some("test"));
    assert!(attribute(&resource, "service.instance.id").is_some());

    // JSON logs inside the call carry its trace.
    let logs = node.logs();
    let traced = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|line| line["trace_id"] == TRACE && line["rpc.method"] == "Publish");
    let traced = traced.unwrap_or_else(|| panic!("a log line in the Publish trace:\n{logs}"));
    assert_eq!(traced["span_id"].as_str().map(str::len), Some(16));

    // Metrics go over OTLP too.
    wait_until("metrics over OTLP", Duration::from_secs(20), || async {
        let names = collector.metric_names();
        (names.iter().any(|n| n == "http.client.request.duration")
            && names.iter().any(|n| n == "rpc.server.duration"))
        .then_some(())
    })
    .await
    .expect("metrics exported");

    // A run continues the trace of the RunCampaign call that started it.
    const RUN_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    tidings_client::ContactServiceClient::connect(node.url())
        .await
        .expect("client")
        .upsert_contact(tidings_client::v1::UpsertContactRequest {
            contact: Some(tidings_client::v1::Contact {
                id: "user-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("contact");
    active_campaign(
        &node,
        "promo",
        Campaign {
            webhook_id: "ship".into(),
            trigger: trigger(Kind::OnDemand(Default::default())),
            ..Default::default()
        },
    )
    .await;
    let mut call = tidings_client::tonic::Request::new(tidings_client::v1::RunCampaignRequest {
        id: "promo".into(),
        ..Default::default()
    });
    let traceparent = format!("00-{RUN_TRACE}-b7ad6b7169203331-01");
    call.metadata_mut().insert("traceparent", traceparent.parse().expect("metadata"));
    node.campaigns().await.expect("client").run_campaign(call).await.expect("run");
    wait_until("the run's attempt in the call's trace", Duration::from_secs(20), || async {
        collector
            .spans()
            .iter()
            .any(|s| s.kind == SpanKind::Client as i32 && hex(&s.trace_id) == RUN_TRACE)
            .then_some(())
    })
    .await
    .expect("the run's attempt continues the RunCampaign trace");
}

/// Scrapes `/metrics` and parses it as Prometheus text.
async fn scrape(port: u16) -> prometheus_parse::Scrape {
    let body = http_get(port, "/metrics").await;
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

async fn http_get(port: u16, path: &str) -> String {
    let (head, body) = http_request(port, path).await.expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain"), "{head}");
    body
}

fn sum(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => 0.0,
        })
        .sum()
}

/// Returns the metric names of the README's metric table.
fn documented_metrics() -> Vec<String> {
    let section = tidings_tests::readme::section("## Observability");
    let mut names = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split('|').nth(1).unwrap_or_default();
        if !(cell.contains("_total") || cell.contains("tidings_") || cell.contains("_seconds")) {
            continue;
        }
        names.extend(cell.split('`').skip(1).step_by(2).map(str::to_string));
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text_and_move_under_load() {
    let receiver = Receiver::start().await.expect("receiver");
    let failing = Receiver::start().await.expect("receiver");
    failing.default_reply(Reply::Status(500));
    let port = free_port().expect("port");
    let mut options = options(None, port);
    options.env.push(("TIDINGS_DELIVERY__CIRCUIT_THRESHOLD".into(), "2".into()));
    let node = NodeProcess::start(options).await.expect("node");
    on_event(&node, &receiver).await;
    // A webhook that always fails (retried once, then its circuit opens), and a run.
    webhook(
        &node,
        "down",
        Webhook {
            url: failing.url("/down"),
            retry_policy: Some(RetryPolicy {
                delays: vec![tidings_client::prost_types::Duration {
                    seconds: 0,
                    nanos: 50_000_000,
                }],
                jitter: Some(0.0),
            }),
            ..Default::default()
        },
    )
    .await;
    active_campaign(
        &node,
        "alarm",
        Campaign {
            webhook_id: "down".into(),
            trigger: trigger(Kind::Event(EventTrigger {
                event_type: "order.shipped".into(),
                filter: String::new(),
            })),
            ..Default::default()
        },
    )
    .await;
    webhook(
        &node,
        "slow",
        Webhook { url: receiver.url("/slow"), rate_limit: 20.0, ..Default::default() },
    )
    .await;
    active_campaign(
        &node,
        "blast",
        Campaign {
            webhook_id: "slow".into(),
            trigger: trigger(Kind::OnDemand(Default::default())),
            ..Default::default()
        },
    )
    .await;
    let before = scrape(port).await;
    for i in 0..20 {
        publish_traced(&node, &format!("user-{i}")).await;
    }
    let mut contacts =
        tidings_client::ContactServiceClient::connect(node.url()).await.expect("client");
    for i in 0..30 {
        contacts
            .upsert_contact(tidings_client::v1::UpsertContactRequest {
                contact: Some(tidings_client::v1::Contact {
                    id: format!("user-{i}"),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("contact");
    }
    node.campaigns()
        .await
        .expect("client")
        .run_campaign(tidings_client::v1::RunCampaignRequest {
            id: "blast".into(),
            ..Default::default()
        })
        .await
        .expect("run");
    receiver.wait_for(50, Duration::from_secs(20)).await.expect("deliveries");
    wait_until("the deliveries counted", Duration::from_secs(20), || async {
        let scrape = scrape(port).await;
        (sum(&scrape, "tidings_deliveries_total", Some(("outcome", "delivered"))) >= 50.0)
            .then_some(())
    })
    .await
    .expect("counted");

    // Every metric the README documents is there.
    let after = wait_until("every documented metric", Duration::from_secs(20), || async {
        let scrape = scrape(port).await;
        let names: std::collections::BTreeSet<String> =
            scrape.samples.iter().map(|s| s.metric.clone()).collect();
        documented_metrics().iter().all(|name| names.contains(name)).then_some(scrape)
    })
    .await
    .unwrap_or_else(|_| {
        panic!("documented metrics missing; documented: {:?}", documented_metrics())
    });
    assert!(documented_metrics().len() >= 19, "{:?}", documented_metrics());
    assert_eq!(
        sum(&after, "tidings_circuit_state", Some(("tidings_webhook_id", "down"))),
        2.0,
        "the failing webhook's circuit is open"
    );
    assert!(
        sum(&after, "tidings_rate_limit_waits_total", Some(("tidings_webhook_id", "slow"))) > 0.0
    );
    assert!(sum(&after, "tidings_run_contacts_total", Some(("outcome", "queued"))) >= 30.0);
    assert_eq!(
        sum(&after, "tidings_events_total", Some(("result", "accepted")))
            - sum(&before, "tidings_events_total", Some(("result", "accepted"))),
        20.0
    );
    assert!(
        sum(&after, "http_client_request_duration_seconds", Some(("tidings_webhook_id", "ship")))
            >= 20.0,
        "every attempt is in the HTTP client histogram"
    );
    assert!(
        sum(&after, "rpc_server_duration_seconds", Some(("rpc_method", "Publish"))) >= 20.0,
        "every call is in the RPC histogram"
    );
    assert!(
        sum(&after, "tidings_store_transaction_duration_seconds", None)
            > sum(&before, "tidings_store_transaction_duration_seconds", None)
    );
    assert_eq!(sum(&after, "tidings_partitions_owned", None), 8.0, "an embedded node owns 8");
    assert_eq!(sum(&after, "tidings_partition_ownership_changes_total", None), 8.0);
    // Label values stay bounded: no contact ids anywhere.
    assert!(
        after.samples.iter().all(|s| s.labels.values().all(|v| !v.starts_with("user-"))),
        "contact ids never label a metric"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_prometheus_scrapes_a_node() {
    let prometheus = std::env::var_os("PROMETHEUS")
        .map_or_else(|| std::path::PathBuf::from("prometheus"), Into::into);
    let port = free_port().expect("port");
    let node = NodeProcess::start(options(None, port)).await.expect("node");
    // The text passes Prometheus' own checker.
    let body = http_get(port, "/metrics").await;
    let mut promtool = std::process::Command::new(prometheus.with_file_name("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs Debian's prometheus package)");
    use std::io::Write;
    promtool.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tidings\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .expect("config");
    let web = free_port().expect("port");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let mut server = std::process::Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus (scripts/test installs Debian's prometheus package)");
    let query = "/api/v1/query?query=tidings_partitions_owned";
    let owned = wait_until("Prometheus to scrape the node", Duration::from_secs(30), || async {
        let (_, body) = http_request(web, query).await?;
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        let value = answer["data"]["result"][0]["value"][1].as_str()?.to_string();
        Some(value)
    })
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let logs = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    assert_eq!(owned.unwrap_or_else(|e| panic!("{e}\n{logs}")), "8", "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_observability_commands_work_as_written() {
    let section = tidings_tests::readme::section("## Observability");
    let block =
        section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let command = block.replace("\\\n", " ");
    let mut lines = command.lines().map(str::trim).filter(|l| !l.is_empty());
    let serve = lines.next().expect("the serve command");
    let curl = lines.next().expect("the curl command");
    // The variables the README sets, as it sets them; only the addresses change.
    let (assignments, rest) = serve.split_once("cargo run").expect("cargo run");
    assert!(rest.trim().ends_with("-p tidings-server -- serve"), "{serve}");
    let collector = Collector::start().await.expect("collector");
    let port = free_port().expect("port");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut readme_port = 0;
    for assignment in assignments.split_whitespace() {
        let (key, value) = assignment.split_once('=').expect("KEY=value");
        let value = match key {
            "TIDINGS_METRICS__LISTEN" => {
                readme_port = value.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
                format!("127.0.0.1:{port}")
            }
            "OTEL_EXPORTER_OTLP_ENDPOINT" => collector.endpoint(),
            _ => value.to_string(),
        };
        env.push((key.to_string(), value));
    }
    assert!(env.iter().any(|(k, _)| k == "OTEL_SERVICE_NAME"), "{env:?}");
    let node = NodeProcess::start(NodeOptions { env, ..Default::default() }).await.expect("node");
    // curl -s http://127.0.0.1:PORT/metrics | grep '^NAME'
    let url = curl.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL");
    assert!(url.contains(&format!(":{readme_port}/")), "{url}");
    let path = &url[url.find("/metrics").expect("/metrics")..];
    let pattern =
        curl.rsplit("grep '^").next().and_then(|p| p.strip_suffix('\'')).expect("grep '^NAME'");
    let body = http_get(port, path).await;
    assert!(body.lines().any(|l| l.starts_with(pattern)), "no line starts with {pattern}:\n{body}");
    // And the node's spans reach the collector the README points it at.
    node.cluster()
        .await
        .expect("client")
        .list_nodes(tidings_client::v1::ListNodesRequest::default())
        .await
        .expect("call");
    wait_until("a span at the collector", Duration::from_secs(20), || async {
        collector
            .resources()
            .iter()
            .any(|r| attribute(r, "service.name").as_deref() == Some("tidings"))
            .then_some(())
    })
    .await
    .expect("spans exported");
}
