//! Contacts as callers see them: upserts with optimistic concurrency, imports, reads, deletes,
//! and the audience evaluator that lists, counts and samples contacts by a CEL filter.

use std::sync::Arc;

use crate::cluster::PartitionId;
use crate::contact::Contact;
use crate::rules::Programs;
use crate::state::{Expect, Key, State, StateError, Stored, Write, partition_of};
use crate::store::Revision;

/// Contacts written per store transaction by an import.
const WRITES_PER_TXN: usize = 120;

/// Contacts read per page while evaluating an audience.
const PAGE: usize = 1000;

/// Records examined per list call before a partial page is returned.
const SCAN_LIMIT: usize = 20_000;

/// Why a contact call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContactError {
    /// No contact has the id.
    #[error("contact {0} not found")]
    NotFound(String),
    /// The contact changed since the etag the caller read.
    #[error("contact {id} changed since etag {etag} was read")]
    Conflict {
        /// Contact id.
        id: String,
        /// The etag given.
        etag: Revision,
    },
    /// A page token that this call did not give.
    #[error("not a page token of this call")]
    InvalidCursor,
    /// The state layer failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A contact with its id and version (its etag).
#[derive(Clone, Debug)]
pub struct Versioned {
    /// Contact id.
    pub id: String,
    /// The contact.
    pub contact: Contact,
    /// Its version.
    pub version: Revision,
}

/// What an audience evaluation found.
#[derive(Clone, Debug, Default)]
pub struct Audience {
    /// Contacts that pass the filter.
    pub members: u64,
    /// Contacts examined.
    pub examined: u64,
    /// The first members, up to the sample size asked for.
    pub sample: Vec<Versioned>,
}

/// Contacts for the adapters.
#[derive(Clone)]
pub struct Contacts {
    state: State,
    partitions: u32,
    programs: Arc<Programs>,
}

impl std::fmt::Debug for Contacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contacts").finish_non_exhaustive()
    }
}

impl Contacts {
    /// Returns the contacts of a cluster of `partitions` partitions.
    pub fn new(state: State, partitions: u32) -> Self {
        Self { state, partitions, programs: Arc::new(Programs::default()) }
    }

    fn key(&self, id: &str) -> Key {
        Key::Contact { partition: partition_of(id, self.partitions), id: id.to_string() }
    }

    /// Returns whether a contact passes a CEL filter (an empty one passes everyone; one that
    /// fails to evaluate, such as a missing attribute, does not pass).
    pub fn matches(&self, filter: &str, id: &str, contact: &Contact) -> bool {
        filter.is_empty()
            || self.programs.evaluate(filter, &[("contact", &contact.view(id))]).unwrap_or(false)
    }

    /// Writes a contact; with `etag`, only if it is still at that version. Keeps the creation
    /// time of the contact it replaces.
    pub async fn upsert(
        &self,
        id: &str,
        mut contact: Contact,
        etag: Option<Revision>,
    ) -> Result<Versioned, ContactError> {
        let key = self.key(id);
        let partition = partition_of(id, self.partitions);
        loop {
            let current: Option<Stored<Contact>> = self.state.versioned(&key).await?;
            if let Some(etag) = etag
                && current.as_ref().map(|c| c.version) != Some(etag)
            {
                return Err(ContactError::Conflict { id: id.to_string(), etag });
            }
            let expect = match &current {
                Some(stored) => {
                    if let Ok(existing) = &stored.value {
                        contact.created_ms = existing.created_ms;
                    }
                    Expect::Version(stored.version)
                }
                None => Expect::Absent,
            };
            let write = Write::contact(partition, id, &contact)?;
            if let Ok(version) = self.state.write_if::<Contact>(&key, expect, vec![write]).await? {
                return Ok(Versioned { id: id.to_string(), contact, version });
            }
        }
    }

