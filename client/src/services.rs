//! One handle per service of the API. Each wraps the generated client over the shared
//! transport, retries what is safe to retry, and turns listings and watches into streams.

use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};

use crate::v1::{self, *};
use crate::{
    CampaignServiceClient, Client, ClusterServiceClient, ContactServiceClient,
    DeliveryServiceClient, Error, EventServiceClient, List, Page, SegmentServiceClient,
    TokenServiceClient, WebhookServiceClient, idempotency_key, request,
};

/// Largest response accepted: a page of 1,000 deliveries with their attempts runs to tens of
/// megabytes, well past tonic's default of 4 MiB.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Runs one unary call of a generated client through [`Client::call`].
macro_rules! unary {
    ($client:expr, safe = $safe:expr, $service:ident :: $method:ident ( $message:expr )) => {{
        let message = $message;
        $client
            .call($safe, |transport, timeout| {
                let message = message.clone();
                async move {
                    $service::new(transport)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .$method(request(message, timeout))
                        .await
                }
            })
            .await
    }};
}

/// Returns a listing whose pages come from one list call: `$build(token, size)` makes the
/// request, `$items` names the repeated field of the response.
macro_rules! listing {
    ($client:expr, $service:ident :: $method:ident, $items:ident, $build:expr) => {{
        let client = $client.clone();
        let build = $build;
        List::new(move |page_token: String, page_size: u32| {
            let client = client.clone();
            let message = build(page_token, page_size);
            async move {
                let response = unary!(client, safe = true, $service::$method(message))?;
                Ok(Page { items: response.$items, next_page_token: response.next_page_token })
            }
            .boxed()
        })
    }};
}

fn mask(fields: impl IntoIterator<Item = impl Into<String>>) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: fields.into_iter().map(Into::into).collect() })
}

fn watch<T>(
    stream: tonic::codec::Streaming<T>,
) -> impl Stream<Item = Result<T, Error>> + Send + 'static
where
    T: Send + 'static,
{
    stream.map(|item| item.map_err(Error::from))
}

/// Webhooks: endpoints and how to call them.
#[derive(Debug, Clone)]
pub struct Webhooks {
    client: Client,
}

impl Webhooks {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates a webhook with a generated id. The response carries the signing secret when
    /// Tidings generated it.
    pub async fn create(&self, webhook: Webhook) -> Result<Webhook, Error> {
        self.create_with_id("", webhook).await
    }

    /// Creates a webhook with the given id.
    pub async fn create_with_id(
        &self,
        id: impl Into<String>,
        webhook: Webhook,
    ) -> Result<Webhook, Error> {
        let message = CreateWebhookRequest { webhook: Some(webhook), webhook_id: id.into() };
        unary!(self.client, safe = false, WebhookServiceClient::create_webhook(message))
    }

    /// Returns a webhook.
    pub async fn get(&self, id: impl Into<String>) -> Result<Webhook, Error> {
        let message = GetWebhookRequest { id: id.into() };
        unary!(self.client, safe = true, WebhookServiceClient::get_webhook(message))
    }

    /// Lists the webhooks in id order.
    pub fn list(&self) -> List<Webhook> {
        listing!(
            self.client,
            WebhookServiceClient::list_webhooks,
            webhooks,
            |page_token, page_size| { ListWebhooksRequest { page_size, page_token } }
        )
    }

