//! The contact record, kept in its partition, and its owner's copy of a partition's contacts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::cluster::PartitionId;
use crate::state::ContactChange;

/// A contact as stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    /// Attributes, a JSON object.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// IANA time zone; empty for UTC.
    pub timezone: String,
    /// Opted out of every campaign.
    pub unsubscribed: bool,
    /// Creation, Unix milliseconds.
    pub created_ms: i64,
    /// Last change.
    pub updated_ms: i64,
}

impl Contact {
    /// Returns the contact as templates and rules see it.
    pub fn view(&self, id: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "attributes": self.attributes,
            "timezone": if self.timezone.is_empty() { "UTC" } else { self.timezone.as_str() },
            "unsubscribed": self.unsubscribed,
        })
    }
}

/// The contacts of the partitions this node owns, each kept in memory by its owner: a run
/// evaluates its audience from here instead of reading every contact from the store.
///
/// A partition's copy is loaded the first time its owner needs it (a run or a follow-up) and
/// kept fresh by a watch from the revision of that load, so it trails the store by the watch's delay; until it is loaded
/// (and while it reloads after a broken watch) callers read the store instead. Values are kept
/// as their stored JSON bytes, the most compact form at hand, and decoded when used.
#[derive(Default)]
pub struct ContactCache {
    parts: std::sync::RwLock<std::collections::HashMap<PartitionId, Arc<Part>>>,
    /// The owned partitions not followed yet, with what ends their ownership.
    owned: std::sync::Mutex<std::collections::HashMap<PartitionId, CancellationToken>>,
}

impl std::fmt::Debug for ContactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactCache").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Part {
    ready: AtomicBool,
    contacts: std::sync::RwLock<BTreeMap<Box<str>, Box<[u8]>>>,
}

/// A page of cached contacts, in key order.
#[derive(Debug)]
pub struct CachedPage {
    /// Contact ids and records.
    pub contacts: Vec<(String, Contact)>,
    /// Whether more contacts follow the last one.
    pub more: bool,
}

impl ContactCache {
    fn part(&self, partition: PartitionId) -> Option<Arc<Part>> {
        let parts = self.parts.read().unwrap_or_else(|p| p.into_inner());
        parts.get(&partition).filter(|p| p.ready.load(Ordering::Acquire)).cloned()
    }

    /// Returns the contact when the partition's copy is loaded: `Some(None)` when it does not
    /// exist, `None` when the caller must read the store — also when the cached bytes do not
    /// decode, so that the store's read fails with the key named instead of the contact being
    /// taken for absent (and subscribed).
    pub fn get(&self, partition: PartitionId, id: &str) -> Option<Option<Contact>> {
        let part = self.part(partition)?;
        let contacts = part.contacts.read().unwrap_or_else(|p| p.into_inner());
        match contacts.get(id) {
            None => Some(None),
            Some(bytes) => serde_json::from_slice(bytes).ok().map(Some),
        }
    }

    /// Returns up to `limit` contacts whose ids sort after `after` ("" for the first page),
    /// or `None` when the partition's copy is not loaded or one of the page's contacts does not
    /// decode (the caller then reads the page from the store, which names it).
    pub fn page(&self, partition: PartitionId, after: &str, limit: usize) -> Option<CachedPage> {
        use std::ops::Bound;
        let part = self.part(partition)?;
        let contacts = part.contacts.read().unwrap_or_else(|p| p.into_inner());
        let lower = if after.is_empty() { Bound::Unbounded } else { Bound::Excluded(after) };
        let mut range = contacts.range::<str, _>((lower, Bound::Unbounded));
        let mut page = Vec::with_capacity(limit);
        for (id, bytes) in range.by_ref().take(limit) {
            page.push((id.to_string(), serde_json::from_slice(bytes).ok()?));
        }
        Some(CachedPage { contacts: page, more: range.next().is_some() })
    }

