//! The state layer: partition data as typed tables, so that nothing else formats a key or
//! encodes a record.
//!
//! - [`Key`]: the typed key of every kind of partition data (contacts, inbox, timers,
//!   deliveries, standings, runs, run shards, idempotency keys);
//! - [`Write`]: a typed put or delete, built only through its constructors, which encode the
//!   record and fail naming the key when it does not encode;
//! - [`State`]: typed reads, every one a `Result`; a record that does not decode is an error
//!   naming its key, never a default;
//! - [`Fence`]: the partition and epoch a partition transaction is guarded by;
//!   [`State::fenced`] turns a fence and writes into the one transaction the store applies.
//!
//! The layout below is that of the key-value store (redb); a backend with tables maps
//! each [`Key`] variant to a table whose primary key starts with the partition.
//!
//! ```text
//! p/{pppp}/applied                     `{node}/{epoch}` of the last write to the partition
//! p/{pppp}/inbox/{id}                  accepted input not yet processed
//! p/{pppp}/timers/{due_ms:013}/{id}    timers, ordered by due time
//! p/{pppp}/contacts/{contact}
//! p/{pppp}/deliveries/{id}             deliveries with their attempt log
//! p/{pppp}/status/{contact}/{campaign} a contact's standing in a campaign
//! runs/{campaign}/{run}
//! shards/{campaign}/{run}/{pppp}       a run's counters in one partition (written by its owner)
//! idem/{key}                           idempotency keys of Publish
//! ```
//!
//! Partition numbers are zero-padded to four digits so keys sort by partition.

mod backend;
pub(crate) mod keys;
mod kv;
pub mod postgres;

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use backend::{Backend, Raw, Table};
pub use backend::{Committed, TimerPage};
pub use backend::{ContactChange, ContactFeed, DeliveryStream, InboxBatch, InboxFeed};
pub use keys::partition_of;

use crate::campaign::{Run, Shard};
use crate::cluster::PartitionId;
use crate::contact::Contact;
use crate::delivery::record::Delivery;
use crate::inbox::InboxEntry;
use crate::status::CampaignStatus;
use crate::store::{Compare, CompareOp, Op, Revision, Store, StoreError};
use crate::timers::Timer;

