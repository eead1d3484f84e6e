//! The state layer's conformance suite on each backend: the embedded store (redb) and
//! PostgreSQL.

use std::sync::Arc;

use tidings_scheduler::state::State;
use tidings_scheduler::state::postgres::PgOptions;
use tidings_scheduler::store::EmbeddedStore;
use tidings_tests::postgres::Postgres;
use tidings_tests::state_conformance as suite;

fn embedded() -> (tempfile::TempDir, State) {
    let dir = tempfile::tempdir().expect("dir");
    let store = EmbeddedStore::open(&dir.path().join("t.redb")).expect("store");
    (dir, State::new(Arc::new(store)))
}

async fn postgres(server: &Postgres) -> State {
    let url = server.database().await.expect("database");
    State::postgres(PgOptions { url, pool_size: 8, ..Default::default() }).await.expect("state")
}

#[tokio::test]
async fn the_embedded_backend_conforms() {
    let (_dir, state) = embedded();
    suite::records_and_pages(state.clone()).await;
    suite::conditional_writes(state.clone()).await;
    suite::concurrent_writes(state.clone()).await;
    suite::fenced_commits(state.clone(), false).await;
    suite::timer_ranges(state.clone(), false).await;
    suite::inbox_feed(state.clone()).await;
    suite::inbox_backlog(state.clone(), 100).await;
    suite::delivery_queries(state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_backend_conforms() {
    let server = Postgres::start().await.expect("postgres");
    suite::records_and_pages(postgres(&server).await).await;
    suite::conditional_writes(postgres(&server).await).await;
    suite::concurrent_writes(postgres(&server).await).await;
    suite::fenced_commits(postgres(&server).await, true).await;
    suite::timer_ranges(postgres(&server).await, true).await;
    suite::inbox_feed(postgres(&server).await).await;
    suite::inbox_backlog(postgres(&server).await, 4_500).await;
    suite::delivery_queries(postgres(&server).await).await;
}

/// An inbox row whose transaction began before a later one but commits after it is still
/// seen: the feed reads from the oldest transaction that was open at its previous read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_committing_inbox_write_is_not_missed() {
    use std::time::Duration;
    use tidings_scheduler::inbox::InboxEntry;
    use tidings_scheduler::state::Write;
    use tidings_scheduler::timers::{Timer, TimerKind};
    let server = Postgres::start().await.expect("postgres");
    let url = server.database().await.expect("database");
    let state = State::postgres(PgOptions { url: url.clone(), pool_size: 4, ..Default::default() })
        .await
        .expect("state");
    let entry = |id: &str| {
        let timer =
            Timer { id: id.into(), due_ms: 1, kind: TimerKind::Attempt { delivery: id.into() } };
        Write::inbox(2, id, &InboxEntry::Schedule(timer)).expect("encode")
    };
    let mut feed = state.inbox(2).await.expect("feed");
    assert!(feed.next().await.expect("first").entries.is_empty());

    // A transaction takes its id and writes a row, and stays open.
    let (mut slow, connection) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let slow = slow.transaction().await.expect("begin");
    slow.execute(
        "INSERT INTO inbox (partition, id, value, version) VALUES (2, 'early', '\\x00', 0)",
        &[],
    )
    .await
    .expect("insert");
    // A later transaction commits first, and is read.
    state.write(vec![entry("later")]).await.expect("write");
    let batch = tokio::time::timeout(Duration::from_secs(3), feed.next())
        .await
        .expect("the later entry is read")
        .expect("next");
    let ids: Vec<String> = batch.entries.iter().map(|(k, _)| k.to_string()).collect();
    assert!(ids.len() == 1 && ids[0].ends_with("later"), "{ids:?}");
    // The earlier one commits now: the next reads find it.
    slow.commit().await.expect("commit");
    let batch = tokio::time::timeout(Duration::from_secs(3), feed.next())
        .await
        .expect("the early entry is read")
        .expect("next");
    let ids: Vec<String> = batch.entries.iter().map(|(k, _)| k.to_string()).collect();
    assert!(ids.len() == 1 && ids[0].ends_with("early"), "{ids:?}");
}

/// Writes committed together fail together only when PostgreSQL fails: one that it refuses
/// (an id with a NUL byte, which text cannot hold) fails alone, and the others are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_postgres_refuses_fails_alone() {
    use tidings_scheduler::contact::Contact;
    use tidings_scheduler::state::Write;
    let server = Postgres::start().await.expect("postgres");
    let state = postgres(&server).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100 {
        let state = state.clone();
        let id = if i == 50 { "bad\0id".to_string() } else { format!("ok{i:03}") };
        calls.spawn(async move {
            let write = Write::contact(4, &id, &Contact::default()).expect("encode");
            (i, state.write(vec![write]).await)
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (i, result) = done.expect("task");
        if let Err(error) = result {
            failed.push((i, error.to_string()));
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 50, "{failed:?}");
    let page = state.contacts_after(4, "", 1000).await.expect("page");
    assert_eq!(page.contacts.len(), 99);
}
