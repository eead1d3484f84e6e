//! What every backend of the state layer must do, run against each of them.

use std::time::Duration;

use tidings_scheduler::contact::Contact;
use tidings_scheduler::delivery::record::{Delivery, Status};
use tidings_scheduler::inbox::{IdempotencyRecord, InboxEntry};
use tidings_scheduler::state::{
    Committed, DeliveryFilter, Expect, Fence, Key, State, TimerRef, Write, timers_start,
    timers_until,
};
use tidings_scheduler::timers::{Timer, TimerKind};

fn contact(name: &str) -> Contact {
    Contact {
        attributes: [("name".to_string(), serde_json::json!(name))].into(),
        ..Default::default()
    }
}

fn fence(partition: u32, epoch: i64) -> Fence {
    Fence { partition, epoch, signature: format!("test/{epoch}").into_bytes() }
}

/// Builds a delivery of `campaign` to `contact`.
pub fn delivery(
    partition: u32,
    id: &str,
    campaign: &str,
    contact: &str,
    status: Status,
) -> Delivery {
    serde_json::from_value(serde_json::json!({
        "id": id, "partition": partition, "webhook_id": "wh", "campaign_id": campaign,
        "run_id": "", "contact_id": contact, "event_id": "", "status": status,
        "reason": "", "request": null, "attempts": [], "retry_index": 0, "dispatch_seq": 0,
        "next_attempt_ms": null, "created_ms": 1000, "updated_ms": 1000,
    }))
    .expect("a delivery")
}

/// Records read back as written, pages in id order, deletes, and versions that change.
pub async fn records_and_pages(state: State) {
    let writes = (0..25)
        .map(|i| Write::contact(1, &format!("c{i:02}"), &contact(&format!("n{i}"))))
        .collect::<Result<Vec<_>, _>>()
        .expect("encode");
    state.write(writes).await.expect("write");
    let found = state.contact(1, "c03").await.expect("read").expect("present");
    assert_eq!(found.attributes["name"], "n3");
    assert!(state.contact(2, "c03").await.expect("read").is_none(), "partitions are apart");
    let page = state.contacts_after(1, "", 10).await.expect("page");
    assert_eq!(page.contacts.len(), 10);
    assert!(page.more);
    assert_eq!(page.contacts[0].0, "c00");
    let page = state.contacts_after(1, "c19", 10).await.expect("page");
    let ids: Vec<&str> = page.contacts.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["c20", "c21", "c22", "c23", "c24"]);
    assert!(!page.more);
    let many = state.contacts(1, &["c01", "zz", "c02"], 0).await.expect("many");
    assert!(many[0].1.as_ref().expect("decodes").is_some());
    assert!(many[1].1.as_ref().expect("decodes").is_none());

    let standing = tidings_scheduler::status::CampaignStatus::default();
    let standings = vec![
        Write::standing(1, "c01", "k1", &standing).expect("encode"),
        Write::standing(1, "c02", "k2", &standing).expect("encode"),
    ];
    state.write(standings).await.expect("write");
    let pairs =
        [("c02", "k2"), ("c01", "k9"), ("c01", "k1")].map(|(c, k)| (c.to_string(), k.to_string()));
    let found = state.standings_of(1, &pairs, 0).await.expect("standings");
    let present: Vec<bool> = found.iter().map(|f| f.as_ref().expect("decodes").is_some()).collect();
    assert_eq!(present, [true, false, true]);
    assert_eq!(state.standings(1, "c01").await.expect("standings").len(), 1);

    let key = Key::Contact { partition: 1, id: "c01".into() };
    let before = state.versioned::<Contact>(&key).await.expect("read").expect("present");
    state
        .write(vec![Write::contact(1, "c01", &contact("again")).expect("encode")])
        .await
        .expect("write");
    let after = state.versioned::<Contact>(&key).await.expect("read").expect("present");
    assert_ne!(before.version, after.version, "a write changes the version");

    state.write(vec![Write::remove(key.clone())]).await.expect("delete");
    assert!(state.contact(1, "c01").await.expect("read").is_none());
}

