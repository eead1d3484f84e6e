//! The key-value store every part of Tidings keeps its state in, with etcd's semantics.
//!
//! - [`Store`]: the contract. Keys are byte strings ordered bytewise; every change gets a new
//!   store-wide revision; each key carries the revision that created it (`create_revision`) and
//!   the one that last changed it (`mod_revision`); a [`Txn`] applies its operations only when
//!   all its comparisons hold, atomically, at one revision; a watch delivers every change under
//!   a prefix from a revision on, in revision order, with no gap, or fails with
//!   [`StoreError::Compacted`] when that history is gone; keys written under a lease are deleted
//!   when the lease ends.
//! - [`EtcdStore`]: the contract on etcd, for clusters.
//! - [`FlakyStore`]: a wrapper whose reads fail on demand, for fault-injection tests.
//! - [`EmbeddedStore`]: the same contract on a local redb file, for a single node. Its leases
//!   never expire while the process runs; keys attached to leases are gone after a restart, as
//!   they would be once an etcd lease expired.

mod embedded;
mod etcd;
mod flaky;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use flaky::FlakyStore;

/// A store-wide revision number. Revisions start at 1 and only grow.
pub type Revision = i64;

/// A lease identifier; 0 means "no lease".
pub type LeaseId = i64;

/// The largest number of operations a transaction may carry (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The largest request, in bytes, a transaction may carry (etcd's default request size limit).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Failures of store operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The history a watch asked for is gone; the watcher must reload and watch from now.
    #[error("revision compacted: history before revision {compact_revision} is gone")]
    Compacted {
        /// The oldest revision still available.
        compact_revision: Revision,
    },
    /// The lease does not exist (any more).
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// The store ran out of something (disk, quota, memory, connections): not the caller's
    /// fault, and the same operation may succeed once an operator has made room.
    #[error("store exhausted: {0}")]
    Exhausted(String),
    /// The request breaks a limit of the store (too many operations, too large).
    #[error("invalid store request: {0}")]
    InvalidRequest(String),
    /// The store failed in a way retrying will not fix.
    #[error("store failure: {0}")]
    Internal(String),
}

impl StoreError {
    /// Returns whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Exhausted(_))
    }

    /// Returns what a caller may do about it.
    pub fn failure(&self) -> Failure {
        match self {
            StoreError::Unavailable(_) => Failure::Unavailable,
            StoreError::Exhausted(_) => Failure::Exhausted,
            StoreError::InvalidRequest(_) => Failure::Invalid,
            _ => Failure::Internal,
        }
    }
}

/// What a caller may do about a store's failure, for those that report it onwards (the API
/// maps it to a status code) without knowing the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The store did not answer: the same call may succeed soon.
    Unavailable,
    /// The store ran out of something: the same call may succeed later.
    Exhausted,
    /// The request breaks a limit of the store.
    Invalid,
    /// Anything else: trying again will not help.
    Internal,
}

/// The result type of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A stored key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, without the store's prefix.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after the first).
    pub version: i64,
    /// Lease the key is attached to; 0 when none.
    pub lease: LeaseId,
}

/// How a comparison relates the stored value to the expected one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    /// Stored equals expected.
    Equal,
    /// Stored differs from expected.
    NotEqual,
    /// Stored is less than expected.
    Less,
    /// Stored is greater than expected.
    Greater,
}

/// What a comparison looks at. A missing key has revisions and version 0 and no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The value bytes.
    Value(Vec<u8>),
    /// The create revision (0 when absent).
    CreateRevision(Revision),
    /// The mod revision (0 when absent).
    ModRevision(Revision),
    /// The version (0 when absent).
    Version(i64),
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// How.
    pub op: CompareOp,
    /// Against what.
    pub target: CompareTarget,
}

