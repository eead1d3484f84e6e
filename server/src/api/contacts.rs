//! ContactService and SegmentService.
//!
//! Contacts are written by callers straight into their partition (`p/{p}/contacts/{id}`): they
//! are inputs, like inbox entries, not state the partition owner derives; the owner reads them
//! when it decides.

use futures::StreamExt;
use tidings_api::v1 as pb;
use tidings_api::v1::contact_service_server::ContactService;
use tidings_api::v1::segment_service_server::SegmentService;
use tidings_scheduler::app::contacts::Versioned as VersionedContact;
use tidings_scheduler::app::{ContactError, Contacts};
use tidings_scheduler::contact::Contact;
use tidings_scheduler::defs::{Definitions, DefsError, Versioned};
use tidings_scheduler::now_ms;
use tidings_scheduler::rules;
use tidings_scheduler::segment::Segment;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{json_to_struct, struct_to_json, timestamp};
use super::events::check_contact_id;
use super::{ApiError, Violations, check_id, invalid, new_id, page_size, parse_etag};

/// Largest attributes object, encoded as JSON.
const MAX_ATTRIBUTES: usize = 64 * 1024;
/// Most contacts in one BatchUpsertContacts message.
const MAX_BATCH: usize = 1000;
/// Rejected contacts listed in a BatchUpsertContacts response.
const MAX_REJECTS_LISTED: usize = 1000;

/// Serves ContactService and SegmentService.
pub(crate) struct ContactApi {
    contacts: Contacts,
    segments: Definitions<Segment>,
    campaigns: Definitions<tidings_scheduler::campaign::Campaign>,
}

impl From<ContactError> for ApiError {
    fn from(error: ContactError) -> Self {
        match error {
            ContactError::NotFound(_) => ApiError::NotFound(error.to_string()),
            ContactError::Conflict { .. } => ApiError::FailedPrecondition(error.to_string()),
            ContactError::InvalidCursor => invalid("page_token", error.to_string()),
            ContactError::State(error) => error.into(),
        }
    }
}

impl ContactApi {
    pub(crate) fn new(
        coordination: &tidings_scheduler::coordination::Coordination,
        state: tidings_scheduler::state::State,
        partitions: u32,
    ) -> Self {
        Self {
            segments: coordination.segments(),
            campaigns: coordination.campaigns(),
            contacts: Contacts::new(state, partitions),
        }
    }

    /// Validates a contact; `field` prefixes violations.
    fn to_domain(proto: &pb::Contact, field: &str, v: &mut Violations) -> Contact {
        check_contact_id(v, &format!("{field}.id"), &proto.id);
        let attributes = proto.attributes.as_ref().map(struct_to_json).unwrap_or_default();
        let size = serde_json::to_vec(&attributes).map_or(usize::MAX, |b| b.len());
        if size > MAX_ATTRIBUTES {
            v.add(
                format!("{field}.attributes"),
                format!("is {size} bytes as JSON; the limit is {MAX_ATTRIBUTES}"),
            );
        }
        if let Err(reason) = tidings_scheduler::schedule::parse_timezone(&proto.timezone) {
            v.add(format!("{field}.timezone"), reason);
        }
        let now = now_ms();
        Contact {
            attributes: attributes.into_iter().collect(),
            timezone: proto.timezone.clone(),
            unsubscribed: proto.unsubscribed,
            created_ms: now,
            updated_ms: now,
        }
    }

    fn to_proto(id: &str, c: &Contact, revision: i64) -> pb::Contact {
        pb::Contact {
            id: id.to_string(),
            attributes: Some(json_to_struct(&c.attributes)),
            timezone: c.timezone.clone(),
            unsubscribed: c.unsubscribed,
            create_time: Some(timestamp(c.created_ms)),
            update_time: Some(timestamp(c.updated_ms)),
            etag: revision.to_string(),
        }
    }

    fn versioned_to_proto(c: &VersionedContact) -> pb::Contact {
        Self::to_proto(&c.id, &c.contact, c.version)
    }

    fn segment_to_proto(s: &Versioned<Segment>) -> pb::Segment {
        pb::Segment {
            id: s.id.clone(),
            description: s.value.description.clone(),
            filter: s.value.filter.clone(),
            create_time: Some(timestamp(s.value.created_at_ms)),
            update_time: Some(timestamp(s.value.updated_at_ms)),
            etag: s.revision.to_string(),
        }
    }

