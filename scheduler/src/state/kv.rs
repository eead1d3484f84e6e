//! The state layer on a key-value store (the layout in [`super::keys`]): redb, for a single
//! node. (etcd has the same semantics but holds coordination only; see [`super::postgres`].)
//!
//! A partition commit is one store transaction that compares the create revision of
//! `owners/{p}` with the writer's epoch, and stamps `p/{p}/applied` with its signature. The
//! inbox is followed with a watch from the revision it was read at.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::backend::{
    Backend, Committed, ContactChange, ContactFeed, DeliveryPage, DeliveryStream, InboxBatch,
    InboxFeed, Raw, Table, TimerPage,
};
use super::{DeliveryFilter, Expect, Fence, Key, StateError, StateResult, Write, keys};
use crate::cluster::PartitionId;
use crate::delivery::record::Delivery;
use crate::store::{
    Compare, CompareOp, EventKind, KeyValue, Op, OpResult, Revision, Store, StoreError, Txn,
    WatchStream,
};

/// The state layer over a key-value store.
pub(crate) struct KvBackend {
    store: Arc<dyn Store>,
}

impl KvBackend {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

fn raw(kv: KeyValue) -> Raw {
    Raw { value: kv.value, version: kv.mod_revision }
}

fn prefix(table: Table<'_>) -> String {
    match table {
        Table::Contacts(p) => keys::contacts_prefix(p),
        Table::Deliveries(p) => keys::deliveries_prefix(p),
        Table::Standings(p, contact) => keys::contact_standings_prefix(p, contact),
        Table::Shards(campaign, run) => keys::run_shards_prefix(campaign, run),
        Table::Runs(campaign) => keys::run(campaign, ""),
        Table::Timers(p) => keys::timers_prefix(p),
        Table::Inbox(p) => keys::inbox_prefix(p),
    }
}

/// Returns the store transaction that applies `writes` under `fence`, stamping the partition:
/// when the fence does not hold, it reads the owner key instead. With `witness`, it also
/// requires that key to exist.
fn fenced(fence: &Fence, writes: Vec<Write>, witness: Option<&Key>) -> Txn {
    let mut txn = Txn::new()
        .when([fence.guard()])
        .and_then(
            writes
                .into_iter()
                .map(Write::into_op)
                .chain([Op::put(keys::applied(fence.partition), fence.signature.clone())]),
        )
        .or_else([Op::get(crate::cluster::owner_key(fence.partition))]);
    if let Some(witness) = witness {
        txn.when.push(Compare::present(witness.encode()));
    }
    txn
}

impl KvBackend {
    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> StateResult<(Vec<(String, KeyValue)>, bool)> {
        let start = match after {
            Some(after) => {
                let mut start = format!("{prefix}{after}").into_bytes();
                start.push(0);
                start
            }
            None => prefix.as_bytes().to_vec(),
        };
        let end = match before {
            Some(before) => format!("{prefix}{before}").into_bytes(),
            None => crate::store::prefix_end(prefix.as_bytes()),
        };
        let page = self
            .store
            .range(&start, &end, limit)
            .await
            .map_err(|source| StateError::Read { key: prefix.to_string(), source })?;
        let found = page
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(), kv))
            .collect();
        Ok((found, page.more))
    }
}

#[async_trait]
impl Backend for KvBackend {
    async fn get(&self, key: &Key) -> StateResult<Option<Raw>> {
        let encoded = key.encode();
        match self.store.get(encoded.as_bytes()).await {
            Ok(found) => Ok(found.map(raw)),
            Err(source) => Err(StateError::Read { key: encoded, source }),
        }
    }

