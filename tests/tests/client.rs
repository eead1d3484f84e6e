//! The Rust client against real nodes: retries across a node restart, typed field violations,
//! pagination as a stream, watches, and the verification of a real delivery.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::TryStreamExt;
use tidings_client::v1::{
    Campaign, CampaignState, Contact, DeliveryFilter, DeliveryStatus, Event, RunState, Webhook,
};
use tidings_client::webhook::Verifier;
use tidings_client::{Client, Error, RetryPolicy};
use tidings_tests::{NodeOptions, NodeProcess, Receiver, free_port};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn loopback(listen: Option<String>, data_dir: Option<std::path::PathBuf>) -> NodeOptions {
    NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        listen,
        data_dir,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_calls_are_retried_across_a_node_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let options = loopback(Some(listen), Some(dir.path().to_path_buf()));
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    let client = node.client().await.expect("client");
    let created = client
        .webhooks()
        .create(Webhook::new("https://example.com/hook").description("kept across restarts"))
        .await
        .expect("create");

    node.kill();
    // A write that is not safe to repeat fails at once, saying a retry could help.
    let refused = client.webhooks().create(Webhook::new("https://example.com/other")).await;
    assert!(
        matches!(&refused, Err(error @ Error::Unavailable(_)) if error.retryable()),
        "{refused:?}"
    );
    // Reads and idempotent publishes wait for the node to come back.
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        NodeProcess::start(options).await.expect("restarted node")
    });
    let (webhooks, events) = (client.webhooks(), client.events());
    let (read, published) = tokio::join!(
        webhooks.get(&created.id),
        events.publish(Event::new("order.shipped", "user-1"))
    );
    let _node = restart.await.expect("restart task");
    assert_eq!(read.expect("read after the restart").description, "kept across restarts");
    let published = published.expect("publish after the restart");
    assert!(!published.event_id.is_empty());
    assert!(!published.duplicate, "the first success is no duplicate");

    // Without retries, the same read during an outage fails.
    let no_retry = Client::builder()
        .endpoint(format!("http://127.0.0.1:{}", free_port().expect("port")))
        .retry_policy(RetryPolicy::none())
        .connect_lazy()
        .expect("client");
    let failed = no_retry.webhooks().get(&created.id).await;
    assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_come_back_as_field_violations() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let client = node.client().await.expect("client");
    let error = client
        .webhooks()
        .create(Webhook::new("ftp://example.com").timeout(Duration::from_millis(1)))
        .await
        .expect_err("an ftp URL is refused");
    let fields: Vec<&str> = error.violations().iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"webhook.url"), "{error:?}");
    assert!(fields.contains(&"webhook.timeout"), "{error:?}");
    assert!(error.violations().iter().all(|v| !v.reason.is_empty()), "{error:?}");
    assert!(!error.retryable());

    let missing = client.webhooks().get("no-such-webhook").await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    client
        .webhooks()
        .create_with_id("dup", Webhook::new("https://example.com"))
        .await
        .expect("one");
    let again = client.webhooks().create_with_id("dup", Webhook::new("https://example.com")).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_webhooks_stream_page_after_page() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let client = node.client().await.expect("client");
    let mut created = BTreeSet::new();
    for i in 0..1000 {
        let webhook = client
            .webhooks()
            .create_with_id(
                format!("hook-{i:04}"),
                Webhook::new("https://example.com/{{ contact.id }}"),
            )
            .await
            .expect("create");
        created.insert(webhook.id);
    }
    let first = client.webhooks().list().page_size(137).page().await.expect("page");
    assert_eq!(first.items.len(), 137);
    assert!(!first.next_page_token.is_empty());

    let listed: Vec<String> = client
        .webhooks()
        .list()
        .page_size(137)
        .stream()
        .map_ok(|webhook| webhook.id)
        .try_collect()
        .await
        .expect("stream");
    assert_eq!(listed.len(), 1000, "every webhook once");
    assert!(listed.windows(2).all(|pair| pair[0] < pair[1]), "in id order");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_watched_and_its_delivery_verifies() {
    let receiver = Receiver::start().await.expect("receiver");
    let node = NodeProcess::start(loopback(None, None)).await.expect("node");
    let client = node.client().await.expect("client");
    let webhook = client
        .webhooks()
        .create(
            Webhook::new(receiver.url("/notify/{{ contact.id }}"))
                .signing_secret(SECRET)
                .body(r#"{"plan": "{{ contact.attributes.plan }}"}"#),
        )
        .await
        .expect("webhook");
    for (id, plan) in [("ada", "pro"), ("bob", "free"), ("cy", "pro")] {
        client
            .contacts()
            .upsert(Contact::new(id).attributes(serde_json::json!({"plan": plan})))
            .await
            .expect("contact");
    }
    let campaign = client
        .campaigns()
        .create(Campaign::new(&webhook.id).audience_filter("contact.attributes.plan == 'pro'"))
        .await
        .expect("campaign");
    assert_eq!(campaign.state(), CampaignState::Draft);
    client.campaigns().activate(&campaign.id).await.expect("activate");

    let mut watch = client
        .deliveries()
        .watch(DeliveryFilter { campaign_id: campaign.id.clone(), ..Default::default() })
        .await
        .expect("watch deliveries");
    let run = client.campaigns().run(&campaign.id).await.expect("run");
    let runs = client.campaigns().watch_run(&campaign.id, &run.id).await.expect("watch run");
    let last = runs
        .try_filter(|run| futures::future::ready(run.state() == RunState::Completed))
        .try_next()
        .await
        .expect("run stream")
        .expect("the run completes");
    assert_eq!((last.audience, last.delivered), (2, 2), "{last:?}");

    let mut delivered = BTreeSet::new();
    while delivered.len() < 2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), watch.try_next())
            .await
            .expect("a delivery change within 10 s")
            .expect("watch stream")
            .expect("the watch goes on");
        if delivery.status() == DeliveryStatus::Delivered {
            delivered.insert(delivery.contact_id);
        }
    }
    assert_eq!(delivered, BTreeSet::from(["ada".to_string(), "cy".to_string()]));

    let listed = client
        .deliveries()
        .list(DeliveryFilter { run_id: run.id.clone(), ..Default::default() })
        .all()
        .await
        .expect("list");
    assert_eq!(listed.len(), 2);

    let verifier = Verifier::new(SECRET).expect("secret");
    for received in receiver.wait_for(2, Duration::from_secs(10)).await.expect("requests") {
        let headers = received.header_map();
        verifier.verify(&headers, &received.body).expect("the signature verifies");
        let reference = standardwebhooks::Webhook::new(SECRET).expect("secret");
        reference.verify(&received.body, &headers).expect("and so says the reference");
        assert_eq!(&received.body[..], br#"{"plan": "pro"}"#);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_client_certificate_and_a_token_come_from_the_builder() {
    use tidings_tests::certs::{Authority, write};
    let dir = tempfile::tempdir().expect("dir");
    let servers = Authority::new("server CA").expect("CA");
    let clients = Authority::new("client CA").expect("CA");
    let (cert, key) = servers.issue(&["localhost", "127.0.0.1"]).expect("issued");
    let (client_cert, client_key) = clients.issue(&["billing-service"]).expect("issued");
    let env = vec![
        (
            "TIDINGS_GRPC__TLS__CERT_FILE".into(),
            write(dir.path(), "node.pem", &cert).expect("w").display().to_string(),
        ),
        (
            "TIDINGS_GRPC__TLS__KEY_FILE".into(),
            write(dir.path(), "node.key", &key).expect("w").display().to_string(),
        ),
        (
            "TIDINGS_GRPC__TLS__CLIENT_CA_FILE".into(),
            write(dir.path(), "client-ca.pem", &clients.pem).expect("w").display().to_string(),
        ),
    ];
    let node = NodeProcess::start(NodeOptions { env, auth: true, ..Default::default() })
        .await
        .expect("node");
    let token = std::fs::read_to_string(node.data_dir().join("admin.token")).expect("admin token");
    let endpoint = format!("https://localhost:{}", node.addr().port());
    let builder = Client::builder()
        .endpoint(&endpoint)
        .ca_certificate(servers.pem.clone())
        .retry_policy(RetryPolicy::none());

    let client = builder
        .clone()
        .client_certificate(client_cert.clone(), client_key.clone())
        .token(token.trim())
        .user_agent("billing-service/1.2")
        .connect()
        .await
        .expect("connects over mutual TLS");
    assert!(client.webhooks().list().all().await.expect("list").is_empty());

    let anonymous = builder
        .clone()
        .client_certificate(client_cert, client_key)
        .connect()
        .await
        .expect("connects");
    let refused = anonymous.webhooks().list().page().await;
    assert!(matches!(refused, Err(Error::Unauthenticated(_))), "{refused:?}");

    // With TLS 1.3 the client finishes its side of the handshake before the node checks the
    // certificate, so the refusal may come with the first call rather than with connect().
    let refused = match builder.token(token.trim()).connect().await {
        Err(error) => error,
        Ok(client) => client.webhooks().list().page().await.expect_err("refused"),
    };
    assert!(
        matches!(refused, Error::Unavailable(_)),
        "the node refuses a client without a certificate: {refused:?}"
    );

    let plain =
        Client::builder().endpoint(node.url()).ca_certificate(servers.pem.clone()).connect_lazy();
    assert!(matches!(plain, Err(Error::Config(_))), "certificates with http:// are refused");
}
