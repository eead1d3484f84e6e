//! Definitions (webhooks, segments, campaigns) stored as JSON under `defs/{kind}/{id}`.
//!
//! The etag of a definition is the store's `mod_revision` of its key: every change bumps it, so
//! a compare on it in the writing transaction makes optimistic concurrency exact, with no extra
//! field to keep in step.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{Compare, CompareOp, Op, OpResult, Revision, Store, StoreError, Txn};

/// Failures of definition reads and writes.
#[derive(Debug, thiserror::Error)]
pub enum DefsError {
    /// No definition with this id.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Resource kind, singular (`webhook`).
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The id is taken.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Resource kind.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The definition changed since the revision the caller read.
    #[error("{kind} {id} changed since it was read (etag mismatch)")]
    Conflict {
        /// Resource kind.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The stored bytes do not decode.
    #[error("{kind} {id} is stored in a form this version cannot read: {reason}")]
    Corrupt {
        /// Resource kind.
        kind: &'static str,
        /// The id.
        id: String,
        /// The decoder's message.
        reason: String,
    },
    /// The definition does not encode; nothing was written.
    #[error("{kind} {id} cannot be stored: {reason}")]
    Unencodable {
        /// Resource kind.
        kind: &'static str,
        /// The id.
        id: String,
        /// The encoder's message.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A definition with the revision it was read or written at (its etag).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// Identifier.
    pub id: String,
    /// The definition.
    pub value: T,
    /// Store revision of its last change.
    pub revision: Revision,
}

/// Typed access to one kind of definition.
pub struct Definitions<T> {
    store: Arc<dyn crate::store::Store>,
    kind: &'static str,
    prefix: String,
    /// The revision this node's cache of these definitions reflects, when writes wait for it.
    applied: Option<Arc<tokio::sync::watch::Sender<Revision>>>,
    _type: PhantomData<fn() -> T>,
}

/// How long a write waits for this node's cache to reflect it.
const READ_YOUR_WRITES: std::time::Duration = std::time::Duration::from_secs(2);

impl<T> Clone for Definitions<T> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            kind: self.kind,
            prefix: self.prefix.clone(),
            applied: self.applied.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Definitions<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions").field("kind", &self.kind).finish()
    }
}

impl<T: Serialize + DeserializeOwned> Definitions<T> {
    /// Returns access to the definitions of `kind` (singular, `webhook`) stored under
    /// `defs/{collection}/`.
    pub(crate) fn new(store: Arc<dyn Store>, kind: &'static str, collection: &str) -> Self {
        Self {
            store,
            kind,
            prefix: format!("defs/{collection}/"),
            applied: None,
            _type: PhantomData,
        }
    }

    /// Returns access to the definitions of `kind` stored under `prefix` (ending in `/`).
    pub(crate) fn with_prefix(store: Arc<dyn Store>, kind: &'static str, prefix: &str) -> Self {
        Self { store, kind, prefix: prefix.to_string(), applied: None, _type: PhantomData }
    }

    /// Returns access whose writes return only once `cache` reflects them (for up to 2 s),
    /// so that a caller's next call on this node sees its change: an event published right
    /// after ActivateCampaign is matched against the active campaign.
    pub fn read_your_writes(mut self, cache: &Cache<T>) -> Self {
        self.applied = Some(cache.applied.clone());
        self
    }

    async fn settle(&self, revision: Revision) {
        if let Some(applied) = &self.applied {
            let mut applied = applied.subscribe();
            let reached = applied.wait_for(|applied| *applied >= revision);
            if tokio::time::timeout(READ_YOUR_WRITES, reached).await.is_err() {
                tracing::debug!(kind = self.kind, revision, "cache behind a write after 2 s");
            }
        }
    }