/// Failures of the state layer, each naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store did not answer a read.
    #[error("cannot read {key}: {source}")]
    Read {
        /// The key or range read.
        key: String,
        /// The store's answer.
        #[source]
        source: StoreError,
    },
    /// A stored record does not decode.
    #[error("cannot decode {key}: {source}")]
    Decode {
        /// The key of the record.
        key: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A record to write does not encode.
    #[error("cannot encode {key}: {source}")]
    Encode {
        /// The key it was to be written at.
        key: String,
        /// The encoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The store did not take a write; whether it applied is unknown when the store did not
    /// answer.
    #[error("cannot write {key}: {source}")]
    Write {
        /// The first key written.
        key: String,
        /// The store's answer.
        #[source]
        source: StoreError,
    },
    /// A definition (campaign, segment) could not be read.
    #[error(transparent)]
    Definition(#[from] crate::defs::DefsError),
}

impl StateError {
    /// Returns whether trying again may succeed (the store may answer next time; a record
    /// that does not decode will not change by itself).
    pub fn is_retryable(&self) -> bool {
        match self {
            StateError::Read { source, .. } | StateError::Write { source, .. } => {
                source.is_retryable()
            }
            StateError::Definition(crate::defs::DefsError::Store(source)) => source.is_retryable(),
            _ => false,
        }
    }
}

/// The result of state layer calls.
pub type StateResult<T = ()> = Result<T, StateError>;

/// A typed key of partition data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A contact.
    Contact {
        /// Its partition.
        partition: PartitionId,
        /// Contact id.
        id: String,
    },
    /// An inbox entry.
    Inbox {
        /// Its partition.
        partition: PartitionId,
        /// Entry id.
        id: String,
    },
    /// A timer.
    Timer(TimerRef),
    /// A delivery.
    Delivery {
        /// Its partition.
        partition: PartitionId,
        /// Delivery id.
        id: String,
    },
    /// A contact's standing in a campaign.
    Standing {
        /// The contact's partition.
        partition: PartitionId,
        /// Contact id.
        contact: String,
        /// Campaign id.
        campaign: String,
    },
    /// A run.
    Run {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
    },
    /// A run's counters in one partition.
    Shard {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
        /// The partition counted.
        partition: PartitionId,
    },
    /// An idempotency key of Publish.
    Idempotency {
        /// The caller's key.
        key: String,
    },
}

impl Key {
    /// Returns the key in the key-value layout.
    pub(crate) fn encode(&self) -> String {
        match self {
            Key::Contact { partition, id } => keys::contact(*partition, id),
            Key::Inbox { partition, id } => keys::inbox_entry(*partition, id),
            Key::Timer(timer) => keys::timer(timer.partition, timer.due_ms, &timer.id),
            Key::Delivery { partition, id } => keys::delivery(*partition, id),
            Key::Standing { partition, contact, campaign } => {
                keys::standing(*partition, contact, campaign)
            }
            Key::Run { campaign, run } => keys::run(campaign, run),
            Key::Shard { campaign, run, partition } => keys::shard(campaign, run, *partition),
            Key::Idempotency { key } => keys::idempotency(key),
        }
    }
}

impl Key {
    /// Returns the key of the inbox entry stored at `raw`, a key read from the inbox.
    pub(crate) fn inbox_at(partition: PartitionId, raw: &[u8]) -> Option<Key> {
        let text = std::str::from_utf8(raw).ok()?;
        let id = text.strip_prefix(keys::inbox_prefix(partition).as_str())?;
        Some(Key::Inbox { partition, id: id.to_string() })
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

/// Names one stored timer: its partition, due time and id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TimerRef {
    /// Its partition.
    pub partition: PartitionId,
    /// When it is due, Unix milliseconds.
    pub due_ms: i64,
    /// Timer id.
    pub id: String,
}

impl TimerRef {
    /// Returns the reference of `timer` in `partition`.
    pub fn of(partition: PartitionId, timer: &Timer) -> Self {
        Self { partition, due_ms: timer.due_ms, id: timer.id.clone() }
    }

    /// Returns the reference a stored timer key names, if it names one.
    pub(crate) fn parse(partition: PartitionId, key: &[u8]) -> Option<Self> {
        let (due_ms, id) = keys::parse_timer(key)?;
        Some(Self { partition, due_ms, id })
    }

    /// Returns the stored key.
    pub(crate) fn encode(&self) -> Vec<u8> {
        keys::timer(self.partition, self.due_ms, &self.id).into_bytes()
    }
}

/// A put or a delete of one typed key. Built through the constructors, which encode records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    key: Key,
    /// The encoded record; `None` deletes the key.
    value: Option<Vec<u8>>,
    /// What a backend with tables indexes the record by.
    columns: Columns,
}

/// The fields of a record that a backend with tables keeps in columns of their own.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) enum Columns {
    /// None beyond the key.
    #[default]
    None,
    /// A delivery's filters.
    Delivery {
        webhook: String,
        campaign: String,
        contact: String,
        run: String,
        status: &'static str,
        created_ms: i64,
    },
    /// When an idempotency key was first seen.
    Created(i64),
}

fn encoded(key: Key, record: &impl Serialize) -> StateResult<Write> {
    match serde_json::to_vec(record) {
        Ok(value) => Ok(Write { key, value: Some(value), columns: Columns::None }),
        Err(source) => Err(StateError::Encode { key: key.encode(), source }),
    }
}

impl Write {
    /// Writes a contact.
    pub fn contact(partition: PartitionId, id: &str, contact: &Contact) -> StateResult<Self> {
        encoded(Key::Contact { partition, id: id.to_string() }, contact)
    }

    /// Deletes a contact.
    pub fn remove_contact(partition: PartitionId, id: &str) -> Self {
        Self::remove(Key::Contact { partition, id: id.to_string() })
    }

    /// Writes a delivery (in its own partition).
    pub fn delivery(delivery: &Delivery) -> StateResult<Self> {
        let key = Key::Delivery { partition: delivery.partition, id: delivery.id.clone() };
        let mut write = encoded(key, delivery)?;
        write.columns = Columns::Delivery {
            webhook: delivery.webhook_id.clone(),
            campaign: delivery.campaign_id.clone(),
            contact: delivery.contact_id.clone(),
            run: delivery.run_id.clone(),
            status: delivery.status.name(),
            created_ms: delivery.created_ms,
        };
        Ok(write)
    }

