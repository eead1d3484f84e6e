//! The [`Store`] contract, as checks that run against any backend. Each check takes a fresh
//! store (its own etcd prefix or its own file) and panics with what differed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tidings_scheduler::store::{
    Compare, CompareOp, EventKind, Op, OpResult, Store, StoreError, Txn, WatchBatch, WatchStream,
};

/// Reads batches until `count` events arrived, or fails after a deadline.
pub async fn next_events(stream: &mut WatchStream, count: usize) -> Vec<(EventKind, String, i64)> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while events.len() < count {
        let batch: Option<Result<WatchBatch, StoreError>> =
            tokio::time::timeout_at(deadline, stream.next()).await.unwrap_or_else(|_| {
                panic!("waited for {count} watch events, saw {}: {events:?}", events.len())
            });
        let batch = batch.expect("watch stream ended").expect("watch failed");
        for event in batch.events {
            events.push((
                event.kind,
                String::from_utf8_lossy(&event.kv.key).into_owned(),
                event.kv.mod_revision,
            ));
        }
    }
    events
}

/// Put, get, overwrite and delete keep etcd's revision bookkeeping.
pub async fn put_get_delete(store: Arc<dyn Store>) {
    assert_eq!(store.get(b"a").await.expect("get"), None);
    let r1 = store.put(b"a", b"one").await.expect("put");
    let kv = store.get(b"a").await.expect("get").expect("present");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version),
        (&b"one"[..], r1, r1, 1)
    );
    let r2 = store.put(b"a", b"two").await.expect("put");
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let kv = store.get(b"a").await.expect("get").expect("present");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version),
        (&b"two"[..], r1, r2, 2)
    );
    assert!(store.revision().await.expect("revision") >= r2);
    assert!(store.delete(b"a").await.expect("delete"));
    assert!(!store.delete(b"a").await.expect("delete again"));
    assert_eq!(store.get(b"a").await.expect("get"), None);
    let r3 = store.put(b"a", b"three").await.expect("put");
    let kv = store.get(b"a").await.expect("get").expect("present");
    assert_eq!((kv.create_revision, kv.version), (r3, 1), "a re-created key starts over");
}

/// Ranges return keys in order, page by page, and only within the range.
pub async fn range_pages(store: Arc<dyn Store>) {
    for i in 0..25 {
        store.put(format!("items/{i:03}").as_bytes(), b"x").await.expect("put");
    }
    store.put(b"itemsX", b"outside").await.expect("put");
    store.put(b"item", b"outside").await.expect("put");
    let mut seen = Vec::new();
    let mut start = b"items/".to_vec();
    let end = tidings_scheduler::store::prefix_end(b"items/");
    loop {
        let page = store.range(&start, &end, 10).await.expect("range");
        assert!(page.kvs.len() <= 10);
        seen.extend(page.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()));
        if !page.more {
            break;
        }
        start = page.kvs.last().expect("a full page").key.clone();
        start.push(0);
    }
    let expected: Vec<String> = (0..25).map(|i| format!("items/{i:03}")).collect();
    assert_eq!(seen, expected);
    let all = store.range_prefix(b"items/", 0).await.expect("range");
    assert_eq!(all.kvs.len(), 25);
    assert!(!all.more);
    assert!(all.revision > 0);
    let none = store.range_prefix(b"nothing/", 0).await.expect("range");
    assert!(none.kvs.is_empty());

    // A read that must reflect a revision sees the write that made it, and pages the same way.
    let last = store.put(b"items/999", b"new").await.expect("put");
    let page = store.range_since(b"items/", &end, 30, last).await.expect("range since");
    assert!(page.revision >= last);
    assert_eq!(page.kvs.len(), 26);
    assert_eq!(page.kvs.last().map(|kv| kv.value.clone()), Some(b"new".to_vec()));
    let page = store.range_since(b"items/", &end, 10, last).await.expect("range since");
    assert!(page.more && page.kvs.len() == 10);
    for count in [2, 20] {
        let mut keys: Vec<Vec<u8>> =
            (0..count - 1).map(|i| format!("items/{i:03}").into_bytes()).collect();
        keys.push(b"items/999".to_vec());
        keys.push(b"items/absent".to_vec());
        let found = store.get_many_since(&keys, last).await.expect("get many since");
        assert_eq!(found.len(), keys.len());
        assert_eq!(
            found[keys.len() - 2].as_ref().map(|kv| kv.value.clone()),
            Some(b"new".to_vec())
        );
        assert!(found[keys.len() - 1].is_none());
        assert!(found[..keys.len() - 2].iter().all(Option::is_some));
    }
}

