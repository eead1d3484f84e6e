//! Credentials to endpoints, against real local servers: OAuth 2.0 client credentials from a
//! token endpoint (fetched once, cached, fetched again after a 401; a refused fetch recorded as
//! the attempt's error), and a client certificate presented to a TLS receiver that requires one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tidings_client::WebhookServiceClient;
use tidings_client::v1::{
    ClientCertificate, CreateWebhookRequest, ErrorClass, GetWebhookRequest,
    OAuth2ClientCredentials, SendTestRequest, Webhook,
};
use tidings_tests::certs::{Authority, write};
use tidings_tests::{NodeOptions, NodeProcess, Receiver, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the token endpoint saw and gave.
#[derive(Default)]
struct Issued {
    requests: Vec<(Option<String>, String)>,
    tokens: u32,
}

async fn token(
    State(issued): State<Arc<Mutex<Issued>>>,
    headers: HeaderMap,
    form: String,
) -> (StatusCode, String) {
    use base64::Engine;
    let authorization =
        headers.get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
    let mut issued = issued.lock().unwrap_or_else(|p| p.into_inner());
    issued.requests.push((authorization.clone(), form.clone()));
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("tidings:s3cret-client")
    );
    if authorization.as_deref() != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#.into());
    }
    if !form.contains("grant_type=client_credentials") {
        return (StatusCode::BAD_REQUEST, r#"{"error":"unsupported_grant_type"}"#.into());
    }
    issued.tokens += 1;
    let body = format!(
        r#"{{"access_token":"tok-{}","token_type":"Bearer","expires_in":3600}}"#,
        issued.tokens
    );
    (StatusCode::OK, body)
}

async fn token_endpoint() -> (String, Arc<Mutex<Issued>>) {
    let issued = Arc::new(Mutex::new(Issued::default()));
    let app =
        axum::Router::new().route("/token", axum::routing::post(token)).with_state(issued.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/token", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, issued)
}

async fn node(
    env: &[(&str, String)],
) -> (NodeProcess, WebhookServiceClient<tidings_client::Transport>) {
    let mut all =
        vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".to_string(), r#"["127.0.0.1/32"]"#.to_string())];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let node =
        NodeProcess::start(NodeOptions { env: all, ..Default::default() }).await.expect("node");
    let webhooks = node.webhooks().await.expect("client");
    (node, webhooks)
}

async fn send(
    webhooks: &mut WebhookServiceClient<tidings_client::Transport>,
    id: &str,
) -> tidings_client::v1::Attempt {
    webhooks
        .send_test(SendTestRequest { id: id.into(), ..Default::default() })
        .await
        .expect("sent")
        .into_inner()
        .attempt
        .expect("attempt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_tokens_are_fetched_cached_and_refreshed() {
    let (token_url, issued) = token_endpoint().await;
    let receiver = Receiver::start().await.expect("receiver");
    let (node, mut webhooks) = node(&[]).await;
    let oauth = |secret: &str| OAuth2ClientCredentials {
        token_url: token_url.clone(),
        client_id: "tidings".into(),
        client_secret: secret.into(),
        scopes: vec!["events:write".into(), "users:read".into()],
        audience: "https://api.example.com".into(),
    };
    let webhook = Webhook {
        url: receiver.url("/hook"),
        oauth2: Some(oauth("s3cret-client")),
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "api".into(), webhook: Some(webhook) })
        .await
        .expect("created");

    // Two attempts, one token.
    for _ in 0..2 {
        assert_eq!(send(&mut webhooks, "api").await.status_code, 200);
    }
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    assert!(
        received.iter().all(|r| r.header("authorization") == Some("Bearer tok-1")),
        "{received:?}"
    );
    {
        let issued = issued.lock().expect("lock");
        assert_eq!(issued.tokens, 1, "the token is cached");
        let form = &issued.requests[0].1;
        assert!(form.contains("scope=events%3Awrite+users%3Aread"), "{form}");
        assert!(form.contains("audience=https%3A%2F%2Fapi.example.com"), "{form}");
    }

    // The endpoint refuses the token: the attempt is retried, the next one fetches another.
    receiver.script([Reply::Status(401)]);
    let refused = send(&mut webhooks, "api").await;
    assert_eq!(refused.status_code, 401);
    assert_eq!(send(&mut webhooks, "api").await.status_code, 200);
    assert_eq!(
        receiver
            .received()
            .last()
            .and_then(|r| r.header("authorization").map(String::from))
            .as_deref(),
        Some("Bearer tok-2")
    );

    // The secret is never returned.
    let stored = webhooks
        .get_webhook(GetWebhookRequest { id: "api".into() })
        .await
        .expect("get")
        .into_inner();
    let stored_oauth = stored.oauth2.expect("oauth2");
    assert!(stored_oauth.client_secret.is_empty());
    assert_eq!(stored_oauth.client_id, "tidings");

    // A refused token request is the attempt's error; nothing reaches the endpoint.
    let wrong =
        Webhook { url: receiver.url("/hook"), oauth2: Some(oauth("wrong")), ..Default::default() };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "wrong".into(), webhook: Some(wrong) })
        .await
        .expect("created");
    let before = receiver.received().len();
    let failed = send(&mut webhooks, "wrong").await;
    assert_eq!(failed.error_class, ErrorClass::Credentials as i32, "{failed:?}");
    assert!(failed.error.contains("invalid_client"), "{}", failed.error);
    assert_eq!(receiver.received().len(), before);

    // An Authorization header cannot be given as well; the client secret is required.
    let both = Webhook {
        url: receiver.url("/hook"),
        oauth2: Some(oauth("x")),
        headers: vec![tidings_client::v1::Header {
            name: "Authorization".into(),
            value: "Bearer y".into(),
            secret: true,
        }],
        ..Default::default()
    };
    let status = webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "both".into(), webhook: Some(both) })
        .await
        .expect_err("both");
    assert!(status.message().contains("webhook.headers"), "{}", status.message());
    let no_secret =
        Webhook { url: receiver.url("/hook"), oauth2: Some(oauth("")), ..Default::default() };
    let status = webhooks
        .create_webhook(CreateWebhookRequest {
            webhook_id: "nosecret".into(),
            webhook: Some(no_secret),
        })
        .await
        .expect_err("no secret");
    assert!(status.message().contains("webhook.oauth2.client_secret"), "{}", status.message());
    assert!(!node.logs().contains("s3cret-client"), "the client secret is in the log");
}