    /// Deletes a delivery.
    pub fn remove_delivery(partition: PartitionId, id: &str) -> Self {
        Self::remove(Key::Delivery { partition, id: id.to_string() })
    }

    /// Writes a contact's standing in a campaign.
    pub fn standing(
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        standing: &CampaignStatus,
    ) -> StateResult<Self> {
        let key = Key::Standing {
            partition,
            contact: contact.to_string(),
            campaign: campaign.to_string(),
        };
        encoded(key, standing)
    }

    /// Writes a run.
    pub fn run(campaign: &str, run: &str, record: &Run) -> StateResult<Self> {
        encoded(Key::Run { campaign: campaign.to_string(), run: run.to_string() }, record)
    }

    /// Writes a run's counters in one partition.
    pub fn shard(
        campaign: &str,
        run: &str,
        partition: PartitionId,
        shard: &Shard,
    ) -> StateResult<Self> {
        let key = Key::Shard { campaign: campaign.to_string(), run: run.to_string(), partition };
        encoded(key, shard)
    }

    /// Adds an entry to a partition's inbox.
    pub fn inbox(partition: PartitionId, id: &str, entry: &InboxEntry) -> StateResult<Self> {
        encoded(Key::Inbox { partition, id: id.to_string() }, entry)
    }

    /// Removes a processed inbox entry.
    pub fn remove_inbox(partition: PartitionId, id: &str) -> Self {
        Self::remove(Key::Inbox { partition, id: id.to_string() })
    }

    /// Stores a timer.
    pub fn timer(partition: PartitionId, timer: &Timer) -> StateResult<Self> {
        encoded(Key::Timer(TimerRef::of(partition, timer)), timer)
    }

    /// Removes a timer.
    pub fn remove_timer(timer: TimerRef) -> Self {
        Self::remove(Key::Timer(timer))
    }

    /// Deletes any key.
    pub fn remove(key: Key) -> Self {
        Self { key, value: None, columns: Columns::None }
    }

    /// Records an idempotency key of Publish.
    pub fn idempotency(key: &str, record: &crate::inbox::IdempotencyRecord) -> StateResult<Self> {
        let mut write = encoded(Key::Idempotency { key: key.to_string() }, record)?;
        write.columns = Columns::Created(record.created_ms);
        Ok(write)
    }

    /// Returns the key written.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Returns whether the write deletes its key.
    pub fn is_delete(&self) -> bool {
        self.value.is_none()
    }

    /// Returns the encoded record a put writes.
    pub(crate) fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// Returns the columns a backend with tables keeps.
    pub(crate) fn columns(&self) -> &Columns {
        &self.columns
    }

    /// Returns the store operation, for the adapters that still build store transactions
    /// themselves.
    pub fn into_op(self) -> Op {
        let key = self.key.encode();
        match self.value {
            Some(value) => Op::put(key, value),
            None => Op::delete(key),
        }
    }
}

/// What a conditional write expects of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists.
    Present,
    /// The key was last written at this version.
    Version(Revision),
}

/// A stored record with its version; the value is an error when it does not decode.
#[derive(Debug)]
pub struct Stored<T> {
    /// The record.
    pub value: StateResult<T>,
    /// Its version: changes with every write (the etag of optimistic concurrency).
    pub version: Revision,
}

/// The ownership a partition transaction is guarded by: it applies only while `epoch` is the
/// partition's current epoch.
#[derive(Clone, Debug)]
pub struct Fence {
    /// The partition written.
    pub partition: PartitionId,
    /// The writer's epoch (the create revision of the partition's owner key).
    pub epoch: Revision,
    /// `{node}/{epoch}`, stamped on every transaction so that the store's history shows who
    /// made each partition write.
    pub signature: Vec<u8>,
}

impl Fence {
    /// Returns the condition that holds while the fence's epoch owns the partition.
    pub(crate) fn guard(&self) -> Compare {
        Compare::create_revision(
            crate::cluster::owner_key(self.partition),
            CompareOp::Equal,
            self.epoch,
        )
    }
}

