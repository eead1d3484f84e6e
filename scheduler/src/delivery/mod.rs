//! Sending webhooks.
//!
//! - [`render`]: Liquid rendering of URL, headers and body, bounded;
//! - [`signing`]: Standard Webhooks signatures, one per active secret;
//! - [`retry`]: which outcomes are retried, and when;
//! - [`ssrf`]: the outbound address guard;
//! - [`record`]: the delivery record and its attempt log;
//! - [`dispatch`]: the HTTP sender with limits and circuits.

mod credentials;
pub mod dispatch;
pub mod record;
pub mod render;
pub mod retry;
pub mod signing;
pub mod ssrf;
