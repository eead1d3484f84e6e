//! PostgreSQL stops under a cluster node: calls answer UNAVAILABLE within the configured
//! timeouts, nothing accepted is lost, and work resumes by itself once PostgreSQL is back.

use std::time::{Duration, Instant};

use tidings_client::tonic::Code;
use tidings_client::v1::{
    Campaign, Event, EventTrigger, PublishBatchRequest, PublishRequest, Trigger, Webhook,
    trigger::Kind,
};
use tidings_tests::postgres::Postgres;
use tidings_tests::{Etcd, NodeOptions, NodeProcess, Receiver, setup, unique_prefix};

fn event(contact: &str) -> Event {
    Event { r#type: "go".into(), contact_id: contact.into(), ..Default::default() }
}

/// Starts a cluster node on `etcd` and the PostgreSQL database at `url`, with a campaign that
/// sends every `go` event to the returned receiver.
async fn sending_node(etcd: &Etcd, url: &str, env: &[(&str, &str)]) -> (NodeProcess, Receiver) {
    let receiver = Receiver::start().await.expect("receiver");
    let mut all =
        vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".to_string(), r#"["127.0.0.1/32"]"#.to_string())];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(unique_prefix()),
        postgres: Some(url.to_string()),
        env: all,
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let webhook = Webhook { url: receiver.url("/hook"), ..Default::default() };
    setup::webhook(&node, "hook", webhook).await;
    let trigger = Trigger {
        kind: Some(Kind::Event(EventTrigger { event_type: "go".into(), filter: String::new() })),
    };
    let campaign =
        Campaign { webhook_id: "hook".into(), trigger: Some(trigger), ..Default::default() };
    setup::active_campaign(&node, "c", campaign).await;
    (node, receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_while_postgres_is_down_and_work_resumes_after() {
    let etcd = Etcd::start().await.expect("etcd");
    let mut postgres = Postgres::start().await.expect("postgres");
    let url = postgres.database().await.expect("database");
    let timeouts = [
        ("TIDINGS_POSTGRES__CONNECT_TIMEOUT", "1s"),
        ("TIDINGS_POSTGRES__STATEMENT_TIMEOUT", "1s"),
    ];
    let (node, receiver) = sending_node(&etcd, &url, &timeouts).await;
    let mut api = node.events().await.expect("client");
    let before: Vec<Event> = (0..20).map(|i| event(&format!("before-{i}"))).collect();
    api.publish_batch(PublishBatchRequest { events: before }).await.expect("before");
    receiver.wait_for(20, Duration::from_secs(20)).await.expect("delivered before");

    postgres.kill();
    let asked = Instant::now();
    let status = api
        .publish(PublishRequest { event: Some(event("during")) })
        .await
        .expect_err("refused while PostgreSQL is down");
    let waited = asked.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    println!("Publish with PostgreSQL down: {:?} after {waited:?}", status.code());

    postgres.restart().await.expect("postgres back");
    // The pool reconnects by itself: Publish works again within a few tries.
    let mut accepted = None;
    for _ in 0..50 {
        match api.publish(PublishRequest { event: Some(event("after")) }).await {
            Ok(response) => {
                accepted = Some(response.into_inner());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(accepted.is_some(), "Publish works again once PostgreSQL is back");
    // The refused event was not half-written: the 20 before and the one after arrive, each
    // under its own webhook-id. (The tests' PostgreSQL runs without synchronous commit, so its
    // crash may take back the last commits of the partitions: attempts sent again then carry
    // the same webhook-id, as the delivery contract allows.)
    receiver
        .wait_for(21, Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("delivered after: {error}\nnode logs:\n{}", node.logs()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: std::collections::BTreeSet<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 21, "{ids:#?}");
}

/// PostgreSQL loses the record of a claim (a crash took back its last commits, or an operator
/// restored a backup): the owner's next transaction is fenced off, and the partition is
/// claimed again with a new epoch rather than left owned by no worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_database_lost_is_made_again() {
    let etcd = Etcd::start().await.expect("etcd");
    let postgres = Postgres::start().await.expect("postgres");
    let url = postgres.database().await.expect("database");
    let (node, receiver) = sending_node(&etcd, &url, &[]).await;
    let cluster = node.cluster().await.expect("client");
    tidings_tests::wait_until("every partition owned", Duration::from_secs(20), || {
        let mut cluster = cluster.clone();
        async move {
            let request = tidings_client::v1::ListPartitionsRequest {};
            let partitions = cluster.list_partitions(request).await.ok()?.into_inner().partitions;
            (partitions.len() == 64 && partitions.iter().all(|p| !p.owner.is_empty())).then_some(())
        }
    })
    .await
    .expect("owned");

    // Every partition's recorded epoch goes back by one, as if its claim had not committed.
    let (client, connection) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let changed =
        client.execute("UPDATE partitions SET epoch = epoch - 1", &[]).await.expect("update");
    assert_eq!(changed, 64);

    let mut api = node.events().await.expect("client");
    let events: Vec<Event> = (0..200).map(|i| event(&format!("c-{i}"))).collect();
    api.publish_batch(PublishBatchRequest { events }).await.expect("published");
    receiver
        .wait_for(200, Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("delivered: {error}\nnode logs:\n{}", node.logs()));
}
