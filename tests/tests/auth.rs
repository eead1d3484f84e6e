//! Tokens and scopes on node processes: the first admin token in the data directory, scopes
//! checked per method, revocation on every node of a cluster within a second, and secrets that
//! appear nowhere but in CreateToken's answer.

use std::time::{Duration, Instant};

use tidings_client::tonic::metadata::MetadataValue;
use tidings_client::tonic::service::Interceptor;
use tidings_client::tonic::transport::Channel;
use tidings_client::tonic::{Code, Request, Status};
use tidings_client::v1::{
    CreateTokenRequest, CreateWebhookRequest, Event, ListTokensRequest, ListWebhooksRequest,
    PublishRequest, RevokeTokenRequest, Webhook,
};
use tidings_client::{EventServiceClient, TokenServiceClient, WebhookServiceClient};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, unique_prefix, wait_until};

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.0 {
            let value: MetadataValue<_> =
                format!("Bearer {secret}").parse().map_err(|_| Status::internal("header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Intercepted = tidings_client::tonic::service::interceptor::InterceptedService<Channel, Bearer>;

async fn channel(node: &NodeProcess) -> Channel {
    Channel::from_shared(node.url()).expect("url").connect().await.expect("connect")
}

async fn webhooks(node: &NodeProcess, secret: Option<&str>) -> WebhookServiceClient<Intercepted> {
    WebhookServiceClient::with_interceptor(channel(node).await, Bearer(secret.map(String::from)))
}

async fn events(node: &NodeProcess, secret: Option<&str>) -> EventServiceClient<Intercepted> {
    EventServiceClient::with_interceptor(channel(node).await, Bearer(secret.map(String::from)))
}

async fn tokens(node: &NodeProcess, secret: Option<&str>) -> TokenServiceClient<Intercepted> {
    TokenServiceClient::with_interceptor(channel(node).await, Bearer(secret.map(String::from)))
}

fn admin_token(node: &NodeProcess) -> Option<String> {
    let secret = std::fs::read_to_string(node.data_dir().join("admin.token")).ok()?;
    Some(secret.trim().to_string())
}

async fn create(node: &NodeProcess, admin: &str, scopes: &[&str]) -> String {
    let request = CreateTokenRequest {
        description: format!("{scopes:?} for a test"),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        expire_time: None,
    };
    let created = tokens(node, Some(admin)).await.create_token(request).await.expect("created");
    created.into_inner().secret
}

async fn publish(node: &NodeProcess, secret: Option<&str>) -> Result<(), Status> {
    let event = Event { r#type: "signup".into(), contact_id: "u1".into(), ..Default::default() };
    events(node, secret).await.publish(PublishRequest { event: Some(event) }).await.map(|_| ())
}

async fn list_webhooks(node: &NodeProcess, secret: Option<&str>) -> Result<(), Status> {
    webhooks(node, secret).await.list_webhooks(ListWebhooksRequest::default()).await.map(|_| ())
}

fn code(result: Result<(), Status>) -> Code {
    result.err().map_or(Code::Ok, |status| status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_on_one_node() {
    let node =
        NodeProcess::start(NodeOptions { auth: true, ..Default::default() }).await.expect("node");
    // The first admin token, in a file only its owner reads; the log names the file only.
    let path = node.data_dir().join("admin.token");
    let admin = admin_token(&node).expect("admin.token written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin.token mode {mode:o}");
    }
    assert!(node.logs().contains("admin.token"), "{}", node.logs());

    // No token, a malformed one, an unknown one, a wrong secret for a real id.
    let status = list_webhooks(&node, None).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{}", status.message());
    assert_eq!(code(list_webhooks(&node, Some("nonsense")).await), Code::Unauthenticated);
    let id = admin.split_once('.').expect("id.secret").0;
    let forged = format!("{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(code(list_webhooks(&node, Some(&forged)).await), Code::Unauthenticated);
    assert_eq!(code(list_webhooks(&node, Some(&admin)).await), Code::Ok);

    // Health and reflection answer without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&node).await);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    health.check(request).await.expect("health without a token");

    // A publish token publishes, and may not create a webhook; the denial names the scope.
    let publisher = create(&node, &admin, &["publish"]).await;
    assert_eq!(code(publish(&node, Some(&publisher)).await), Code::Ok);
    let webhook = Webhook { url: "https://example.com/hook".into(), ..Default::default() };
    let denied = webhooks(&node, Some(&publisher))
        .await
        .create_webhook(CreateWebhookRequest {
            webhook_id: "w".into(),
            webhook: Some(webhook.clone()),
        })
        .await
        .expect_err("publish may not write");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("`write`"), "{}", denied.message());
    assert_eq!(code(list_webhooks(&node, Some(&publisher)).await), Code::PermissionDenied);

    // A write token writes and reads, and may not manage tokens.
    let writer = create(&node, &admin, &["write"]).await;
    webhooks(&node, Some(&writer))
        .await
        .create_webhook(CreateWebhookRequest { webhook_id: "w".into(), webhook: Some(webhook) })
        .await
        .expect("write may create");
    assert_eq!(code(list_webhooks(&node, Some(&writer)).await), Code::Ok);
    assert_eq!(code(publish(&node, Some(&writer)).await), Code::PermissionDenied);
    let listed = tokens(&node, Some(&writer)).await.list_tokens(ListTokensRequest::default()).await;
    assert_eq!(listed.expect_err("write may not list tokens").code(), Code::PermissionDenied);

    // Bad requests name the field.
    let bad = tokens(&node, Some(&admin))
        .await
        .create_token(CreateTokenRequest { scopes: vec!["root".into()], ..Default::default() })
        .await
        .expect_err("unknown scope");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("scopes[0]"), "{}", bad.message());

    // An expired token stops working.
    let soon = prost_types_now(1);
    let expiring = tokens(&node, Some(&admin))
        .await
        .create_token(CreateTokenRequest {
            description: "expires".into(),
            scopes: vec!["read".into()],
            expire_time: Some(soon),
        })
        .await
        .expect("created")
        .into_inner()
        .secret;
    assert_eq!(code(list_webhooks(&node, Some(&expiring)).await), Code::Ok);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let expired = list_webhooks(&node, Some(&expiring)).await.expect_err("expired");
    assert!(expired.message().contains("expired"), "{}", expired.message());

    // Listing shows every token and no secret.
    let listed = tokens(&node, Some(&admin))
        .await
        .list_tokens(ListTokensRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tokens.len(), 4, "{listed:?}");
    let shown = format!("{listed:?}");
    for secret in [&admin, &publisher, &writer, &expiring] {
        let random = secret.split_once('.').expect("id.secret").1;
        assert!(!shown.contains(random), "ListTokens shows a secret");
    }

    // Revoked: refused right away on this node.
    let publisher_id = publisher.split_once('.').expect("id.secret").0.to_string();
    tokens(&node, Some(&admin))
        .await
        .revoke_token(RevokeTokenRequest { id: publisher_id })
        .await
        .expect("revoked");
    let revoked = publish(&node, Some(&publisher)).await.expect_err("revoked");
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert!(revoked.message().contains("revoked"), "{}", revoked.message());

    // No secret was ever logged.
    let logs = node.logs();
    for secret in [&admin, &publisher, &writer, &expiring] {
        let random = secret.split_once('.').expect("id.secret").1;
        assert!(!logs.contains(random), "a secret is in the log");
    }
}

/// A restart keeps the tokens and does not make a second admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_tokens_and_makes_no_new_admin_token() {
    let dir = tempfile::tempdir().expect("dir");
    let options =
        NodeOptions { auth: true, data_dir: Some(dir.path().into()), ..Default::default() };
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    let admin = admin_token(&node).expect("admin.token");
    let reader = create(&node, &admin, &["read"]).await;
    node.terminate().await.expect("stop");
    std::fs::remove_file(dir.path().join("admin.token")).expect("remove");
    let node = NodeProcess::start(options).await.expect("restarted");
    assert!(admin_token(&node).is_none(), "a second admin token was made");
    assert_eq!(code(list_webhooks(&node, Some(&reader)).await), Code::Ok);
    assert_eq!(code(list_webhooks(&node, Some(&admin)).await), Code::Ok);
}

/// Three nodes on etcd: a token made on one works on all, and once revoked on one, every node
/// refuses it within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_on_every_node_within_a_second() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let options = NodeOptions {
            etcd: Some(etcd.endpoint()),
            prefix: Some(prefix.clone()),
            args: vec!["--node-id".into(), id.into()],
            env: vec![("TIDINGS_CLUSTER__LEASE_TTL".into(), "2s".into())],
            auth: true,
            ..Default::default()
        };
        nodes.push(NodeProcess::start(options).await.expect("node"));
    }
    // Auth is on in cluster mode; exactly one node wrote the first admin token.
    let admins: Vec<String> = nodes.iter().filter_map(admin_token).collect();
    assert_eq!(admins.len(), 1, "one admin token for the cluster");
    let admin = &admins[0];
    let publisher = create(&nodes[0], admin, &["publish"]).await;
    for node in &nodes {
        wait_until("the token to reach every node", Duration::from_secs(5), || async {
            publish(node, Some(&publisher)).await.ok()
        })
        .await
        .expect("token works everywhere");
    }
    let id = publisher.split_once('.').expect("id.secret").0.to_string();
    tokens(&nodes[1], Some(admin))
        .await
        .revoke_token(RevokeTokenRequest { id })
        .await
        .expect("revoked");
    let revoked = Instant::now();
    for node in &nodes {
        wait_until("the revocation to reach every node", Duration::from_secs(1), || async {
            (code(publish(node, Some(&publisher)).await) == Code::Unauthenticated).then_some(())
        })
        .await
        .expect("refused everywhere within a second");
    }
    assert!(revoked.elapsed() < Duration::from_secs(1), "{:?}", revoked.elapsed());
}

/// A timestamp `seconds` from now.
fn prost_types_now(seconds: i64) -> tidings_client::prost_types::Timestamp {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    tidings_client::prost_types::Timestamp {
        seconds: now.as_secs() as i64 + seconds,
        nanos: now.subsec_nanos() as i32,
    }
}