    fn check_segment(proto: &pb::Segment, v: &mut Violations) {
        if proto.filter.is_empty() {
            v.add("segment.filter", "is required");
        } else if let Err(reason) = rules::check(&proto.filter) {
            v.add("segment.filter", format!("invalid CEL: {reason}"));
        }
        if proto.description.chars().count() > 1024 {
            v.add("segment.description", "must be at most 1024 characters");
        }
    }

    /// Checks a segment as CreateSegment does, without storing it, and counts its members with
    /// a sample of `sample` of them (the console's live count).
    pub(crate) async fn try_segment(
        &self,
        proto: &pb::Segment,
        sample: usize,
    ) -> Result<(u64, u64, Vec<pb::Contact>), ApiError> {
        let mut v = Violations::default();
        Self::check_segment(proto, &mut v);
        v.check()?;
        self.members(&proto.filter, sample).await
    }

    /// Counts the members of a segment and returns up to `sample` of them.
    async fn members(
        &self,
        filter: &str,
        sample: usize,
    ) -> Result<(u64, u64, Vec<pb::Contact>), ApiError> {
        let audience = self.contacts.audience(&[filter], sample).await?;
        let sample = audience.sample.iter().map(Self::versioned_to_proto).collect();
        Ok((audience.members, audience.examined, sample))
    }
}

#[tonic::async_trait]
impl ContactService for ContactApi {
    async fn upsert_contact(
        &self,
        request: Request<pb::UpsertContactRequest>,
    ) -> Result<Response<pb::Contact>, Status> {
        let request = request.into_inner();
        let Some(proto) = request.contact else {
            return Err(invalid("contact", "is required").into());
        };
        let mut v = Violations::default();
        let contact = Self::to_domain(&proto, "contact", &mut v);
        v.check()?;
        let etag = parse_etag("etag", &request.etag)?;
        let stored =
            self.contacts.upsert(&proto.id, contact, etag).await.map_err(ApiError::from)?;
        Ok(Response::new(Self::versioned_to_proto(&stored)))
    }

    async fn batch_upsert_contacts(
        &self,
        request: Request<Streaming<pb::BatchUpsertContactsRequest>>,
    ) -> Result<Response<pb::BatchUpsertContactsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut response = pb::BatchUpsertContactsResponse::default();
        let mut index = 0u64;
        while let Some(message) = stream.next().await {
            let message = message?;
            if message.contacts.len() > MAX_BATCH {
                return Err(invalid(
                    "contacts",
                    format!("at most {MAX_BATCH} contacts per message"),
                )
                .into());
            }
            let mut valid = Vec::new();
            for proto in &message.contacts {
                let mut v = Violations::default();
                let contact = Self::to_domain(proto, "contact", &mut v);
                if !v.is_empty() {
                    response.rejected_count += 1;
                    if response.rejected.len() < MAX_REJECTS_LISTED {
                        response.rejected.push(pb::RejectedContact {
                            index,
                            id: proto.id.clone(),
                            reason: v.describe(),
                        });
                    }
                } else {
                    valid.push((proto.id.clone(), contact));
                }
                index += 1;
            }
            // Imports replace whole contacts.
            response.upserted += self.contacts.import(&valid).await.map_err(ApiError::from)?;
        }
        Ok(Response::new(response))
    }

    async fn get_contact(
        &self,
        request: Request<pb::GetContactRequest>,
    ) -> Result<Response<pb::Contact>, Status> {
        let id = request.into_inner().id;
        let mut v = Violations::default();
        check_contact_id(&mut v, "id", &id);
        v.check()?;
        let stored = self.contacts.get(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(Self::versioned_to_proto(&stored)))
    }

    async fn delete_contact(
        &self,
        request: Request<pb::DeleteContactRequest>,
    ) -> Result<Response<pb::DeleteContactResponse>, Status> {
        let id = request.into_inner().id;
        let mut v = Violations::default();
        check_contact_id(&mut v, "id", &id);
        v.check()?;
        self.contacts.delete(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteContactResponse {}))
    }

    async fn list_contacts(
        &self,
        request: Request<pb::ListContactsRequest>,
    ) -> Result<Response<pb::ListContactsResponse>, Status> {
        let request = request.into_inner();
        if !request.filter.is_empty()
            && let Err(reason) = rules::check(&request.filter)
        {
            return Err(invalid("filter", format!("invalid CEL: {reason}")).into());
        }
        let after = super::parse_page_token(&request.page_token)?;
        let (page, next) = self
            .contacts
            .list(&request.filter, after.as_deref(), page_size(request.page_size))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListContactsResponse {
            contacts: page.iter().map(Self::versioned_to_proto).collect(),
            next_page_token: next.map(|cursor| super::page_token(&cursor)).unwrap_or_default(),
        }))
    }
}