    /// Changes the named fields (for example `["url", "headers"]`) to their values in
    /// `webhook`. A non-empty `webhook.etag` (as returned by [`get`](Self::get)) makes the
    /// update fail with [`Error::Conflict`] when the webhook changed since.
    pub async fn update(
        &self,
        webhook: Webhook,
        fields: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Webhook, Error> {
        let etag = webhook.etag.clone();
        let message =
            UpdateWebhookRequest { webhook: Some(webhook), update_mask: mask(fields), etag };
        unary!(self.client, safe = false, WebhookServiceClient::update_webhook(message))
    }

    /// Deletes a webhook.
    pub async fn delete(&self, id: impl Into<String>) -> Result<(), Error> {
        let message = DeleteWebhookRequest { id: id.into(), etag: String::new() };
        unary!(self.client, safe = false, WebhookServiceClient::delete_webhook(message)).map(drop)
    }

    /// Adds a generated signing secret; the previous ones keep signing for `grace_period`.
    pub async fn rotate_signing_secret(
        &self,
        id: impl Into<String>,
        grace_period: Duration,
    ) -> Result<RotateSigningSecretResponse, Error> {
        let message = RotateSigningSecretRequest {
            id: id.into(),
            signing_secret: String::new(),
            grace_period: Some(prost_types::Duration {
                seconds: i64::try_from(grace_period.as_secs()).unwrap_or(i64::MAX),
                nanos: grace_period.subsec_nanos() as i32,
            }),
        };
        unary!(self.client, safe = false, WebhookServiceClient::rotate_signing_secret(message))
    }

    /// Sends one test request now with a sample payload, and returns it with the attempt.
    pub async fn send_test(&self, id: impl Into<String>) -> Result<SendTestResponse, Error> {
        let message = SendTestRequest { id: id.into(), ..Default::default() };
        unary!(self.client, safe = false, WebhookServiceClient::send_test(message))
    }

    /// Returns the generated client over the shared transport, for calls with every option.
    pub fn raw(&self) -> WebhookServiceClient<crate::Transport> {
        WebhookServiceClient::new(self.client.transport()).max_decoding_message_size(MAX_MESSAGE)
    }
}

/// Segments: named audiences.
#[derive(Debug, Clone)]
pub struct Segments {
    client: Client,
}

impl Segments {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates a segment with a generated id.
    pub async fn create(&self, segment: Segment) -> Result<Segment, Error> {
        self.create_with_id("", segment).await
    }

    /// Creates a segment with the given id.
    pub async fn create_with_id(
        &self,
        id: impl Into<String>,
        segment: Segment,
    ) -> Result<Segment, Error> {
        let message = CreateSegmentRequest { segment: Some(segment), segment_id: id.into() };
        unary!(self.client, safe = false, SegmentServiceClient::create_segment(message))
    }

    /// Returns a segment.
    pub async fn get(&self, id: impl Into<String>) -> Result<Segment, Error> {
        let message = GetSegmentRequest { id: id.into() };
        unary!(self.client, safe = true, SegmentServiceClient::get_segment(message))
    }

    /// Lists the segments in id order.
    pub fn list(&self) -> List<Segment> {
        listing!(
            self.client,
            SegmentServiceClient::list_segments,
            segments,
            |page_token, page_size| { ListSegmentsRequest { page_size, page_token } }
        )
    }

    /// Changes the named fields; a non-empty `segment.etag` guards against concurrent changes.
    pub async fn update(
        &self,
        segment: Segment,
        fields: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Segment, Error> {
        let etag = segment.etag.clone();
        let message =
            UpdateSegmentRequest { segment: Some(segment), update_mask: mask(fields), etag };
        unary!(self.client, safe = false, SegmentServiceClient::update_segment(message))
    }

    /// Deletes a segment.
    pub async fn delete(&self, id: impl Into<String>) -> Result<(), Error> {
        let message = DeleteSegmentRequest { id: id.into(), etag: String::new() };
        unary!(self.client, safe = false, SegmentServiceClient::delete_segment(message)).map(drop)
    }

    /// Counts the contacts in a segment.
    pub async fn count(&self, id: impl Into<String>) -> Result<CountSegmentResponse, Error> {
        let message = CountSegmentRequest { id: id.into() };
        unary!(self.client, safe = true, SegmentServiceClient::count_segment(message))
    }

    /// Returns up to `sample_size` contacts of a segment.
    pub async fn preview(
        &self,
        id: impl Into<String>,
        sample_size: u32,
    ) -> Result<Vec<Contact>, Error> {
        let message = PreviewSegmentRequest { id: id.into(), sample_size };
        unary!(self.client, safe = true, SegmentServiceClient::preview_segment(message))
            .map(|response| response.contacts)
    }
}

/// Campaigns and their runs.
#[derive(Debug, Clone)]
pub struct Campaigns {
    client: Client,
}

impl Campaigns {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates a draft campaign with a generated id.
    pub async fn create(&self, campaign: Campaign) -> Result<Campaign, Error> {
        self.create_with_id("", campaign).await
    }