/// Typed reads and writes of partition data, over one of the backends.
#[derive(Clone)]
pub struct State {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

/// Returns the id of the last contact a run shard handled, from what its entry says: entries
/// written by earlier versions name the contact's key rather than its id.
pub(crate) fn resume_after(partition: PartitionId, after: &str) -> &str {
    after.strip_prefix(keys::contacts_prefix(partition).as_str()).unwrap_or(after)
}

/// Returns the cursor of a scan over every partition that stopped at delivery `id` of
/// `partition`.
pub fn cursor(partition: PartitionId, id: &str) -> String {
    keys::delivery(partition, id)
}

/// Parses a cursor of [`cursor`]: the partition and the id to go on after.
pub fn parse_cursor(cursor: &str) -> Option<(PartitionId, Option<String>)> {
    let rest = cursor.strip_prefix("p/")?;
    let partition = rest.get(..4)?.parse().ok()?;
    let id = rest.get(4..)?.strip_prefix("/deliveries/")?;
    Some((partition, Some(id.to_string())))
}

/// Returns the cursor of a scan over every partition that stopped at contact `id` of
/// `partition`.
pub fn contact_cursor(partition: PartitionId, id: &str) -> String {
    keys::contact(partition, id)
}

/// Parses a cursor of [`contact_cursor`]: the partition and the id to go on after.
pub fn parse_contact_cursor(cursor: &str) -> Option<(PartitionId, String)> {
    let rest = cursor.strip_prefix("p/")?;
    let partition = rest.get(..4)?.parse().ok()?;
    let id = rest.get(4..)?.strip_prefix("/contacts/")?;
    Some((partition, id.to_string()))
}

/// Returns the position of a timer among its partition's timers: positions sort as the
/// timers fall due.
pub fn timer_position(timer: &TimerRef) -> Vec<u8> {
    timer.encode()
}

/// Returns the position before a partition's first timer.
pub fn timers_start(partition: PartitionId) -> Vec<u8> {
    keys::timers_prefix(partition).into_bytes()
}

/// Returns the position after every timer of `partition` due at or before `due_ms`.
pub fn timers_until(partition: PartitionId, due_ms: i64) -> Vec<u8> {
    keys::timers_until(partition, due_ms).into_bytes()
}

/// Returns the position just after `position`.
pub fn timer_after(position: &[u8]) -> Vec<u8> {
    let mut after = position.to_vec();
    after.push(0);
    after
}

/// Returns the due time of the timer at `position`.
pub fn timer_due(position: &[u8]) -> Option<i64> {
    keys::timer_due(position)
}

/// A page of a partition's contacts, in id order.
#[derive(Clone, Debug, Default)]
pub struct ContactPage {
    /// Contacts with their ids.
    pub contacts: Vec<(String, Contact)>,
    /// Whether more follow the last one.
    pub more: bool,
}

/// Which deliveries a list, a watch or a redelivery applies to; empty fields match all.
#[derive(Clone, Debug, Default)]
pub struct DeliveryFilter {
    /// Webhook called.
    pub webhook_id: String,
    /// Campaign sent for.
    pub campaign_id: String,
    /// Contact sent to.
    pub contact_id: String,
    /// Run sent by.
    pub run_id: String,
    /// Status now.
    pub status: Option<crate::delivery::record::Status>,
    /// Created at or after, Unix milliseconds.
    pub start_ms: Option<i64>,
    /// Created before, Unix milliseconds.
    pub end_ms: Option<i64>,
}

impl DeliveryFilter {
    /// Returns whether a delivery passes the filter.
    pub fn matches(&self, d: &Delivery) -> bool {
        (self.webhook_id.is_empty() || d.webhook_id == self.webhook_id)
            && (self.campaign_id.is_empty() || d.campaign_id == self.campaign_id)
            && (self.contact_id.is_empty() || d.contact_id == self.contact_id)
            && (self.run_id.is_empty() || d.run_id == self.run_id)
            && self.status.is_none_or(|s| s == d.status)
            && self.start_ms.is_none_or(|t| d.created_ms >= t)
            && self.end_ms.is_none_or(|t| d.created_ms < t)
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> StateResult<T> {
    serde_json::from_slice(bytes).map_err(|source| StateError::Decode { key: key.into(), source })
}

fn stored<T: DeserializeOwned>(key: &Key, raw: Raw) -> Stored<T> {
    Stored { value: decode(&key.encode(), &raw.value), version: raw.version }
}

impl State {
    /// Returns the state layer over a key-value store (the embedded node's redb file).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { backend: Arc::new(kv::KvBackend::new(store)) }
    }

    /// Connects to PostgreSQL and applies the schema migrations not applied yet.
    pub async fn postgres(options: postgres::PgOptions) -> Result<Self, StoreError> {
        Ok(Self { backend: Arc::new(postgres::PgBackend::connect(options).await?) })
    }

    /// Loads a partition's contacts and follows their changes, on a backend whose owner keeps
    /// them in memory (the key-value one); `None` elsewhere, where the engine reads them.
    pub(crate) async fn follow_contacts(
        &self,
        partition: PartitionId,
    ) -> StateResult<Option<ContactFeed>> {
        self.backend.follow_contacts(partition).await
    }

    async fn record<T: DeserializeOwned>(&self, key: &Key) -> StateResult<Option<T>> {
        match self.backend.get(key).await? {
            Some(raw) => decode(&key.encode(), &raw.value).map(Some),
            None => Ok(None),
        }
    }

    /// Returns a contact; `None` when it was never written (or was deleted).
    pub async fn contact(&self, partition: PartitionId, id: &str) -> StateResult<Option<Contact>> {
        self.record(&Key::Contact { partition, id: id.to_string() }).await
    }

    /// Returns contacts of one partition as of at least revision `at_least`, by id: `None`
    /// for an absent one, an error for one that does not decode.
    pub async fn contacts(
        &self,
        partition: PartitionId,
        ids: &[&str],
        at_least: Revision,
    ) -> StateResult<Vec<(String, StateResult<Option<Contact>>)>> {
        let keys: Vec<Key> =
            ids.iter().map(|id| Key::Contact { partition, id: id.to_string() }).collect();
        let found = self.backend.get_many(&keys, at_least).await?;
        Ok(ids
            .iter()
            .zip(keys.iter().zip(found))
            .map(|(id, (key, raw))| {
                let contact = match raw {
                    Some(raw) => decode(&key.encode(), &raw.value).map(Some),
                    None => Ok(None),
                };
                (id.to_string(), contact)
            })
            .collect())
    }

    /// Returns up to `limit` contacts of a partition after the id `after` (all from the
    /// first when empty).
    pub async fn contacts_after(
        &self,
        partition: PartitionId,
        after: &str,
        limit: usize,
    ) -> StateResult<ContactPage> {
        let (page, more) = self.contacts_versioned(partition, after, limit).await?;
        let contacts = page
            .into_iter()
            .map(|(id, stored)| Ok((id, stored.value?)))
            .collect::<StateResult<_>>()?;
        Ok(ContactPage { contacts, more })
    }

    /// Returns up to `limit` contacts of a partition after the id `after` (from the first when
    /// empty), with their versions, and whether more follow.
    pub async fn contacts_versioned(
        &self,
        partition: PartitionId,
        after: &str,
        limit: usize,
    ) -> StateResult<(Vec<(String, Stored<Contact>)>, bool)> {
        let after = (!after.is_empty()).then_some(after);
        let (page, more) =
            self.backend.scan(Table::Contacts(partition), after, None, limit).await?;
        let contacts = page
            .into_iter()
            .map(|(id, raw)| {
                let value = decode(&keys::contact(partition, &id), &raw.value);
                (id, Stored { value, version: raw.version })
            })
            .collect();
        Ok((contacts, more))
    }

    /// Returns a delivery.
    pub async fn delivery(
        &self,
        partition: PartitionId,
        id: &str,
    ) -> StateResult<Option<Delivery>> {
        self.record(&Key::Delivery { partition, id: id.to_string() }).await
    }

    /// Returns up to `limit` deliveries of a partition whose ids sort after `after` (from the
    /// first when `None`) and before `before`, with the id to go on from.
    pub async fn deliveries_between(
        &self,
        partition: PartitionId,
        after: Option<&str>,
        before: &str,
        limit: usize,
    ) -> StateResult<(Vec<(String, StateResult<Delivery>)>, Option<String>)> {
        let (page, more) =
            self.backend.scan(Table::Deliveries(partition), after, Some(before), limit).await?;
        let last = page.last().filter(|_| more).map(|(id, _)| id.clone());
        let deliveries = page
            .into_iter()
            .map(|(id, raw)| {
                let value = decode(&keys::delivery(partition, &id), &raw.value);
                (id, value)
            })
            .collect();
        Ok((deliveries, last))
    }

    /// Returns up to `size` deliveries that pass `filter`, in partition then id order, from
    /// after the position `from` on, with the position of the next page (`None` at the end).
    /// A page may come back short when many deliveries were examined.
    pub async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        from: (PartitionId, Option<String>),
        partitions: u32,
        size: usize,
    ) -> StateResult<(Vec<Delivery>, Option<(PartitionId, String)>)> {
        /// Records examined per list call before a partial page is returned.
        const SCAN_LIMIT: usize = 20_000;
        let page = self.backend.deliveries(filter, from, partitions, size, SCAN_LIMIT).await?;
        Ok((page.deliveries, page.next))
    }