    async fn get_many(&self, keys: &[Key], at_least: Revision) -> StateResult<Vec<Option<Raw>>> {
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.encode().into_bytes()).collect();
        let found = self.store.get_many_since(&encoded, at_least).await.map_err(|source| {
            StateError::Read { key: keys.first().map(Key::encode).unwrap_or_default(), source }
        })?;
        Ok(found.into_iter().map(|kv| kv.map(raw)).collect())
    }

    async fn scan(
        &self,
        table: Table<'_>,
        after: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> StateResult<(Vec<(String, Raw)>, bool)> {
        let (page, more) = self.scan_prefix(&prefix(table), after, before, limit).await?;
        Ok((page.into_iter().map(|(id, kv)| (id, raw(kv))).collect(), more))
    }

    async fn count(&self, table: Table<'_>) -> Result<u64, StoreError> {
        self.store.count_prefix(prefix(table).as_bytes()).await
    }

    async fn write(&self, writes: Vec<Write>) -> StateResult<Revision> {
        let key = writes.first().map(|w| w.key.encode()).unwrap_or_default();
        let txn = Txn::new().and_then(writes.into_iter().map(Write::into_op));
        match self.store.txn(txn).await {
            Ok(result) => Ok(result.revision),
            Err(source) => Err(StateError::Write { key, source }),
        }
    }

    async fn write_if(
        &self,
        key: &Key,
        expect: Expect,
        writes: Vec<Write>,
    ) -> StateResult<Result<Revision, Option<Raw>>> {
        let encoded = key.encode();
        let compare = match expect {
            Expect::Absent => Compare::absent(encoded.clone()),
            Expect::Present => Compare::present(encoded.clone()),
            Expect::Version(version) => {
                Compare::mod_revision(encoded.clone(), CompareOp::Equal, version)
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then(writes.into_iter().map(Write::into_op))
            .or_else([Op::get(encoded.clone())]);
        let result = self
            .store
            .txn(txn)
            .await
            .map_err(|source| StateError::Write { key: encoded.clone(), source })?;
        if result.succeeded {
            return Ok(Ok(result.revision));
        }
        Ok(Err(match result.results.into_iter().next() {
            Some(OpResult::Get(Some(kv))) => Some(raw(kv)),
            _ => None,
        }))
    }

    async fn write_if_absent(&self, absent: &[Key], writes: Vec<Write>) -> StateResult<bool> {
        let key = absent.first().map(Key::encode).unwrap_or_default();
        let txn = Txn::new()
            .when(absent.iter().map(|k| Compare::absent(k.encode())))
            .and_then(writes.into_iter().map(Write::into_op));
        match self.store.txn(txn).await {
            Ok(result) => Ok(result.succeeded),
            Err(source) => Err(StateError::Write { key, source }),
        }
    }

    async fn expire_idempotency(
        &self,
        fence: &Fence,
        after: Option<&str>,
        before_ms: i64,
        limit: usize,
    ) -> StateResult<(u64, Option<String>)> {
        let (page, more) = self.scan_prefix(&keys::idempotency(""), after, None, limit).await?;
        let mut deleted = 0;
        for (_, kv) in &page {
            // A record that does not decode is left alone: it may be a newer version's.
            let expired = serde_json::from_slice::<crate::inbox::IdempotencyRecord>(&kv.value)
                .is_ok_and(|r| r.created_ms < before_ms);
            if !expired {
                continue;
            }
            let txn = Txn::new()
                .when([
                    fence.guard(),
                    Compare::mod_revision(kv.key.clone(), CompareOp::Equal, kv.mod_revision),
                ])
                .and_then([Op::delete(kv.key.clone())]);
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            match self.store.txn(txn).await {
                Ok(result) if result.succeeded => deleted += 1,
                Ok(_) => {}
                Err(source) => return Err(StateError::Write { key, source }),
            }
        }
        let next = page.last().filter(|_| more).map(|(key, _)| key.clone());
        Ok((deleted, next))
    }

    async fn claim(&self, _fence: &Fence) -> Result<bool, StoreError> {
        // The owner key itself is the record: its create revision is the epoch.
        Ok(true)
    }

    async fn commit(
        &self,
        fence: &Fence,
        writes: Vec<Write>,
        witness: Option<&Key>,
    ) -> Result<Committed, StoreError> {
        let result = self.store.txn(fenced(fence, writes, witness)).await?;
        if result.succeeded {
            return Ok(Committed::Applied(result.revision));
        }
        let still_ours = matches!(result.results.first(),
            Some(OpResult::Get(Some(kv))) if kv.create_revision == fence.epoch);
        Ok(Committed::Refused { still_ours, revision: result.revision })
    }

    async fn timers(
        &self,
        _partition: PartitionId,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> Result<TimerPage, StoreError> {
        let page = self.store.range_since(start, end, limit, at_least).await?;
        Ok(TimerPage {
            timers: page.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            more: page.more,
            revision: page.revision,
        })
    }

    async fn inbox(&self, partition: PartitionId) -> StateResult<Box<dyn InboxFeed>> {
        Ok(Box::new(KvInbox {
            store: self.store.clone(),
            partition,
            prefix: keys::inbox_prefix(partition),
            watch: None,
            loaded: HashSet::new(),
        }))
    }

    async fn watch_deliveries(&self) -> StateResult<DeliveryStream> {
        let stream = self
            .store
            .watch(b"p/", 0)
            .await
            .map_err(|source| StateError::Read { key: "p/".into(), source })?;
        let deliveries = stream.flat_map(|batch| {
            let items: Vec<StateResult<Delivery>> = match batch {
                Err(source) => vec![Err(StateError::Read { key: "p/".into(), source })],
                Ok(batch) => batch
                    .events
                    .into_iter()
                    .filter(|event| {
                        event.kind == EventKind::Put
                            && event.kv.key.windows(12).any(|w| w == b"/deliveries/")
                    })
                    // A watcher only follows along: one record it cannot show is logged and
                    // passed over rather than ending every watch.
                    .filter_map(|event| match serde_json::from_slice(&event.kv.value) {
                        Ok(delivery) => Some(Ok(delivery)),
                        Err(error) => {
                            let key = String::from_utf8_lossy(&event.kv.key);
                            tracing::warn!(%key, %error, "delivery does not decode; not shown");
                            None
                        }
                    })
                    .collect(),
            };
            futures::stream::iter(items)
        });
        Ok(Box::pin(deliveries))
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        from: (PartitionId, Option<String>),
        partitions: u32,
        size: usize,
        scan_limit: usize,
    ) -> StateResult<DeliveryPage> {
        let mut found = Vec::new();
        let mut examined = 0;
        let (mut partition, mut after) = from;
        while partition < partitions {
            let prefix = keys::deliveries_prefix(partition);
            let (page, more) = self.scan_prefix(&prefix, after.as_deref(), None, 500).await?;
            for (id, kv) in &page {
                examined += 1;
                let delivery: Delivery =
                    super::decode(&String::from_utf8_lossy(&kv.key), &kv.value)?;
                if filter.matches(&delivery) {
                    found.push(delivery);
                }
                if found.len() == size || examined >= scan_limit {
                    return Ok(DeliveryPage {
                        deliveries: found,
                        next: Some((partition, id.clone())),
                    });
                }
            }
            match page.last().filter(|_| more) {
                Some((last, _)) => after = Some(last.clone()),
                None => {
                    partition += 1;
                    after = None;
                }
            }
        }
        Ok(DeliveryPage { deliveries: found, next: None })
    }

    async fn follow_contacts(&self, partition: PartitionId) -> StateResult<Option<ContactFeed>> {
        let prefix = keys::contacts_prefix(partition);
        let read = |source| StateError::Read { key: prefix.clone(), source };
        let revision = self.store.revision().await.map_err(read)?;
        // Watched from the load's revision on: nothing written after the load is missed.
        let stream = self.store.watch(prefix.as_bytes(), revision + 1).await.map_err(read)?;
        let mut contacts = std::collections::BTreeMap::new();
        let end = crate::store::prefix_end(prefix.as_bytes());
        let mut start = prefix.clone().into_bytes();
        loop {
            let page = self.store.range(&start, &end, 10_000).await.map_err(read)?;
            for kv in &page.kvs {
                let id = String::from_utf8_lossy(&kv.key[prefix.len()..]).into();
                contacts.insert(id, kv.value.clone().into_boxed_slice());
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        let changes = stream.map(move |batch| {
            let batch = batch.map_err(|source| StateError::Read { key: prefix.clone(), source })?;
            Ok(batch
                .events
                .into_iter()
                .map(|event| {
                    let id: Box<str> =
                        String::from_utf8_lossy(&event.kv.key[prefix.len()..]).into();
                    match event.kind {
                        EventKind::Put => ContactChange::Put(id, event.kv.value.into_boxed_slice()),
                        EventKind::Delete => ContactChange::Delete(id),
                    }
                })
                .collect())
        });
        Ok(Some(ContactFeed { contacts, changes: Box::pin(changes) }))
    }
}

/// The inbox of one partition, read and then followed with a watch. Entries put between the
/// read and the watch's start appear in both; `loaded` remembers them so the watch's copy is
/// skipped.
struct KvInbox {
    store: Arc<dyn Store>,
    partition: PartitionId,
    prefix: String,
    watch: Option<WatchStream>,
    loaded: HashSet<Vec<u8>>,
}

impl KvInbox {
    async fn load(&mut self) -> StateResult<InboxBatch> {
        let read = |source| StateError::Read { key: self.prefix.clone(), source };
        let start = self.store.revision().await.map_err(read)?;
        let stream = self.store.watch(self.prefix.as_bytes(), start + 1).await.map_err(read)?;
        let page = self.store.range_prefix(self.prefix.as_bytes(), 0).await.map_err(read)?;
        let mut kvs = page.kvs;
        kvs.sort_by_key(|kv| kv.mod_revision);
        self.loaded =
            kvs.iter().filter(|kv| kv.mod_revision > start).map(|kv| kv.key.clone()).collect();
        let mut entries = Vec::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(key) = Key::inbox_at(self.partition, &kv.key) {
                entries.push((key, kv.value));
            }
        }
        self.watch = Some(stream);
        Ok(InboxBatch { entries, reset: true, revision: page.revision })
    }
}

#[async_trait]
impl InboxFeed for KvInbox {
    async fn next(&mut self) -> StateResult<InboxBatch> {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let Some(mut stream) = self.watch.take() else {
                match self.load().await {
                    Ok(batch) => return Ok(batch),
                    Err(error) => {
                        tracing::debug!(partition = self.partition, %error, "cannot read the inbox; retrying");
                        backoff.wait().await;
                        continue;
                    }
                }
            };
            // Take every batch already received too, so a backlog is handled in full
            // transactions rather than one watch message at a time.
            let mut next = Some(stream.next().await);
            let mut out = InboxBatch::default();
            let mut open = true;
            while let Some(batch) = next.take() {
                match batch {
                    Some(Ok(batch)) => {
                        for event in batch.events {
                            out.revision = out.revision.max(event.kv.mod_revision);
                            if event.kind != EventKind::Put || self.loaded.remove(&event.kv.key) {
                                continue;
                            }
                            if let Some(key) = Key::inbox_at(self.partition, &event.kv.key) {
                                out.entries.push((key, event.kv.value));
                            }
                        }
                        self.loaded.clear();
                        next = futures::FutureExt::now_or_never(stream.next());
                    }
                    Some(Err(error)) => {
                        tracing::debug!(partition = self.partition, %error, "inbox watch ended; reloading");
                        open = false;
                    }
                    None => open = false,
                }
            }
            if open {
                self.watch = Some(stream);
            } else if out.entries.is_empty() {
                continue;
            }
            return Ok(out);
        }
    }
}
