//! WebhookService end to end: real node processes, embedded and on a real etcd.

use std::time::Duration;

use tidings_client::prost_types::{Duration as PbDuration, FieldMask};
use tidings_client::tonic::{Code, Status};
use tidings_client::v1::{
    CreateWebhookRequest, DeleteWebhookRequest, GetWebhookRequest, Header, HttpMethod,
    ListWebhooksRequest, RetryPolicy, RotateSigningSecretRequest, UpdateWebhookRequest, Webhook,
};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, wait_until};
use tonic_types::StatusExt;

const TOKEN: &str = "tok-5f2a9c1e-never-in-clear";
const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn orders_webhook() -> Webhook {
    Webhook {
        url: "https://example.com/hooks/{{ contact.id }}".into(),
        description: "order notifications".into(),
        headers: vec![
            Header {
                name: "Authorization".into(),
                value: format!("Bearer {TOKEN}"),
                secret: false,
            },
            Header { name: "X-Source".into(), value: "tidings".into(), secret: false },
        ],
        body: r#"{"order": "{{ event.data.order_id }}"}"#.into(),
        signing_secret: SIGNING.into(),
        ..Default::default()
    }
}

fn create(id: &str, webhook: Webhook) -> CreateWebhookRequest {
    CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) }
}

fn violations(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn exercise_crud(node: &NodeProcess) -> Webhook {
    let mut api = node.webhooks().await.expect("client");
    let created =
        api.create_webhook(create("orders", orders_webhook())).await.expect("create").into_inner();
    assert_eq!(created.id, "orders");
    assert_eq!(created.enabled, Some(true));
    assert_eq!(created.headers[0].value, "", "credential headers come back redacted");
    assert!(created.headers[0].secret);
    assert_eq!(created.signing_secret, "", "a caller-given secret is not echoed");
    assert_eq!(created.signing_secrets.len(), 1);
    assert_eq!(created.signing_secrets[0].hint, "whsec_MfKQ");

    let duplicate =
        api.create_webhook(create("orders", orders_webhook())).await.expect_err("taken");
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let fetched =
        api.get_webhook(GetWebhookRequest { id: "orders".into() }).await.expect("get").into_inner();
    assert_eq!(fetched, created);

    let updated = api
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: "orders".into(),
                url: "https://example.com/v2/hooks".into(),
                rate_limit: 50.0,
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths: vec!["url".into(), "rate_limit".into()] }),
            etag: created.etag.clone(),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.url, "https://example.com/v2/hooks");
    assert_eq!(updated.rate_limit, 50.0);
    assert_eq!(updated.body, created.body, "fields outside the mask keep their values");
    assert_eq!(updated.headers, created.headers, "secret headers are kept");
    assert_ne!(updated.etag, created.etag);

    let stale = api
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: "orders".into(),
                description: "lost".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths: vec!["description".into()] }),
            etag: created.etag.clone(),
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");

    let missing =
        api.get_webhook(GetWebhookRequest { id: "nope".into() }).await.expect_err("unknown id");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("nope"));

    api.create_webhook(create("temporary", orders_webhook())).await.expect("create");
    api.delete_webhook(DeleteWebhookRequest { id: "temporary".into(), etag: String::new() })
        .await
        .expect("delete");
    let gone = api
        .delete_webhook(DeleteWebhookRequest { id: "temporary".into(), etag: String::new() })
        .await;
    assert_eq!(gone.expect_err("deleted").code(), Code::NotFound);
    updated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_work_and_survive_a_restart_in_embedded_mode() {
    let data = tempfile::tempdir().expect("temp dir");
    let options = NodeOptions { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    let before = exercise_crud(&node).await;
    node.terminate().await.expect("graceful stop");

    let node = NodeProcess::start(options).await.expect("restarted node");
    let mut api = node.webhooks().await.expect("client");
    let after =
        api.get_webhook(GetWebhookRequest { id: "orders".into() }).await.expect("get").into_inner();
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_shared_by_nodes_on_one_etcd_and_survive_restarts() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = tidings_tests::unique_prefix();
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        ..Default::default()
    };
    let mut first = NodeProcess::start(options.clone()).await.expect("node a");
    let second = NodeProcess::start(options.clone()).await.expect("node b");
    let created = exercise_crud(&first).await;

    let mut other = second.webhooks().await.expect("client");
    let seen = other
        .get_webhook(GetWebhookRequest { id: "orders".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(seen, created, "a webhook written through one node reads back through another");

    first.terminate().await.expect("graceful stop");
    drop(second);
    let node = NodeProcess::start(options).await.expect("restart");
    let mut api = node.webhooks().await.expect("client");
    let after =
        api.get_webhook(GetWebhookRequest { id: "orders".into() }).await.expect("get").into_inner();
    assert_eq!(after, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_named() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let mut api = node.webhooks().await.expect("client");
    type Case = (&'static str, fn(&mut Webhook));
    let cases: Vec<Case> = vec![
        ("webhook.url", |w| w.url = "ftp://example.com".into()),
        ("webhook.url", |w| w.url = String::new()),
        ("webhook.url", |w| w.url = "https://x/{{ oops".into()),
        ("webhook.method", |w| w.method = 42),
        ("webhook.body", |w| w.method = HttpMethod::Get as i32),
        ("webhook.body", |w| w.body = "{% if x %}".into()),
        ("webhook.headers[0].name", |w| w.headers[0].name = "Bad Name".into()),
        ("webhook.headers[1].name", |w| w.headers[1].name = "webhook-signature".into()),
        ("webhook.headers[1].value", |w| w.headers[1].value = "a\r\nb".into()),
        ("webhook.timeout", |w| w.timeout = Some(PbDuration { seconds: 600, nanos: 0 })),
        ("webhook.retry_policy.delays[1]", |w| {
            let delays =
                vec![PbDuration { seconds: 1, nanos: 0 }, PbDuration { seconds: -1, nanos: 0 }];
            w.retry_policy = Some(RetryPolicy { delays, jitter: None })
        }),
        ("webhook.retry_policy.jitter", |w| {
            w.retry_policy = Some(RetryPolicy { delays: vec![], jitter: Some(2.0) })
        }),
        ("webhook.rate_limit", |w| w.rate_limit = -1.0),
        ("webhook.max_in_flight", |w| w.max_in_flight = 1_000_000),
        ("webhook.signing_secret", |w| w.signing_secret = "whsec_short".into()),
        ("webhook.body", |w| w.body = "x".repeat(300 * 1024)),
    ];
    for (field, mutate) in cases {
        let mut webhook = orders_webhook();
        mutate(&mut webhook);
        let request = create("valid-id", webhook);
        let status = api.create_webhook(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            violations(&status).contains(&field.to_string()),
            "{field}: {:?}",
            violations(&status)
        );
        assert!(status.message().contains(field), "{field}: {}", status.message());
    }
    let status = api.create_webhook(create("Bad Id", orders_webhook())).await.expect_err("bad id");
    assert_eq!(violations(&status), vec!["webhook_id".to_string()]);
    let listed =
        api.list_webhooks(ListWebhooksRequest::default()).await.expect("list").into_inner();
    assert!(listed.webhooks.is_empty(), "nothing invalid was written");

    let missing =
        api.create_webhook(CreateWebhookRequest { webhook_id: String::new(), webhook: None }).await;
    assert_eq!(violations(&missing.expect_err("no webhook")), vec!["webhook".to_string()]);
    api.create_webhook(create("orders", orders_webhook())).await.expect("create");
    let mask = api
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook { id: "orders".into(), ..Default::default() }),
            update_mask: Some(FieldMask { paths: vec!["etag".into()] }),
            etag: String::new(),
        })
        .await
        .expect_err("output-only field in the mask");
    assert_eq!(violations(&mask), vec!["update_mask".to_string()]);
    let token = api
        .list_webhooks(ListWebhooksRequest { page_size: 1, page_token: "%%%".into() })
        .await
        .expect_err("bad token");
    assert_eq!(violations(&token), vec!["page_token".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_through_every_webhook_once() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let mut api = node.webhooks().await.expect("client");
    for i in 0..7 {
        api.create_webhook(create(&format!("hook-{i}"), orders_webhook())).await.expect("create");
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list_webhooks(ListWebhooksRequest { page_size: 3, page_token: token.clone() })
            .await
            .expect("list")
            .into_inner();
        assert!(page.webhooks.len() <= 3);
        ids.extend(page.webhooks.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, (0..7).map(|i| format!("hook-{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_answers_unavailable_and_writes_nothing_half_way() {
    let mut etcd = Etcd::start().await.expect("etcd");
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(tidings_tests::unique_prefix()),
        env: vec![("TIDINGS_ETCD__REQUEST_TIMEOUT".into(), "1s".into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut api = node.webhooks().await.expect("client");
    api.create_webhook(create("before", orders_webhook())).await.expect("create");
    etcd.kill();
    let status =
        api.create_webhook(create("during", orders_webhook())).await.expect_err("etcd down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status =
        api.get_webhook(GetWebhookRequest { id: "before".into() }).await.expect_err("etcd down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    etcd.restart().await.expect("restart");
    let listed = wait_until("the node to reach etcd again", Duration::from_secs(20), || {
        let mut api = api.clone();
        async move { api.list_webhooks(ListWebhooksRequest::default()).await.ok() }
    })
    .await
    .expect("recovery")
    .into_inner();
    let ids: Vec<String> = listed.webhooks.into_iter().map(|w| w.id).collect();
    assert_eq!(ids, vec!["before".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_and_never_returned_or_logged() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = tidings_tests::unique_prefix();
    let debug = Some("debug".to_string());
    let cluster = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        log_level: debug.clone(),
        ..Default::default()
    };
    let embedded_dir = tempfile::tempdir().expect("temp dir");
    let embedded = NodeOptions {
        data_dir: Some(embedded_dir.path().to_path_buf()),
        log_level: debug,
        ..Default::default()
    };

    for options in [cluster, embedded] {
        let mut node = NodeProcess::start(options.clone()).await.expect("node");
        let mut api = node.webhooks().await.expect("client");
        let mut webhook = orders_webhook();
        webhook.headers.push(Header {
            name: "X-Signature-Key".into(),
            value: format!("k-{TOKEN}"),
            secret: true,
        });
        let mut responses = Vec::new();
        responses.push(format!(
            "{:?}",
            api.create_webhook(create("secret", webhook)).await.expect("create")
        ));
        responses.push(format!(
            "{:?}",
            api.get_webhook(GetWebhookRequest { id: "secret".into() }).await.expect("get")
        ));
        responses.push(format!(
            "{:?}",
            api.list_webhooks(ListWebhooksRequest::default()).await.expect("list")
        ));
        let rotated = api
            .rotate_signing_secret(RotateSigningSecretRequest {
                id: "secret".into(),
                ..Default::default()
            })
            .await
            .expect("rotate")
            .into_inner();
        let generated = rotated.signing_secret.clone();
        assert!(generated.starts_with("whsec_"), "a generated secret is returned once");
        assert_eq!(
            rotated.webhook.as_ref().map(|w| w.signing_secrets.len()),
            Some(2),
            "both secrets sign during the grace period"
        );
        responses.push(format!("{:?}", rotated.webhook));
        let bad = api
            .update_webhook(UpdateWebhookRequest {
                webhook: Some(Webhook {
                    id: "secret".into(),
                    headers: vec![Header {
                        name: "Authorization".into(),
                        value: format!("{{{{ {TOKEN}"),
                        secret: true,
                    }],
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["headers".into()] }),
                etag: String::new(),
            })
            .await
            .expect_err("bad template");
        responses.push(format!("{bad:?}"));
        for response in &responses {
            assert!(!response.contains(TOKEN), "a response carries the token: {response}");
            assert!(!response.contains(SIGNING), "a response carries the signing secret");
        }
        node.terminate().await.expect("stop");

        let logs = node.logs();
        assert!(logs.contains("webhook created"), "logs are captured");
        for secret in [TOKEN, SIGNING, &generated] {
            assert!(!logs.contains(secret), "the logs contain a secret");
        }
        let stored: Vec<u8> = if options.etcd.is_some() {
            let store = etcd.store_at(&prefix).await.expect("store");
            use tidings_scheduler::store::Store;
            let page = store.range_prefix(b"", 0).await.expect("range");
            assert!(!page.kvs.is_empty());
            page.kvs.into_iter().flat_map(|kv| kv.value).collect()
        } else {
            std::fs::read(node.data_dir().join("tidings.redb")).expect("store file")
        };
        for secret in [TOKEN, SIGNING, &generated] {
            assert!(!contains(&stored, secret.as_bytes()), "the store holds a secret in clear");
        }
        assert!(contains(&stored, b"order notifications"), "the store was read");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