    /// Returns how many contacts are cached, over every partition.
    pub fn len(&self) -> usize {
        let parts = self.parts.read().unwrap_or_else(|p| p.into_inner());
        parts.values().map(|p| p.contacts.read().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    /// Returns whether no contact is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that this node owns `partition` until `owned` is cancelled. Its contacts are
    /// loaded on first use ([`ContactCache::start`]): a partition that only ever handles events
    /// never pays for a watch on its contacts.
    pub fn own(&self, partition: PartitionId, owned: CancellationToken) {
        let mut parts = self.parts.write().unwrap_or_else(|p| p.into_inner());
        parts.remove(&partition);
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, owned);
    }

    /// Starts loading and following `partition`'s contacts if this node owns it and does not
    /// follow them yet.
    pub fn start(self: &Arc<Self>, state: &crate::state::State, partition: PartitionId) {
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
        if let Some(owned) = owned.filter(|o| !o.is_cancelled()) {
            self.follow(state.clone(), partition, owned);
        }
    }

    /// Loads `partition`'s contacts and follows their changes until `cancel`, then forgets them.
    fn follow(
        self: &Arc<Self>,
        state: crate::state::State,
        partition: PartitionId,
        cancel: CancellationToken,
    ) {
        let part = Arc::new(Part::default());
        self.parts.write().unwrap_or_else(|p| p.into_inner()).insert(partition, part.clone());
        let cache = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = follow(&state, partition, &part) => {}
            }
            let mut parts = cache.parts.write().unwrap_or_else(|p| p.into_inner());
            if parts.get(&partition).is_some_and(|p| Arc::ptr_eq(p, &part)) {
                parts.remove(&partition);
            }
        });
    }
}

/// Loads a partition's contacts into `part` and applies their changes, loading again when the
/// feed breaks. Returns when the backend keeps no contacts in memory (the engine then reads
/// the store).
async fn follow(state: &crate::state::State, partition: PartitionId, part: &Part) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        part.ready.store(false, Ordering::Release);
        let mut changes = match state.follow_contacts(partition).await {
            Ok(Some(feed)) => {
                let count = feed.contacts.len();
                *part.contacts.write().unwrap_or_else(|p| p.into_inner()) = feed.contacts;
                part.ready.store(true, Ordering::Release);
                tracing::debug!(partition, contacts = count, "contacts cached");
                backoff.reset();
                feed.changes
            }
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(partition, %error, "cannot load contacts; retrying");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            match changes.next().await {
                Some(Ok(batch)) => {
                    let mut contacts = part.contacts.write().unwrap_or_else(|p| p.into_inner());
                    for change in batch {
                        match change {
                            ContactChange::Put(id, bytes) => {
                                contacts.insert(id, bytes);
                            }
                            ContactChange::Delete(id) => {
                                contacts.remove(&id);
                            }
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(partition, %error, "contact feed ended; loading again");
                    break;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(entries: &[(&str, &[u8])]) -> ContactCache {
        let part = Part::default();
        part.ready.store(true, Ordering::Release);
        {
            let mut contacts = part.contacts.write().expect("lock");
            for (id, bytes) in entries {
                contacts.insert((*id).into(), bytes.to_vec().into_boxed_slice());
            }
        }
        let cache = ContactCache::default();
        cache.parts.write().expect("lock").insert(3, Arc::new(part));
        cache
    }

    #[test]
    fn a_cached_contact_that_does_not_decode_sends_the_caller_to_the_store() {
        let unsubscribed = Contact { unsubscribed: true, ..Default::default() };
        let good = serde_json::to_vec(&unsubscribed).expect("json");
        let cache = cache_with(&[("a", &good), ("b", b"{not json")]);
        assert_eq!(cache.get(3, "a"), Some(Some(unsubscribed)));
        assert_eq!(cache.get(3, "absent"), Some(None));
        assert_eq!(cache.get(3, "b"), None, "an unreadable contact is never taken for absent");
        assert!(cache.page(3, "", 10).is_none(), "a page with an unreadable contact is read again");
        assert_eq!(cache.page(3, "", 1).map(|page| page.contacts.len()), Some(1));
    }
}
