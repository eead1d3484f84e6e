//! [`Store`] on a local redb file, for a node that runs alone.
//!
//! One writer thread applies transactions. It takes every request waiting in its queue, applies
//! them in order in a single redb write transaction (each at its own revision, each seeing the
//! writes of those before it) and commits once, so concurrent writers share one fsync (group
//! commit). A request is answered only after the commit, so a returned write is durable.
//!
//! Watches are served from an in-memory history of recent revisions. The history starts empty
//! when the file is opened: a watch from before the opening revision fails with
//! [`StoreError::Compacted`], exactly as an etcd watch from a compacted revision does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    EventKind, KeyValue, LeaseId, Op, OpResult, RangePage, Revision, Store, StoreError,
    StoreResult, Txn, TxnResult, WatchBatch, WatchEvent, WatchStream,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// Bytes before the value in a stored record: create, mod, version, lease as little-endian i64.
const HEADER: usize = 32;

/// Most events kept in memory for watches that start in the past.
const HISTORY_EVENTS: usize = 1 << 16;

/// Bytes of redb page cache.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Most requests the writer applies in one redb transaction.
const MAX_GROUP: usize = 512;

fn storage_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("embedded store: {error}"))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

/// A record's revisions and lease, without its value.
struct Header {
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: LeaseId,
}

fn header(record: &[u8]) -> StoreResult<Header> {
    if record.len() < HEADER {
        return Err(storage_error("corrupt record: shorter than its header"));
    }
    let field = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&record[i * 8..i * 8 + 8]);
        i64::from_le_bytes(bytes)
    };
    Ok(Header {
        create_revision: field(0),
        mod_revision: field(1),
        version: field(2),
        lease: field(3),
    })
}

fn decode(key: &[u8], record: &[u8]) -> StoreResult<KeyValue> {
    let header = header(record)?;
    Ok(KeyValue {
        key: key.to_vec(),
        create_revision: header.create_revision,
        mod_revision: header.mod_revision,
        version: header.version,
        lease: header.lease,
        value: record[HEADER..].to_vec(),
    })
}

/// A range end of `[0]` means "to the end of the keyspace" (see [`super::prefix_end`]).
fn unbounded(end: &[u8]) -> bool {
    end == [0]
}

struct Watcher {
    prefix: Vec<u8>,
    sender: mpsc::UnboundedSender<StoreResult<WatchBatch>>,
}

/// What the writer publishes and watches read, under one lock so that a new watch sees either
/// a revision in the history or live, never neither.
struct WatchState {
    /// The last committed revision.
    revision: Revision,
    /// The oldest revision a watch may start from.
    oldest: Revision,
    history: VecDeque<(Revision, Vec<WatchEvent>)>,
    history_events: usize,
    watchers: Vec<Watcher>,
}

impl WatchState {
    fn publish(&mut self, revision: Revision, events: Vec<WatchEvent>) {
        self.revision = revision;
        if events.is_empty() {
            return;
        }
        self.watchers.retain(|watcher| {
            let matching: Vec<WatchEvent> =
                events.iter().filter(|e| e.kv.key.starts_with(&watcher.prefix)).cloned().collect();
            matching.is_empty()
                || watcher.sender.send(Ok(WatchBatch { revision, events: matching })).is_ok()
        });
        self.history_events += events.len();
        self.history.push_back((revision, events));
        while self.history_events > HISTORY_EVENTS {
            let Some((_, dropped)) = self.history.pop_front() else {
                break;
            };
            self.history_events -= dropped.len();
            self.oldest = self.history.front().map_or(self.revision + 1, |(r, _)| *r);
        }
    }
}

/// Live leases: their TTL and the keys attached to them. Only the writer changes the key sets.
#[derive(Default)]
struct Leases {
    ttl: HashMap<LeaseId, Duration>,
    keys: HashMap<LeaseId, HashSet<Vec<u8>>>,
}

enum Request {
    Txn(Txn, oneshot::Sender<StoreResult<TxnResult>>),
    Revoke(LeaseId, oneshot::Sender<StoreResult<()>>),
}

