//! The webhook definition: one HTTP endpoint and how to call it.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secrets::{Cipher, Sealed, Secret};

/// The default retry delays in milliseconds: 0 s, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
pub const DEFAULT_RETRY_DELAYS_MS: [u64; 8] =
    [0, 5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000];

/// The default jitter: ±20 %.
pub const DEFAULT_JITTER: f64 = 0.2;

/// The default timeout of one attempt.
pub const DEFAULT_TIMEOUT_MS: u64 = 15_000;

/// The default most requests in flight per node.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;

/// HTTP methods a webhook may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
    /// GET.
    Get,
}

impl Method {
    /// Returns the method's name as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Get => "GET",
        }
    }
}

/// A header value: plain, or a credential encrypted at rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderValue {
    /// A template in clear.
    Plain(String),
    /// A sealed credential.
    Secret(Sealed),
}

/// One extra request header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The name, as given.
    pub name: String,
    /// The value.
    pub value: HeaderValue,
}

/// How failed attempts are retried.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay before each retry, in milliseconds.
    pub delays_ms: Vec<u64>,
    /// Random spread of each delay, as a fraction.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { delays_ms: DEFAULT_RETRY_DELAYS_MS.to_vec(), jitter: DEFAULT_JITTER }
    }
}

/// A Standard Webhooks signing secret, sealed, with what may be shown of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningSecret {
    /// Stable, non-reversible identifier (a hash prefix).
    pub id: String,
    /// The first characters, for recognising it.
    pub hint: String,
    /// The secret itself.
    pub sealed: Sealed,
    /// When it was added, in Unix milliseconds.
    pub created_at_ms: i64,
    /// When it stops signing, in Unix milliseconds; `None` for the current secret.
    pub expires_at_ms: Option<i64>,
}

impl SigningSecret {
    /// Seals a clear `whsec_` secret.
    pub fn seal(cipher: &Cipher, secret: &Secret, now_ms: i64) -> Self {
        let digest = Sha256::digest(secret.expose().as_bytes());
        let id =
            format!("sk_{}", digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>());
        let hint: String = secret.expose().chars().take(10).collect();
        Self { id, hint, sealed: cipher.seal(secret), created_at_ms: now_ms, expires_at_ms: None }
    }
}

/// Returns a new random signing secret: `whsec_` + base64 of 32 bytes.
pub fn generate_signing_secret() -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(format!("whsec_{}", STANDARD.encode(bytes)))
}

/// Checks the form of a signing secret: `whsec_` + base64 of 24 to 64 bytes.
pub fn check_signing_secret(secret: &str) -> Result<(), &'static str> {
    let encoded = secret.strip_prefix("whsec_").ok_or("must start with whsec_")?;
    let bytes = STANDARD.decode(encoded).map_err(|_| "must be whsec_ followed by base64")?;
    if !(24..=64).contains(&bytes.len()) {
        return Err("must encode 24 to 64 bytes");
    }
    Ok(())
}

/// OAuth 2.0 client credentials of a webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OAuth2 {
    /// Token endpoint.
    pub token_url: String,
    /// Client identifier.
    pub client_id: String,
    /// Client secret, sealed.
    pub client_secret: Sealed,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// `audience` parameter, when not empty.
    pub audience: String,
}

/// A client certificate of a webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientCertificate {
    /// PEM chain.
    pub certificate_pem: String,
    /// PEM private key, sealed.
    pub private_key: Sealed,
}

/// Checks that `certificate_pem` holds a PEM certificate chain and `key_pem` its key.
pub fn check_client_certificate(certificate_pem: &str, key_pem: &str) -> bool {
    let pem = format!("{}\n{}", certificate_pem.trim_end(), key_pem);
    reqwest::Identity::from_pem(pem.as_bytes()).is_ok()
}

/// A webhook as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// Free text.
    pub description: String,
    /// URL template.
    pub url: String,
    /// HTTP method.
    pub method: Method,
    /// Extra headers.
    pub headers: Vec<Header>,
    /// Body template.
    pub body: String,
    /// Content type of the body.
    pub content_type: String,
    /// Timeout of one attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Retry schedule.
    pub retry: RetryPolicy,
    /// Cluster-wide requests per second; 0 for no limit.
    pub rate_limit: f64,
    /// Requests in flight per node.
    pub max_in_flight: u32,
    /// Signing secrets, newest first.
    pub signing_secrets: Vec<SigningSecret>,
    /// Whether deliveries are sent.
    pub enabled: bool,
    /// Why Tidings disabled it.
    pub disabled_reason: String,
    /// When it was last disabled, in Unix milliseconds.
    pub disabled_at_ms: Option<i64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Last change, Unix milliseconds.
    pub updated_at_ms: i64,
    /// OAuth 2.0 client credentials.
    #[serde(default)]
    pub oauth2: Option<OAuth2>,
    /// Client certificate for mutual TLS.
    #[serde(default)]
    pub client_certificate: Option<ClientCertificate>,
}

/// Returns the origin (`scheme://host:port`) of a URL or URL template, or `None` when the part
/// before its path is not plain text or not a valid origin. Templates may shape the path and
/// query only, so a webhook's requests all go to this origin.
pub fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || crate::template::has_markup(authority) {
        return None;
    }
    let parsed = reqwest::Url::parse(&format!("{scheme}://{authority}/")).ok()?;
    parsed.host_str()?;
    Some(parsed.origin().ascii_serialization())
}

#[cfg(test)]
mod origin_tests {
    use super::origin;

    #[test]
    fn the_origin_is_the_text_before_the_path() {
        assert_eq!(
            origin("https://api.example.com/v1/{{ contact.id }}").as_deref(),
            Some("https://api.example.com")
        );
        assert_eq!(
            origin("HTTPS://API.example.com:443?x={{ y }}").as_deref(),
            Some("https://api.example.com")
        );
        assert_eq!(origin("http://example.com:8080").as_deref(), Some("http://example.com:8080"));
        assert_eq!(origin("https://{{ event.data.host }}/x"), None);
        assert_eq!(origin("https://example.com{{ event.data.suffix }}/x"), None);
        assert_eq!(origin("https://user:{{ x }}@example.com/"), None);
    }
}
