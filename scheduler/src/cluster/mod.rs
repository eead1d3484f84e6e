//! Membership, partition ownership and fencing.
//!
//! - Each node registers `nodes/{id}` under its own lease and renews it. When it cannot show
//!   that the lease is alive (a renewal failed and the lease may have run out), it stops all
//!   partition work at once, then registers again with a new lease.
//! - Every node computes the same [`assign::plan`] from the members and owners it watches.
//! - A node claims partition `p` by creating `owners/{p}` under its lease, only if the key is
//!   absent. The key's create revision is the **epoch** of that ownership.
//! - **Fencing invariant:** every write that changes a partition's state is a transaction that
//!   compares the create revision of `owners/{p}` with the writer's epoch (see
//!   [`partition`]). A node that lost its lease or its partition cannot change anything there.
//! - Handoff: when the plan gives an owned partition to another node, the owner stops its
//!   worker (the batch in progress finishes, within a bound), then deletes `owners/{p}` under
//!   the same epoch guard; the new owner claims it. On a crash, the lease expires, the owner
//!   keys go with it, and the same claim follows.

pub mod assign;
mod partition;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use assign::PartitionId;

/// Returns the owner key of a partition: its create revision is the partition's epoch.
pub(crate) fn owner_key(partition: PartitionId) -> String {
    keys::owner(partition)
}
pub use partition::PartitionStats;

use crate::engine::Engine;
use crate::keys;
use crate::store::{
    Compare, CompareOp, LeaseId, Op, Revision, Store, StoreError, Txn, WatchStream,
};
use partition::{Exit, Worker};

/// How a node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This node's id.
    pub node_id: String,
    /// The address clients reach this node at.
    pub address: String,
    /// Partition count used when this node creates the cluster; an existing cluster keeps its own.
    pub partitions: u32,
    /// Lease time to live: how long a silent node keeps its partitions.
    pub lease_ttl: Duration,
    /// Longest a handoff waits for a partition's work in progress.
    pub handoff_timeout: Duration,
    /// Kept equal to the number of live nodes, for whoever shares a cluster-wide budget.
    pub live_nodes: Arc<std::sync::atomic::AtomicUsize>,
    /// Attempts a partition keeps in flight at most: past that, its worker takes no inbox
    /// entry (events, run shards) until outcomes come back, so that a slow or rate-limited
    /// endpoint holds a bounded number of tasks and requests in memory. One entry (an event
    /// for many campaigns, a page of a run), and timers that fall due (retries, follow-ups,
    /// intervals), may go past it by the attempts they start.
    pub max_in_flight: usize,
}

/// The record under `cluster`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ClusterRecord {
    partitions: u32,
    created_at_ms: i64,
}

/// The record under `nodes/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Address clients reach the node at.
    pub address: String,
    /// Tidings version it runs.
    pub version: String,
    /// When it registered, Unix milliseconds.
    pub started_at_ms: i64,
}

/// A node as seen by this one.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// Its registration.
    pub record: NodeRecord,
    /// Partitions it owns.
    pub partitions: Vec<PartitionId>,
    /// Time left on its lease, when the store can tell.
    pub lease_left: Option<Duration>,
}

/// A partition as seen by this node.
#[derive(Clone, Debug)]
pub struct PartitionStatus {
    /// Partition number.
    pub id: PartitionId,
    /// Owner node, if any.
    pub owner: Option<String>,
    /// Epoch of the ownership; 0 while unowned.
    pub epoch: Revision,
    /// Pending timers.
    pub pending_timers: u64,
    /// Unprocessed inbox entries.
    pub inbox_backlog: u64,
}

#[derive(Clone, Debug)]
struct Owner {
    node: String,
    epoch: Revision,
    lease: LeaseId,
}

#[derive(Default)]
struct View {
    nodes: BTreeMap<String, (NodeRecord, LeaseId)>,
    owners: BTreeMap<PartitionId, Owner>,
    owned: BTreeMap<PartitionId, Arc<PartitionStats>>,
}

struct Shared {
    store: Arc<dyn Store>,
    state: crate::state::State,
    options: ClusterOptions,
    partitions: u32,
    /// The latest view of members and owners, for status calls. Written only by the manager.
    view: Mutex<View>,
}