impl Compare {
    /// Returns a condition that holds when `key` does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CompareOp::Equal, 0)
    }

    /// Returns a condition that holds when `key` exists.
    pub fn present(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CompareOp::Greater, 0)
    }

    /// Returns a condition on the create revision of `key`.
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Self { key: key.into(), op, target: CompareTarget::CreateRevision(revision) }
    }

    /// Returns a condition on the mod revision of `key`.
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Self { key: key.into(), op, target: CompareTarget::ModRevision(revision) }
    }

    /// Returns a condition on the version of `key`.
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self { key: key.into(), op, target: CompareTarget::Version(version) }
    }

    /// Returns a condition on the value of `key`. A missing key fails every value comparison.
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into(), op, target: CompareTarget::Value(value.into()) }
    }

    /// Returns whether the condition holds for the stored key (`None` when absent).
    pub(crate) fn holds(&self, stored: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ordering = match (&self.target, stored) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(expected), Some(kv)) => kv.value.as_slice().cmp(expected),
            (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
        };
        match self.op {
            CompareOp::Equal => ordering == Ordering::Equal,
            CompareOp::NotEqual => ordering != Ordering::Equal,
            CompareOp::Less => ordering == Ordering::Less,
            CompareOp::Greater => ordering == Ordering::Greater,
        }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writes `value` at `key`, attached to `lease` (0 for none).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease; 0 for none.
        lease: LeaseId,
    },
    /// Deletes `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Deletes every key starting with `prefix`.
    DeletePrefix {
        /// The prefix.
        prefix: Vec<u8>,
    },
    /// Reads `key` as of the transaction's revision, before its writes.
    Get {
        /// The key.
        key: Vec<u8>,
    },
}

impl Op {
    /// Returns a put without a lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease: 0 }
    }

    /// Returns a put attached to `lease`.
    pub fn put_with_lease(
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease }
    }

    /// Returns a delete of one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// Returns a delete of every key under `prefix`.
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Op::DeletePrefix { prefix: prefix.into() }
    }

    /// Returns a read of one key.
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get { key: key.into() }
    }

    /// The single key this operation writes, if it writes one.
    pub fn written_key(&self) -> Option<&Vec<u8>> {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => Some(key),
            Op::Get { .. } | Op::DeletePrefix { .. } => None,
        }
    }

    fn size(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => key.len() + value.len(),
            Op::Delete { key } | Op::Get { key } => key.len(),
            Op::DeletePrefix { prefix } => prefix.len(),
        }
    }
}

/// A conditional, atomic group of operations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions that must all hold for `then` to apply.
    pub when: Vec<Compare>,
    /// Operations applied when every condition holds.
    pub then: Vec<Op>,
    /// Operations applied otherwise.
    pub otherwise: Vec<Op>,
}

impl Txn {
    /// Returns an empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds conditions.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.when.extend(compares);
        self
    }

    /// Adds operations applied on success.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.then.extend(ops);
        self
    }

    /// Adds operations applied on failure.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.otherwise.extend(ops);
        self
    }

    /// Checks the transaction against the store limits shared by both backends.
    pub(crate) fn check_limits(&self) -> StoreResult<()> {
        let ops = self.then.len().max(self.otherwise.len()).max(self.when.len());
        if ops > MAX_TXN_OPS {
            return Err(StoreError::InvalidRequest(format!(
                "transaction has {ops} operations; the limit is {MAX_TXN_OPS}"
            )));
        }
        for branch in [&self.then, &self.otherwise] {
            let mut written = std::collections::HashSet::new();
            for op in branch.iter() {
                if let Some(key) = op.written_key()
                    && !written.insert(key.as_slice())
                {
                    return Err(StoreError::InvalidRequest(format!(
                        "transaction writes {} more than once",
                        String::from_utf8_lossy(key)
                    )));
                }
            }
        }
        let size: usize = self.then.iter().chain(&self.otherwise).map(Op::size).sum::<usize>()
            + self.when.iter().map(|c| c.key.len()).sum::<usize>();
        if size > MAX_REQUEST_BYTES {
            return Err(StoreError::InvalidRequest(format!(
                "transaction carries {size} bytes; the limit is {MAX_REQUEST_BYTES}"
            )));
        }
        Ok(())
    }
}

/// The outcome of one operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put was applied.
    Put,
    /// A delete removed this many keys.
    Delete(u64),
    /// A get found this key, or nothing.
    Get(Option<KeyValue>),
}

/// The outcome of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every condition held (so `then` was applied rather than `otherwise`).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
    /// One result per applied operation, in order.
    pub results: Vec<OpResult>,
}

/// A page of keys read by [`Store::range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePage {
    /// Keys in order.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys lie in the range after the last one returned.
    pub more: bool,
    /// The store revision the page was read at.
    pub revision: Revision,
}

/// Whether a watched key was written or deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created or changed.
    Put,
    /// Deleted (explicitly or by its lease ending).
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, the key with an empty value and the delete's
    /// revision as `mod_revision`.
    pub kv: KeyValue,
}

