//! Webhook delivery end to end against a real HTTP receiver: rendering, Standard Webhooks
//! signatures (verified with the `standardwebhooks` crate), retries, failure classes, the
//! address guard, the attempt log and SendTest.

use std::time::Duration;

use tidings_client::prost_types::{
    Duration as PbDuration, Struct, Value, value::Kind as ValueKind,
};
use tidings_client::v1::{
    ActivateCampaignRequest, Campaign, CreateCampaignRequest, CreateWebhookRequest, Delivery,
    DeliveryFilter, DeliveryStatus, ErrorClass, Event, EventTrigger, GetWebhookRequest, Header,
    HttpMethod, ListDeliveriesRequest, PublishRequest, RedeliverRequest, RetryPolicy,
    RotateSigningSecretRequest, SendTestRequest, Trigger, Webhook, trigger::Kind,
};
use tidings_client::{DeliveryServiceClient, WebhookServiceClient};
use tidings_tests::{NodeOptions, NodeProcess, Receiver, Reply, wait_until};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn allow_loopback() -> NodeOptions {
    NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32", "::1"]"#.into())],
        ..Default::default()
    }
}

fn data(fields: &[(&str, ValueKind)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value { kind: Some(v.clone()) }))
            .collect(),
    }
}

fn fast_retries(delays_ms: &[u64]) -> RetryPolicy {
    RetryPolicy {
        delays: delays_ms
            .iter()
            .map(|ms| PbDuration {
                seconds: (*ms / 1000) as i64,
                nanos: ((*ms % 1000) * 1_000_000) as i32,
            })
            .collect(),
        jitter: Some(0.2),
    }
}

async fn webhook(node: &NodeProcess, id: &str, webhook: Webhook) -> Webhook {
    let mut api = node.webhooks().await.expect("client");
    api.create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
        .await
        .expect("webhook")
        .into_inner()
}

/// Creates and activates a campaign calling `webhook_id` for every event of `event_type`.
async fn on_event(node: &NodeProcess, id: &str, webhook_id: &str, event_type: &str) {
    let mut api = node.campaigns().await.expect("client");
    let campaign = Campaign {
        webhook_id: webhook_id.into(),
        trigger: Some(Trigger {
            kind: Some(Kind::Event(EventTrigger {
                event_type: event_type.into(),
                filter: String::new(),
            })),
        }),
        ..Default::default()
    };
    api.create_campaign(CreateCampaignRequest { campaign_id: id.into(), campaign: Some(campaign) })
        .await
        .expect("campaign");
    api.activate_campaign(ActivateCampaignRequest { id: id.into() }).await.expect("activate");
}

async fn publish(node: &NodeProcess, event_type: &str, contact: &str, payload: Option<Struct>) {
    let mut api = node.events().await.expect("client");
    let event = Event {
        r#type: event_type.into(),
        contact_id: contact.into(),
        data: payload,
        ..Default::default()
    };
    api.publish(PublishRequest { event: Some(event) }).await.expect("publish");
}

async fn deliveries(node: &NodeProcess, webhook_id: &str) -> Vec<Delivery> {
    let mut api = DeliveryServiceClient::connect(node.url()).await.expect("client");
    let filter = DeliveryFilter { webhook_id: webhook_id.into(), ..Default::default() };
    api.list_deliveries(ListDeliveriesRequest {
        filter: Some(filter),
        page_size: 1000,
        page_token: String::new(),
    })
    .await
    .expect("list")
    .into_inner()
    .deliveries
}

/// Waits until the delivery of `webhook_id` reaches `status`.
async fn final_delivery(node: &NodeProcess, webhook_id: &str, status: DeliveryStatus) -> Delivery {
    wait_until(
        &format!("a {status:?} delivery of {webhook_id}"),
        Duration::from_secs(30),
        || async {
            deliveries(node, webhook_id).await.into_iter().find(|d| d.status == status as i32)
        },
    )
    .await
    .expect("delivery settles")
}