    /// Streams every delivery written from now on, in every partition. A record that does
    /// not decode is skipped; the stream ends with an error when the store's watch does.
    pub async fn watch_deliveries(&self) -> StateResult<DeliveryStream> {
        self.backend.watch_deliveries().await
    }

    /// Returns a contact's standing in a campaign; `None` before anything was recorded.
    pub async fn standing(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
    ) -> StateResult<Option<CampaignStatus>> {
        let key = Key::Standing {
            partition,
            contact: contact.to_string(),
            campaign: campaign.to_string(),
        };
        self.record(&key).await
    }

    /// Returns standings as of at least revision `at_least`, by (contact, campaign): `None`
    /// for an absent one, an error for one that does not decode.
    pub async fn standings_of(
        &self,
        partition: PartitionId,
        pairs: &[(String, String)],
        at_least: Revision,
    ) -> StateResult<Vec<StateResult<Option<CampaignStatus>>>> {
        let keys: Vec<Key> = pairs
            .iter()
            .map(|(contact, campaign)| Key::Standing {
                partition,
                contact: contact.clone(),
                campaign: campaign.clone(),
            })
            .collect();
        let found = self.backend.get_many(&keys, at_least).await?;
        Ok(keys
            .iter()
            .zip(found)
            .map(|(key, raw)| match raw {
                Some(raw) => decode(&key.encode(), &raw.value).map(Some),
                None => Ok(None),
            })
            .collect())
    }

