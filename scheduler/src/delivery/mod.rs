//! Sending webhooks.
//!
//! - [`render`]: Liquid rendering of URL, headers and body, bounded;
//! - [`signing`]: Standard Webhooks signatures, one per active secret;
//! - [`retry`]: which outcomes are retried, and when;
//! - [`ssrf`]: the outbound address guard;
//! - [`record`]: the delivery record and its attempt log;
//! - [`dispatch`]: the HTTP sender with limits and circuits;
//! - [`pulse`]: the last hour of this node's attempts, for the console.

mod credentials;
pub mod dispatch;
pub mod pulse;
pub mod record;
pub mod render;
pub mod retry;
pub mod signing;
pub mod ssrf;