    fn key(&self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.prefix).into_bytes()
    }

    fn encode(&self, id: &str, value: &T) -> Result<Vec<u8>, DefsError> {
        serde_json::to_vec(value).map_err(|e| DefsError::Unencodable {
            kind: self.kind,
            id: id.to_string(),
            reason: e.to_string(),
        })
    }

    fn decode(
        &self,
        id: &str,
        bytes: &[u8],
        revision: Revision,
    ) -> Result<Versioned<T>, DefsError> {
        let value = serde_json::from_slice(bytes).map_err(|e| DefsError::Corrupt {
            kind: self.kind,
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Versioned { id: id.to_string(), value, revision })
    }

    /// Stores a new definition; fails when the id is taken.
    pub async fn create(&self, id: &str, value: &T) -> Result<Versioned<T>, DefsError> {
        let key = self.key(id);
        let bytes = self.encode(id, value)?;
        let result = self
            .store
            .txn(
                Txn::new()
                    .when([Compare::absent(key.clone())])
                    .and_then([Op::put(key, bytes.clone())]),
            )
            .await?;
        if !result.succeeded {
            return Err(DefsError::AlreadyExists { kind: self.kind, id: id.to_string() });
        }
        self.settle(result.revision).await;
        self.decode(id, &bytes, result.revision)
    }

    /// Creates a definition unless the coordination key `once` exists, and sets `once` to the
    /// new id in the same transaction: of several nodes racing to create the first of
    /// something, exactly one does. Returns whether this call created it.
    pub async fn create_once(&self, once: &str, id: &str, value: &T) -> Result<bool, DefsError> {
        let bytes = self.encode(id, value)?;
        let result = self
            .store
            .txn(
                Txn::new()
                    .when([Compare::absent(once)])
                    .and_then([Op::put(once, id), Op::put(self.key(id), bytes)]),
            )
            .await?;
        if result.succeeded {
            self.settle(result.revision).await;
        }
        Ok(result.succeeded)
    }

    /// Returns a definition.
    pub async fn get(&self, id: &str) -> Result<Versioned<T>, DefsError> {
        let kv = self
            .store
            .get(&self.key(id))
            .await?
            .ok_or_else(|| DefsError::NotFound { kind: self.kind, id: id.to_string() })?;
        self.decode(id, &kv.value, kv.mod_revision)
    }

    /// Returns up to `limit` definitions with ids after `after`, in id order, and whether more
    /// follow.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Versioned<T>>, bool), DefsError> {
        let start = match after {
            Some(after) => {
                let mut key = self.key(after);
                key.push(0);
                key
            }
            None => self.prefix.clone().into_bytes(),
        };
        let end = crate::store::prefix_end(self.prefix.as_bytes());
        let page = self.store.range(&start, &end, limit).await?;
        let items = page
            .kvs
            .iter()
            .map(|kv| {
                let id = String::from_utf8_lossy(&kv.key[self.prefix.len()..]).into_owned();
                self.decode(&id, &kv.value, kv.mod_revision)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, page.more))
    }

    /// Replaces a definition if it is still at `expected` revision.
    pub async fn replace(
        &self,
        id: &str,
        value: &T,
        expected: Revision,
    ) -> Result<Versioned<T>, DefsError> {
        let key = self.key(id);

        let bytes = self.encode(id, value)?;
        let result = self
            .store
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, expected)])
                    .and_then([Op::put(key.clone(), bytes.clone())])
                    .or_else([Op::get(key)]),
            )
            .await?;
        if !result.succeeded {
            return Err(match result.results.first() {
                Some(OpResult::Get(Some(_))) => {
                    DefsError::Conflict { kind: self.kind, id: id.to_string() }
                }
                _ => DefsError::NotFound { kind: self.kind, id: id.to_string() },
            });
        }
        self.settle(result.revision).await;
        self.decode(id, &bytes, result.revision)
    }

    /// Deletes a definition, only if it is at `expected` revision when given.
    pub async fn delete(&self, id: &str, expected: Option<Revision>) -> Result<(), DefsError> {
        let key = self.key(id);
        let guard = match expected {
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            None => Compare::present(key.clone()),
        };
        let result = self
            .store
            .txn(
                Txn::new()
                    .when([guard])
                    .and_then([Op::delete(key.clone())])
                    .or_else([Op::get(key)]),
            )
            .await?;
        if result.succeeded {
            self.settle(result.revision).await;
            return Ok(());
        }
        Err(match result.results.first() {
            Some(OpResult::Get(Some(_))) => {
                DefsError::Conflict { kind: self.kind, id: id.to_string() }
            }
            _ => DefsError::NotFound { kind: self.kind, id: id.to_string() },
        })
    }
}