/// A node's handle on the cluster.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.shared.options.node_id).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cluster {
    /// Joins the cluster (creating it on first start) and runs membership and partition work
    /// until `shutdown` is cancelled; then hands every partition off and leaves. The returned
    /// task ends when the node has left.
    pub async fn start(
        coordination: &crate::coordination::Coordination,
        state: crate::state::State,
        engine: impl FnOnce(u32) -> Arc<dyn Engine>,
        options: ClusterOptions,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let store = coordination.store().clone();
        let partitions = ensure_cluster(store.as_ref(), options.partitions).await?;
        let engine = engine(partitions);

        if partitions != options.partitions {
            info!(
                configured = options.partitions,
                existing = partitions,
                "the cluster keeps its partition count"
            );
        }
        let shared = Arc::new(Shared {
            state,
            store,
            options,
            partitions,
            view: Mutex::new(View::default()),
        });
        let manager = Manager {
            _gauges: observe(&shared),
            shared: shared.clone(),
            engine,
            workers: BTreeMap::new(),
            tasks: JoinSet::new(),
            refused: BTreeMap::new(),
        };
        let task = tokio::spawn(manager.run(shutdown));
        Ok((Self { shared }, task))
    }

    /// Returns the partition count.
    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    /// Returns this node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.options.node_id
    }

    /// Returns the partitions this node currently works on.
    pub fn owned(&self) -> Vec<PartitionId> {
        lock(&self.shared.view).owned.keys().copied().collect()
    }

    /// Returns the fence of this node's ownership of `partition`, while it works on it.
    pub fn fence(&self, partition: PartitionId) -> Option<crate::state::Fence> {
        let view = lock(&self.shared.view);
        if !view.owned.contains_key(&partition) {
            return None;
        }
        let owner = view.owners.get(&partition).filter(|o| o.node == self.node_id())?;
        Some(crate::state::Fence {
            partition,
            epoch: owner.epoch,
            signature: format!("{}/{}", owner.node, owner.epoch).into_bytes(),
        })
    }

    /// Returns the live nodes with the partitions each owns.
    pub async fn nodes(&self) -> Vec<NodeStatus> {
        let (nodes, owners) = {
            let view = lock(&self.shared.view);
            (view.nodes.clone(), view.owners.clone())
        };
        let mut out = Vec::with_capacity(nodes.len());
        for (id, (record, lease)) in nodes {
            let lease_left = self.shared.store.lease_time_left(lease).await.ok().flatten();
            let partitions = owners.iter().filter(|(_, o)| o.node == id).map(|(p, _)| *p).collect();
            out.push(NodeStatus { id, record, partitions, lease_left });
        }
        out
    }

    /// Returns every partition with its owner and backlog. Backlogs of partitions owned
    /// elsewhere are counted from the store.
    pub async fn partition_status(&self) -> Result<Vec<PartitionStatus>, StoreError> {
        let (owners, owned) = {
            let view = lock(&self.shared.view);
            (view.owners.clone(), view.owned.clone())
        };
        let mut out = Vec::with_capacity(self.shared.partitions as usize);
        for p in 0..self.shared.partitions {
            let owner = owners.get(&p);
            let loaded =
                owned.get(&p).filter(|s| s.loaded.load(std::sync::atomic::Ordering::Acquire));
            let (pending_timers, inbox_backlog) = match loaded {
                Some(stats) => (
                    stats.pending_timers.load(std::sync::atomic::Ordering::Relaxed),
                    stats.inbox_backlog.load(std::sync::atomic::Ordering::Relaxed),
                ),
                None => (
                    self.shared.state.pending_timers(p).await?,
                    self.shared.state.inbox_backlog(p).await?,
                ),
            };
            out.push(PartitionStatus {
                id: p,
                owner: owner.map(|o| o.node.clone()),
                epoch: owner.map_or(0, |o| o.epoch),
                pending_timers,
                inbox_backlog,
            });
        }
        Ok(out)
    }
}

/// Creates the cluster record on first start; returns the partition count.
async fn ensure_cluster(store: &dyn Store, partitions: u32) -> Result<u32, StoreError> {
    let record = ClusterRecord { partitions: partitions.max(1), created_at_ms: crate::now_ms() };
    let value = serde_json::to_vec(&record).unwrap_or_default();
    let result = store
        .txn(
            Txn::new()
                .when([Compare::absent(keys::CLUSTER)])
                .and_then([Op::put(keys::CLUSTER, value)])
                .or_else([Op::get(keys::CLUSTER)]),
        )
        .await?;
    if result.succeeded {
        return Ok(record.partitions);
    }
    match result.results.first() {
        Some(crate::store::OpResult::Get(Some(kv))) => {
            serde_json::from_slice::<ClusterRecord>(&kv.value)
                .map(|r| r.partitions)
                .map_err(|e| StoreError::Internal(format!("unreadable cluster record: {e}")))
        }
        _ => Err(StoreError::Internal("the cluster record vanished".into())),
    }
}