    /// Creates a draft campaign with the given id.
    pub async fn create_with_id(
        &self,
        id: impl Into<String>,
        campaign: Campaign,
    ) -> Result<Campaign, Error> {
        let message = CreateCampaignRequest { campaign: Some(campaign), campaign_id: id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::create_campaign(message))
    }

    /// Returns a campaign.
    pub async fn get(&self, id: impl Into<String>) -> Result<Campaign, Error> {
        let message = GetCampaignRequest { id: id.into() };
        unary!(self.client, safe = true, CampaignServiceClient::get_campaign(message))
    }

    /// Lists the campaigns in id order; only those in `state` unless it is unspecified.
    pub fn list(&self, state: CampaignState) -> List<Campaign> {
        listing!(
            self.client,
            CampaignServiceClient::list_campaigns,
            campaigns,
            move |page_token, page_size| ListCampaignsRequest {
                state: state as i32,
                page_size,
                page_token
            }
        )
    }

    /// Changes the named fields; a non-empty `campaign.etag` guards against concurrent changes.
    pub async fn update(
        &self,
        campaign: Campaign,
        fields: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Campaign, Error> {
        let etag = campaign.etag.clone();
        let message =
            UpdateCampaignRequest { campaign: Some(campaign), update_mask: mask(fields), etag };
        unary!(self.client, safe = false, CampaignServiceClient::update_campaign(message))
    }

    /// Deletes a campaign.
    pub async fn delete(&self, id: impl Into<String>) -> Result<(), Error> {
        let message = DeleteCampaignRequest { id: id.into(), etag: String::new() };
        unary!(self.client, safe = false, CampaignServiceClient::delete_campaign(message)).map(drop)
    }

    /// Activates a campaign: its trigger starts firing.
    pub async fn activate(&self, id: impl Into<String>) -> Result<Campaign, Error> {
        let message = ActivateCampaignRequest { id: id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::activate_campaign(message))
    }

    /// Pauses a campaign.
    pub async fn pause(&self, id: impl Into<String>) -> Result<Campaign, Error> {
        let message = PauseCampaignRequest { id: id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::pause_campaign(message))
    }

    /// Archives a campaign.
    pub async fn archive(&self, id: impl Into<String>) -> Result<Campaign, Error> {
        let message = ArchiveCampaignRequest { id: id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::archive_campaign(message))
    }

    /// Starts a run of a campaign now.
    pub async fn run(&self, id: impl Into<String>) -> Result<Run, Error> {
        self.run_with(RunCampaignRequest { id: id.into(), ..Default::default() }).await
    }

    /// Starts or schedules a run with every option. The client sets an idempotency key when
    /// the request has none, so a retried call starts one run.
    pub async fn run_with(&self, mut message: RunCampaignRequest) -> Result<Run, Error> {
        if message.idempotency_key.is_empty() {
            message.idempotency_key = idempotency_key();
        }
        unary!(self.client, safe = true, CampaignServiceClient::run_campaign(message))
    }

    /// Returns a run.
    pub async fn get_run(
        &self,
        campaign_id: impl Into<String>,
        run_id: impl Into<String>,
    ) -> Result<Run, Error> {
        let message = GetRunRequest { campaign_id: campaign_id.into(), run_id: run_id.into() };
        unary!(self.client, safe = true, CampaignServiceClient::get_run(message))
    }

    /// Lists the runs of a campaign, newest first.
    pub fn runs(&self, campaign_id: impl Into<String>) -> List<Run> {
        let campaign_id = campaign_id.into();
        listing!(
            self.client,
            CampaignServiceClient::list_runs,
            runs,
            move |page_token, page_size| {
                ListRunsRequest { campaign_id: campaign_id.clone(), page_size, page_token }
            }
        )
    }

    /// Follows a run: its state now, then each change until it ends.
    pub async fn watch_run(
        &self,
        campaign_id: impl Into<String>,
        run_id: impl Into<String>,
    ) -> Result<impl Stream<Item = Result<Run, Error>> + Send + 'static, Error> {
        let message = WatchRunRequest { campaign_id: campaign_id.into(), run_id: run_id.into() };
        let mut service = CampaignServiceClient::new(self.client.transport())
            .max_decoding_message_size(MAX_MESSAGE);
        Ok(watch(service.watch_run(message).await?.into_inner()))
    }

