//! Partitions across node processes on a real etcd: ownership, failover on kill -9, rebalance
//! on restart, and fencing of a node frozen past its lease.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidings_client::v1::{Event, ListPartitionsRequest, PublishBatchRequest};
use tidings_scheduler::store::{EventKind, Store};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, unique_prefix, wait_until};

const LEASE_TTL: &str = "2s";

fn options(etcd: &Etcd, prefix: &str, id: &str) -> NodeOptions {
    NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.to_string()),
        args: vec!["--node-id".into(), id.into()],
        env: vec![
            ("TIDINGS_CLUSTER__LEASE_TTL".into(), LEASE_TTL.into()),
            ("TIDINGS_CLUSTER__HANDOFF_TIMEOUT".into(), "2s".into()),
        ],
        ..Default::default()
    }
}

/// Returns the owner of every owned partition, read from etcd.
async fn owners(store: &dyn Store) -> BTreeMap<u32, String> {
    let page = store.range_prefix(b"owners/", 0).await.expect("owners");
    page.kvs
        .into_iter()
        .filter_map(|kv| {
            let p = std::str::from_utf8(&kv.key[7..]).ok()?.parse().ok()?;
            Some((p, String::from_utf8_lossy(&kv.value).into_owned()))
        })
        .collect()
}

/// Waits until all 64 partitions are owned, by exactly `expected` nodes, balanced.
async fn settled(store: &dyn Store, expected: &[&str], within: Duration) -> BTreeMap<u32, String> {
    let cap = 64usize.div_ceil(expected.len());
    wait_until(&format!("64 partitions balanced over {expected:?}"), within, || async {
        let owners = owners(store).await;
        let counts: BTreeMap<&str, usize> =
            expected.iter().map(|n| (*n, owners.values().filter(|o| o == n).count())).collect();
        (owners.len() == 64
            && owners.values().all(|o| expected.contains(&o.as_str()))
            && counts.values().all(|c| *c <= cap && *c > 0))
        .then_some(owners)
    })
    .await
    .expect("partitions settle")
}

/// Publishes a batch of events spread over every partition.
async fn publish(node: &NodeProcess, round: usize) {
    let mut events = node.events().await.expect("client");
    let batch = (0..128)
        .map(|i| Event {
            r#type: "tick".into(),
            contact_id: format!("contact-{round}-{i}"),
            ..Default::default()
        })
        .collect();
    events.publish_batch(PublishBatchRequest { events: batch }).await.expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_fail_over_after_kill_and_rebalance_after_restart() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let start_revision = store.revision().await.expect("revision");
    let mut a = NodeProcess::start(options(&etcd, &prefix, "node-a")).await.expect("a");
    let _b = NodeProcess::start(options(&etcd, &prefix, "node-b")).await.expect("b");
    let c = NodeProcess::start(options(&etcd, &prefix, "node-c")).await.expect("c");
    settled(&store, &["node-a", "node-b", "node-c"], Duration::from_secs(20)).await;

    // The plan may still move a partition after the counts settle; during a handoff the
    // partition has no owner for a moment, so the listing is awaited too.
    let cluster = c.cluster().await.expect("client");
    let listed =
        wait_until("ListPartitions to show 64 owned partitions", Duration::from_secs(10), || {
            let mut cluster = cluster.clone();
            async move {
                let listed =
                    cluster.list_partitions(ListPartitionsRequest {}).await.ok()?.into_inner();
                (listed.partitions.len() == 64
                    && listed.partitions.iter().all(|p| !p.owner.is_empty() && p.epoch > 0))
                .then_some(listed)
            }
        })
        .await
        .expect("listed");
    assert_eq!(listed.partitions.len(), 64);

    // kill -9: the survivors own everything again within the lease TTL + 2 s.
    publish(&c, 0).await;
    let a_owned: Vec<u32> =
        owners(&store).await.into_iter().filter(|(_, o)| o == "node-a").map(|(p, _)| p).collect();
    a.kill();
    let killed = Instant::now();
    let after_kill = settled(&store, &["node-b", "node-c"], Duration::from_secs(10)).await;
    let failover = killed.elapsed();
    println!("failover after kill -9: {failover:?} (lease TTL {LEASE_TTL})");
    assert!(failover <= Duration::from_secs(4), "failover took {failover:?}");

    // Restart: only partitions the returning node takes move; none move between survivors.
    let _a = NodeProcess::start(options(&etcd, &prefix, "node-a")).await.expect("a again");
    let after_restart =
        settled(&store, &["node-a", "node-b", "node-c"], Duration::from_secs(20)).await;
    publish(&c, 1).await;
    let state = tidings_tests::cluster_state(&etcd.endpoint(), &prefix).await.expect("state");
    wait_until("every inbox to drain", Duration::from_secs(20), || async {
        (inbox_backlog(&state).await == 0).then_some(())
    })
    .await
    .expect("drained");

    let moved: Vec<u32> =
        after_kill.keys().filter(|p| after_kill.get(p) != after_restart.get(p)).copied().collect();
    assert!(
        moved.iter().all(|p| after_restart[p] == "node-a"),
        "a partition moved between survivors: {moved:?}"
    );
    let gained = after_restart.values().filter(|o| *o == "node-a").count();
    assert_eq!(moved.len(), gained);
    println!("node-a owned {} before the kill, {gained} after its restart", a_owned.len());

    assert_single_owner_history(&store, start_revision).await;
}