struct WorkerSlot {
    epoch: Revision,
    cancel: CancellationToken,
    abort: tokio::task::AbortHandle,
    releasing: Option<Instant>,
}

struct Manager {
    /// The cluster's observable gauges, registered for as long as the manager runs.
    _gauges: Vec<Box<dyn std::any::Any + Send + Sync>>,
    shared: Arc<Shared>,
    engine: Arc<dyn Engine>,
    workers: BTreeMap<PartitionId, WorkerSlot>,
    tasks: JoinSet<(PartitionId, Revision, Exit)>,
    /// Partitions whose writes the store refused, with when: this node leaves them to others
    /// for a lease's time before it claims them again.
    refused: BTreeMap<PartitionId, Instant>,
}

/// One registration: a lease, the node key under it, and renewal.
struct Session {
    lease: LeaseId,
    /// Cancelled the moment the lease can no longer be shown alive.
    alive: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Manager {
    fn me(&self) -> &str {
        &self.shared.options.node_id
    }

    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let session = tokio::select! {
                _ = shutdown.cancelled() => return,
                session = self.register() => session,
            };
            let leave = self.serve(&session, &shutdown).await;
            session.keeper.abort();
            if leave {
                self.leave(&session).await;
                return;
            }
            warn!(node = %self.me(), "lease lost; dropped every partition and registering again");
        }
    }

    async fn register(&self) -> Session {
        let options = &self.shared.options;
        let record = NodeRecord {
            address: options.address.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: crate::now_ms(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let attempt = async {
                let lease = self.shared.store.lease_grant(options.lease_ttl).await?;
                self.shared
                    .store
                    .txn(Txn::new().and_then([Op::put_with_lease(
                        keys::node(&options.node_id),
                        value.clone(),
                        lease,
                    )]))
                    .await?;
                Ok::<_, StoreError>(lease)
            };
            match attempt.await {
                Ok(lease) => {
                    info!(node = %options.node_id, lease, "registered");
                    let alive = CancellationToken::new();
                    let keeper = tokio::spawn(keep_alive(
                        self.shared.store.clone(),
                        lease,
                        options.lease_ttl,
                        alive.clone(),
                    ));
                    return Session { lease, alive, keeper };
                }
                Err(error) => {
                    warn!(%error, "cannot register; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Runs one session; returns true to leave (shutdown), false when the lease was lost.
    async fn serve(&mut self, session: &Session, shutdown: &CancellationToken) -> bool {
        let store = self.shared.store.clone();
        let mut nodes = Watched::new(store.clone(), keys::NODES);
        let mut owners = Watched::new(store.clone(), keys::OWNERS);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = session.alive.cancelled() => {
                    self.drop_all();
                    return false;
                }
                changed = nodes.next() => if changed { self.refresh_view(&nodes, &owners); self.replan(session).await; },
                changed = owners.next() => if changed { self.refresh_view(&nodes, &owners); self.replan(session).await; },
                Some(done) = self.tasks.join_next() => {
                    match done {
                        Ok((partition, epoch, exit)) => {
                            self.worker_exited(partition, epoch, exit).await;
                        }
                        // An aborted handoff (or a worker that panicked) says nothing of its
                        // partition: its slot is the one whose task has finished.
                        Err(_) => self.reap_finished().await,
                    }
                    self.replan(session).await;
                }
                _ = tick.tick() => {
                    self.expire_handoffs();
                    self.replan(session).await;
                }
            }
        }
    }

    fn refresh_view(&self, nodes: &Watched, owners: &Watched) {
        let mut view = lock(&self.shared.view);
        self.shared
            .options
            .live_nodes
            .store(nodes.map.len().max(1), std::sync::atomic::Ordering::Relaxed);
        view.nodes = nodes
            .map
            .iter()
            .filter_map(|(key, (value, lease, _))| {
                let id =
                    String::from_utf8_lossy(key.strip_prefix(keys::NODES.as_bytes())?).into_owned();
                Some((id, (serde_json::from_slice(value).ok()?, *lease)))
            })
            .collect();
        view.owners = owners
            .map
            .iter()
            .filter_map(|(key, (value, lease, create))| {
                let partition = keys::parse_owner(key)?;
                Some((
                    partition,
                    Owner {
                        node: String::from_utf8_lossy(value).into_owned(),
                        epoch: *create,
                        lease: *lease,
                    },
                ))
            })
            .collect();
    }

    async fn replan(&mut self, session: &Session) {
        if session.alive.is_cancelled() {
            return;
        }
        let (live, owners) = {
            let view = lock(&self.shared.view);
            (view.nodes.keys().cloned().collect::<Vec<_>>(), view.owners.clone())
        };
        if !live.iter().any(|n| n == self.me()) {
            return;
        }
        let current: BTreeMap<PartitionId, String> =
            owners.iter().map(|(p, o)| (*p, o.node.clone())).collect();
        let target = assign::plan(self.shared.partitions, &live, &current);
        let pause = self.shared.options.lease_ttl;
        self.refused.retain(|_, since| since.elapsed() < pause);
        for (p, wanted) in target.iter().enumerate() {
            let p = p as PartitionId;
            let mine = wanted.as_deref() == Some(self.me());
            let owner = owners.get(&p);
            match (mine, self.workers.get(&p)) {
                (true, None) if owner.is_none() && !self.refused.contains_key(&p) => {
                    self.claim(p, session).await
                }
                (false, Some(slot)) if slot.releasing.is_none() => {
                    debug!(partition = p, "handing off");
                    slot.cancel.cancel();
                    if let Some(slot) = self.workers.get_mut(&p) {
                        slot.releasing = Some(Instant::now());
                    }
                }
                _ => {}
            }
            // An owner key that is not ours while we run a worker: we were fenced off.
            if let (Some(slot), Some(owner)) = (self.workers.get(&p), owner)
                && (owner.node != self.me()
                    || owner.epoch != slot.epoch
                    || owner.lease != session.lease)
            {
                slot.cancel.cancel();
            }
        }
    }

    async fn claim(&mut self, partition: PartitionId, session: &Session) {
        let key = keys::owner(partition);
        let txn = Txn::new().when([Compare::absent(key.clone())]).and_then([Op::put_with_lease(
            key,
            self.me().as_bytes().to_vec(),
            session.lease,
        )]);
        match self.shared.store.txn(txn).await {
            Ok(result) if result.succeeded => {
                let epoch = result.revision;
                info!(partition, epoch, "partition claimed");
                let stats = Arc::new(PartitionStats::default());
                let cancel = session.alive.child_token();
                let worker = Worker {
                    state: self.shared.state.clone(),
                    engine: self.engine.clone(),
                    partition,
                    epoch,
                    stats: stats.clone(),
                    fence: crate::state::Fence {
                        partition,
                        epoch,
                        signature: format!("{}/{epoch}", self.me()).into_bytes(),
                    },
                    seen: std::sync::atomic::AtomicI64::new(epoch),
                    in_flight: Default::default(),
                    // Inside the handoff bound, so that the worker ends before it is aborted.
                    drain: self.shared.options.handoff_timeout.mul_f64(0.8),
                    attempts: Default::default(),
                    max_in_flight: self.shared.options.max_in_flight.max(1),
                    split: Default::default(),
                };
                let token = cancel.clone();
                let abort =
                    self.tasks.spawn(async move { (partition, epoch, worker.run(token).await) });
                self.workers
                    .insert(partition, WorkerSlot { epoch, cancel, abort, releasing: None });
                lock(&self.shared.view).owned.insert(partition, stats);
                ownership_changes("claimed", 1);
            }
            Ok(_) => debug!(partition, "claim lost: already owned"),
            Err(error) => debug!(partition, %error, "claim failed"),
        }
    }

    async fn worker_exited(&mut self, partition: PartitionId, epoch: Revision, exit: Exit) {
        let Some(slot) = self.workers.get(&partition) else { return };
        if slot.epoch != epoch {
            return;
        }
        self.workers.remove(&partition);
        lock(&self.shared.view).owned.remove(&partition);
        match exit {
            Exit::Fenced => {
                warn!(partition, epoch, "fenced off: another node owns the partition");
                // Deleted only if still this epoch's: when the data store lost the record of
                // this claim (a crash that took back its last commits), the partition is
                // claimed again with a new epoch instead of staying owned by no worker.
                self.release(partition, epoch).await;
                ownership_changes("fenced", 1);
            }
            Exit::Cancelled => {
                self.release(partition, epoch).await;
                ownership_changes("released", 1);
            }
            Exit::Refused { .. } => {
                self.release(partition, epoch).await;
                self.refused.insert(partition, Instant::now());
                ownership_changes("refused", 1);
            }
        }
    }

    /// Releases the partitions whose workers ended without an exit (aborted or panicked), so
    /// that another node can claim them at once.
    async fn reap_finished(&mut self) {
        let finished: Vec<(PartitionId, Revision)> = self
            .workers
            .iter()
            .filter(|(_, slot)| slot.abort.is_finished())
            .map(|(partition, slot)| (*partition, slot.epoch))
            .collect();
        for (partition, epoch) in finished {
            warn!(partition, epoch, "partition worker ended without finishing; releasing it");
            self.workers.remove(&partition);
            lock(&self.shared.view).owned.remove(&partition);
            self.release(partition, epoch).await;
            ownership_changes("released", 1);
        }
    }

    /// Deletes the owner key, only if it is still this epoch's.
    async fn release(&self, partition: PartitionId, epoch: Revision) {
        let key = keys::owner(partition);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, epoch)])
            .and_then([Op::delete(key)]);
        match self.shared.store.txn(txn).await {
            Ok(result) if result.succeeded => info!(partition, epoch, "partition released"),
            Ok(_) => {}
            Err(error) => debug!(partition, %error, "release failed; the lease will expire it"),
        }
    }

    /// Aborts handoffs that did not finish within the bound; their in-flight work is abandoned.
    fn expire_handoffs(&mut self) {
        let bound = self.shared.options.handoff_timeout;
        for (partition, slot) in &self.workers {
            if slot.releasing.is_some_and(|since| since.elapsed() > bound) {
                warn!(partition, "handoff took too long; abandoning work in progress");
                slot.abort.abort();
            }
        }
    }

    /// Stops every worker now, without waiting: the lease may already be gone.
    fn drop_all(&mut self) {
        for slot in self.workers.values() {
            slot.cancel.cancel();
            slot.abort.abort();
        }
        ownership_changes("lost", self.workers.len());
        self.workers.clear();
        self.tasks.detach_all();
        lock(&self.shared.view).owned.clear();
    }

    /// Graceful exit: finish the batches in progress (bounded), then revoke the lease, which
    /// releases every owner key and the node key in one step.
    async fn leave(&mut self, session: &Session) {
        let owned = self.workers.len();
        for slot in self.workers.values() {
            slot.cancel.cancel();
        }
        let bound = self.shared.options.handoff_timeout;
        let drained = tokio::time::timeout(bound, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Ok((partition, _, _)) = done {
                    self.workers.remove(&partition);
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!(?bound, "partitions still busy at shutdown; abandoning their work in progress");
            self.tasks.abort_all();
        }
        ownership_changes("released", owned);
        self.workers.clear();
        lock(&self.shared.view).owned.clear();
        if let Err(error) = self.shared.store.lease_revoke(session.lease).await {
            warn!(%error, "cannot revoke the lease; it will expire");
        }
        info!(node = %self.me(), "left the cluster");
    }
}

/// Registers the gauges read from the cluster view at each collection: partitions owned, cluster
/// members, and each owned partition's inbox backlog (entries and age) and pending timers.
fn observe(shared: &Arc<Shared>) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    use opentelemetry::KeyValue;
    let meter = crate::telemetry::meter();
    fn view(shared: &std::sync::Weak<Shared>) -> Option<Arc<Shared>> {
        shared.upgrade()
    }
    fn stats(shared: &std::sync::Weak<Shared>) -> BTreeMap<PartitionId, Arc<PartitionStats>> {
        view(shared).map(|shared| lock(&shared.view).owned.clone()).unwrap_or_default()
    }
    let weak = Arc::downgrade(shared);
    let owned = meter
        .u64_observable_gauge("tidings.partitions.owned")
        .with_description("Partitions this node works on.")
        .with_callback(move |observer| {
            if let Some(shared) = view(&weak) {
                observer.observe(lock(&shared.view).owned.len() as u64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    let nodes = meter
        .u64_observable_gauge("tidings.cluster.nodes")
        .with_description("Nodes this node sees in the cluster, itself included.")
        .with_callback(move |observer| {
            if let Some(shared) = view(&weak) {
                observer.observe(lock(&shared.view).nodes.len().max(1) as u64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    let backlog = meter
        .u64_observable_gauge("tidings.inbox.backlog")
        .with_description("Inbox entries waiting in each partition this node works on.")
        .with_callback(move |observer| {
            for (partition, stats) in stats(&weak) {
                let entries = stats.inbox_backlog.load(std::sync::atomic::Ordering::Relaxed);
                observer.observe(entries, &[KeyValue::new("partition", i64::from(partition))]);
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    let age = meter
        .f64_observable_gauge("tidings.inbox.backlog.age")
        .with_unit("s")
        .with_description("Age of the oldest inbox entry waiting in each partition.")
        .with_callback(move |observer| {
            let now = crate::now_ms();
            for (partition, stats) in stats(&weak) {
                let oldest = stats.inbox_oldest_ms.load(std::sync::atomic::Ordering::Relaxed);
                let age = if oldest > 0 { (now - oldest).max(0) as f64 / 1000.0 } else { 0.0 };
                observer.observe(age, &[KeyValue::new("partition", i64::from(partition))]);
            }
        })
        .build();
    let weak = Arc::downgrade(shared);
    let timers = meter
        .u64_observable_gauge("tidings.timers.pending")
        .with_description("Timers waiting to fire in each partition this node works on.")
        .with_callback(move |observer| {
            for (partition, stats) in stats(&weak) {
                let pending = stats.pending_timers.load(std::sync::atomic::Ordering::Relaxed);
                observer.observe(pending, &[KeyValue::new("partition", i64::from(partition))]);
            }
        })
        .build();
    vec![Box::new(owned), Box::new(nodes), Box::new(backlog), Box::new(age), Box::new(timers)]
}

/// Counts `count` changes of ownership of this node's partitions.
fn ownership_changes(change: &'static str, count: usize) {
    if count > 0 {
        crate::telemetry::metrics()
            .ownership_changes
            .add(count as u64, &[opentelemetry::KeyValue::new("change", change)]);
    }
}

/// Renews the lease every third of its TTL. Cancels `alive` as soon as the lease can no longer
/// be shown alive: when it is gone, or when renewals failed until the last confirmed expiry is
/// less than a renewal period away.
async fn keep_alive(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    alive: CancellationToken,
) {
    let period = ttl / 3;
    let mut expires = Instant::now() + ttl;
    loop {
        tokio::time::sleep(period).await;
        let sent = Instant::now();
        match tokio::time::timeout(period, store.lease_keep_alive(lease)).await {
            Ok(Ok(left)) => expires = sent + left,
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                warn!(lease, "lease expired");
                alive.cancel();
                return;
            }
            Ok(Err(error)) => debug!(lease, %error, "lease renewal failed"),
            Err(_) => debug!(lease, "lease renewal timed out"),
        }
        if Instant::now() + period >= expires {
            warn!(lease, "cannot renew the lease in time; stopping partition work");
            alive.cancel();
            return;
        }
    }
}

/// A prefix kept in memory from a range read and a watch, reloaded when the watch fails.
struct Watched {
    store: Arc<dyn Store>,
    prefix: &'static str,
    /// Key to (value, lease, create revision).
    map: BTreeMap<Vec<u8>, (Vec<u8>, LeaseId, Revision)>,
    stream: Option<WatchStream>,
}

impl Watched {
    fn new(store: Arc<dyn Store>, prefix: &'static str) -> Self {
        Self { store, prefix, map: BTreeMap::new(), stream: None }
    }

    async fn reload(&mut self) -> Result<(), StoreError> {
        let page = self.store.range_prefix(self.prefix.as_bytes(), 0).await?;
        let stream = self.store.watch(self.prefix.as_bytes(), page.revision + 1).await?;
        self.map = page
            .kvs
            .into_iter()
            .map(|kv| (kv.key, (kv.value, kv.lease, kv.create_revision)))
            .collect();
        self.stream = Some(stream);
        Ok(())
    }

    /// Waits for the next change; returns whether the map changed.
    async fn next(&mut self) -> bool {
        let Some(stream) = &mut self.stream else {
            if let Err(error) = self.reload().await {
                debug!(prefix = self.prefix, %error, "cannot load; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return false;
            }
            return true;
        };
        match stream.next().await {
            Some(Ok(batch)) => {
                for event in batch.events {
                    match event.kind {
                        crate::store::EventKind::Put => {
                            self.map.insert(
                                event.kv.key,
                                (event.kv.value, event.kv.lease, event.kv.create_revision),
                            );
                        }
                        crate::store::EventKind::Delete => {
                            self.map.remove(&event.kv.key);
                        }
                    }
                }
                true
            }
            _ => {
                self.stream = None;
                false
            }
        }
    }
}
