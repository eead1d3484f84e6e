//! Ingest: what callers send — events, interactions, requests to deliver again — written
//! durably into the inbox of the partition that owns it. The write is the acknowledgement:
//! once a call returns, the owner will process the entry even if this node dies.
//!
//! Idempotency keys: an event with a key is written together with the key's record, only if
//! the key is free (never seen, or seen longer than the retention ago); otherwise the first
//! event's id is returned and nothing is written.

use crate::cluster::PartitionId;
use crate::inbox::{Event, IdempotencyRecord, InboxEntry};
use crate::state::{Expect, Key, State, StateResult, Write, partition_of};

/// Inbox writes per store transaction when a batch is written.
const WRITES_PER_TXN: usize = 120;

/// What a publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The event's id: the new one, or for a repeated idempotency key, the first one's.
    pub event_id: String,
    /// Whether the idempotency key was seen before, so nothing was written.
    pub duplicate: bool,
}

/// An event to publish, with its idempotency key (empty for none).
#[derive(Clone, Debug)]
pub struct Publish {
    /// The event, validated.
    pub event: Event,
    /// The caller's idempotency key, or empty.
    pub idempotency_key: String,
}

/// Writes what callers send into the partitions' inboxes.
#[derive(Clone)]
pub struct Ingest {
    state: State,
    partitions: u32,
    /// How long an idempotency key is remembered, in milliseconds.
    retention_ms: i64,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("partitions", &self.partitions).finish()
    }
}

impl Ingest {
    /// Returns the ingest of a cluster of `partitions` partitions.
    pub fn new(state: State, partitions: u32, retention: std::time::Duration) -> Self {
        Self { state, partitions, retention_ms: retention.as_millis() as i64 }
    }

    /// Returns the partition that holds a contact.
    pub fn partition_of(&self, contact: &str) -> PartitionId {
        partition_of(contact, self.partitions)
    }

    fn event_write(&self, event: &Event) -> StateResult<Write> {
        let entry = InboxEntry::Event(event.clone());
        Write::inbox(self.partition_of(&event.contact_id), &event.id, &entry)
    }

    /// Writes one event, honouring its idempotency key.
    pub async fn publish(&self, publish: &Publish) -> StateResult<Published> {
        let event = &publish.event;
        let entry = self.event_write(event)?;
        if publish.idempotency_key.is_empty() {
            self.state.write(vec![entry]).await?;
            return Ok(Published { event_id: event.id.clone(), duplicate: false });
        }
        let key = Key::Idempotency { key: publish.idempotency_key.clone() };
        let record =
            IdempotencyRecord { event_id: event.id.clone(), created_ms: event.accepted_ms };
        let claim = Write::idempotency(&publish.idempotency_key, &record)?;
        let mut expect = Expect::Absent;
        loop {
            let writes = vec![claim.clone(), entry.clone()];
            let stored =
                match self.state.write_if::<IdempotencyRecord>(&key, expect, writes).await? {
                    Ok(_) => return Ok(Published { event_id: event.id.clone(), duplicate: false }),
                    Err(None) => {
                        // Gone between the write and the read: try as new.
                        expect = Expect::Absent;
                        continue;
                    }
                    Err(Some(stored)) => stored,
                };
            match stored.value {
                Ok(first) if event.accepted_ms - first.created_ms < self.retention_ms => {
                    return Ok(Published { event_id: first.event_id, duplicate: true });
                }
                // Past the retention (or unreadable): the key is free again; take it only if
                // nobody else did in between.
                _ => expect = Expect::Version(stored.version),
            }
        }
    }

