//! Groups the partition workers' transactions into fewer, larger store transactions.
//!
//! On etcd every transaction is a raft entry applied by one loop, and a node that owns many
//! partitions sends many small ones: their fixed cost, not their writes, sets the latency.
//! The committer sends the transactions waiting at the moment as one, each keeping its own
//! compares (its partition's epoch guard), within etcd's limit of operations. When the merged
//! transaction's compares do not all hold, its members are sent again one by one, so each
//! gets its own answer and a fenced partition cannot hold back the others. An error is
//! answered to every member: the merged transaction may or may not have applied, which each
//! worker resolves as it does for a transaction of its own.
//!
//! The embedded store already commits every waiting writer together, so there the committer
//! passes transactions straight through.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::{MAX_TXN_OPS, Op, Store, StoreError, StoreResult, Txn, TxnResult};

/// Merged transactions in flight at once. More make each one slower, since etcd applies them
/// one after another: with 4, `deliver` on etcd gained 6 % over 2, but a commit's p90 went from
/// 9 to 12 ms, and with it the lateness of timers that fall due while their partition commits.
const IN_FLIGHT: usize = 2;

type Request = (Txn, oneshot::Sender<StoreResult<TxnResult>>);

/// Sends partition transactions, merged where the store gains from it.
pub struct Committer {
    store: Arc<dyn Store>,
    queue: Option<mpsc::UnboundedSender<Request>>,
}

impl Committer {
    /// Starts a committer on `store` (a task, on etcd; nothing on the embedded store).
    pub fn start(store: Arc<dyn Store>) -> Self {
        if store.groups_commits() {
            return Self { store, queue: None };
        }
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(run(store.clone(), requests));
        Self { store, queue: Some(queue) }
    }

    /// Applies `txn` as [`Store::txn`] would, possibly as part of a larger transaction.
    pub async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        let Some(queue) = &self.queue else { return self.store.txn(txn).await };
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((txn, _))) = queue.send((txn, reply)) {
            return self.store.txn(txn).await;
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::Unavailable("committer stopped".into())))
    }
}

fn written(txn: &Txn) -> impl Iterator<Item = &Vec<u8>> {
    txn.then.iter().chain(&txn.otherwise).filter_map(Op::written_key)
}

async fn run(store: Arc<dyn Store>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Request> = None;
    loop {
        // Waiting for a slot lets more transactions queue up to share the next one.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(request) => request,
            None => match requests.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let size = |txn: &Txn| [txn.when.len(), txn.then.len(), txn.otherwise.len()];
        let mut used = size(&first.0);
        let mut keys: HashSet<Vec<u8>> = written(&first.0).cloned().collect();
        let mut group = vec![first];
        while let Ok(next) = requests.try_recv() {
            let more = size(&next.0);
            let fits = (0..3).all(|i| used[i] + more[i] <= MAX_TXN_OPS)
                && written(&next.0).all(|key| !keys.contains(key));
            if !fits {
                carried = Some(next);
                break;
            }
            (0..3).for_each(|i| used[i] += more[i]);
            keys.extend(written(&next.0).cloned());
            group.push(next);
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit(store.as_ref(), group).await;
            drop(slot);
        });
    }
}

async fn commit(store: &dyn Store, mut group: Vec<Request>) {
    if group.len() == 1 {
        if let Some((txn, reply)) = group.pop() {
            let _ = reply.send(store.txn(txn).await);
        }
        return;
    }
    let mut merged = Txn::new();
    for (txn, _) in &group {
        merged.when.extend(txn.when.iter().cloned());
        merged.then.extend(txn.then.iter().cloned());
        merged.otherwise.extend(txn.otherwise.iter().cloned());
    }
    match store.txn(merged).await {
        Ok(result) if result.succeeded => {
            let mut results = result.results.into_iter();
            for (txn, reply) in group {
                let _ = reply.send(Ok(TxnResult {
                    succeeded: true,
                    revision: result.revision,
                    results: results.by_ref().take(txn.then.len()).collect(),
                }));
            }
        }
        Ok(_) | Err(StoreError::InvalidRequest(_)) => {
            // Some member's compares failed (or together they exceed a limit): each on its own.
            let singles = group.into_iter().map(|(txn, reply)| async move {
                let _ = reply.send(store.txn(txn).await);
            });
            futures::future::join_all(singles).await;
        }
        Err(error) => {
            let message = error.to_string();
            let retryable = error.is_retryable();
            for (_, reply) in group {
                let _ = reply.send(Err(if retryable {
                    StoreError::Unavailable(message.clone())
                } else {
                    StoreError::Internal(message.clone())
                }));
            }
        }
    }
}
