//! The coordination store a node runs on: the cluster's definitions (webhooks, campaigns,
//! segments, API tokens), its membership and partition ownership. etcd in a cluster, a redb
//! file on a single node (which then also holds the partitions' state).
//!
//! Callers get typed definitions from it and hand it to the cluster and the engine; only the
//! scheduler reaches the store behind it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::campaign::Campaign;
use crate::defs::Definitions;
use crate::segment::Segment;
use crate::state::State;
use crate::store::{EmbeddedStore, EtcdStore, Store, StoreError};
use crate::webhook::Webhook;

pub use crate::store::{EtcdOptions, EtcdTls, Failure};

/// A handle on the coordination store; cheap to clone.
#[derive(Clone)]
pub struct Coordination {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Coordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordination").finish_non_exhaustive()
    }
}

impl Coordination {
    /// Opens the redb file of a single node, which holds everything.
    pub fn embedded(file: &Path) -> Result<Self, StoreError> {
        Ok(Self::over(Arc::new(EmbeddedStore::open(file)?)))
    }

    /// Connects to etcd, trying again while it does not answer, until `within` has passed.
    pub async fn etcd(options: EtcdOptions, within: Duration) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + within;
        let store =
            until_reachable("etcd", deadline, || EtcdStore::connect(options.clone())).await?;
        Ok(Self::over(Arc::new(store)))
    }

    /// Runs on a store the caller opened (tests wrap one to inject faults).
    pub fn over(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Returns the partitions' state kept in this store itself, as a single node does.
    pub fn embedded_state(&self) -> State {
        State::new(self.store.clone())
    }

    /// Returns the webhooks.
    pub fn webhooks(&self) -> Definitions<Webhook> {
        Definitions::new(self.store.clone(), "webhook", "webhooks")
    }

    /// Returns the campaigns.
    pub fn campaigns(&self) -> Definitions<Campaign> {
        Definitions::new(self.store.clone(), "campaign", "campaigns")
    }

    /// Returns the segments.
    pub fn segments(&self) -> Definitions<Segment> {
        Definitions::new(self.store.clone(), "segment", "segments")
    }

    /// Returns the API tokens, in the caller's record type.
    pub fn tokens<T: Serialize + DeserializeOwned>(&self) -> Definitions<T> {
        Definitions::with_prefix(self.store.clone(), "token", "tokens/")
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Calls `connect` again while it fails as unavailable (the store is not up yet), with
/// backoff, until `deadline`; logs the first failure. Other errors return at once.
pub async fn until_reachable<T, F, Fut>(
    what: &str,
    deadline: tokio::time::Instant,
    mut connect: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut waiting = false;
    loop {
        match connect().await {
            Err(StoreError::Unavailable(reason))
                if tokio::time::Instant::now() + backoff.peek() < deadline =>
            {
                if !waiting {
                    tracing::warn!(%reason, "{what} does not answer yet; retrying until node.start_timeout");
                    waiting = true;
                }
                backoff.wait().await;
            }
            other => return other,
        }
    }
}