    /// Returns a contact's standing in every campaign it has one in, by campaign id.
    pub async fn standings(
        &self,
        partition: PartitionId,
        contact: &str,
    ) -> StateResult<Vec<(String, CampaignStatus)>> {
        let (page, _) =
            self.backend.scan(Table::Standings(partition, contact), None, None, 0).await?;
        page.into_iter()
            .map(|(campaign, raw)| {
                let key = keys::standing(partition, contact, &campaign);
                Ok((campaign, decode(&key, &raw.value)?))
            })
            .collect()
    }

    /// Returns a run.
    pub async fn run(&self, campaign: &str, run: &str) -> StateResult<Option<Run>> {
        self.record(&Key::Run { campaign: campaign.to_string(), run: run.to_string() }).await
    }

    /// Returns a run's counters in one partition; `None` before the partition wrote any.
    pub async fn shard(
        &self,
        campaign: &str,
        run: &str,
        partition: PartitionId,
    ) -> StateResult<Option<Shard>> {
        let key = Key::Shard { campaign: campaign.to_string(), run: run.to_string(), partition };
        self.record(&key).await
    }

    /// Applies `writes` in one transaction, with no condition: what callers send, which no
    /// partition owner has decided on yet. Returns the store revision of the write.
    pub async fn write(&self, writes: Vec<Write>) -> StateResult<Revision> {
        self.backend.write(writes).await
    }

    /// Applies `writes` only if `key` is as expected. Otherwise writes nothing and returns
    /// what `key` holds now (`None` when it is absent).
    pub async fn write_if<T: DeserializeOwned>(
        &self,
        key: &Key,
        expect: Expect,
        writes: Vec<Write>,
    ) -> StateResult<Result<Revision, Option<Stored<T>>>> {
        Ok(self
            .backend
            .write_if(key, expect, writes)
            .await?
            .map_err(|held| held.map(|raw| stored(key, raw))))
    }

    /// Applies `writes` only if every key in `absent` is absent; returns whether it did.
    pub async fn write_if_absent(&self, absent: &[Key], writes: Vec<Write>) -> StateResult<bool> {
        self.backend.write_if_absent(absent, writes).await
    }

    /// Returns a record with its version (the etag of optimistic concurrency).
    pub async fn versioned<T: DeserializeOwned>(
        &self,
        key: &Key,
    ) -> StateResult<Option<Stored<T>>> {
        Ok(self.backend.get(key).await?.map(|raw| stored(key, raw)))
    }

