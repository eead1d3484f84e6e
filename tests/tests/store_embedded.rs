//! The store contract on redb, plus what only the embedded backend promises.

use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tidings_scheduler::store::{EmbeddedStore, Op, Store, StoreError, Txn};
use tidings_tests::conformance::next_events;

async fn fresh() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open");
    (Arc::new(store), dir)
}

tidings_tests::conformance_tests!(fresh());

#[tokio::test]
async fn writes_survive_reopening_and_leased_keys_do_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let revision = {
        let store = EmbeddedStore::open(&path).expect("open");
        let lease = store.lease_grant(Duration::from_secs(10)).await.expect("grant");
        store.put(b"kept", b"yes").await.expect("put");
        store
            .txn(Txn::new().and_then([Op::put_with_lease("leased", "x", lease)]))
            .await
            .expect("txn")
            .revision
    };
    let store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(store.get(b"kept").await.expect("get").map(|kv| kv.value), Some(b"yes".to_vec()));
    assert_eq!(store.get(b"leased").await.expect("get"), None, "the lease ended with the process");
    assert!(
        store.revision().await.expect("revision") > revision,
        "deleting leased keys is a change"
    );
}

#[tokio::test]
async fn a_watch_from_before_opening_reports_compaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    {
        let store = EmbeddedStore::open(&path).expect("open");
        store.put(b"w/a", b"1").await.expect("put");
    }
    let store = EmbeddedStore::open(&path).expect("reopen");
    let now = store.revision().await.expect("revision");
    match store.watch(b"w/", 1).await {
        Err(StoreError::Compacted { compact_revision }) => assert_eq!(compact_revision, now + 1),
        Err(other) => panic!("expected compaction, got {other:?}"),
        Ok(_) => panic!("expected compaction, got a stream"),
    }
    let mut stream = store.watch(b"w/", now + 1).await.expect("watch from the opening revision");
    store.put(b"w/b", b"2").await.expect("put");
    assert_eq!(next_events(&mut stream, 1).await[0].1, "w/b");
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let _first = EmbeddedStore::open(&path).expect("open");
    let error = EmbeddedStore::open(&path).expect_err("second open");
    assert!(error.to_string().contains("in use"), "{error}");
}