/// Transactions compare value, mod_revision and create_revision, and apply all or nothing.
pub async fn txn_compares(store: Arc<dyn Store>) {
    let created = store
        .txn(
            Txn::new()
                .when([Compare::absent("k")])
                .and_then([Op::put("k", "v1"), Op::put("other", "o")]),
        )
        .await
        .expect("txn");
    assert!(created.succeeded);
    let again = store
        .txn(
            Txn::new()
                .when([Compare::absent("k")])
                .and_then([Op::put("k", "v2")])
                .or_else([Op::get("k")]),
        )
        .await
        .expect("txn");
    assert!(!again.succeeded);
    match &again.results[..] {
        [OpResult::Get(Some(kv))] => {
            assert_eq!(kv.value, b"v1");
            assert_eq!(kv.create_revision, created.revision);
        }
        other => panic!("expected the current key from or_else, got {other:?}"),
    }

    let value_ok = store
        .txn(
            Txn::new()
                .when([Compare::value("k", CompareOp::Equal, "v1")])
                .and_then([Op::put("k", "v2")]),
        )
        .await
        .expect("txn");
    assert!(value_ok.succeeded);
    let value_stale = store
        .txn(
            Txn::new()
                .when([Compare::value("k", CompareOp::Equal, "v1")])
                .and_then([Op::put("k", "v3")]),
        )
        .await
        .expect("txn");
    assert!(!value_stale.succeeded);

    let kv = store.get(b"k").await.expect("get").expect("present");
    let stale = store
        .txn(
            Txn::new()
                .when([Compare::mod_revision("k", CompareOp::Equal, kv.mod_revision - 1)])
                .and_then([Op::put("k", "lost"), Op::delete("other")]),
        )
        .await
        .expect("txn");
    assert!(!stale.succeeded);
    assert_eq!(
        store.get(b"other").await.expect("get").map(|kv| kv.value),
        Some(b"o".to_vec()),
        "nothing applied"
    );
    let fresh = store
        .txn(
            Txn::new()
                .when([
                    Compare::mod_revision("k", CompareOp::Equal, kv.mod_revision),
                    Compare::create_revision("k", CompareOp::Equal, created.revision),
                    Compare::version("k", CompareOp::Equal, 2),
                ])
                .and_then([Op::put("k", "v4"), Op::delete("other"), Op::get("k")]),
        )
        .await
        .expect("txn");
    assert!(fresh.succeeded);
    assert_eq!(fresh.results.len(), 3);
    assert_eq!(fresh.results[1], OpResult::Delete(1));
    let after = store.get(b"k").await.expect("get").expect("present");
    assert_eq!(after.mod_revision, fresh.revision, "one revision for the whole transaction");
    assert_eq!(store.get(b"other").await.expect("get"), None);
    let lt = store
        .txn(Txn::new().when([Compare::mod_revision("k", CompareOp::Less, fresh.revision + 1)]))
        .await
        .expect("txn");
    assert!(lt.succeeded);
}

/// A prefix delete removes every key under the prefix and nothing else.
pub async fn delete_prefix(store: Arc<dyn Store>) {
    for key in ["p/1", "p/2", "p/3/x", "q/1", "p"] {
        store.put(key.as_bytes(), b"x").await.expect("put");
    }
    let result = store.txn(Txn::new().and_then([Op::delete_prefix("p/")])).await.expect("txn");
    assert_eq!(result.results, vec![OpResult::Delete(3)]);
    assert!(store.range_prefix(b"p/", 0).await.expect("range").kvs.is_empty());
    assert!(store.get(b"q/1").await.expect("get").is_some());
    assert!(store.get(b"p").await.expect("get").is_some());
}

/// Limits match etcd's defaults on both backends.
pub async fn txn_limits(store: Arc<dyn Store>) {
    let ops: Vec<Op> = (0..129).map(|i| Op::put(format!("k{i}"), "v")).collect();
    let error = store.txn(Txn::new().and_then(ops)).await.expect_err("129 operations");
    assert!(matches!(error, StoreError::InvalidRequest(_)), "{error:?}");
    let ops: Vec<Op> = (0..128).map(|i| Op::put(format!("k{i}"), "v")).collect();
    store.txn(Txn::new().and_then(ops)).await.expect("128 operations");
    // etcd refuses a transaction that writes one key twice.
    let twice = Txn::new().and_then([Op::put("dup", "1"), Op::delete("dup")]);
    let error = store.txn(twice).await.expect_err("a key written twice");
    assert!(matches!(error, StoreError::InvalidRequest(_)), "{error:?}");
}

