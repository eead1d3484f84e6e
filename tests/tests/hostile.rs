//! Hostile input against a node process: each input is refused naming the field, or fails the
//! one delivery with a recorded reason, and the node answers health right after.

use std::time::Duration;

use tidings_client::tonic::Code;
use tidings_client::tonic::transport::Channel;
use tidings_client::v1::{
    CreateSegmentRequest, CreateWebhookRequest, Header, Segment, SendTestRequest,
    UpdateWebhookRequest, Webhook,
};
use tidings_client::{SegmentServiceClient, WebhookServiceClient};
use tidings_tests::{NodeOptions, NodeProcess, Receiver, Reply};

fn options(extra: &[(&str, &str)]) -> NodeOptions {
    let mut env =
        vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".to_string(), r#"["127.0.0.1/32"]"#.to_string())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    NodeOptions { env, ..Default::default() }
}

async fn healthy(node: &NodeProcess) {
    let channel = Channel::from_shared(node.url()).expect("url").connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let answer = tokio::time::timeout(Duration::from_secs(2), health.check(request))
        .await
        .expect("health answers within 2 s")
        .expect("health");
    assert_eq!(answer.into_inner().status, 1, "SERVING");
}

/// Creates a webhook; returns the error's code and message when refused.
async fn create(
    webhooks: &mut WebhookServiceClient<tidings_client::Transport>,
    id: &str,
    webhook: Webhook,
) -> Result<(), (Code, String)> {
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
        .await
        .map(|_| ())
        .map_err(|s| (s.code(), s.message().to_string()))
}

fn refused(result: Result<(), (Code, String)>, field: &str, reason: &str) {
    let (code, message) = result.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains(field), "names {field}: {message}");
    assert!(message.contains(reason), "says {reason:?}: {message}");
}