    /// Pauses a run.
    pub async fn pause_run(
        &self,
        campaign_id: impl Into<String>,
        run_id: impl Into<String>,
    ) -> Result<Run, Error> {
        let message = PauseRunRequest { campaign_id: campaign_id.into(), run_id: run_id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::pause_run(message))
    }

    /// Resumes a paused run.
    pub async fn resume_run(
        &self,
        campaign_id: impl Into<String>,
        run_id: impl Into<String>,
    ) -> Result<Run, Error> {
        let message = ResumeRunRequest { campaign_id: campaign_id.into(), run_id: run_id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::resume_run(message))
    }

    /// Cancels a run.
    pub async fn cancel_run(
        &self,
        campaign_id: impl Into<String>,
        run_id: impl Into<String>,
    ) -> Result<Run, Error> {
        let message = CancelRunRequest { campaign_id: campaign_id.into(), run_id: run_id.into() };
        unary!(self.client, safe = false, CampaignServiceClient::cancel_run(message))
    }

    /// Renders the requests a run would send to a sample of its audience, sending nothing.
    pub async fn preview(
        &self,
        id: impl Into<String>,
        sample_size: u32,
    ) -> Result<PreviewCampaignResponse, Error> {
        let message = PreviewCampaignRequest { id: id.into(), sample_size, event_data: None };
        unary!(self.client, safe = true, CampaignServiceClient::preview_campaign(message))
    }
}

/// Contacts: who campaigns send to.
#[derive(Debug, Clone)]
pub struct Contacts {
    client: Client,
}

impl Contacts {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates or replaces a contact.
    pub async fn upsert(&self, contact: Contact) -> Result<Contact, Error> {
        let message = UpsertContactRequest { contact: Some(contact), etag: String::new() };
        unary!(self.client, safe = true, ContactServiceClient::upsert_contact(message))
    }

    /// Upserts contacts streamed in batches; returns how many were upserted and which were
    /// rejected, by index in the whole stream. Not retried: a stream cannot be replayed.
    pub async fn batch_upsert(
        &self,
        batches: impl Stream<Item = Vec<Contact>> + Send + 'static,
    ) -> Result<BatchUpsertContactsResponse, Error> {
        let mut service = ContactServiceClient::new(self.client.transport())
            .max_decoding_message_size(MAX_MESSAGE);
        let requests = batches.map(|contacts| BatchUpsertContactsRequest { contacts });
        Ok(service.batch_upsert_contacts(requests).await?.into_inner())
    }

    /// Returns a contact.
    pub async fn get(&self, id: impl Into<String>) -> Result<Contact, Error> {
        let message = GetContactRequest { id: id.into() };
        unary!(self.client, safe = true, ContactServiceClient::get_contact(message))
    }

    /// Deletes a contact.
    pub async fn delete(&self, id: impl Into<String>) -> Result<(), Error> {
        let message = DeleteContactRequest { id: id.into() };
        unary!(self.client, safe = true, ContactServiceClient::delete_contact(message)).map(drop)
    }

    /// Lists the contacts matching a CEL `filter` (all when empty) in id order.
    pub fn list(&self, filter: impl Into<String>) -> List<Contact> {
        let filter = filter.into();
        listing!(
            self.client,
            ContactServiceClient::list_contacts,
            contacts,
            move |page_token, page_size| {
                ListContactsRequest { filter: filter.clone(), page_size, page_token }
            }
        )
    }
}

/// Events and interactions.
#[derive(Debug, Clone)]
pub struct Events {
    client: Client,
}

impl Events {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Publishes one event; when this returns, the event is durable. The client sets an
    /// idempotency key when the event has none, so a retried call publishes it once.
    pub async fn publish(&self, mut event: Event) -> Result<PublishResponse, Error> {
        if event.idempotency_key.is_empty() {
            event.idempotency_key = idempotency_key();
        }
        let message = PublishRequest { event: Some(event) };
        unary!(self.client, safe = true, EventServiceClient::publish(message))
    }