struct Shared {
    db: Database,
    watch: Mutex<WatchState>,
    leases: Mutex<Leases>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind, still consistent enough to
    // read; poisoning is not a reason to take the node down.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Inner {
    shared: Arc<Shared>,
    requests: Option<mpsc::UnboundedSender<Request>>,
    writer: Option<JoinHandle<()>>,
    next_lease: AtomicI64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer after the requests already queued; joining it
        // releases the database file before the store counts as closed.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// [`Store`] on a redb file; see the module documentation.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`. Keys attached to leases of a previous
    /// process are deleted, since those leases ended with it.
    pub fn open(path: &Path) -> StoreResult<Self> {
        // redb caches up to 1 GiB by default; a node's working set is far smaller, and memory
        // is better left to the partitions' in-memory state.
        let db =
            redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "{} is in use by another process",
                    path.display()
                )),
                other => StoreError::Internal(format!("opening {}: {other}", path.display())),
            })?;
        let revision = Self::recover(&db)?;
        let shared = Arc::new(Shared {
            db,
            watch: Mutex::new(WatchState {
                revision,
                oldest: revision + 1,
                history: VecDeque::new(),
                history_events: 0,
                watchers: Vec::new(),
            }),
            leases: Mutex::new(Leases::default()),
        });
        let (sender, receiver) = mpsc::unbounded_channel();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("tidings-store-writer".into())
            .spawn(move || writer_loop(&writer_shared, receiver))
            .map_err(storage_error)?;
        // Lease ids start from the clock so that ids of a previous process are never reused.
        let first_lease = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as i64);
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                requests: Some(sender),
                writer: Some(writer),
                next_lease: AtomicI64::new(first_lease),
            }),
        })
    }

    /// Creates the tables, deletes keys of dead leases, and returns the current revision.
    fn recover(db: &Database) -> StoreResult<Revision> {
        let tx = db.begin_write().map_err(storage_error)?;
        let revision = {
            let mut meta = tx.open_table(META).map_err(storage_error)?;
            let mut kv = tx.open_table(KV).map_err(storage_error)?;
            let mut revision = meta.get(REVISION).map_err(storage_error)?.map_or(0, |v| v.value());
            let mut leased = Vec::new();
            for entry in kv.iter().map_err(storage_error)? {
                let (key, record) = entry.map_err(storage_error)?;
                if decode(key.value(), record.value())?.lease != 0 {
                    leased.push(key.value().to_vec());
                }
            }
            if !leased.is_empty() {
                revision += 1;
                for key in &leased {
                    kv.remove(key.as_slice()).map_err(storage_error)?;
                }
            }
            meta.insert(REVISION, revision).map_err(storage_error)?;
            revision
        };
        tx.commit().map_err(storage_error)?;
        Ok(revision)
    }

    fn send(&self, request: Request) -> StoreResult<()> {
        self.inner
            .requests
            .as_ref()
            .and_then(|sender| sender.send(request).ok())
            .ok_or_else(|| StoreError::Unavailable("embedded store is closed".into()))
    }
}

/// Applies queued requests in groups until the queue closes.
fn writer_loop(shared: &Shared, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = requests.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        apply_group(shared, &mut group);
    }
}

/// The effects of one request, held back until the group commits.
enum Outcome {
    Txn(TxnResult),
    Revoke,
    /// Refused before it wrote anything; the rest of the group goes on.
    Refused(StoreError),
}

struct Applied {
    revision: Revision,
    events: Vec<WatchEvent>,
    /// Lease index changes: (lease, key, attached).
    lease_changes: Vec<(LeaseId, Vec<u8>, bool)>,
    revoked: Option<LeaseId>,
}