/// Sends a test of `body` to the receiver; returns the attempt's error.
async fn send_body(
    webhooks: &mut WebhookServiceClient<tidings_client::Transport>,
    receiver: &Receiver,
    id: &str,
    body: &str,
) -> String {
    let webhook = Webhook { url: receiver.url("/hook"), body: body.into(), ..Default::default() };
    create(webhooks, id, webhook).await.expect("accepted at write time");
    let answer = webhooks
        .send_test(SendTestRequest { id: id.into(), ..Default::default() })
        .await
        .expect("send test")
        .into_inner();
    answer.attempt.expect("attempt").error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_templates_and_expressions_cannot_hurt_a_node() {
    let node = NodeProcess::start(options(&[])).await.expect("node");
    let receiver = Receiver::start().await.expect("receiver");
    let mut webhooks = node.webhooks().await.expect("client");
    let hook = |body: String| Webhook {
        url: "https://example.com/hook".into(),
        body,
        ..Default::default()
    };

    // 15,000 nested blocks in a 256 KiB body: refused before the parser recurses.
    let nested = format!("{}x{}", "{%if 1%}".repeat(15_000), "{%endif%}".repeat(15_000));
    assert!(nested.len() <= 256 * 1024, "{}", nested.len());
    refused(create(&mut webhooks, "nested", hook(nested)).await, "webhook.body", "nest more than");
    healthy(&node).await;

    let elsif = format!("{{% if a %}}{}{{% endif %}}", "{% elsif b %}x".repeat(5_000));
    refused(create(&mut webhooks, "elsif", hook(elsif)).await, "webhook.body", "elsif");
    healthy(&node).await;

    let range = "{% for i in (1..2000000000) %}x{% endfor %}".to_string();
    refused(
        create(&mut webhooks, "range", hook(range)).await,
        "webhook.body",
        "more than 10000 items",
    );
    let variable = "{% for i in (1..event.data.n) %}x{% endfor %}".to_string();
    refused(
        create(&mut webhooks, "variable", hook(variable)).await,
        "webhook.body",
        "integer literals",
    );
    let loops = "{% for a in (1..10) %}{% for b in (1..10) %}{% for c in (1..10) %}{% endfor %}{% endfor %}{% endfor %}";
    refused(create(&mut webhooks, "loops", hook(loops.into())).await, "webhook.body", "loops nest");
    healthy(&node).await;

    let path = format!("{{{{ a{} | default: 1 }}}}", ".a".repeat(5_000));
    refused(create(&mut webhooks, "path", hook(path)).await, "webhook.body", "segments");
    healthy(&node).await;

    // Accepted at write time, bounded at render time: the attempt fails with the reason.
    let doubling = "{% assign s = 'xxxxxxxx' %}{% for i in (1..40) %}{% assign s = s | append: s %}{% endfor %}{{ s | size }}";
    let error = send_body(&mut webhooks, &receiver, "doubling", doubling).await;
    assert!(error.contains("longer than"), "{error}");
    healthy(&node).await;
    let capture = "{% capture s %}xxxxxxxx{% endcapture %}{% for i in (1..40) %}{% capture s %}{{ s }}{{ s }}{% endcapture %}{% endfor %}{{ s | size }}";
    let error = send_body(&mut webhooks, &receiver, "capture", capture).await;
    assert!(error.contains("longer than"), "{error}");
    let replace = "{% assign s = 'xxxxxxxxxxxxxxxx' %}{% for i in (1..8) %}{% assign s = s | replace: 'x', s %}{% endfor %}{{ s | size }}";
    let error = send_body(&mut webhooks, &receiver, "replace", replace).await;
    assert!(error.contains("longer than"), "{error}");
    healthy(&node).await;
    // Every bound on the source holds, yet 90,000 appends to a 512 KiB string would hold a
    // worker for seconds: the render stops at its time budget.
    let slow = "{% assign s = 'xxxxxxxx' %}{% for i in (1..16) %}{% assign s = s | append: s %}{% endfor %}{% for i in (1..300) %}{% for j in (1..300) %}{% assign t = s | append: 'x' %}{% endfor %}{% endfor %}{{ t | size }}";
    let error = send_body(&mut webhooks, &receiver, "slow", slow).await;
    assert!(error.contains("took longer than 1000 ms to render"), "{error}");
    healthy(&node).await;
    let overflow = "{{ -9223372036854775808 | divided_by: -1 }}";
    let error = send_body(&mut webhooks, &receiver, "overflow", overflow).await;
    assert!(error.contains("overflow"), "{error}");
    let modulo = "{{ -9223372036854775808 | modulo: -1 }}";
    let error = send_body(&mut webhooks, &receiver, "modulo", modulo).await;
    assert!(error.contains("overflow"), "{error}");
    healthy(&node).await;

    // CEL: nesting and nested comprehensions are refused at write time.
    let mut segments = SegmentServiceClient::connect(node.url()).await.expect("client");
    let segment = |filter: &str| CreateSegmentRequest {
        segment_id: "s".into(),
        segment: Some(Segment { filter: filter.into(), ..Default::default() }),
    };
    let nested_all = "contact.attributes.a.all(x, contact.attributes.b.all(y, x != y))";
    let status = segments.create_segment(segment(nested_all)).await.expect_err("nested");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("segment.filter") && status.message().contains("comprehension"),
        "{}",
        status.message()
    );
    let deep = format!("{}true{}", "(".repeat(1_000), ")".repeat(1_000));
    let status = segments.create_segment(segment(&deep)).await.expect_err("deep");
    assert!(status.message().contains("deeper than"), "{}", status.message());
    healthy(&node).await;
    // One comprehension whose body walks the list again: quadratic in the contact's data, so
    // it runs only over data small enough for its budget.
    let walk = "contact.attributes.l.all(x, x in contact.attributes.l)";
    segments.create_segment(segment(walk)).await.expect("allowed at write time");
    let mut contacts =
        tidings_client::ContactServiceClient::connect(node.url()).await.expect("client");
    for (id, items) in [("big", 8_000), ("small", 100)] {
        use tidings_client::prost_types::{ListValue, Struct, Value, value::Kind as ValueKind};
        let values = (0..items)
            .map(|i| Value { kind: Some(ValueKind::NumberValue(f64::from(i))) })
            .collect();
        let list = Value { kind: Some(ValueKind::ListValue(ListValue { values })) };
        let attributes = Struct { fields: [("l".to_string(), list)].into() };
        let contact = tidings_client::v1::Contact {
            id: id.into(),
            attributes: Some(attributes),
            ..Default::default()
        };
        let request = tidings_client::v1::UpsertContactRequest {
            contact: Some(contact),
            etag: String::new(),
        };
        contacts.upsert_contact(request).await.expect("contact");
    }
    let count = segments
        .count_segment(tidings_client::v1::CountSegmentRequest { id: "s".into() })
        .await
        .expect("count")
        .into_inner();
    assert_eq!((count.count, count.total), (1, 2), "only the small contact is evaluated");
    healthy(&node).await;

    // Numeric edges name the field.
    let tiny = Webhook { rate_limit: 1e-300, ..hook(String::new()) };
    refused(create(&mut webhooks, "tiny", tiny).await, "webhook.rate_limit", "between");
    healthy(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_keeps_its_origin_and_its_credentials() {
    let node = NodeProcess::start(options(&[])).await.expect("node");
    let mut webhooks = node.webhooks().await.expect("client");
    for url in [
        "https://{{ event.data.host }}/hook",
        "https://example.com{{ event.data.suffix }}/hook",
        "https://example.com:{{ event.data.port }}/hook",
        "{{ event.data.url }}",
    ] {
        let webhook = Webhook { url: url.into(), ..Default::default() };
        let (code, message) = create(&mut webhooks, "w", webhook).await.expect_err(url);
        assert_eq!(code, Code::InvalidArgument, "{url}: {message}");
        assert!(message.contains("webhook.url"), "{url}: {message}");
    }
    // The path and query may be templated.
    let secret =
        Header { name: "Authorization".into(), value: "Bearer s3cret".into(), secret: true };
    let webhook = Webhook {
        url: "https://api.example.com/v1/{{ contact.id }}?o={{ event.data.order }}".into(),
        headers: vec![secret.clone()],
        ..Default::default()
    };
    create(&mut webhooks, "w", webhook).await.expect("path templated");

    // Moving it elsewhere without giving the secret again is refused ...
    let moved = Webhook {
        id: "w".into(),
        url: "https://elsewhere.example.net/hook".into(),
        ..Default::default()
    };
    let mask = |paths: &[&str]| tidings_client::prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    };
    let status = webhooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(moved.clone()),
            update_mask: Some(mask(&["url"])),
            ..Default::default()
        })
        .await
        .expect_err("secret not given again");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("webhook.headers") && status.message().contains("Authorization"),
        "{}",
        status.message()
    );
    // ... and accepted with it. The path may change freely.
    let with_secret = Webhook { headers: vec![secret], ..moved };
    webhooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(with_secret),
            update_mask: Some(mask(&["url", "headers"])),
            ..Default::default()
        })
        .await
        .expect("secret given again");
    let path_only = Webhook {
        id: "w".into(),
        url: "https://elsewhere.example.net/other/{{ contact.id }}".into(),
        ..Default::default()
    };
    webhooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(path_only),
            update_mask: Some(mask(&["url"])),
            ..Default::default()
        })
        .await
        .expect("same origin");
    healthy(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_ignore_proxy_variables_and_respect_the_guard() {
    let receiver = Receiver::start().await.expect("receiver");
    let proxy = Receiver::start().await.expect("proxy");
    receiver.default_reply(Reply::WithHeaders(
        200,
        vec![
            ("Set-Cookie".into(), "session=abc123".into()),
            ("X-Api-Token".into(), "tok-999".into()),
            ("X-Request-Id".into(), "r-1".into()),
        ],
    ));
    let proxy_url = proxy.url("");
    let node = NodeProcess::start(options(&[
        ("HTTP_PROXY", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
    ]))
    .await
    .expect("node");
    let mut webhooks = node.webhooks().await.expect("client");
    let webhook = Webhook { url: receiver.url("/hook"), ..Default::default() };
    create(&mut webhooks, "direct", webhook).await.expect("created");
    let attempt = webhooks
        .send_test(SendTestRequest { id: "direct".into(), ..Default::default() })
        .await
        .expect("sent")
        .into_inner()
        .attempt
        .expect("attempt");
    assert_eq!(attempt.status_code, 200, "{attempt:?}");
    assert_eq!(receiver.received().len(), 1, "went straight to the receiver");
    assert!(proxy.received().is_empty(), "the proxy variables are ignored");
    // Credentials in the answer are not kept in the attempt log.
    let headers = &attempt.response_headers;
    assert_eq!(headers.get("set-cookie").map(String::as_str), Some("[redacted]"), "{headers:?}");
    assert_eq!(headers.get("x-api-token").map(String::as_str), Some("[redacted]"), "{headers:?}");
    assert_eq!(headers.get("x-request-id").map(String::as_str), Some("r-1"), "{headers:?}");

    for (id, url, reason) in [
        ("nat64", "http://[64:ff9b::7f00:1]/hook", "NAT64"),
        ("sixtofour", "http://[2002:7f00:1::1]/hook", "6to4"),
        ("teredo", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook", "Teredo"),
        ("compat", "http://[::7f00:1]/hook", "IPv4-compatible"),
        ("ietf", "http://192.0.0.8/hook", "IETF"),
    ] {
        let webhook = Webhook { url: url.into(), ..Default::default() };
        create(&mut webhooks, id, webhook).await.expect("created");
        let attempt = webhooks
            .send_test(SendTestRequest { id: id.into(), ..Default::default() })
            .await
            .expect("sent")
            .into_inner()
            .attempt
            .expect("attempt");
        assert!(attempt.error.contains(reason), "{url}: {}", attempt.error);
    }
    healthy(&node).await;

    // With delivery.ports, other ports are refused.
    let limited =
        NodeProcess::start(options(&[("TIDINGS_DELIVERY__PORTS", "[443]")])).await.expect("node");
    let mut webhooks = limited.webhooks().await.expect("client");
    let webhook = Webhook { url: receiver.url("/hook"), ..Default::default() };
    create(&mut webhooks, "port", webhook).await.expect("created");
    let attempt = webhooks
        .send_test(SendTestRequest { id: "port".into(), ..Default::default() })
        .await
        .expect("sent")
        .into_inner()
        .attempt
        .expect("attempt");
    assert!(attempt.error.contains("delivery.ports"), "{}", attempt.error);
    healthy(&limited).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    // No key in the environment: the node generates one into its data directory.
    let env = vec![("TIDINGS_SECRETS__KEY".to_string(), String::new())];
    let node = NodeProcess::start(NodeOptions { auth: true, env, ..Default::default() })
        .await
        .expect("node");
    let mode = |name: &str| {
        let path = node.data_dir().join(name);
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700, "data directory");
    for file in ["tidings.redb", "secrets.key", "admin.token"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
}

/// A node serves at most `grpc.max_streams` watch streams, and drops a watcher that leaves its
/// buffer full, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_bounded_and_a_slow_watcher_is_dropped() {
    use tidings_client::v1::{
        ActivateCampaignRequest, Campaign, CreateCampaignRequest, Event, EventTrigger,
        PublishBatchRequest, Trigger, WatchDeliveriesRequest, trigger::Kind,
    };
    let receiver = Receiver::start().await.expect("receiver");
    let node =
        NodeProcess::start(options(&[("TIDINGS_GRPC__MAX_STREAMS", "2")])).await.expect("node");
    // A caller with small HTTP/2 windows: what it does not read backs up quickly.
    let channel = tidings_client::tonic::transport::Endpoint::from_shared(node.url())
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut deliveries = tidings_client::DeliveryServiceClient::new(channel);
    let watch = WatchDeliveriesRequest::default;
    let mut slow = deliveries.watch_deliveries(watch()).await.expect("first").into_inner();
    let second = deliveries.watch_deliveries(watch()).await.expect("second").into_inner();
    let third = deliveries.watch_deliveries(watch()).await.expect_err("third");
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("grpc.max_streams"), "{}", third.message());
    drop(second);
    tidings_tests::wait_until("a place to free up", Duration::from_secs(5), || {
        let mut deliveries = deliveries.clone();
        async move { deliveries.watch_deliveries(watch()).await.ok().map(|_| ()) }
    })
    .await
    .expect("the closed stream's place is free again");

    // Thousands of delivery changes while `slow` reads nothing.
    let mut webhooks = node.webhooks().await.expect("client");
    let webhook = Webhook { url: receiver.url("/hook"), ..Default::default() };
    create(&mut webhooks, "w", webhook).await.expect("webhook");
    let mut campaigns = node.campaigns().await.expect("client");
    let trigger = Trigger {
        kind: Some(Kind::Event(EventTrigger { event_type: "e".into(), filter: String::new() })),
    };
    let campaign =
        Campaign { webhook_id: "w".into(), trigger: Some(trigger), ..Default::default() };
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "c".into(),
            campaign: Some(campaign),
        })
        .await
        .expect("campaign");
    campaigns.activate_campaign(ActivateCampaignRequest { id: "c".into() }).await.expect("active");
    let mut events = node.events().await.expect("client");
    for batch in 0..4 {
        let events_batch = (0..500)
            .map(|i| Event {
                r#type: "e".into(),
                contact_id: format!("u{batch}-{i}"),
                ..Default::default()
            })
            .collect();
        events
            .publish_batch(PublishBatchRequest { events: events_batch })
            .await
            .expect("published");
    }
    receiver.wait_for(2_000, Duration::from_secs(60)).await.expect("delivered");
    tokio::time::sleep(Duration::from_secs(7)).await;
    dropped_as_behind(&mut slow).await;
    healthy(&node).await;
}