    /// Publishes up to 1,000 events, each validated on its own; idempotency keys are set as by
    /// [`publish`](Self::publish).
    pub async fn publish_batch(&self, mut events: Vec<Event>) -> Result<Vec<PublishResult>, Error> {
        for event in &mut events {
            if event.idempotency_key.is_empty() {
                event.idempotency_key = idempotency_key();
            }
        }
        let message = PublishBatchRequest { events };
        unary!(self.client, safe = true, EventServiceClient::publish_batch(message))
            .map(|response| response.results)
    }

    /// Records what a contact did with a delivery (`opened`, `clicked`, …).
    pub async fn record_interaction(
        &self,
        delivery_id: impl Into<String>,
        kind: impl Into<String>,
    ) -> Result<(), Error> {
        let message = RecordInteractionRequest {
            delivery_id: delivery_id.into(),
            kind: kind.into(),
            ..Default::default()
        };
        unary!(self.client, safe = false, EventServiceClient::record_interaction(message)).map(drop)
    }
}

/// Deliveries: what was sent where, attempt by attempt.
#[derive(Debug, Clone)]
pub struct Deliveries {
    client: Client,
}

impl Deliveries {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Returns a delivery with its attempts.
    pub async fn get(&self, id: impl Into<String>) -> Result<Delivery, Error> {
        let message = GetDeliveryRequest { id: id.into() };
        unary!(self.client, safe = true, DeliveryServiceClient::get_delivery(message))
    }

    /// Lists the deliveries matching `filter`.
    pub fn list(&self, filter: DeliveryFilter) -> List<Delivery> {
        listing!(
            self.client,
            DeliveryServiceClient::list_deliveries,
            deliveries,
            move |page_token, page_size| ListDeliveriesRequest {
                filter: Some(filter.clone()),
                page_size,
                page_token
            }
        )
    }

    /// Queues a finished delivery for another round of attempts.
    pub async fn redeliver(&self, id: impl Into<String>) -> Result<Delivery, Error> {
        let message = RedeliverRequest { id: id.into() };
        unary!(self.client, safe = false, DeliveryServiceClient::redeliver(message))
    }

    /// Queues every failed delivery of a webhook created in `[start, end)` again; returns how
    /// many.
    pub async fn redeliver_failed(&self, message: RedeliverFailedRequest) -> Result<u64, Error> {
        unary!(self.client, safe = false, DeliveryServiceClient::redeliver_failed(message))
            .map(|response| response.queued)
    }

    /// Follows the deliveries matching `filter` as they change.
    pub async fn watch(
        &self,
        filter: DeliveryFilter,
    ) -> Result<impl Stream<Item = Result<Delivery, Error>> + Send + 'static, Error> {
        let message = WatchDeliveriesRequest { filter: Some(filter) };
        let mut service = DeliveryServiceClient::new(self.client.transport())
            .max_decoding_message_size(MAX_MESSAGE);
        Ok(watch(service.watch_deliveries(message).await?.into_inner()))
    }
}

/// The nodes of the cluster and the partitions they own.
#[derive(Debug, Clone)]
pub struct Cluster {
    client: Client,
}

impl Cluster {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Returns the live nodes.
    pub async fn nodes(&self) -> Result<Vec<v1::Node>, Error> {
        unary!(self.client, safe = true, ClusterServiceClient::list_nodes(ListNodesRequest {}))
            .map(|response| response.nodes)
    }

    /// Returns every partition with its owner and backlog.
    pub async fn partitions(&self) -> Result<Vec<Partition>, Error> {
        let message = ListPartitionsRequest {};
        unary!(self.client, safe = true, ClusterServiceClient::list_partitions(message))
            .map(|response| response.partitions)
    }
}

/// API tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    client: Client,
}

impl Tokens {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates a token; the response holds its secret, shown this once.
    pub async fn create(&self, message: CreateTokenRequest) -> Result<CreateTokenResponse, Error> {
        unary!(self.client, safe = false, TokenServiceClient::create_token(message))
    }

    /// Lists the tokens.
    pub fn list(&self) -> List<Token> {
        listing!(self.client, TokenServiceClient::list_tokens, tokens, |page_token, page_size| {
            ListTokensRequest { page_size, page_token }
        })
    }

    /// Revokes a token.
    pub async fn revoke(&self, id: impl Into<String>) -> Result<Token, Error> {
        let message = RevokeTokenRequest { id: id.into() };
        unary!(self.client, safe = false, TokenServiceClient::revoke_token(message))
    }
}
