//! The store contract on a real etcd, plus what only etcd does: lease expiry, compaction,
//! restarts and outages.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tidings_scheduler::store::{Op, Store, StoreError, Txn};
use tidings_tests::conformance::next_events;
use tidings_tests::{Etcd, wait_until};

async fn fresh() -> (Arc<dyn Store>, Etcd) {
    let etcd = Etcd::start().await.expect("etcd");
    let store = etcd.store().await.expect("store");
    (Arc::new(store), etcd)
}

tidings_tests::conformance_tests!(fresh());

#[tokio::test]
async fn keys_vanish_when_their_lease_expires() {
    let (store, _etcd) = fresh().await;
    let lease = store.lease_grant(Duration::from_secs(2)).await.expect("grant");
    store.txn(Txn::new().and_then([Op::put_with_lease("short", "x", lease)])).await.expect("txn");
    wait_until("the leased key to expire", Duration::from_secs(15), || {
        let store = store.clone();
        async move { store.get(b"short").await.ok().flatten().is_none().then_some(()) }
    })
    .await
    .expect("expiry");
    assert!(matches!(store.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_fails_with_compacted() {
    let (store, etcd) = fresh().await;
    let first = store.put(b"c/1", b"x").await.expect("put");
    store.put(b"c/2", b"x").await.expect("put");
    let last = store.put(b"c/3", b"x").await.expect("put");
    etcd.compact(last).await.expect("compact");
    match store.watch(b"c/", first).await {
        Err(StoreError::Compacted { compact_revision }) => assert_eq!(compact_revision, last),
        Err(other) => panic!("expected compaction, got {other:?}"),
        Ok(_) => panic!("expected compaction, got a stream"),
    }
}

#[tokio::test]
async fn a_watch_resumes_without_a_gap_after_etcd_restarts() {
    let (store, mut etcd) = fresh().await;
    let mut stream = store.watch(b"r/", 0).await.expect("watch");
    store.put(b"r/1", b"x").await.expect("put");
    assert_eq!(next_events(&mut stream, 1).await[0].1, "r/1");
    etcd.restart().await.expect("restart");
    // Writes made while the watch is reconnecting must still arrive, in order.
    for i in 2..=5 {
        wait_until("a write after the restart", Duration::from_secs(15), || {
            let store = store.clone();
            async move { store.put(format!("r/{i}").as_bytes(), b"x").await.ok() }
        })
        .await
        .expect("write");
    }
    let events = next_events(&mut stream, 4).await;
    let keys: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(keys, vec!["r/2", "r/3", "r/4", "r/5"]);
}

#[tokio::test]
async fn calls_fail_as_unavailable_while_etcd_is_down() {
    let (store, mut etcd) = fresh().await;
    store.put(b"k", b"v").await.expect("put");
    let mut stream = store.watch(b"k", 0).await.expect("watch");
    etcd.kill();
    let started = std::time::Instant::now();
    let error = store.get(b"k").await.expect_err("etcd is down");
    assert!(error.is_retryable(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by the request timeout");
    let error = store.put(b"k", b"w").await.expect_err("etcd is down");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    etcd.restart().await.expect("restart");
    wait_until("etcd to answer again", Duration::from_secs(15), || {
        let store = store.clone();
        async move { store.put(b"k", b"again").await.ok() }
    })
    .await
    .expect("recovery");
    let batch = tokio::time::timeout(Duration::from_secs(15), stream.next()).await.expect("event");
    let batch = batch.expect("stream open").expect("no error");
    assert_eq!(batch.events[0].kv.value, b"again");
}
