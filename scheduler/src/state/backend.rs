//! The interface a backend of the state layer implements: records by typed key, scans of one
//! table, conditional and fenced writes, the timer range a partition's owner reads, the feed of
//! its inbox, and the delivery queries of the API.
//!
//! Records cross this interface encoded; [`super::State`] decodes them and names the key of a
//! record that does not decode. Two backends implement it: [`super::kv`] over the key-value
//! stores (redb for a single node) and [`super::postgres`] over PostgreSQL tables.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

use super::{DeliveryFilter, Expect, Fence, Key, StateResult, Write};
use crate::cluster::PartitionId;
use crate::store::{Revision, StoreError};

/// An encoded record with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Raw {
    /// The encoded record.
    pub value: Vec<u8>,
    /// Changes with every write of the record.
    pub version: Revision,
}

/// One table, or the part of one that a scan reads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Table<'a> {
    /// A partition's contacts, by id.
    Contacts(PartitionId),
    /// A partition's deliveries, by id.
    Deliveries(PartitionId),
    /// A contact's standings, by campaign id.
    Standings(PartitionId, &'a str),
    /// A run's counters, by partition.
    Shards(&'a str, &'a str),
    /// A campaign's runs, by id.
    Runs(&'a str),
    /// A partition's timers.
    Timers(PartitionId),
    /// A partition's inbox.
    Inbox(PartitionId),
}

/// What a fenced commit came to.
#[derive(Debug)]
pub enum Committed {
    /// Every write applied, at this revision.
    Applied(Revision),
    /// Nothing applied: the fence does not hold (`still_ours` false), or it does but the
    /// witness is gone (`still_ours` true), which after a retry means the earlier attempt did
    /// commit.
    Refused {
        /// Whether the fence still holds.
        still_ours: bool,
        /// The revision the answer reflects.
        revision: Revision,
    },
}

/// Stored timers of a range, in due order, keyed by their position (see
/// [`super::timer_position`]).
#[derive(Debug, Default)]
pub struct TimerPage {
    /// Position and encoded timer.
    pub timers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the range holds more than the page.
    pub more: bool,
    /// The revision the read reflects.
    pub revision: Revision,
}

/// Entries of a partition's inbox that its owner has not seen yet.
#[derive(Debug, Default)]
pub struct InboxBatch {
    /// The entries, oldest first.
    pub entries: Vec<(Key, Vec<u8>)>,
    /// Whether the batch is the whole inbox, replacing every entry seen before.
    pub reset: bool,
    /// The revision the batch reflects.
    pub revision: Revision,
}

/// New entries of one partition's inbox, as they arrive. The first batch is the whole inbox.
#[async_trait]
pub trait InboxFeed: Send {
    /// Waits for entries not returned before. Cancel-safe: a call dropped before it returns
    /// loses nothing.
    async fn next(&mut self) -> StateResult<InboxBatch>;
}

/// A stream of deliveries as they are written.
pub type DeliveryStream =
    Pin<Box<dyn Stream<Item = StateResult<crate::delivery::record::Delivery>> + Send>>;

/// A page of deliveries that pass a filter, in partition then id order.
#[derive(Debug, Default)]
pub(crate) struct DeliveryPage {
    /// The deliveries.
    pub deliveries: Vec<crate::delivery::record::Delivery>,
    /// Where the next page starts, when more may follow.
    pub next: Option<(PartitionId, String)>,
}

/// A backend of the state layer.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Reads one record.
    async fn get(&self, key: &Key) -> StateResult<Option<Raw>>;

    /// Reads records as of at least revision `at_least`, in the order of `keys`.
    async fn get_many(&self, keys: &[Key], at_least: Revision) -> StateResult<Vec<Option<Raw>>>;

    /// Reads up to `limit` records of `table` (0 for no limit) whose ids sort after `after`
    /// and before `before`, in id order; returns each record's id within the table and
    /// whether more follow.
    async fn scan(
        &self,
        table: Table<'_>,
        after: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> StateResult<(Vec<(String, Raw)>, bool)>;

    /// Counts the records of `table`.
    async fn count(&self, table: Table<'_>) -> Result<u64, StoreError>;

    /// Applies `writes` in one transaction, with no condition.
    async fn write(&self, writes: Vec<Write>) -> StateResult<Revision>;

    /// Applies `writes` only if `key` is as expected; otherwise returns what `key` holds.
    async fn write_if(
        &self,
        key: &Key,
        expect: Expect,
        writes: Vec<Write>,
    ) -> StateResult<Result<Revision, Option<Raw>>>;

    /// Applies `writes` only if every key in `absent` is absent; returns whether it did.
    async fn write_if_absent(&self, absent: &[Key], writes: Vec<Write>) -> StateResult<bool>;

    /// Deletes up to `limit` idempotency records created before `before_ms`, from after the
    /// key `after`, while `fence` holds; returns how many and the key to go on from.
    async fn expire_idempotency(
        &self,
        fence: &Fence,
        after: Option<&str>,
        before_ms: i64,
        limit: usize,
    ) -> StateResult<(u64, Option<String>)>;

    /// Records that `fence` owns its partition from now on; returns false when a newer
    /// epoch already does.
    async fn claim(&self, fence: &Fence) -> Result<bool, StoreError>;

    /// Applies `writes` under `fence`; with `witness`, only while that key exists.
    async fn commit(
        &self,
        fence: &Fence,
        writes: Vec<Write>,
        witness: Option<&Key>,
    ) -> Result<Committed, StoreError>;

    /// Reads the stored timers of `partition` from position `start` up to (not including)
    /// position `end`, as of at least revision `at_least`.
    async fn timers(
        &self,
        partition: PartitionId,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> Result<TimerPage, StoreError>;

    /// Opens the feed of a partition's inbox.
    async fn inbox(&self, partition: PartitionId) -> StateResult<Box<dyn InboxFeed>>;

    /// Streams every delivery written from now on.
    async fn watch_deliveries(&self) -> StateResult<DeliveryStream>;

    /// Returns up to `size` deliveries that pass `filter`, from `from` on (inclusive of
    /// nothing before it), examining at most `scan_limit` records.
    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        from: (PartitionId, Option<String>),
        partitions: u32,
        size: usize,
        scan_limit: usize,
    ) -> StateResult<DeliveryPage>;

    /// Loads a partition's contacts and follows their changes, on a backend whose owner keeps
    /// them in memory (the key-value one); `None` elsewhere, where the engine reads them.
    async fn follow_contacts(&self, _partition: PartitionId) -> StateResult<Option<ContactFeed>> {
        Ok(None)
    }
}

/// A partition's contacts as stored (their JSON bytes, by id) at one point, and the changes
/// after it, in order.
pub struct ContactFeed {
    /// Every contact of the partition.
    pub contacts: std::collections::BTreeMap<Box<str>, Box<[u8]>>,
    /// The changes since; an error ends the feed (the follower loads again).
    pub changes: Pin<Box<dyn Stream<Item = StateResult<Vec<ContactChange>>> + Send>>,
}

/// A change to one contact.
#[derive(Debug, PartialEq)]
pub enum ContactChange {
    /// Written: its id and JSON bytes.
    Put(Box<str>, Box<[u8]>),
    /// Deleted: its id.
    Delete(Box<str>),
}