/// Verifies a received webhook with the `standardwebhooks` crate and with the client crate's
/// verifier; both must agree.
fn verify(received: &tidings_tests::Received, secret: &str) -> bool {
    let headers = received.header_map();
    let reference =
        standardwebhooks::Webhook::new(secret).expect("secret").verify(&received.body, &headers);
    let ours = tidings_client::webhook::Verifier::new(secret)
        .expect("secret")
        .verify(&headers, &received.body);
    assert_eq!(reference.is_ok(), ours.is_ok(), "the two verifiers disagree: {ours:?}");
    ours.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sends_the_rendered_request_signed() {
    let receiver = Receiver::start().await.expect("receiver");
    let node = NodeProcess::start(allow_loopback()).await.expect("node");
    webhook(&node, "shipping", Webhook {
        url: receiver.url("/orders/{{ event.data.order_id }}?c={{ contact.id }}"),
        method: HttpMethod::Put as i32,
        headers: vec![
            Header { name: "Authorization".into(), value: "Bearer tok-{{ contact.id }}".into(), secret: false },
            Header { name: "X-Campaign".into(), value: "{{ campaign.id }}".into(), secret: false },
        ],
        body: r#"{"order": {{ event.data.order_id }}, "who": "{{ contact.id }}", "note": "{{ event.data.note | default: 'none' }}"}"#.into(),
        signing_secret: SECRET.into(),
        ..Default::default()
    })
    .await;
    on_event(&node, "ship-notice", "shipping", "order.shipped").await;
    // Published under a trace: the webhook continues it.
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut call = tidings_client::tonic::Request::new(PublishRequest {
        event: Some(Event {
            r#type: "order.shipped".into(),
            contact_id: "user-7".into(),
            data: Some(data(&[("order_id", ValueKind::NumberValue(42.0))])),
            ..Default::default()
        }),
    });
    call.metadata_mut().insert("traceparent", PARENT.parse().expect("metadata"));
    node.events().await.expect("client").publish(call).await.expect("publish");

    let received = receiver.wait_for(1, Duration::from_secs(15)).await.expect("arrives");
    let request = &received[0];
    assert_eq!(request.method, "PUT");
    assert_eq!(request.path, "/orders/42?c=user-7");
    assert_eq!(&request.body[..], br#"{"order": 42, "who": "user-7", "note": "none"}"#);
    assert_eq!(request.header("authorization"), Some("Bearer tok-user-7"));
    assert_eq!(request.header("x-campaign"), Some("ship-notice"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert!(request.header("user-agent").is_some_and(|ua| ua.starts_with("Tidings/")));
    let trace = request.header("traceparent").expect("traceparent");
    assert!(trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && trace.len() == 55);
    assert!(!trace.contains("00f067aa0ba902b7"), "the attempt is a span of its own: {trace}");
    let id = request.header("webhook-id").expect("webhook-id").to_string();
    assert!(verify(request, SECRET), "the signature verifies with the standardwebhooks crate");
    assert!(
        !verify(request, "whsec_dGVzdC1zZWNyZXQtMjQtYnl0ZXMtbG9uZyEh"),
        "and not with another secret"
    );

    let delivered = final_delivery(&node, "shipping", DeliveryStatus::Delivered).await;
    assert_eq!(delivered.id, id, "webhook-id is the delivery id");
    assert_eq!(delivered.attempts.len(), 1);
    assert_eq!(delivered.attempts[0].status_code, 200);
    assert_eq!(
        delivered.request.as_ref().map(|r| r.headers["Authorization"].as_str()),
        Some("[redacted]")
    );
    assert!(!format!("{delivered:?}").contains("tok-user-7"), "the credential is not returned");
    assert!(!node.logs().contains("tok-user-7"), "the credential is not logged");

    // Rotation: during the grace period both secrets sign, and either one verifies.
    let mut webhooks = node.webhooks().await.expect("client");
    let rotated = webhooks
        .rotate_signing_secret(RotateSigningSecretRequest {
            id: "shipping".into(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    publish(
        &node,
        "order.shipped",
        "user-8",
        Some(data(&[("order_id", ValueKind::NumberValue(43.0))])),
    )
    .await;
    let received = receiver.wait_for(2, Duration::from_secs(15)).await.expect("arrives");
    assert!(verify(&received[1], SECRET), "the old secret still verifies");
    assert!(verify(&received[1], &rotated.signing_secret), "the new secret verifies");
    assert_eq!(received[1].header("webhook-signature").map(|s| s.split(' ').count()), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_or_fail_by_status_and_the_log_shows_why() {
    let receiver = Receiver::start().await.expect("receiver");
    let node = NodeProcess::start(allow_loopback()).await.expect("node");
    let retrying = |path: &str| Webhook {
        url: receiver.url(path),
        retry_policy: Some(fast_retries(&[200, 400, 800])),
        timeout: Some(PbDuration { seconds: 0, nanos: 300_000_000 }),
        ..Default::default()
    };
    for (id, path) in [
        ("flaky", "/flaky"),
        ("bad", "/bad"),
        ("slow", "/slow"),
        ("gone", "/gone"),
        ("busy", "/busy"),
    ] {
        webhook(&node, id, retrying(path)).await;
        on_event(&node, &format!("c-{id}"), id, &format!("e.{id}")).await;
    }

    // 503, 503, then 200: delivered on the third attempt, at the scheduled delays (±20 %).
    receiver.script([Reply::Status(503), Reply::Status(503)]);
    publish(&node, "e.flaky", "u1", None).await;
    let flaky = final_delivery(&node, "flaky", DeliveryStatus::Delivered).await;
    assert_eq!(
        flaky.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
        vec![503, 503, 200]
    );
    let starts: Vec<i64> = flaky
        .attempts
        .iter()
        .map(|a| {
            a.start_time.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        })
        .collect();
    for (gap, expected) in starts.windows(2).map(|w| w[1] - w[0]).zip([200i64, 400]) {
        assert!(
            gap as f64 >= expected as f64 * 0.8 && gap as f64 <= expected as f64 * 1.2 + 250.0,
            "gap {gap} ms for {expected} ms"
        );
    }

    // 400: fails at once, no retry.
    receiver.script([Reply::Status(400)]);
    publish(&node, "e.bad", "u1", None).await;
    let bad = final_delivery(&node, "bad", DeliveryStatus::Failed).await;
    assert_eq!(bad.attempts.len(), 1);
    assert_eq!(bad.attempts[0].error_class, ErrorClass::HttpStatus as i32);

    // A timeout retries, then the schedule ends in failure.
    receiver.script((0..4).map(|_| Reply::Delay(Duration::from_secs(2), 200)));
    publish(&node, "e.slow", "u1", None).await;
    let slow = final_delivery(&node, "slow", DeliveryStatus::Failed).await;
    assert_eq!(slow.attempts.len(), 4, "first attempt plus three retries");
    assert!(slow.attempts.iter().all(|a| a.error_class == ErrorClass::Timeout as i32));
    assert!(slow.reason.contains("gave up after 4 attempts"), "{}", slow.reason);

    // 429 with Retry-After: the next attempt waits at least that long.
    receiver.script([Reply::WithHeaders(429, vec![("retry-after".into(), "2".into())])]);
    publish(&node, "e.busy", "u1", None).await;
    let busy = final_delivery(&node, "busy", DeliveryStatus::Delivered).await;
    let starts: Vec<i64> = busy
        .attempts
        .iter()
        .map(|a| {
            a.start_time.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        })
        .collect();
    assert_eq!(busy.attempts[0].status_code, 429);
    assert!(starts[1] - starts[0] >= 2000, "Retry-After honoured: {} ms", starts[1] - starts[0]);

    // 410: fails and disables the webhook, with the reason visible.
    receiver.script([Reply::Status(410)]);
    publish(&node, "e.gone", "u1", None).await;
    final_delivery(&node, "gone", DeliveryStatus::Failed).await;
    let mut webhooks = node.webhooks().await.expect("client");
    let gone = wait_until("the webhook to be disabled", Duration::from_secs(10), || {
        let mut webhooks = webhooks.clone();
        async move {
            let w = webhooks
                .get_webhook(GetWebhookRequest { id: "gone".into() })
                .await
                .ok()?
                .into_inner();
            (w.enabled == Some(false)).then_some(w)
        }
    })
    .await
    .expect("disabled");
    assert!(gone.disabled_reason.contains("410"), "{}", gone.disabled_reason);
    let _ = &mut webhooks;

    // Redeliver a failed delivery: same id, one more attempt.
    let mut api = DeliveryServiceClient::connect(node.url()).await.expect("client");
    api.redeliver(RedeliverRequest { id: bad.id.clone() }).await.expect("redeliver");
    let redelivered = wait_until("the redelivery", Duration::from_secs(10), || {
        let mut api = api.clone();
        let id = bad.id.clone();
        async move {
            let d = api
                .get_delivery(tidings_client::v1::GetDeliveryRequest { id })
                .await
                .ok()?
                .into_inner();
            (d.status == DeliveryStatus::Delivered as i32).then_some(d)
        }
    })
    .await
    .expect("redelivered");
    assert_eq!(redelivered.attempts.len(), 2);
    let arrived = receiver.received();
    let ids: Vec<&str> = arrived
        .iter()
        .filter(|r| r.path == "/bad")
        .filter_map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(ids, vec![bad.id.as_str(), bad.id.as_str()], "the same webhook-id on every attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_unless_allow_listed() {
    let receiver = Receiver::start().await.expect("receiver");
    let port = receiver.port();
    let guarded = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let targets = [
        ("loopback", format!("http://127.0.0.1:{port}/x")),
        ("private", "http://10.0.0.1/x".to_string()),
        ("metadata", "http://169.254.169.254/latest/meta-data".to_string()),
        ("v6-loopback", format!("http://[::1]:{port}/x")),
        ("by-name", format!("http://localhost:{port}/x")),
    ];
    let mut webhooks: WebhookServiceClient<tidings_client::Transport> =
        guarded.webhooks().await.expect("client");
    for (id, url) in &targets {
        webhooks
            .create_webhook(CreateWebhookRequest {
                webhook_id: id.to_string(),
                webhook: Some(Webhook { url: url.clone(), ..Default::default() }),
            })
            .await
            .expect("webhook");
        let test = webhooks
            .send_test(SendTestRequest { id: id.to_string(), ..Default::default() })
            .await
            .expect("send test")
            .into_inner();
        let attempt = test.attempt.expect("attempt");
        assert_eq!(attempt.error_class, ErrorClass::Blocked as i32, "{id}: {attempt:?}");
        assert!(attempt.error.contains("not allowed"), "{id}: {}", attempt.error);
    }
    assert!(receiver.received().is_empty(), "nothing reached the receiver");

    // Allow-listed, the same loopback targets are reached.
    let open = NodeProcess::start(allow_loopback()).await.expect("node");
    let mut webhooks = open.webhooks().await.expect("client");
    for (id, url) in [("loopback", &targets[0].1), ("by-name", &targets[4].1)] {
        webhooks
            .create_webhook(CreateWebhookRequest {
                webhook_id: id.to_string(),
                webhook: Some(Webhook { url: url.clone(), ..Default::default() }),
            })
            .await
            .expect("webhook");
        let test = webhooks
            .send_test(SendTestRequest { id: id.to_string(), ..Default::default() })
            .await
            .expect("send test")
            .into_inner();
        assert_eq!(test.attempt.expect("attempt").status_code, 200, "{id}");
    }
    assert_eq!(receiver.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_render_failure_is_a_visible_failed_delivery() {
    let receiver = Receiver::start().await.expect("receiver");
    let node = NodeProcess::start(allow_loopback()).await.expect("node");
    webhook(
        &node,
        "strict",
        Webhook {
            url: receiver.url("/x"),
            body: "{{ event.data.missing }}".into(),
            ..Default::default()
        },
    )
    .await;
    on_event(&node, "c-strict", "strict", "e.strict").await;
    publish(&node, "e.strict", "u1", None).await;
    let failed = final_delivery(&node, "strict", DeliveryStatus::Failed).await;
    assert_eq!(failed.attempts[0].error_class, ErrorClass::Render as i32);
    assert!(failed.reason.starts_with("body: event.data.missing is not set"), "{}", failed.reason);
    assert!(receiver.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_redeliver_failed_and_retention() {
    use futures::StreamExt;
    use tidings_client::v1::{GetDeliveryRequest, RedeliverFailedRequest, WatchDeliveriesRequest};
    let receiver = Receiver::start().await.expect("receiver");
    let mut options = allow_loopback();
    options.env.push(("TIDINGS_DELIVERY__RETENTION".into(), "4s".into()));
    let node = NodeProcess::start(options).await.expect("node");
    webhook(&node, "batch", Webhook { url: receiver.url("/batch"), ..Default::default() }).await;
    on_event(&node, "c-batch", "batch", "e.batch").await;

    let mut api = DeliveryServiceClient::connect(node.url()).await.expect("client");
    let filter = DeliveryFilter {
        webhook_id: "batch".into(),
        status: DeliveryStatus::Failed as i32,
        ..Default::default()
    };
    let mut watch = api
        .watch_deliveries(WatchDeliveriesRequest { filter: Some(filter) })
        .await
        .expect("watch")
        .into_inner();
    let started = std::time::SystemTime::now();
    receiver.script((0..3).map(|_| Reply::Status(400)));
    for i in 0..3 {
        publish(&node, "e.batch", &format!("u{i}"), None).await;
    }
    // The stream shows the three failures as they happen.
    let mut failed = Vec::new();
    while failed.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(15), watch.next())
            .await
            .expect("an update")
            .expect("open")
            .expect("ok");
        assert_eq!(next.status, DeliveryStatus::Failed as i32);
        failed.push(next.id);
    }

    // Redeliver every failed delivery of the webhook since the start: all three succeed.
    let since = tidings_client::prost_types::Timestamp::from(started);
    let queued = api
        .redeliver_failed(RedeliverFailedRequest {
            webhook_id: "batch".into(),
            start_time: Some(since),
            end_time: None,
        })
        .await
        .expect("redeliver")
        .into_inner()
        .queued;
    assert_eq!(queued, 3);
    wait_until("three deliveries to succeed", Duration::from_secs(15), || async {
        (deliveries(&node, "batch")
            .await
            .iter()
            .filter(|d| d.status == DeliveryStatus::Delivered as i32)
            .count()
            == 3)
            .then_some(())
    })
    .await
    .expect("redelivered");

    // After the retention, the records are gone.
    wait_until("the retention to end", Duration::from_secs(20), || async {
        deliveries(&node, "batch").await.is_empty().then_some(())
    })
    .await
    .expect("expired");
    let gone =
        api.get_delivery(GetDeliveryRequest { id: failed[0].clone() }).await.expect_err("expired");
    assert_eq!(gone.code(), tidings_client::tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_too_long_is_disabled_and_can_be_enabled_again() {
    use tidings_client::prost_types::FieldMask;
    use tidings_client::v1::UpdateWebhookRequest;
    let receiver = Receiver::start().await.expect("receiver");
    receiver.default_reply(Reply::Status(503));
    let mut options = allow_loopback();
    options.env.push(("TIDINGS_DELIVERY__DISABLE_AFTER".into(), "1s".into()));
    options.env.push(("TIDINGS_DELIVERY__CIRCUIT_THRESHOLD".into(), "100".into()));
    let node = NodeProcess::start(options).await.expect("node");
    webhook(
        &node,
        "down",
        Webhook {
            url: receiver.url("/down"),
            retry_policy: Some(fast_retries(&[300; 10])),
            ..Default::default()
        },
    )
    .await;
    on_event(&node, "c-down", "down", "e.down").await;
    publish(&node, "e.down", "u1", None).await;
    let mut webhooks = node.webhooks().await.expect("client");
    let disabled = wait_until("the webhook to be disabled", Duration::from_secs(20), || {
        let mut webhooks = webhooks.clone();
        async move {
            let w = webhooks
                .get_webhook(GetWebhookRequest { id: "down".into() })
                .await
                .ok()?
                .into_inner();
            (w.enabled == Some(false)).then_some(w)
        }
    })
    .await
    .expect("disabled");
    assert!(disabled.disabled_reason.contains("kept failing"), "{}", disabled.disabled_reason);
    assert!(disabled.disabled_at.is_some());
    let enabled = webhooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook { id: "down".into(), enabled: Some(true), ..Default::default() }),
            update_mask: Some(FieldMask { paths: vec!["enabled".into()] }),
            etag: String::new(),
        })
        .await
        .expect("enable")
        .into_inner();
    assert_eq!(enabled.enabled, Some(true));
    assert!(enabled.disabled_reason.is_empty());
}

/// An attempt that waits on this node for its webhook's rate limit longer than its visibility
/// timer (the attempt's timeout plus a margin) is still in flight, not lost: it is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_waiting_for_the_rate_limit_are_sent_once() {
    let node = NodeProcess::start(allow_loopback()).await.expect("node");
    let receiver = Receiver::start().await.expect("receiver");
    // Five a second with a one-second timeout: the visibility timer of the attempts queued
    // last (about eight seconds of waiting) falls due long before they are sent.
    let limited = Webhook {
        url: receiver.url("/limited"),
        rate_limit: 5.0,
        timeout: Some(PbDuration { seconds: 1, nanos: 0 }),
        ..Default::default()
    };
    webhook(&node, "limited", limited).await;
    on_event(&node, "limited", "limited", "queued").await;
    let total = 40;
    let mut events = node.events().await.expect("client");
    let batch = (0..total)
        .map(|i| Event {
            r#type: "queued".into(),
            contact_id: format!("c{i}"),
            ..Default::default()
        })
        .collect();
    events
        .publish_batch(tidings_client::v1::PublishBatchRequest { events: batch })
        .await
        .expect("publish");
    wait_until("every delivery delivered", Duration::from_secs(60), || async {
        let found = deliveries(&node, "limited").await;
        (found.len() == total && found.iter().all(|d| d.status == DeliveryStatus::Delivered as i32))
            .then_some(())
    })
    .await
    .expect("delivered");
    node.quiet(Duration::from_secs(30)).await.expect("quiet");
    let received = receiver.received();
    let mut ids: Vec<&str> = received.iter().filter_map(|r| r.header("webhook-id")).collect();
    ids.sort_unstable();
    let sent = ids.len();
    ids.dedup();
    assert_eq!((sent, ids.len()), (total, total), "each delivery is sent once");
}

/// A partition keeps a bounded number of attempts in flight: past it, new events wait in its
/// inbox (visible in ListPartitions) instead of becoming tasks, and every one is still sent
/// once the endpoint catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_bound_events_wait_in_the_inbox() {
    let mut options = allow_loopback();
    options.env.push(("TIDINGS_CLUSTER__PARTITIONS".into(), "1".into()));
    options.env.push(("TIDINGS_DELIVERY__MAX_IN_FLIGHT_PER_PARTITION".into(), "3".into()));
    let node = NodeProcess::start(options).await.expect("node");
    let receiver = Receiver::start().await.expect("receiver");
    let slow = Webhook { url: receiver.url("/slow"), rate_limit: 4.0, ..Default::default() };
    webhook(&node, "slow", slow).await;
    on_event(&node, "slow", "slow", "queued").await;
    let total = 20;
    let mut events = node.events().await.expect("client");
    for i in 0..total {
        let event =
            Event { r#type: "queued".into(), contact_id: format!("c{i}"), ..Default::default() };
        events.publish(PublishRequest { event: Some(event) }).await.expect("publish");
    }
    // Four a second: once four are delivered, without the bound every other event would have
    // become an attempt long ago; with it, all but the few in flight still wait in the inbox.
    wait_until("four deliveries", Duration::from_secs(10), || async {
        let found = deliveries(&node, "slow").await;
        let delivered = found.iter().filter(|d| d.status == DeliveryStatus::Delivered as i32);
        (delivered.count() >= 4).then_some(())
    })
    .await
    .expect("four deliveries");
    let partitions = node
        .cluster()
        .await
        .expect("client")
        .list_partitions(tidings_client::v1::ListPartitionsRequest {})
        .await
        .expect("partitions")
        .into_inner()
        .partitions;
    let waiting: u64 = partitions.iter().map(|p| p.inbox_backlog).sum();
    assert!(waiting >= 10, "{waiting} events wait in the inbox");
    wait_until("every delivery delivered", Duration::from_secs(60), || async {
        let found = deliveries(&node, "slow").await;
        (found.len() == total && found.iter().all(|d| d.status == DeliveryStatus::Delivered as i32))
            .then_some(())
    })
    .await
    .expect("delivered");
    let mut ids: Vec<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(String::from))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "each delivery is sent");
}
