//! Deliveries as callers see them: one by id, pages filtered over every partition, a live
//! stream of changes, and redelivery (asked of the owner through its inbox, so the owner's
//! epoch guards the new attempt like any other).

use futures::StreamExt;
use std::sync::Arc;

use crate::cluster::PartitionId;
use crate::delivery::record::{self, Delivery, Status};
use crate::state::{State, StateError};

use super::Ingest;

pub use crate::state::DeliveryFilter;

/// Why a delivery call failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The id is not a delivery id of this cluster.
    #[error("{0} is not a delivery id (msg_...)")]
    InvalidId(String),
    /// No delivery has the id.
    #[error("delivery {0} not found")]
    NotFound(String),
    /// The delivery is still being sent.
    #[error("delivery {0} is still in progress")]
    InProgress(String),
    /// The state layer failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Deliveries for the adapters.
#[derive(Clone)]
pub struct Deliveries {
    state: State,
    ingest: Ingest,
    partitions: u32,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl Deliveries {
    /// Returns the deliveries of a cluster of `partitions` partitions.
    pub fn new(state: State, ingest: Ingest, partitions: u32) -> Self {
        Self { state, ingest, partitions }
    }

    fn partition(&self, id: &str) -> Result<PartitionId, DeliveryError> {
        record::partition_of_id(id)
            .filter(|p| *p < self.partitions)
            .ok_or_else(|| DeliveryError::InvalidId(id.to_string()))
    }

    /// Returns one delivery.
    pub async fn get(&self, id: &str) -> Result<Delivery, DeliveryError> {
        let partition = self.partition(id)?;
        self.state
            .delivery(partition, id)
            .await?
            .ok_or_else(|| DeliveryError::NotFound(id.to_string()))
    }

    /// Returns up to `size` deliveries that pass `filter`, in partition then id order, after
    /// the cursor `after`, with the cursor of the next page (`None` at the end). A page may
    /// come back short when many deliveries were examined.
    pub async fn list(
        &self,
        filter: &DeliveryFilter,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<Delivery>, Option<String>), DeliveryError> {
        let from = match after {
            Some(cursor) => crate::state::parse_cursor(cursor)
                .ok_or_else(|| DeliveryError::InvalidId(cursor.to_string()))?,
            None => (0, None),
        };
        let (found, next) = self.state.deliveries(filter, from, self.partitions, size).await?;
        Ok((found, next.map(|(partition, id)| crate::state::cursor(partition, &id))))
    }

    /// Asks the owner to send a finished delivery again; returns it as it was.
    pub async fn redeliver(&self, id: &str) -> Result<Delivery, DeliveryError> {
        let delivery = self.get(id).await?;
        if matches!(delivery.status, Status::Pending | Status::Sending) {
            return Err(DeliveryError::InProgress(delivery.id));
        }
        self.ingest.redeliver(&[(delivery.partition, delivery.id.clone())]).await?;
        Ok(delivery)
    }

    /// Asks the owners to send again every failed delivery that passes `filter`; returns
    /// how many were queued. Pages through the filtered listing, so a backend with a status
    /// index (PostgreSQL) reads only failed deliveries.
    pub async fn redeliver_failed(&self, filter: &DeliveryFilter) -> Result<u64, DeliveryError> {
        let filter = DeliveryFilter { status: Some(Status::Failed), ..filter.clone() };
        let mut queued = 0;
        let mut from: (PartitionId, Option<String>) = (0, None);
        loop {
            let (page, next) = self.state.deliveries(&filter, from, self.partitions, 1000).await?;
            let failed: Vec<(PartitionId, String)> =
                page.into_iter().map(|delivery| (delivery.partition, delivery.id)).collect();
            if !failed.is_empty() {
                self.ingest.redeliver(&failed).await?;
            }
            queued += failed.len() as u64;
            match next {
                Some((partition, id)) => from = (partition, Some(id)),
                None => return Ok(queued),
            }
        }
    }

    /// Streams every change to a delivery that passes `filter`, until the receiver is
    /// dropped or the store's watch ends (then the stream's last item is the error).
    pub async fn watch(
        &self,
        filter: DeliveryFilter,
        buffer: usize,
    ) -> Result<DeliveryWatch, DeliveryError> {
        let mut changes = self.state.watch_deliveries().await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(buffer);
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lagging = lagged.clone();
        // Owned by the caller: it ends as soon as the receiver is dropped, even while no
        // delivery changes, and when the caller reads too slowly to keep up.
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = sender.closed() => return,
                    next = changes.next() => next,
                };
                match next {
                    Some(Ok(delivery)) if filter.matches(&delivery) => {
                        match sender.send_timeout(Ok(delivery), SLOW_CALLER).await {
                            Ok(()) => {}
                            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                                lagging.store(true, std::sync::atomic::Ordering::Release);
                                return;
                            }
                            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(DeliveryWatch { changes: receiver, lagged })
    }
}

/// How long a watcher may leave its buffer full before it is dropped.
pub const SLOW_CALLER: std::time::Duration = std::time::Duration::from_secs(5);

/// A watch of delivery changes.
#[derive(Debug)]
pub struct DeliveryWatch {
    /// The changes that match the filter, in order.
    pub changes: tokio::sync::mpsc::Receiver<Result<Delivery, DeliveryError>>,
    /// Set when the watch ended because the caller left its buffer full for
    /// [`SLOW_CALLER`].
    pub lagged: Arc<std::sync::atomic::AtomicBool>,
}