fn apply_group(shared: &Shared, group: &mut Vec<Request>) {
    let result = (|| -> StoreResult<Vec<(Outcome, Applied)>> {
        let tx = shared.db.begin_write().map_err(storage_error)?;
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut kv = tx.open_table(KV).map_err(storage_error)?;
            let mut meta = tx.open_table(META).map_err(storage_error)?;
            let mut revision = meta.get(REVISION).map_err(storage_error)?.map_or(0, |v| v.value());
            let live_leases: HashSet<LeaseId> = lock(&shared.leases).ttl.keys().copied().collect();
            let mut lease_keys: HashMap<LeaseId, Vec<Vec<u8>>> = HashMap::new();
            for request in group.iter() {
                let outcome = match request {
                    Request::Txn(txn, _) => match apply_txn(&mut kv, revision, txn, &live_leases) {
                        Ok((result, applied)) => (Outcome::Txn(result), applied),
                        Err(error @ StoreError::LeaseNotFound(_)) => (
                            Outcome::Refused(error),
                            Applied {
                                revision,
                                events: Vec::new(),
                                lease_changes: Vec::new(),
                                revoked: None,
                            },
                        ),
                        Err(error) => return Err(error),
                    },
                    Request::Revoke(lease, _) => {
                        let keys = lease_keys.entry(*lease).or_insert_with(|| {
                            lock(&shared.leases)
                                .keys
                                .get(lease)
                                .map(|keys| keys.iter().cloned().collect())
                                .unwrap_or_default()
                        });
                        let mut applied = Applied {
                            revision: revision + 1,
                            events: Vec::new(),
                            lease_changes: Vec::new(),
                            revoked: Some(*lease),
                        };
                        for key in keys.drain(..) {
                            // A key re-attached to another lease earlier in this group stays.
                            if read(&kv, &key)?.is_some_and(|old| old.lease == *lease) {
                                kv.remove(key.as_slice()).map_err(storage_error)?;
                                applied.events.push(delete_event(key, applied.revision));
                            }
                        }
                        if applied.events.is_empty() {
                            applied.revision = revision;
                        }
                        (Outcome::Revoke, applied)
                    }
                };
                revision = outcome.1.revision;
                outcomes.push(outcome);
            }
            meta.insert(REVISION, revision).map_err(storage_error)?;
        }
        tx.commit().map_err(storage_error)?;
        Ok(outcomes)
    })();

    match result {
        Ok(outcomes) => {
            {
                let mut leases = lock(&shared.leases);
                for (_, applied) in &outcomes {
                    for (lease, key, attached) in &applied.lease_changes {
                        let keys = leases.keys.entry(*lease).or_default();
                        if *attached {
                            keys.insert(key.clone());
                        } else {
                            keys.remove(key);
                        }
                    }
                    if let Some(lease) = applied.revoked {
                        leases.keys.remove(&lease);
                        leases.ttl.remove(&lease);
                    }
                }
            }
            let mut watch = lock(&shared.watch);
            for (request, (outcome, applied)) in group.drain(..).zip(outcomes) {
                watch.publish(applied.revision, applied.events);
                match (request, outcome) {
                    (Request::Txn(_, reply), Outcome::Txn(result)) => {
                        let _ = reply.send(Ok(result));
                    }
                    (Request::Txn(_, reply), Outcome::Refused(error)) => {
                        let _ = reply.send(Err(error));
                    }
                    (Request::Revoke(_, reply), _) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Request::Txn(_, reply), Outcome::Revoke) => {
                        let _ = reply.send(Err(storage_error("mismatched outcome")));
                    }
                }
            }
        }
        Err(error) => {
            let message = error.to_string();
            for request in group.drain(..) {
                let error = StoreError::Internal(message.clone());
                match request {
                    Request::Txn(_, reply) => {
                        let _ = reply.send(Err(error));
                    }
                    Request::Revoke(_, reply) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
        }
    }
}

fn delete_event(key: Vec<u8>, revision: Revision) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: 0,
        },
    }
}

type KvTable<'a> = redb::Table<'a, &'static [u8], &'static [u8]>;

fn read(kv: &KvTable<'_>, key: &[u8]) -> StoreResult<Option<KeyValue>> {
    kv.get(key).map_err(storage_error)?.map(|record| decode(key, record.value())).transpose()
}