/// Replays every change under `owners/`: a partition is created as owned only while it has no
/// owner, and every partition write (`p/*/applied`) was made by its owner of the moment, under
/// that owner's epoch.
async fn assert_single_owner_history(store: &dyn Store, from: i64) {
    let end = store.revision().await.expect("revision");
    let mut stream = store.watch(b"", from + 1).await.expect("watch history");
    let mut owners: BTreeMap<Vec<u8>, (String, i64)> = BTreeMap::new();
    let mut writes = 0;
    let mut revision = from;
    while revision < end {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("history arrives")
            .expect("stream open")
            .expect("no compaction");
        revision = batch.revision;
        for event in batch.events {
            let key = event.kv.key.clone();
            if key.starts_with(b"owners/") {
                match event.kind {
                    EventKind::Put => {
                        let node = String::from_utf8_lossy(&event.kv.value).into_owned();
                        if let Some((other, _)) = owners.get(&key) {
                            assert_eq!(event.kv.version, 1, "owner key rewritten");
                            panic!(
                                "{node} claimed {:?} while {other} owned it",
                                String::from_utf8_lossy(&key)
                            );
                        }
                        owners.insert(key, (node, event.kv.create_revision));
                    }
                    EventKind::Delete => {
                        owners.remove(&key);
                    }
                }
            } else if key.ends_with(b"/applied") && event.kind == EventKind::Put {
                let partition = &key[2..6];
                let owner_key = [b"owners/".as_slice(), partition].concat();
                let stamp = String::from_utf8_lossy(&event.kv.value).into_owned();
                let (node, epoch) = owners.get(&owner_key).unwrap_or_else(|| {
                    panic!("write {stamp} to an unowned partition at {revision}")
                });
                assert_eq!(
                    stamp,
                    format!("{node}/{epoch}"),
                    "write by a stale owner at {revision}"
                );
                writes += 1;
            }
        }
    }
    println!("checked {writes} partition writes up to revision {end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_lease_writes_nothing_after_losing_its_partitions() {
    let etcd = Etcd::start().await.expect("etcd");
    let prefix = unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let start_revision = store.revision().await.expect("revision");
    let a = NodeProcess::start(options(&etcd, &prefix, "node-a")).await.expect("a");
    let b = NodeProcess::start(options(&etcd, &prefix, "node-b")).await.expect("b");
    let c = NodeProcess::start(options(&etcd, &prefix, "node-c")).await.expect("c");
    settled(&store, &["node-a", "node-b", "node-c"], Duration::from_secs(20)).await;
    let audit = FenceAudit::install(&etcd.endpoint(), &prefix).await;
    publish(&b, 0).await;

    // Events keep arriving in every partition while node-a is frozen, so that its workers have
    // work queued the moment it thaws.
    a.pause();
    let frozen = Instant::now();
    let mut round = 1;
    while frozen.elapsed() < Duration::from_secs(5) {
        publish(&b, round).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = owners(&store).await;
    assert!(during.values().all(|o| o != "node-a"), "node-a lost every partition: {during:?}");
    a.resume();
    for _ in 0..10 {
        publish(&c, round).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It rejoins cleanly and gets its share back.
    settled(&store, &["node-a", "node-b", "node-c"], Duration::from_secs(20)).await;
    let logs = a.logs();
    let noticed = logs.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|entry| {
            entry["message"] == "lease lost; dropped every partition and registering again"
        })
    });
    assert!(noticed, "node-a did not log that it lost its lease:\n{logs}");
    let state = tidings_tests::cluster_state(&etcd.endpoint(), &prefix).await.expect("state");
    wait_until("every inbox to drain", Duration::from_secs(20), || async {
        (inbox_backlog(&state).await == 0).then_some(())
    })
    .await
    .expect("drained");
    assert_single_owner_history(&store, start_revision).await;
    assert_fences_recorded(&store, &etcd.endpoint(), &prefix).await;
    audit.assert_every_write_by_its_owner().await;
}