/// An in-memory copy of every definition of one kind, kept fresh by a watch. The hot paths
/// (event matching, sending) read definitions from here, never from the store.
pub struct Cache<T> {
    items: Arc<std::sync::RwLock<std::collections::HashMap<String, Arc<T>>>>,
    /// The store revision the copy reflects; written by the follower only.
    applied: Arc<tokio::sync::watch::Sender<Revision>>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Self { items: self.items.clone(), applied: self.applied.clone() }
    }
}

impl<T> std::fmt::Debug for Cache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Cache<T> {
    /// Loads the definitions and follows their changes until `stop` is cancelled.
    pub async fn start(
        defs: Definitions<T>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Self, DefsError> {
        let cache =
            Self { items: Default::default(), applied: Arc::new(tokio::sync::watch::channel(0).0) };
        let revision = cache.reload(&defs).await?;
        let task = cache.clone();
        tokio::spawn(async move { task.follow(defs, revision, stop).await });
        Ok(cache)
    }

    /// Returns a definition.
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.items.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Returns every definition.
    pub fn all(&self) -> Vec<(String, Arc<T>)> {
        self.items
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    async fn reload(&self, defs: &Definitions<T>) -> Result<Revision, DefsError> {
        let page = defs.store.range_prefix(defs.prefix.as_bytes(), 0).await?;
        let mut items = std::collections::HashMap::new();
        for kv in page.kvs {
            let id = String::from_utf8_lossy(&kv.key[defs.prefix.len()..]).into_owned();
            match serde_json::from_slice::<T>(&kv.value) {
                Ok(value) => {
                    items.insert(id, Arc::new(value));
                }
                // Left out rather than guessed: nothing acts on it until it is written again
                // in a form this version reads.
                Err(error) => {
                    tracing::warn!(kind = defs.kind, %id, %error, "definition does not decode; ignored")
                }
            }
        }
        *self.items.write().unwrap_or_else(|p| p.into_inner()) = items;
        self.applied.send_replace(page.revision);
        Ok(page.revision)
    }

    async fn follow(
        self,
        defs: Definitions<T>,
        mut revision: Revision,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                stream = defs.store.watch(defs.prefix.as_bytes(), revision + 1) => stream,
            };
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    if let Ok(r) = self.reload(&defs).await {
                        revision = r;
                    }
                    continue;
                }
            };
            loop {
                let batch = tokio::select! {
                    _ = stop.cancelled() => return,
                    batch = stream.next() => batch,
                };
                let Some(Ok(batch)) = batch else { break };
                revision = batch.revision;
                let mut items = self.items.write().unwrap_or_else(|p| p.into_inner());
                for event in batch.events {
                    let id =
                        String::from_utf8_lossy(&event.kv.key[defs.prefix.len()..]).into_owned();
                    match event.kind {
                        crate::store::EventKind::Put => {
                            match serde_json::from_slice::<T>(&event.kv.value) {
                                Ok(value) => {
                                    items.insert(id, Arc::new(value));
                                }
                                // The version before it is stale: it goes too.
                                Err(error) => {
                                    tracing::warn!(kind = defs.kind, %id, %error, "definition does not decode; ignored");
                                    items.remove(&id);
                                }
                            }
                        }
                        crate::store::EventKind::Delete => {
                            items.remove(&id);
                        }
                    }
                }
                drop(items);
                self.applied.send_replace(revision);
            }
            // The watch broke in a way it could not resume from (compaction): start over.
            if let Ok(r) = self.reload(&defs).await {
                revision = r;
            }
        }
    }
}