fn apply_txn(
    kv: &mut KvTable<'_>,
    revision: Revision,
    txn: &Txn,
    live_leases: &HashSet<LeaseId>,
) -> StoreResult<(TxnResult, Applied)> {
    let mut succeeded = true;
    for compare in &txn.when {
        if !compare.holds(read(kv, &compare.key)?.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &txn.then } else { &txn.otherwise };
    for op in ops {
        if let Op::Put { lease, .. } = op
            && *lease != 0
            && !live_leases.contains(lease)
        {
            return Err(StoreError::LeaseNotFound(*lease));
        }
    }
    let next = revision + 1;
    let mut applied =
        Applied { revision: next, events: Vec::new(), lease_changes: Vec::new(), revoked: None };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Get { key } => results.push(OpResult::Get(read(kv, key)?)),
            Op::Put { key, value, lease } => {
                // Only the old record's header matters here: its value is not copied out.
                let old = match kv.get(key.as_slice()).map_err(storage_error)? {
                    Some(record) => Some(header(record.value())?),
                    None => None,
                };
                let new = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: old.as_ref().map_or(next, |o| o.create_revision),
                    mod_revision: next,
                    version: old.as_ref().map_or(1, |o| o.version + 1),
                    lease: *lease,
                };
                kv.insert(key.as_slice(), encode(&new).as_slice()).map_err(storage_error)?;
                if let Some(old) = &old
                    && old.lease != 0
                    && old.lease != *lease
                {
                    applied.lease_changes.push((old.lease, key.clone(), false));
                }
                if *lease != 0 {
                    applied.lease_changes.push((*lease, key.clone(), true));
                }
                applied.events.push(WatchEvent { kind: EventKind::Put, kv: new });
                results.push(OpResult::Put);
            }
            Op::Delete { key } => {
                let removed = delete_key(kv, key, next, &mut applied)?;
                results.push(OpResult::Delete(u64::from(removed)));
            }
            Op::DeletePrefix { prefix } => {
                let end = super::prefix_end(prefix);
                let mut keys = Vec::new();
                let range = if unbounded(&end) {
                    kv.range::<&[u8]>(prefix.as_slice()..)
                } else {
                    kv.range::<&[u8]>(prefix.as_slice()..end.as_slice())
                }
                .map_err(storage_error)?;
                for entry in range {
                    keys.push(entry.map_err(storage_error)?.0.value().to_vec());
                }
                let mut count = 0;
                for key in keys {
                    count += u64::from(delete_key(kv, &key, next, &mut applied)?);
                }
                results.push(OpResult::Delete(count));
            }
        }
    }
    if applied.events.is_empty() {
        applied.revision = revision;
    }
    Ok((TxnResult { succeeded, revision: applied.revision, results }, applied))
}

fn delete_key(
    kv: &mut KvTable<'_>,
    key: &[u8],
    revision: Revision,
    applied: &mut Applied,
) -> StoreResult<bool> {
    let Some(record) = kv.remove(key).map_err(storage_error)? else {
        return Ok(false);
    };
    let old = header(record.value())?;
    drop(record);
    if old.lease != 0 {
        applied.lease_changes.push((old.lease, key.to_vec(), false));
    }
    applied.events.push(delete_event(key.to_vec(), revision));
    Ok(true)
}

