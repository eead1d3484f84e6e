//! The application layer: what the adapters (the gRPC services, the console) call. Each call
//! takes validated domain values and returns domain values or a [`crate::state::StateError`];
//! the adapters only convert and map errors.
//!
//! - [`ingest`]: events, interactions and requests to deliver again, into the inboxes;
//! - [`campaigns`]: the campaign life cycle (activate, pause, archive, edits that start a new
//!   interval chain);
//! - [`contacts`]: contacts with optimistic concurrency, imports, and audience evaluation;
//! - [`deliveries`]: deliveries by id, filtered pages, a live stream, redelivery;
//! - [`runs`]: runs started, read with their counters, paused, resumed and cancelled.

pub mod campaigns;
pub mod contacts;
pub mod deliveries;
pub mod ingest;
pub mod runs;

pub use campaigns::{CampaignError, Campaigns};
pub use contacts::{ContactError, Contacts};
pub use deliveries::{Deliveries, DeliveryError, DeliveryFilter};
pub use ingest::{Ingest, Publish, Published, sweep_idempotency_keys};
pub use runs::{RunError, Runs};