    /// Writes whole contacts, replacing what is stored, in as few transactions as the limits
    /// allow; returns how many were written.
    pub async fn import(&self, contacts: &[(String, Contact)]) -> Result<u64, ContactError> {
        let mut written = 0;
        for chunk in contacts.chunks(WRITES_PER_TXN) {
            let writes = chunk
                .iter()
                .map(|(id, c)| Write::contact(partition_of(id, self.partitions), id, c))
                .collect::<Result<Vec<_>, _>>()?;
            self.state.write(writes).await?;
            written += chunk.len() as u64;
        }
        Ok(written)
    }

    /// Returns a contact with its version.
    pub async fn get(&self, id: &str) -> Result<Versioned, ContactError> {
        let stored: Stored<Contact> = self
            .state
            .versioned(&self.key(id))
            .await?
            .ok_or_else(|| ContactError::NotFound(id.to_string()))?;
        Ok(Versioned { id: id.to_string(), contact: stored.value?, version: stored.version })
    }

    /// Deletes a contact.
    pub async fn delete(&self, id: &str) -> Result<(), ContactError> {
        let key = self.key(id);
        let removal = Write::remove(key.clone());
        match self.state.write_if::<Contact>(&key, Expect::Present, vec![removal]).await? {
            Ok(_) => Ok(()),
            Err(_) => Err(ContactError::NotFound(id.to_string())),
        }
    }

    /// Returns up to `size` contacts that pass `filter`, in partition then id order, after the
    /// cursor `after`, with the cursor of the next page (`None` at the end). A page may come
    /// back short when many contacts were examined.
    pub async fn list(
        &self,
        filter: &str,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<Versioned>, Option<String>), ContactError> {
        let (mut partition, mut from) = match after {
            Some(cursor) => {
                crate::state::parse_contact_cursor(cursor).ok_or(ContactError::InvalidCursor)?
            }
            None => (0, String::new()),
        };
        let mut found = Vec::new();
        let mut examined = 0;
        while partition < self.partitions {
            let (page, more) = self.state.contacts_versioned(partition, &from, 500).await?;
            for (id, stored) in page {
                examined += 1;
                let contact = stored.value?;
                if self.matches(filter, &id, &contact) {
                    found.push(Versioned { id: id.clone(), contact, version: stored.version });
                }
                if found.len() == size || examined >= SCAN_LIMIT {
                    return Ok((found, Some(crate::state::contact_cursor(partition, &id))));
                }
                from = id;
            }
            if !more {
                partition += 1;
                from = String::new();
            }
        }
        Ok((found, None))
    }

    /// Evaluates an audience over every contact: counts the members (the contacts that pass
    /// every filter) and keeps the first `sample` of them.
    pub async fn audience(
        &self,
        filters: &[&str],
        sample: usize,
    ) -> Result<Audience, ContactError> {
        let mut audience = Audience::default();
        for partition in 0..self.partitions {
            self.audience_of(partition, filters, sample, &mut audience).await?;
        }
        Ok(audience)
    }

    /// Returns a contact's standing in every campaign it has one in, by campaign id.
    pub async fn standings(
        &self,
        id: &str,
    ) -> Result<Vec<(String, crate::status::CampaignStatus)>, ContactError> {
        Ok(self.state.standings(partition_of(id, self.partitions), id).await?)
    }

    async fn audience_of(
        &self,
        partition: PartitionId,
        filters: &[&str],
        sample: usize,
        audience: &mut Audience,
    ) -> Result<(), ContactError> {
        let mut from = String::new();
        loop {
            let (page, more) = self.state.contacts_versioned(partition, &from, PAGE).await?;
            for (id, stored) in page {
                let contact = stored.value?;
                audience.examined += 1;
                if filters.iter().all(|filter| self.matches(filter, &id, &contact)) {
                    audience.members += 1;
                    if audience.sample.len() < sample {
                        let version = stored.version;
                        audience.sample.push(Versioned { id: id.clone(), contact, version });
                    }
                }
                from = id;
            }
            if !more {
                return Ok(());
            }
        }
    }
}
