//! Faults injected into a real store, for tests: [`FlakyStore`] passes everything to the store
//! it wraps, except the reads it is told to fail and the partition writes it is told to refuse.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{
    KeyValue, LeaseId, Op, RangePage, Revision, Store, StoreError, StoreResult, Txn, TxnResult,
    WatchStream,
};

/// A store whose reads fail while [`FlakyStore::fail_reads`] is on. Writes, watches and leases
/// keep working, as they do when a store's read path fails (a node's read replica lagging, a
/// decoding bug, a disk error on one page).
pub struct FlakyStore {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
    failed: AtomicU64,
    refusing: AtomicBool,
    /// Partition writes larger than this many bytes are refused.
    refusing_over: AtomicU64,
}

impl std::fmt::Debug for FlakyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlakyStore").field("failing", &self.failing).finish()
    }
}

impl FlakyStore {
    /// Wraps `inner`; reads work until told otherwise.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failing: AtomicBool::new(false),
            failed: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            refusing_over: AtomicU64::new(u64::MAX),
        })
    }

    /// Makes every read fail (`true`) or work again (`false`).
    pub fn fail_reads(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes the store refuse (`true`) the partition owners' fenced transactions as invalid
    /// requests, as a store refuses one too large, or take them again (`false`).
    pub fn refuse_partition_writes(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Makes the store refuse the partition owners' fenced transactions that put more than
    /// `bytes` bytes of values, as etcd refuses a request over its size limit.
    pub fn refuse_partition_writes_over(&self, bytes: u64) {
        self.refusing_over.store(bytes, Ordering::SeqCst);
    }

    /// Returns how many reads failed so far.
    pub fn failed_reads(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn read(&self) -> StoreResult<()> {
        if self.failing.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected read failure".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<KeyValue>> {
        self.read()?;
        self.inner.get(key).await
    }

    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<RangePage> {
        self.read()?;
        self.inner.range(start, end, limit).await
    }

    async fn count(&self, start: &[u8], end: &[u8]) -> StoreResult<u64> {
        self.read()?;
        self.inner.count(start, end).await
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        // A transaction of reads only is a read (`get_many` sends those).
        let reads_only = txn.when.is_empty()
            && txn.then.iter().chain(&txn.otherwise).all(|op| matches!(op, Op::Get { .. }));
        if reads_only {
            self.read()?;
        }
        let fenced = txn.when.iter().any(|c| c.key.starts_with(b"owners/"));
        let writes_partition = txn.then.iter().any(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.starts_with(b"p/"),
            Op::DeletePrefix { prefix } => prefix.starts_with(b"p/"),
            _ => false,
        });
        if fenced && writes_partition && self.refusing.load(Ordering::SeqCst) {
            return Err(StoreError::InvalidRequest("injected refusal".into()));
        }
        let size: u64 = txn
            .then
            .iter()
            .map(|op| match op {
                Op::Put { value, .. } => value.len() as u64,
                _ => 0,
            })
            .sum();
        if fenced && size > self.refusing_over.load(Ordering::SeqCst) {
            return Err(StoreError::InvalidRequest(format!("injected refusal: {size} bytes")));
        }
        self.inner.txn(txn).await
    }

    async fn watch(&self, prefix: &[u8], start_revision: Revision) -> StoreResult<WatchStream> {
        self.inner.watch(prefix, start_revision).await
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.lease_grant(ttl).await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        self.inner.lease_keep_alive(lease).await
    }

    async fn lease_time_left(&self, lease: LeaseId) -> StoreResult<Option<Duration>> {
        self.inner.lease_time_left(lease).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }

    async fn revision(&self) -> StoreResult<Revision> {
        self.inner.revision().await
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> StoreResult<Vec<Option<KeyValue>>> {
        self.read()?;
        self.inner.get_many(keys).await
    }

    async fn get_many_since(
        &self,
        keys: &[Vec<u8>],
        at_least: Revision,
    ) -> StoreResult<Vec<Option<KeyValue>>> {
        self.read()?;
        self.inner.get_many_since(keys, at_least).await
    }

    async fn range_since(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> StoreResult<RangePage> {
        self.read()?;
        self.inner.range_since(start, end, limit, at_least).await
    }
}
