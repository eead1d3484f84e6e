//! The typed client other services use to talk to Tidings.
//!
//! Each service has its generated client (for example [`WebhookServiceClient`]); the messages
//! live in [`v1`]. Receivers verify the webhooks Tidings sends with [`webhook::Verifier`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tidings_client::{WebhookServiceClient, v1::ListWebhooksRequest};
//! let mut webhooks = WebhookServiceClient::connect("http://127.0.0.1:50051").await?;
//! let page = webhooks.list_webhooks(ListWebhooksRequest::default()).await?.into_inner();
//! println!("{} webhooks", page.webhooks.len());
//! # Ok(()) }
//! ```

pub mod webhook;

pub use prost_types;
pub use tidings_api::v1;
pub use tidings_api::v1::campaign_service_client::CampaignServiceClient;
pub use tidings_api::v1::cluster_service_client::ClusterServiceClient;
pub use tidings_api::v1::contact_service_client::ContactServiceClient;
pub use tidings_api::v1::delivery_service_client::DeliveryServiceClient;
pub use tidings_api::v1::event_service_client::EventServiceClient;
pub use tidings_api::v1::segment_service_client::SegmentServiceClient;
pub use tidings_api::v1::token_service_client::TokenServiceClient;
pub use tidings_api::v1::webhook_service_client::WebhookServiceClient;
pub use tonic;