/// Writes made at once, as many API calls make them (a backend may commit them together):
/// each is applied, a key written by several ends with one of their values, and a write the
/// backend refuses fails alone.
pub async fn concurrent_writes(state: State) {
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let state = state.clone();
        calls.spawn(async move {
            let mut writes =
                vec![Write::contact(3, &format!("w{i:03}"), &contact(&format!("n{i}")))?];
            writes.push(Write::contact(3, "shared", &contact(&format!("s{i}")))?);
            state.write(writes).await.map(|_| ())
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("task").expect("write");
    }
    let page = state.contacts_after(3, "", 1000).await.expect("page");
    assert_eq!(page.contacts.len(), 201, "200 contacts and the shared one");
    let shared = state.contact(3, "shared").await.expect("read").expect("present");
    let name = shared.attributes["name"].as_str().expect("a name").to_string();
    assert!(name.starts_with('s'), "{name}");
}

/// Conditional writes apply only when their condition holds, and say what is there instead.
pub async fn conditional_writes(state: State) {
    let key = Key::Idempotency { key: "k1".into() };
    let record = IdempotencyRecord { event_id: "e1".into(), created_ms: 5 };
    let write = || Write::idempotency("k1", &record).expect("encode");
    let first = state.write_if::<IdempotencyRecord>(&key, Expect::Absent, vec![write()]).await;
    assert!(first.expect("write").is_ok());
    let second = state.write_if::<IdempotencyRecord>(&key, Expect::Absent, vec![write()]).await;
    let held = second.expect("write").expect_err("refused").expect("held");
    assert_eq!(held.value.expect("decodes").event_id, "e1");
    let stale = state
        .write_if::<IdempotencyRecord>(&key, Expect::Version(held.version + 1000), vec![write()])
        .await;
    assert!(stale.expect("write").is_err(), "a stale version is refused");
    let current = state
        .write_if::<IdempotencyRecord>(&key, Expect::Version(held.version), vec![write()])
        .await;
    assert!(current.expect("write").is_ok());

    let absent = [Key::Idempotency { key: "k2".into() }];
    let write2 = || Write::idempotency("k2", &record).expect("encode");
    assert!(state.write_if_absent(&absent, vec![write2()]).await.expect("write"));
    assert!(!state.write_if_absent(&absent, vec![write2()]).await.expect("write"));

    // Many writers racing for one key: exactly one wins.
    let racers = (0..8).map(|i| {
        let state = state.clone();
        async move {
            let record = IdempotencyRecord { event_id: format!("e{i}"), created_ms: 5 };
            let absent = [Key::Idempotency { key: "race".into() }];
            let write = Write::idempotency("race", &record).expect("encode");
            state.write_if_absent(&absent, vec![write]).await.expect("write")
        }
    });
    let won = futures::future::join_all(racers).await.into_iter().filter(|w| *w).count();
    assert_eq!(won, 1);
}

/// A commit applies under the current epoch only; a newer claim fences the older owner off.
pub async fn fenced_commits(state: State, claim_first: bool) {
    // Without claims (the key-value stores), the fence is the owner key: absent, epoch 0.
    let old = fence(3, if claim_first { 10 } else { 0 });
    if claim_first {
        assert!(state.claim(&old).await.expect("claim"));
    }
    let write = |id: &str| Write::contact(3, id, &contact(id)).expect("encode");
    let committed = state.commit(&old, vec![write("a")], None).await.expect("commit");
    assert!(matches!(committed, Committed::Applied(_)), "{committed:?}");
    if !claim_first {
        return;
    }
    let new = fence(3, 20);
    assert!(state.claim(&new).await.expect("claim"));
    assert!(!state.claim(&old).await.expect("claim"), "an older epoch cannot claim back");
    let refused = state.commit(&old, vec![write("b")], None).await.expect("commit");
    assert!(matches!(refused, Committed::Refused { still_ours: false, .. }), "{refused:?}");
    assert!(state.contact(3, "b").await.expect("read").is_none(), "nothing of it applied");
    // A witness that is gone: the fence holds, nothing applies.
    let witness = Key::Inbox { partition: 3, id: "gone".into() };
    let refused = state.commit(&new, vec![write("c")], Some(&witness)).await.expect("commit");
    assert!(matches!(refused, Committed::Refused { still_ours: true, .. }), "{refused:?}");
    assert!(state.contact(3, "c").await.expect("read").is_none());
}

/// Timers come back in due order within a range of positions, a page at a time.
pub async fn timer_ranges(state: State, claim_first: bool) {
    let owner = fence(5, i64::from(claim_first));
    if claim_first {
        assert!(state.claim(&owner).await.expect("claim"));
    }
    let timer = |due_ms: i64, id: &str| Timer {
        id: id.into(),
        due_ms,
        kind: TimerKind::Attempt { delivery: format!("d-{id}") },
    };
    let writes = [(300, "c"), (100, "a"), (200, "b"), (200, "a"), (900, "z")]
        .iter()
        .map(|(due, id)| Write::timer(5, &timer(*due, id)).expect("encode"))
        .collect();
    assert!(matches!(
        state.commit(&owner, writes, None).await.expect("commit"),
        Committed::Applied(_)
    ));
    let page =
        state.timers(5, &timers_start(5), &timers_until(5, 300), 10, 0).await.expect("timers");
    let dues: Vec<i64> = page
        .timers
        .iter()
        .map(|(pos, _)| tidings_scheduler::state::timer_due(pos).expect("due"))
        .collect();
    assert_eq!(dues, [100, 200, 200, 300]);
    assert!(!page.more);
    let page =
        state.timers(5, &timers_start(5), &timers_until(5, 1000), 2, 0).await.expect("timers");
    assert_eq!(page.timers.len(), 2);
    assert!(page.more);
    let after = tidings_scheduler::state::timer_after(&page.timers[1].0);
    let rest = state.timers(5, &after, &timers_until(5, 1000), 10, 0).await.expect("timers");
    assert_eq!(rest.timers.len(), 3);
    assert_eq!(state.pending_timers(5).await.expect("count"), 5);
    let gone = TimerRef { partition: 5, due_ms: 100, id: "a".into() };
    state.commit(&owner, vec![Write::remove_timer(gone)], None).await.expect("commit");
    assert_eq!(state.pending_timers(5).await.expect("count"), 4);
}

/// The inbox feed returns what is there, then what arrives, each entry once.
pub async fn inbox_feed(state: State) {
    let entry = |id: &str| {
        let timer =
            Timer { id: id.into(), due_ms: 1, kind: TimerKind::Attempt { delivery: id.into() } };
        Write::inbox(7, id, &InboxEntry::Schedule(timer)).expect("encode")
    };
    state.write(vec![entry("i1"), entry("i2")]).await.expect("write");
    let mut feed = state.inbox(7).await.expect("feed");
    let first = feed.next().await.expect("first");
    assert!(first.reset);
    assert_eq!(first.entries.len(), 2);
    // Well within the fallback poll: the writer's notification wakes the feed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let written = std::time::Instant::now();
    state.write(vec![entry("i3")]).await.expect("write");
    let next = tokio::time::timeout(Duration::from_millis(500), feed.next())
        .await
        .expect("a new entry is seen within 500 ms")
        .expect("next");
    println!("inbox entry seen {:?} after its write", written.elapsed());
    let ids: Vec<String> = next.entries.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(ids[0].ends_with("i3"), "{ids:?}");
    assert_eq!(state.inbox_backlog(7).await.expect("count"), 3);
}

/// A backlog many pages long, written `per_transaction` entries at a time (a backend with
/// large transactions: more than a page in one), comes out of the feed whole, each entry once.
pub async fn inbox_backlog(state: State, per_transaction: usize) {
    let entry = |id: &str| {
        let timer =
            Timer { id: id.into(), due_ms: 1, kind: TimerKind::Attempt { delivery: id.into() } };
        Write::inbox(8, id, &InboxEntry::Schedule(timer)).expect("encode")
    };
    let first: Vec<Write> = (0..4_500).map(|i| entry(&format!("b{i:05}"))).collect();
    for chunk in first.chunks(per_transaction) {
        state.write(chunk.to_vec()).await.expect("write");
    }
    for t in 0..3 {
        let writes: Vec<Write> = (0..500).map(|i| entry(&format!("c{t}-{i:03}"))).collect();
        for chunk in writes.chunks(per_transaction) {
            state.write(chunk.to_vec()).await.expect("write");
        }
    }
    let mut feed = state.inbox(8).await.expect("feed");
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 6_000 {
        let batch = tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .unwrap_or_else(|_| panic!("the feed stopped after {} of 6000", seen.len()))
            .expect("next");
        for (key, _) in batch.entries {
            assert!(seen.insert(key.to_string()), "{key} returned twice");
        }
    }
    assert_eq!(state.inbox_backlog(8).await.expect("count"), 6_000);
    assert_eq!(state.kept_deliveries(8).await.expect("count"), 0);
}

/// Delivery lists filter by campaign, contact and status, in pages.
pub async fn delivery_queries(state: State) {
    let mut writes = Vec::new();
    for p in 0..4u32 {
        for i in 0..10 {
            let status = if i % 2 == 0 { Status::Delivered } else { Status::Failed };
            let d = delivery(
                p,
                &format!("msg_{p}_{i:02}"),
                &format!("camp{}", i % 3),
                &format!("u{i}"),
                status,
            );
            writes.push(Write::delivery(&d).expect("encode"));
        }
    }
    state.write(writes).await.expect("write");
    let all = DeliveryFilter::default();
    let (page, next) = state.deliveries(&all, (0, None), 4, 15).await.expect("list");
    assert_eq!(page.len(), 15);
    let (rest, end) = state
        .deliveries(&all, next.clone().map(|(p, id)| (p, Some(id))).expect("next"), 4, 100)
        .await
        .expect("list");
    assert_eq!(rest.len(), 25);
    assert!(end.is_none());
    let by_contact = DeliveryFilter { contact_id: "u3".into(), ..Default::default() };
    let (page, _) = state.deliveries(&by_contact, (0, None), 4, 10).await.expect("list");
    assert_eq!(page.len(), 4);
    assert!(page.iter().all(|d| d.contact_id == "u3"));
    let by_campaign = DeliveryFilter {
        campaign_id: "camp0".into(),
        status: Some(Status::Failed),
        ..Default::default()
    };
    let (page, _) = state.deliveries(&by_campaign, (0, None), 4, 100).await.expect("list");
    // i in {3, 9} per partition.
    assert_eq!(page.len(), 8);
    let none = DeliveryFilter { status: Some(Status::Skipped), ..Default::default() };
    let (page, next) = state.deliveries(&none, (0, None), 4, 10).await.expect("list");
    assert!(page.is_empty() && next.is_none());
}