/// A watch from a past revision replays history, then follows live changes, in order.
pub async fn watch_from_revision(store: Arc<dyn Store>) {
    let start = store.revision().await.expect("revision") + 1;
    store.put(b"w/1", b"a").await.expect("put");
    store.put(b"elsewhere", b"a").await.expect("put");
    store.put(b"w/2", b"b").await.expect("put");
    store.delete(b"w/1").await.expect("delete");
    let mut stream = store.watch(b"w/", start).await.expect("watch");
    let history = next_events(&mut stream, 3).await;
    let kinds: Vec<(EventKind, &str)> =
        history.iter().map(|(k, key, _)| (*k, key.as_str())).collect();
    assert_eq!(
        kinds,
        vec![(EventKind::Put, "w/1"), (EventKind::Put, "w/2"), (EventKind::Delete, "w/1")]
    );
    assert!(history.windows(2).all(|w| w[0].2 < w[1].2), "revision order: {history:?}");

    let live = store
        .txn(Txn::new().and_then([
            Op::put("w/3", "c"),
            Op::put("w/4", "d"),
            Op::put("elsewhere", "b"),
        ]))
        .await
        .expect("txn");
    let events = next_events(&mut stream, 2).await;
    assert_eq!(events.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), vec!["w/3", "w/4"]);
    assert!(events.iter().all(|e| e.2 == live.revision));
}

/// A watch "from now" sees only later changes.
pub async fn watch_from_now(store: Arc<dyn Store>) {
    store.put(b"n/old", b"x").await.expect("put");
    let mut stream = store.watch(b"n/", 0).await.expect("watch");
    store.put(b"n/new", b"x").await.expect("put");
    let events = next_events(&mut stream, 1).await;
    assert_eq!(events[0].1, "n/new");
}

/// Leased keys live with their lease; an unknown lease is refused.
pub async fn leases(store: Arc<dyn Store>) {
    let lease = store.lease_grant(Duration::from_secs(30)).await.expect("grant");
    let mut stream = store.watch(b"l/", 0).await.expect("watch");
    store
        .txn(Txn::new().and_then([Op::put_with_lease("l/a", "x", lease), Op::put("l/b", "y")]))
        .await
        .expect("txn");
    assert_eq!(store.get(b"l/a").await.expect("get").expect("present").lease, lease);
    let left = store.lease_keep_alive(lease).await.expect("keep alive");
    assert!(left > Duration::from_secs(20) && left <= Duration::from_secs(30), "{left:?}");
    assert!(store.lease_time_left(lease).await.expect("ttl").is_some());
    store.lease_revoke(lease).await.expect("revoke");
    assert_eq!(store.get(b"l/a").await.expect("get"), None);
    assert!(store.get(b"l/b").await.expect("get").is_some(), "keys without the lease stay");
    let events = next_events(&mut stream, 3).await;
    assert_eq!(events[2].0, EventKind::Delete);
    assert_eq!(events[2].1, "l/a");
    assert!(store.lease_time_left(lease).await.expect("ttl").is_none());
    let error = store.lease_keep_alive(lease).await.expect_err("revoked lease");
    assert!(matches!(error, StoreError::LeaseNotFound(_)), "{error:?}");
    let error = store
        .txn(Txn::new().and_then([Op::put_with_lease("l/c", "x", lease)]))
        .await
        .expect_err("put on a revoked lease");
    assert!(matches!(error, StoreError::LeaseNotFound(_)), "{error:?}");
}

/// Many concurrent writers each get their own revision and all writes land.
pub async fn concurrent_writes(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { store.put(format!("c/{i:02}").as_bytes(), b"x").await },
        ));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.expect("task").expect("put"));
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 64, "every write has its own revision");
    assert_eq!(store.range_prefix(b"c/", 0).await.expect("range").kvs.len(), 64);
}

/// Declares one `#[tokio::test]` per conformance check, each on a fresh store from `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            put_get_delete, range_pages, txn_compares, delete_prefix, txn_limits,
            watch_from_revision, watch_from_now, leases, concurrent_writes);
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make.await;
                $crate::conformance::$name(store).await;
            }
        )*
    };
}