/// WatchRun drops a caller that leaves its buffer full too, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_run_watcher_is_dropped() {
    use tidings_client::v1::{
        Audience, BatchUpsertContactsRequest, Campaign, Contact, OnDemandTrigger,
        RunCampaignRequest, Trigger, WatchRunRequest, trigger::Kind,
    };
    let receiver = Receiver::start().await.expect("receiver");
    let node = NodeProcess::start(options(&[])).await.expect("node");
    let mut contacts =
        tidings_client::ContactServiceClient::connect(node.url()).await.expect("client");
    let people: Vec<Contact> =
        (0..400).map(|i| Contact { id: format!("u{i:03}"), ..Default::default() }).collect();
    let request = BatchUpsertContactsRequest { contacts: people };
    contacts.batch_upsert_contacts(tokio_stream::iter([request])).await.expect("contacts");
    // Ten sends a second: the run's counters change at every look the watch takes.
    let webhook = Webhook { url: receiver.url("/hook"), rate_limit: 10.0, ..Default::default() };
    tidings_tests::setup::webhook(&node, "w", webhook).await;
    let campaign = Campaign {
        webhook_id: "w".into(),
        audience: Some(Audience { segment_id: String::new(), filter: "true".into() }),
        trigger: Some(Trigger { kind: Some(Kind::OnDemand(OnDemandTrigger {})) }),
        ..Default::default()
    };
    tidings_tests::setup::active_campaign(&node, "c", campaign).await;
    let mut campaigns = node.campaigns().await.expect("client");
    let run = campaigns
        .run_campaign(RunCampaignRequest { id: "c".into(), ..Default::default() })
        .await
        .expect("run")
        .into_inner();

    // A caller with a small HTTP/2 window that reads nothing.
    let channel = tidings_client::tonic::transport::Endpoint::from_shared(node.url())
        .expect("url")
        .initial_stream_window_size(1024)
        .connect()
        .await
        .expect("connect");
    let mut slow = tidings_client::CampaignServiceClient::new(channel)
        .watch_run(WatchRunRequest { campaign_id: "c".into(), run_id: run.id })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::sleep(Duration::from_secs(25)).await;
    dropped_as_behind(&mut slow).await;
    healthy(&node).await;
}

/// Reads what a slow watcher left unread and checks the stream then ends with
/// RESOURCE_EXHAUSTED saying the watch fell behind.
async fn dropped_as_behind<T>(stream: &mut tidings_client::tonic::Streaming<T>) {
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(item) = stream.message().await.transpose() {
            if let Err(status) = item {
                return Some(status);
            }
        }
        None
    })
    .await
    .expect("the stream ends");
    let status = ended.expect("with an error");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("fell behind"), "{}", status.message());
}