/// A TLS receiver that requires a client certificate from `clients`; it answers 200 to each
/// request and records the subjects it saw.
async fn mtls_receiver(
    dir: &std::path::Path,
    servers: &Authority,
    clients: &Authority,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let (cert, key) = servers.issue(&["127.0.0.1"]).expect("server cert");
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<_, _>>().expect("certs");
    let key = rustls_pemfile::private_key(&mut key.as_bytes()).expect("key").expect("a key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut clients.pem.as_bytes()) {
        roots.add(ca.expect("ca")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .expect("verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _ = dir;
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let presented = tls.get_ref().1.peer_certificates().map_or(0, |c| c.len());
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{presented} certificates"));
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_to_an_endpoint_that_requires_one() {
    let dir = tempfile::tempdir().expect("dir");
    let servers = Authority::new("receiver CA").expect("CA");
    let clients = Authority::new("client CA").expect("CA");
    let (port, seen) = mtls_receiver(dir.path(), &servers, &clients).await;
    let ca_file = write(dir.path(), "receiver-ca.pem", &servers.pem).expect("write");
    let (_node, mut webhooks) =
        node(&[("TIDINGS_DELIVERY__CA_FILE", ca_file.display().to_string())]).await;
    let (client_cert, client_key) = clients.issue(&["tidings-client"]).expect("client cert");
    let url = format!("https://127.0.0.1:{port}/hook");

    let with = Webhook {
        url: url.clone(),
        client_certificate: Some(ClientCertificate {
            certificate_pem: client_cert.clone(),
            private_key_pem: client_key.clone(),
        }),
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "mtls".into(), webhook: Some(with) })
        .await
        .expect("created");
    let attempt = send(&mut webhooks, "mtls").await;
    assert_eq!(attempt.status_code, 200, "{attempt:?}");
    assert_eq!(seen.lock().expect("lock").as_slice(), ["1 certificates"]);

    // Without the certificate the handshake fails.
    let without = Webhook { url, ..Default::default() };
    webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "plain".into(), webhook: Some(without) })
        .await
        .expect("created");
    let attempt = send(&mut webhooks, "plain").await;
    assert_eq!(attempt.error_class, ErrorClass::Connection as i32, "{attempt:?}");

    // The key is never returned; a key that does not parse is refused naming the field.
    let stored = webhooks
        .get_webhook(GetWebhookRequest { id: "mtls".into() })
        .await
        .expect("get")
        .into_inner();
    let stored_cert = stored.client_certificate.expect("certificate");
    assert!(stored_cert.private_key_pem.is_empty());
    assert_eq!(stored_cert.certificate_pem, client_cert);
    let broken = Webhook {
        url: "https://example.com/".into(),
        client_certificate: Some(ClientCertificate {
            certificate_pem: client_cert,
            private_key_pem: "not a key".into(),
        }),
        ..Default::default()
    };
    let status = webhooks
        .create_webhook(CreateWebhookRequest { webhook_id: "broken".into(), webhook: Some(broken) })
        .await
        .expect_err("refused");
    assert!(status.message().contains("webhook.client_certificate"), "{}", status.message());
    tokio::time::sleep(Duration::from_millis(10)).await;
}