#[tonic::async_trait]
impl SegmentService for ContactApi {
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let request = request.into_inner();
        let Some(proto) = request.segment else {
            return Err(invalid("segment", "is required").into());
        };
        let mut v = Violations::default();
        let id =
            if request.segment_id.is_empty() { new_id("seg") } else { request.segment_id.clone() };
        check_id(&mut v, "segment_id", &id);
        Self::check_segment(&proto, &mut v);
        v.check()?;
        let now = now_ms();
        let segment = Segment {
            description: proto.description,
            filter: proto.filter,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let stored = self.segments.create(&id, &segment).await.map_err(ApiError::from)?;
        Ok(Response::new(Self::segment_to_proto(&stored)))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let id = request.into_inner().id;
        let mut v = Violations::default();
        check_id(&mut v, "id", &id);
        v.check()?;
        let stored = self.segments.get(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(Self::segment_to_proto(&stored)))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let request = request.into_inner();
        let (items, next_page_token) =
            super::list_page(&self.segments, &request.page_token, request.page_size).await?;
        Ok(Response::new(pb::ListSegmentsResponse {
            segments: items.iter().map(Self::segment_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let request = request.into_inner();
        let Some(proto) = request.segment else {
            return Err(invalid("segment", "is required").into());
        };
        let mut v = Violations::default();
        check_id(&mut v, "segment.id", &proto.id);
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        for path in &paths {
            if !["description", "filter"].contains(&path.as_str()) {
                v.add("update_mask", format!("{path} is not a writable field"));
            }
        }
        v.check()?;
        let etag = parse_etag("etag", &request.etag)?;
        let named = |f: &str| paths.is_empty() || paths.iter().any(|p| p == f);
        loop {
            let current = self.segments.get(&proto.id).await.map_err(ApiError::from)?;
            if etag.is_some_and(|e| e != current.revision) {
                return Err(ApiError::FailedPrecondition(format!(
                    "segment {} changed since etag {e} was read",
                    proto.id,
                    e = request.etag
                ))
                .into());
            }
            let mut merged = Self::segment_to_proto(&current);
            if named("description") {
                merged.description = proto.description.clone();
            }
            if named("filter") {
                merged.filter = proto.filter.clone();
            }
            let mut v = Violations::default();
            Self::check_segment(&merged, &mut v);
            v.check()?;
            let segment = Segment {
                description: merged.description,
                filter: merged.filter,
                created_at_ms: current.value.created_at_ms,
                updated_at_ms: now_ms(),
            };
            match self.segments.replace(&proto.id, &segment, current.revision).await {
                Ok(stored) => return Ok(Response::new(Self::segment_to_proto(&stored))),
                Err(DefsError::Conflict { .. }) if etag.is_none() => continue,
                Err(error) => return Err(ApiError::from(error).into()),
            }
        }
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        check_id(&mut v, "id", &request.id);
        v.check()?;
        let etag = parse_etag("etag", &request.etag)?;
        let user = tidings_scheduler::app::campaigns::segment_user(&self.campaigns, &request.id)
            .await
            .map_err(ApiError::from)?;
        if let Some(user) = user {
            return Err(ApiError::FailedPrecondition(format!(
                "segment {} is used by campaign {user}; archive the campaign first",
                request.id
            ))
            .into());
        }
        self.segments.delete(&request.id, etag).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }

    async fn count_segment(
        &self,
        request: Request<pb::CountSegmentRequest>,
    ) -> Result<Response<pb::CountSegmentResponse>, Status> {
        let id = request.into_inner().id;
        let segment = self.segments.get(&id).await.map_err(ApiError::from)?;
        let (count, total, _) = self.members(&segment.value.filter, 0).await?;
        Ok(Response::new(pb::CountSegmentResponse { count, total }))
    }

    async fn preview_segment(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> Result<Response<pb::PreviewSegmentResponse>, Status> {
        let request = request.into_inner();
        let size = match request.sample_size {
            0 => 10,
            n if n <= 100 => n as usize,
            _ => return Err(invalid("sample_size", "must be at most 100").into()),
        };
        let segment = self.segments.get(&request.id).await.map_err(ApiError::from)?;
        let (_, _, contacts) = self.members(&segment.value.filter, size).await?;
        Ok(Response::new(pb::PreviewSegmentResponse { contacts }))
    }
}