/// PostgreSQL's own record of who wrote partition data: a trigger on the tables only owners
/// write (deliveries, timers, standings, and the removal of inbox entries) records, for every
/// row changed, the node whose session wrote it (its `application_name`) and the owner the
/// partition's row named in that same transaction.
struct FenceAudit {
    client: tokio_postgres::Client,
}

impl FenceAudit {
    async fn install(etcd: &str, prefix: &str) -> Self {
        let url = tidings_tests::cluster_postgres_url(etcd, prefix).await.expect("url");
        let (client, connection) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE fence_audit (
                     seq bigserial PRIMARY KEY, tbl text NOT NULL, partition integer NOT NULL,
                     writer text NOT NULL, owner text);
                 CREATE FUNCTION fence_audit() RETURNS trigger LANGUAGE plpgsql AS $$
                 DECLARE p integer;
                 BEGIN
                     IF TG_OP = 'DELETE' THEN p := OLD.partition; ELSE p := NEW.partition; END IF;
                     INSERT INTO fence_audit (tbl, partition, writer, owner)
                     VALUES (TG_TABLE_NAME, p, current_setting('application_name'),
                             (SELECT owner FROM partitions WHERE id = p));
                     RETURN NULL;
                 END $$;
                 CREATE TRIGGER fence_audit AFTER INSERT OR UPDATE OR DELETE ON deliveries
                     FOR EACH ROW EXECUTE FUNCTION fence_audit();
                 CREATE TRIGGER fence_audit AFTER INSERT OR UPDATE OR DELETE ON timers
                     FOR EACH ROW EXECUTE FUNCTION fence_audit();
                 CREATE TRIGGER fence_audit AFTER INSERT OR UPDATE OR DELETE ON standings
                     FOR EACH ROW EXECUTE FUNCTION fence_audit();
                 CREATE TRIGGER fence_audit AFTER DELETE ON inbox
                     FOR EACH ROW EXECUTE FUNCTION fence_audit();",
            )
            .await
            .expect("audit");
        Self { client }
    }

    /// Every recorded write was made by the node the partition's row named as owner then.
    async fn assert_every_write_by_its_owner(&self) {
        let rows = self
            .client
            .query("SELECT tbl, partition, writer, owner FROM fence_audit ORDER BY seq", &[])
            .await
            .expect("audit rows");
        assert!(rows.len() > 100, "the audit saw the owners' writes: {}", rows.len());
        let mut writers = std::collections::BTreeSet::new();
        for row in &rows {
            let (table, partition, writer, owner): (String, i32, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let node = writer.strip_prefix("tidings/").unwrap_or(&writer);
            let owner = owner.unwrap_or_default();
            assert!(
                owner.starts_with(&format!("{node}/")),
                "{writer} wrote {table} of partition {partition}, owned by {owner:?}"
            );
            writers.insert(node.to_string());
        }
        assert!(writers.contains("node-a"), "node-a's writes were recorded: {writers:?}");
        println!("fence audit: {} writes, each by its partition's owner", rows.len());
    }
}

/// Every partition's row in PostgreSQL carries the epoch of its owner in etcd: the record
/// every partition transaction is checked against.
async fn assert_fences_recorded(store: &dyn Store, etcd: &str, prefix: &str) {
    let url = tidings_tests::cluster_postgres_url(etcd, prefix).await.expect("url");
    let (client, connection) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let rows = client.query("SELECT id, epoch, owner FROM partitions", &[]).await.expect("rows");
    let recorded: BTreeMap<i32, (i64, String)> =
        rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2)))).collect();
    let page = store.range_prefix(b"owners/", 0).await.expect("owners");
    assert_eq!(page.kvs.len(), 64, "every partition is owned");
    for kv in page.kvs {
        let partition: i32 =
            String::from_utf8_lossy(&kv.key[7..]).parse().expect("a partition number");
        let node = String::from_utf8_lossy(&kv.value).into_owned();
        let (epoch, owner) = recorded.get(&partition).expect("a recorded fence");
        assert_eq!(*epoch, kv.create_revision, "partition {partition}'s fence");
        assert_eq!(*owner, format!("{node}/{epoch}"), "partition {partition}'s owner");
    }
}

async fn inbox_backlog(state: &tidings_scheduler::state::State) -> u64 {
    let mut total = 0;
    for p in 0..64 {
        total += state.inbox_backlog(p).await.unwrap_or(1);
    }
    total
}