    /// Deletes up to `limit` idempotency records created before `before_ms`, scanning from
    /// after the key `after`, each only while `fence` holds and the record is unchanged.
    /// Returns how many it deleted and the key to go on from (`None` at the end).
    pub async fn expire_idempotency(
        &self,
        fence: &Fence,
        after: Option<&str>,
        before_ms: i64,
        limit: usize,
    ) -> StateResult<(u64, Option<String>)> {
        self.backend.expire_idempotency(fence, after, before_ms, limit).await
    }

    /// Returns every partition's counters of a run (the partitions that wrote any).
    pub async fn shards(&self, campaign: &str, run: &str) -> StateResult<Vec<StateResult<Shard>>> {
        let (page, _) = self.backend.scan(Table::Shards(campaign, run), None, None, 0).await?;
        Ok(page
            .into_iter()
            .map(|(partition, raw)| {
                decode(
                    &format!("{}{partition}", keys::run_shards_prefix(campaign, run)),
                    &raw.value,
                )
            })
            .collect())
    }

    /// Returns up to `limit` runs of a campaign in id order after the run `after`, and
    /// whether more follow.
    pub async fn runs(
        &self,
        campaign: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StateResult<(Vec<(String, StateResult<Run>)>, bool)> {
        let (page, more) = self.backend.scan(Table::Runs(campaign), after, None, limit).await?;
        let runs = page
            .into_iter()
            .map(|(id, raw)| {
                let value = decode(&keys::run(campaign, &id), &raw.value);
                (id, value)
            })
            .collect();
        Ok((runs, more))
    }

    /// Returns how many timers a partition holds.
    pub async fn pending_timers(&self, partition: PartitionId) -> Result<u64, StoreError> {
        self.backend.count(Table::Timers(partition)).await
    }

    /// Returns how many delivery records a partition keeps.
    pub async fn kept_deliveries(&self, partition: PartitionId) -> Result<u64, StoreError> {
        self.backend.count(Table::Deliveries(partition)).await
    }

    /// Returns how many entries wait in a partition's inbox.
    pub async fn inbox_backlog(&self, partition: PartitionId) -> Result<u64, StoreError> {
        self.backend.count(Table::Inbox(partition)).await
    }

    /// Records that `fence` owns its partition from now on, before its first commit; false
    /// when a newer owner already does.
    pub async fn claim(&self, fence: &Fence) -> Result<bool, StoreError> {
        self.backend.claim(fence).await
    }

    /// Applies `writes` under `fence` in one transaction, stamping the partition. With
    /// `witness`, it also requires that key to exist (to recognise a retried transaction that
    /// did commit).
    pub async fn commit(
        &self,
        fence: &Fence,
        writes: Vec<Write>,
        witness: Option<&Key>,
    ) -> Result<Committed, StoreError> {
        self.backend.commit(fence, writes, witness).await
    }

    /// Reads a partition's stored timers from position `start` up to position `end`.
    pub async fn timers(
        &self,
        partition: PartitionId,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> Result<TimerPage, StoreError> {
        self.backend.timers(partition, start, end, limit, at_least).await
    }

    /// Opens the feed of a partition's inbox: its first batch is the whole inbox.
    pub async fn inbox(&self, partition: PartitionId) -> StateResult<Box<dyn InboxFeed>> {
        self.backend.inbox(partition).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_layout_and_timers_parse_back() {
        let timer = TimerRef { partition: 3, due_ms: 1_000, id: "t".into() };
        assert_eq!(Key::Timer(timer.clone()).encode(), "p/0003/timers/0000000001000/t");
        assert_eq!(TimerRef::parse(3, &timer.encode()), Some(timer));
        let standing = Key::Standing { partition: 12, contact: "c".into(), campaign: "k".into() };
        assert_eq!(standing.encode(), "p/0012/status/c/k");
        let shard = Key::Shard { campaign: "k".into(), run: "r".into(), partition: 7 };
        assert_eq!(shard.encode(), "shards/k/r/0007");
    }

    #[test]
    fn a_delete_carries_no_record() {
        let write = Write::remove_delivery(1, "d");
        assert!(write.is_delete());
        assert_eq!(write.into_op(), Op::delete("p/0001/deliveries/d"));
    }
}