    /// Writes a batch of events; returns what each publish did, in order.
    pub async fn publish_batch(&self, batch: &[Publish]) -> StateResult<Vec<Published>> {
        let mut results: Vec<Option<Published>> = vec![None; batch.len()];
        // Events without keys: as few transactions as the limits allow.
        let plain: Vec<usize> =
            (0..batch.len()).filter(|i| batch[*i].idempotency_key.is_empty()).collect();
        for chunk in plain.chunks(WRITES_PER_TXN) {
            let writes = chunk
                .iter()
                .map(|i| self.event_write(&batch[*i].event))
                .collect::<StateResult<Vec<_>>>()?;
            self.state.write(writes).await?;
            for i in chunk {
                let event_id = batch[*i].event.id.clone();
                results[*i] = Some(Published { event_id, duplicate: false });
            }
        }
        // Keyed events go in one transaction per chunk when none of their keys was seen (the
        // usual case); a chunk with a repeated or known key falls back to one at a time.
        let keyed: Vec<usize> =
            (0..batch.len()).filter(|i| !batch[*i].idempotency_key.is_empty()).collect();
        for chunk in keyed.chunks(WRITES_PER_TXN / 2) {
            let mut seen = std::collections::HashSet::new();
            let distinct = chunk.iter().all(|i| seen.insert(batch[*i].idempotency_key.as_str()));
            let mut claims = Vec::with_capacity(chunk.len());
            let mut writes = Vec::with_capacity(chunk.len() * 2);
            for i in chunk {
                let Publish { event, idempotency_key } = &batch[*i];
                let record =
                    IdempotencyRecord { event_id: event.id.clone(), created_ms: event.accepted_ms };
                claims.push(Key::Idempotency { key: idempotency_key.clone() });
                writes.push(Write::idempotency(idempotency_key, &record)?);
                writes.push(self.event_write(event)?);
            }
            if distinct && self.state.write_if_absent(&claims, writes).await? {
                for i in chunk {
                    let event_id = batch[*i].event.id.clone();
                    results[*i] = Some(Published { event_id, duplicate: false });
                }
                continue;
            }
            for i in chunk {
                results[*i] = Some(self.publish(&batch[*i]).await?);
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Records an interaction with a delivery or with a campaign, in its contact's partition.
    pub async fn interaction(&self, partition: PartitionId, entry: InboxEntry) -> StateResult {
        let id = crate::inbox::new_id("ix");
        self.state.write(vec![Write::inbox(partition, &id, &entry)?]).await?;
        Ok(())
    }

    /// Asks the owners of these deliveries to send them again, in as few transactions as the
    /// limits allow.
    pub async fn redeliver(&self, deliveries: &[(PartitionId, String)]) -> StateResult {
        for chunk in deliveries.chunks(WRITES_PER_TXN) {
            let writes = chunk
                .iter()
                .map(|(partition, id)| {
                    let entry = InboxEntry::Redeliver { delivery: id.clone() };
                    Write::inbox(*partition, &crate::inbox::new_id("in"), &entry)
                })
                .collect::<StateResult<Vec<_>>>()?;
            self.state.write(writes).await?;
        }
        Ok(())
    }
}

/// Deletes idempotency records past the retention, as a job of partition 0's owner: every
/// delete is guarded by that ownership's epoch (and by the record's version, so a key reused
/// meanwhile is kept). Runs until `stop` is cancelled.
pub async fn sweep_idempotency_keys(
    ingest: Ingest,
    cluster: crate::cluster::Cluster,
    stop: tokio_util::sync::CancellationToken,
) {
    const PAGE: usize = 500;
    let retention = std::time::Duration::from_millis(ingest.retention_ms.max(0) as u64);
    let every = (retention / 24).max(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(fence) = cluster.fence(0) else { continue };
        let before_ms = crate::now_ms() - ingest.retention_ms;
        let mut after: Option<String> = None;
        let mut deleted = 0;
        loop {
            match ingest.state.expire_idempotency(&fence, after.as_deref(), before_ms, PAGE).await {
                Ok((count, next)) => {
                    deleted += count;
                    match next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                Err(error) => {
                    // Nothing is lost by sweeping later: the next pass starts over.
                    tracing::debug!(%error, "idempotency sweep failed; trying again at the next pass");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "expired idempotency keys removed");
        }
    }
}