/// The changes of one revision (or of several consecutive ones), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The highest revision covered by this batch.
    pub revision: Revision,
    /// The changes.
    pub events: Vec<WatchEvent>,
}

/// A stream of changes under a prefix. It ends only with an error or when the store shuts down.
pub type WatchStream = Pin<Box<dyn Stream<Item = StoreResult<WatchBatch>> + Send>>;

/// Returns the first key after every key that starts with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): the range runs to the end of the keyspace.
    vec![0]
}

/// The contract both backends implement; see the module documentation.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Returns the key, or `None` when absent.
    async fn get(&self, key: &[u8]) -> StoreResult<Option<KeyValue>>;

    /// Returns up to `limit` keys in `[start, end)`, in order (`limit` 0 means no limit).
    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<RangePage>;

    /// Returns how many keys lie in `[start, end)`.
    async fn count(&self, start: &[u8], end: &[u8]) -> StoreResult<u64>;

    /// Applies a transaction atomically.
    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult>;

    /// Streams every change to keys starting with `prefix`, from `start_revision` on
    /// (0 means from the next revision).
    async fn watch(&self, prefix: &[u8], start_revision: Revision) -> StoreResult<WatchStream>;

    /// Creates a lease that ends `ttl` after its last renewal.
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId>;

    /// Renews a lease; returns the time left on it.
    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration>;

    /// Returns the time left on a lease, or `None` when it has ended.
    async fn lease_time_left(&self, lease: LeaseId) -> StoreResult<Option<Duration>>;

    /// Ends a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()>;

    /// Returns the current revision.
    async fn revision(&self) -> StoreResult<Revision>;

    /// Writes one key unconditionally; returns the revision of the write.
    async fn put(&self, key: &[u8], value: &[u8]) -> StoreResult<Revision> {
        Ok(self.txn(Txn::new().and_then([Op::put(key, value)])).await?.revision)
    }

    /// Deletes one key unconditionally; returns whether it existed.
    async fn delete(&self, key: &[u8]) -> StoreResult<bool> {
        let result = self.txn(Txn::new().and_then([Op::delete(key)])).await?;
        Ok(matches!(result.results.first(), Some(OpResult::Delete(n)) if *n > 0))
    }

    /// Returns the keys' values in order (`None` for an absent key), in as few round trips
    /// as the store allows: one transaction of reads per [`MAX_TXN_OPS`] keys.
    async fn get_many(&self, keys: &[Vec<u8>]) -> StoreResult<Vec<Option<KeyValue>>> {
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let result = self.txn(Txn::new().and_then(chunk.iter().cloned().map(Op::get))).await?;
            for op in result.results {
                match op {
                    OpResult::Get(kv) => found.push(kv),
                    other => {
                        return Err(StoreError::InvalidRequest(format!(
                            "a read returned {other:?}"
                        )));
                    }
                }
            }
        }
        Ok(found)
    }

    /// Like [`Store::get_many`], but the answer may come from a replica's state as long as
    /// that state includes revision `at_least` (see [`Store::range_since`]).
    async fn get_many_since(
        &self,
        keys: &[Vec<u8>],
        at_least: Revision,
    ) -> StoreResult<Vec<Option<KeyValue>>> {
        let _ = at_least;
        self.get_many(keys).await
    }

    /// Like [`Store::range`], but the answer may come from a replica's state as long as that
    /// state includes revision `at_least`: on etcd such a read needs no round of consensus.
    /// The embedded store is always current.
    async fn range_since(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> StoreResult<RangePage> {
        let _ = at_least;
        self.range(start, end, limit).await
    }

    /// Returns how many keys start with `prefix`.
    async fn count_prefix(&self, prefix: &[u8]) -> StoreResult<u64> {
        self.count(prefix, &prefix_end(prefix)).await
    }

    /// Returns up to `limit` keys starting with `prefix` (0 means no limit).
    async fn range_prefix(&self, prefix: &[u8], limit: usize) -> StoreResult<RangePage> {
        self.range(prefix, &prefix_end(prefix), limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_grow() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    }

    #[test]
    fn compare_on_an_absent_key_sees_zero_revisions_and_no_value() {
        assert!(Compare::absent("k").holds(None));
        assert!(!Compare::present("k").holds(None));
        assert!(!Compare::value("k", CompareOp::NotEqual, "x").holds(None));
    }
}