fn read_range(db: &Database, start: &[u8], end: &[u8], limit: usize) -> StoreResult<RangePage> {
    let tx = db.begin_read().map_err(storage_error)?;
    let revision = tx
        .open_table(META)
        .map_err(storage_error)?
        .get(REVISION)
        .map_err(storage_error)?
        .map_or(0, |v| v.value());
    let kv = tx.open_table(KV).map_err(storage_error)?;
    let range = if unbounded(end) {
        kv.range::<&[u8]>(start..)
    } else if start >= end {
        return Ok(RangePage { kvs: Vec::new(), more: false, revision });
    } else {
        kv.range::<&[u8]>(start..end)
    }
    .map_err(storage_error)?;
    let mut kvs = Vec::new();
    let mut more = false;
    for entry in range {
        let (key, record) = entry.map_err(storage_error)?;
        if limit > 0 && kvs.len() == limit {
            more = true;
            break;
        }
        kvs.push(decode(key.value(), record.value())?);
    }
    Ok(RangePage { kvs, more, revision })
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<KeyValue>> {
        let tx = self.inner.shared.db.begin_read().map_err(storage_error)?;
        let kv = tx.open_table(KV).map_err(storage_error)?;
        kv.get(key).map_err(storage_error)?.map(|record| decode(key, record.value())).transpose()
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> StoreResult<Vec<Option<KeyValue>>> {
        let tx = self.inner.shared.db.begin_read().map_err(storage_error)?;
        let kv = tx.open_table(KV).map_err(storage_error)?;
        keys.iter()
            .map(|key| {
                kv.get(key.as_slice())
                    .map_err(storage_error)?
                    .map(|record| decode(key, record.value()))
                    .transpose()
            })
            .collect()
    }

    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<RangePage> {
        let shared = self.inner.shared.clone();
        let (start, end) = (start.to_vec(), end.to_vec());
        // A large range reads many pages from disk: keep it off the async workers.
        tokio::task::spawn_blocking(move || read_range(&shared.db, &start, &end, limit))
            .await
            .map_err(storage_error)?
    }

    async fn count(&self, start: &[u8], end: &[u8]) -> StoreResult<u64> {
        let shared = self.inner.shared.clone();
        let (start, end) = (start.to_vec(), end.to_vec());
        tokio::task::spawn_blocking(move || {
            let tx = shared.db.begin_read().map_err(storage_error)?;
            let kv = tx.open_table(KV).map_err(storage_error)?;
            let range = if unbounded(&end) {
                kv.range::<&[u8]>(start.as_slice()..)
            } else if start >= end {
                return Ok(0);
            } else {
                kv.range::<&[u8]>(start.as_slice()..end.as_slice())
            }
            .map_err(storage_error)?;
            Ok(range.count() as u64)
        })
        .await
        .map_err(storage_error)?
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        txn.check_limits()?;
        let (reply, response) = oneshot::channel();
        self.send(Request::Txn(txn, reply))?;
        response.await.map_err(|_| StoreError::Unavailable("embedded store is closed".into()))?
    }

    async fn watch(&self, prefix: &[u8], start_revision: Revision) -> StoreResult<WatchStream> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut state = lock(&self.inner.shared.watch);
        let start = if start_revision <= 0 { state.revision + 1 } else { start_revision };
        if start < state.oldest {
            return Err(StoreError::Compacted { compact_revision: state.oldest });
        }
        for (revision, events) in state.history.iter().filter(|(r, _)| *r >= start) {
            let matching: Vec<WatchEvent> =
                events.iter().filter(|e| e.kv.key.starts_with(prefix)).cloned().collect();
            if !matching.is_empty() {
                let _ = sender.send(Ok(WatchBatch { revision: *revision, events: matching }));
            }
        }
        state.watchers.push(Watcher { prefix: prefix.to_vec(), sender });
        Ok(Box::pin(UnboundedReceiverStream::new(receiver)))
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let id = self.inner.next_lease.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.shared.leases).ttl.insert(id, ttl);
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        lock(&self.inner.shared.leases)
            .ttl
            .get(&lease)
            .copied()
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    async fn lease_time_left(&self, lease: LeaseId) -> StoreResult<Option<Duration>> {
        Ok(lock(&self.inner.shared.leases).ttl.get(&lease).copied())
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        if !lock(&self.inner.shared.leases).ttl.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let (reply, response) = oneshot::channel();
        self.send(Request::Revoke(lease, reply))?;
        response.await.map_err(|_| StoreError::Unavailable("embedded store is closed".into()))?
    }

    async fn revision(&self) -> StoreResult<Revision> {
        Ok(lock(&self.inner.shared.watch).revision)
    }
}
