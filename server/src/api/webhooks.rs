//! WebhookService: validation, proto <-> domain mapping, and the calls over the definitions.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tidings_api::v1 as pb;
use tidings_api::v1::webhook_service_server::WebhookService;
use tidings_scheduler::campaign::Campaign;
use tidings_scheduler::defs::{Definitions, DefsError, Versioned};
use tidings_scheduler::secrets::{Cipher, Secret};
use tidings_scheduler::template::{Templates, has_markup};
use tidings_scheduler::webhook::{
    ClientCertificate, DEFAULT_MAX_IN_FLIGHT, DEFAULT_TIMEOUT_MS, Header, HeaderValue, Method,
    OAuth2, RetryPolicy, SigningSecret, Webhook, check_signing_secret, generate_signing_secret,
};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::convert::{duration, duration_ms, struct_to_json, timestamp};
use super::{ApiError, Violations, check_id, invalid, new_id, parse_etag};
use tidings_scheduler::delivery::dispatch::Dispatcher;
use tidings_scheduler::delivery::record::{Delivery, Origin};
use tidings_scheduler::delivery::render::{self, Context};

const MAX_URL: usize = 2048;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_NAME: usize = 256;
const MAX_HEADER_VALUE: usize = 8 * 1024;
const MAX_BODY: usize = 256 * 1024;
const MAX_DESCRIPTION: usize = 1024;
const MIN_TIMEOUT_MS: u64 = 100;
const MAX_TIMEOUT_MS: u64 = 120_000;
const MAX_RETRIES: usize = 20;
const MAX_RETRY_DELAY_MS: u64 = 24 * 3600 * 1000;
const MAX_JITTER: f64 = 0.5;
const MAX_RATE_LIMIT: f64 = 100_000.0;
/// Smallest non-zero rate limit: one request a day is below it (about 0.0000116 per second).
const MIN_RATE_LIMIT: f64 = 0.001;
const MAX_IN_FLIGHT: u32 = 10_000;
const MAX_LABELS: usize = 32;
const MAX_GRACE_MS: u64 = 7 * 24 * 3600 * 1000;
const DEFAULT_GRACE_MS: u64 = 24 * 3600 * 1000;

/// Headers Tidings sets itself; a webhook may not define them.
const RESERVED_HEADERS: [&str; 9] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
];

/// Headers whose values are credentials whatever the caller says.
const CREDENTIAL_HEADERS: [&str; 5] =
    ["authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"];

/// Fields an update mask may name.
const WRITABLE: [&str; 14] = [
    "description",
    "url",
    "method",
    "headers",
    "body",
    "content_type",
    "timeout",
    "retry_policy",
    "rate_limit",
    "max_in_flight",
    "enabled",
    "labels",
    "oauth2",
    "client_certificate",
];

/// Serves WebhookService over the webhook definitions.
pub(crate) struct WebhookApi {
    webhooks: Definitions<Webhook>,
    /// To refuse deleting a webhook a campaign still uses.
    campaigns: Definitions<Campaign>,
    cipher: Cipher,
    templates: Arc<Templates>,
    dispatcher: Dispatcher,
}

impl WebhookApi {
    pub(crate) fn new(
        webhooks: Definitions<Webhook>,
        campaigns: Definitions<Campaign>,
        cipher: Cipher,
        templates: Arc<Templates>,
        dispatcher: Dispatcher,
    ) -> Self {
        Self { webhooks, campaigns, cipher, templates, dispatcher }
    }

    async fn send_test(
        &self,
        request: pb::SendTestRequest,
        traceparent: &str,
    ) -> Result<pb::SendTestResponse, ApiError> {
        let mut violations = Violations::default();
        check_id(&mut violations, "id", &request.id);
        violations.check()?;
        let webhook = self.webhooks.get(&request.id).await?;
        let id = format!("msg_test_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let context = sample_context(request.contact.as_ref(), request.event_data.as_ref(), &id);
        let contact = context.contact.clone();
        let now = tidings_scheduler::now_ms();
        let rendered = render::request(&self.templates, &self.cipher, &webhook.value, &context);
        let origin = Origin {
            webhook_id: &request.id,
            contact_id: contact["id"].as_str().unwrap_or_default(),
            traceparent,
            ..Default::default()
        };
        let mut delivery = Delivery::new(id, 0, origin, now);
        match rendered {
            Ok(request) => delivery.request = Some(request),
            Err(reason) => delivery.reason = reason,
        }
        let (attempt, _) = self.dispatcher.send(&delivery, &webhook.value).await;
        info!(webhook = %request.id, status = attempt.status_code, "test sent");
        Ok(pb::SendTestResponse {
            request: delivery.request.as_ref().map(super::deliveries::request_to_proto),
            attempt: Some(super::deliveries::attempt_to_proto(&attempt)),
        })
    }

    /// Validates a webhook as CreateWebhook does, without storing it, and renders its request
    /// for a sample contact and event (the console's live preview). Secret header values are
    /// redacted; the signature headers are added when a request is sent.
    pub(crate) fn preview(
        &self,
        proto: &pb::Webhook,
        contact: Option<&prost_types::Struct>,
        event_data: Option<&prost_types::Struct>,
    ) -> Result<pb::RenderedRequest, ApiError> {
        let mut violations = Violations::default();
        let webhook = self.to_domain(proto, None, &mut violations);
        violations.check()?;
        let context = sample_context(contact, event_data, "msg_preview");
        let rendered = render::request(&self.templates, &self.cipher, &webhook, &context).map_err(
            |reason| {
                let field = if reason.starts_with("url") {
                    "webhook.url"
                } else if reason.starts_with("header") {
                    "webhook.headers"
                } else {
                    "webhook.body"
                };
                invalid(field, reason)
            },
        )?;
        Ok(super::deliveries::request_to_proto(&rendered))
    }

    /// Maps a proto webhook to the domain, validating every field. `existing` provides the
    /// stored values of secret headers sent back with an empty value.
    fn to_domain(
        &self,
        proto: &pb::Webhook,
        existing: Option<&Webhook>,
        violations: &mut Violations,
    ) -> Webhook {
        let now = tidings_scheduler::now_ms();
        if proto.description.chars().count() > MAX_DESCRIPTION {
            violations.add(
                "webhook.description",
                format!("must be at most {MAX_DESCRIPTION} characters"),
            );
        }
        self.check_url(&proto.url, violations);

        let method = match pb::HttpMethod::try_from(proto.method) {
            Ok(pb::HttpMethod::Unspecified | pb::HttpMethod::Post) => Method::Post,
            Ok(pb::HttpMethod::Put) => Method::Put,
            Ok(pb::HttpMethod::Patch) => Method::Patch,
            Ok(pb::HttpMethod::Delete) => Method::Delete,
            Ok(pb::HttpMethod::Get) => Method::Get,
            Err(_) => {
                violations.add("webhook.method", format!("{} is not an HTTP method", proto.method));
                Method::Post
            }
        };
        let headers = self.headers(&proto.headers, existing, violations);

        if proto.body.len() > MAX_BODY {
            violations.add("webhook.body", format!("must be at most {} KiB", MAX_BODY / 1024));
        } else if let Err(reason) = self.templates.check(&proto.body) {
            violations.add("webhook.body", format!("invalid Liquid template: {reason}"));
        }
        if method == Method::Get && !proto.body.is_empty() {
            violations.add("webhook.body", "must be empty for GET");
        }
        let content_type = if proto.content_type.is_empty() {
            "application/json".to_string()
        } else {
            if proto.content_type.len() > 256 || !header_value_ok(&proto.content_type) {
                violations.add(
                    "webhook.content_type",
                    "must be at most 256 visible characters without line breaks",
                );
            }
            proto.content_type.clone()
        };
        let timeout_ms = match &proto.timeout {
            None => DEFAULT_TIMEOUT_MS,
            Some(t) => {
                duration_ms(violations, "webhook.timeout", t, MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
                    .unwrap_or(DEFAULT_TIMEOUT_MS)
            }
        };
        let retry = self.retry(proto.retry_policy.as_ref(), violations);
        if !proto.rate_limit.is_finite()
            || proto.rate_limit < 0.0
            || (proto.rate_limit > 0.0 && proto.rate_limit < MIN_RATE_LIMIT)
            || proto.rate_limit > MAX_RATE_LIMIT
        {
            violations.add(
                "webhook.rate_limit",
                format!(
                    "must be 0 (no limit) or between {MIN_RATE_LIMIT} and {MAX_RATE_LIMIT} requests per second"
                ),
            );
        }
        if proto.max_in_flight > MAX_IN_FLIGHT {
            violations.add("webhook.max_in_flight", format!("must be at most {MAX_IN_FLIGHT}"));
        }
        let labels = check_labels(&proto.labels, violations);
        let oauth2 = self.oauth2(proto.oauth2.as_ref(), existing, violations);
        let client_certificate =
            self.client_certificate(proto.client_certificate.as_ref(), existing, violations);
        if proto.oauth2.is_some()
            && proto.headers.iter().any(|h| h.name.eq_ignore_ascii_case("authorization"))
        {
            violations.add(
                "webhook.headers",
                "Authorization is sent from oauth2's token; remove the header or oauth2",
            );
        }

        let enabled = proto.enabled.unwrap_or(true);
        let (disabled_reason, disabled_at_ms) = match existing {
            Some(old) if !enabled => {
                (old.disabled_reason.clone(), old.disabled_at_ms.or(Some(now)))
            }
            None if !enabled => (String::new(), Some(now)),
            _ => (String::new(), None),
        };

        Webhook {
            description: proto.description.clone(),
            url: proto.url.clone(),
            method,
            headers,
            body: proto.body.clone(),
            content_type,
            timeout_ms,
            retry,
            rate_limit: proto.rate_limit,
            max_in_flight: if proto.max_in_flight == 0 {
                DEFAULT_MAX_IN_FLIGHT
            } else {
                proto.max_in_flight
            },
            signing_secrets: existing.map(|w| w.signing_secrets.clone()).unwrap_or_default(),
            enabled,
            disabled_reason,
            disabled_at_ms,
            labels,
            created_at_ms: existing.map_or(now, |w| w.created_at_ms),
            updated_at_ms: now,
            oauth2,
            client_certificate,
        }
    }

    /// Maps OAuth 2.0 client credentials; an empty secret keeps the stored one.
    fn oauth2(
        &self,
        proto: Option<&pb::OAuth2ClientCredentials>,
        existing: Option<&Webhook>,
        violations: &mut Violations,
    ) -> Option<OAuth2> {
        const FIELD: &str = "webhook.oauth2";
        let proto = proto?;
        let before = violations.len();
        match url::Url::parse(&proto.token_url) {
            _ if proto.token_url.is_empty() => {
                violations.add(format!("{FIELD}.token_url"), "is required")
            }
            _ if has_markup(&proto.token_url) => {
                violations.add(format!("{FIELD}.token_url"), "must be a plain URL, without Liquid")
            }
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
            Ok(_) => violations.add(format!("{FIELD}.token_url"), "must be an http or https URL"),
            Err(error) => {
                violations.add(format!("{FIELD}.token_url"), format!("is not a valid URL: {error}"))
            }
        }
        if proto.token_url.len() > MAX_URL {
            violations
                .add(format!("{FIELD}.token_url"), format!("must be at most {MAX_URL} characters"));
        }
        if proto.client_id.is_empty() || proto.client_id.len() > 256 {
            violations.add(format!("{FIELD}.client_id"), "is required, at most 256 characters");
        }
        if proto.client_secret.len() > 4096 {
            violations.add(format!("{FIELD}.client_secret"), "must be at most 4,096 characters");
        }
        if proto.scopes.len() > 32
            || proto.scopes.iter().any(|s| s.is_empty() || s.len() > 256 || s.contains(' '))
        {
            violations.add(
                format!("{FIELD}.scopes"),
                "at most 32, each 1 to 256 characters without spaces",
            );
        }
        if proto.audience.len() > 1024 {
            violations.add(format!("{FIELD}.audience"), "must be at most 1,024 characters");
        }
        let client_secret = if proto.client_secret.is_empty() {
            match existing.and_then(|w| w.oauth2.as_ref()) {
                Some(old) => old.client_secret.clone(),
                None => {
                    violations.add(format!("{FIELD}.client_secret"), "is required");
                    return None;
                }
            }
        } else {
            self.cipher.seal(&Secret::new(proto.client_secret.clone()))
        };
        (violations.len() == before).then(|| OAuth2 {
            token_url: proto.token_url.clone(),
            client_id: proto.client_id.clone(),
            client_secret,
            scopes: proto.scopes.clone(),
            audience: proto.audience.clone(),
        })
    }

    /// Maps a client certificate; an empty key keeps the stored one.
    fn client_certificate(
        &self,
        proto: Option<&pb::ClientCertificate>,
        existing: Option<&Webhook>,
        violations: &mut Violations,
    ) -> Option<ClientCertificate> {
        const FIELD: &str = "webhook.client_certificate";
        let proto = proto?;
        if proto.certificate_pem.len() > 64 * 1024 || proto.private_key_pem.len() > 64 * 1024 {
            violations.add(FIELD, "the certificate and the key must be at most 64 KiB each");
            return None;
        }
        let key = if proto.private_key_pem.is_empty() {
            match existing.and_then(|w| w.client_certificate.as_ref()) {
                Some(old) => match self.cipher.open(&old.private_key) {
                    Ok(key) => key,
                    Err(error) => {
                        violations.add(format!("{FIELD}.private_key_pem"), error.to_string());
                        return None;
                    }
                },
                None => {
                    violations.add(format!("{FIELD}.private_key_pem"), "is required");
                    return None;
                }
            }
        } else {
            Secret::new(proto.private_key_pem.clone())
        };
        if !tidings_scheduler::webhook::check_client_certificate(
            &proto.certificate_pem,
            key.expose(),
        ) {
            violations.add(
                FIELD,
                "certificate_pem must hold a PEM certificate chain and private_key_pem its PEM key",
            );
            return None;
        }
        Some(ClientCertificate {
            certificate_pem: proto.certificate_pem.clone(),
            private_key: self.cipher.seal(&key),
        })
    }

    fn check_url(&self, url: &str, violations: &mut Violations) {
        const FIELD: &str = "webhook.url";
        if url.is_empty() {
            violations.add(FIELD, "is required");
            return;
        }
        if url.len() > MAX_URL {
            violations.add(FIELD, format!("must be at most {MAX_URL} characters"));
            return;
        }
        if let Err(reason) = self.templates.check(url) {
            violations.add(FIELD, format!("invalid Liquid template: {reason}"));
            return;
        }
        let lower = url.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"))
        else {
            violations.add(FIELD, "scheme must be http or https");
            return;
        };
        if has_markup(url) {
            if rest.starts_with('/') || rest.is_empty() {
                violations.add(FIELD, "must name a host after the scheme");
            } else if tidings_scheduler::webhook::origin(url).is_none() {
                // Event data must not choose where a webhook's credentials go.
                violations.add(
                    FIELD,
                    "scheme, host and port must be plain text: only the path and query may use Liquid",
                );
            }
            return;
        }
        match url::Url::parse(url) {
            Ok(parsed) if parsed.host_str().is_none_or(str::is_empty) => {
                violations.add(FIELD, "must name a host");
            }
            Ok(_) => {}
            Err(error) => violations.add(FIELD, format!("is not a valid URL: {error}")),
        }
    }

    fn headers(
        &self,
        headers: &[pb::Header],
        existing: Option<&Webhook>,
        violations: &mut Violations,
    ) -> Vec<Header> {
        if headers.len() > MAX_HEADERS {
            violations.add("webhook.headers", format!("must have at most {MAX_HEADERS} entries"));
            return Vec::new();
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(headers.len());
        for (i, header) in headers.iter().enumerate() {
            let field = format!("webhook.headers[{i}]");
            let lower = header.name.to_ascii_lowercase();
            if header.name.is_empty() {
                violations.add(format!("{field}.name"), "is required");
                continue;
            }
            if header.name.len() > MAX_HEADER_NAME || !header.name.bytes().all(is_token_byte) {
                violations.add(
                    format!("{field}.name"),
                    "must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~",
                );
                continue;
            }
            if RESERVED_HEADERS.contains(&lower.as_str()) {
                violations.add(
                    format!("{field}.name"),
                    format!(
                        "{} is set by Tidings{}",
                        header.name,
                        if lower == "content-type" { "; use content_type" } else { "" }
                    ),
                );
                continue;
            }
            if !seen.insert(lower.clone()) {
                violations.add(
                    format!("{field}.name"),
                    format!("{} is given more than once", header.name),
                );
                continue;
            }
            let secret = header.secret || CREDENTIAL_HEADERS.contains(&lower.as_str());
            let value = if secret && header.value.is_empty() {
                // An empty secret on update keeps the stored value.
                let kept = existing.and_then(|w| {
                    w.headers.iter().find(|h| h.name.eq_ignore_ascii_case(&header.name)).and_then(
                        |h| match &h.value {
                            HeaderValue::Secret(sealed) => {
                                Some(HeaderValue::Secret(sealed.clone()))
                            }
                            HeaderValue::Plain(_) => None,
                        },
                    )
                });
                match kept {
                    Some(value) => value,
                    None => {
                        violations
                            .add(format!("{field}.value"), "is required for a new secret header");
                        continue;
                    }
                }
            } else {
                if header.value.len() > MAX_HEADER_VALUE {
                    violations.add(
                        format!("{field}.value"),
                        format!("must be at most {} KiB", MAX_HEADER_VALUE / 1024),
                    );
                    continue;
                }
                if !header_value_ok(&header.value) {
                    violations.add(
                        format!("{field}.value"),
                        "must not contain line breaks or control characters",
                    );
                    continue;
                }
                if let Err(reason) = self.templates.check(&header.value) {
                    // The reason quotes the template, which may be a credential: leave it out.
                    let reason = if secret {
                        "invalid Liquid template".to_string()
                    } else {
                        format!("invalid Liquid template: {reason}")
                    };
                    violations.add(format!("{field}.value"), reason);
                    continue;
                }
                if secret {
                    HeaderValue::Secret(self.cipher.seal(&Secret::new(header.value.clone())))
                } else {
                    HeaderValue::Plain(header.value.clone())
                }
            };
            out.push(Header { name: header.name.clone(), value });
        }
        out
    }

    fn retry(&self, policy: Option<&pb::RetryPolicy>, violations: &mut Violations) -> RetryPolicy {
        let Some(policy) = policy else {
            return RetryPolicy::default();
        };
        let mut retry = RetryPolicy::default();
        if !policy.delays.is_empty() {
            if policy.delays.len() > MAX_RETRIES {
                violations.add(
                    "webhook.retry_policy.delays",
                    format!("must have at most {MAX_RETRIES} entries"),
                );
            } else {
                retry.delays_ms = policy
                    .delays
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| {
                        duration_ms(
                            violations,
                            &format!("webhook.retry_policy.delays[{i}]"),
                            d,
                            0,
                            MAX_RETRY_DELAY_MS,
                        )
                    })
                    .collect();
            }
        }
        if let Some(jitter) = policy.jitter {
            if !jitter.is_finite() || !(0.0..=MAX_JITTER).contains(&jitter) {
                violations.add(
                    "webhook.retry_policy.jitter",
                    format!("must be between 0 and {MAX_JITTER}"),
                );
            } else {
                retry.jitter = jitter;
            }
        }
        retry
    }

    fn to_proto(&self, webhook: &Versioned<Webhook>) -> pb::Webhook {
        let w = &webhook.value;
        pb::Webhook {
            id: webhook.id.clone(),
            description: w.description.clone(),
            url: w.url.clone(),
            method: match w.method {
                Method::Post => pb::HttpMethod::Post,
                Method::Put => pb::HttpMethod::Put,
                Method::Patch => pb::HttpMethod::Patch,
                Method::Delete => pb::HttpMethod::Delete,
                Method::Get => pb::HttpMethod::Get,
            } as i32,
            headers: w
                .headers
                .iter()
                .map(|h| match &h.value {
                    HeaderValue::Plain(value) => {
                        pb::Header { name: h.name.clone(), value: value.clone(), secret: false }
                    }
                    HeaderValue::Secret(_) => {
                        pb::Header { name: h.name.clone(), value: String::new(), secret: true }
                    }
                })
                .collect(),
            body: w.body.clone(),
            content_type: w.content_type.clone(),
            timeout: Some(duration(w.timeout_ms)),
            retry_policy: Some(pb::RetryPolicy {
                delays: w.retry.delays_ms.iter().map(|ms| duration(*ms)).collect(),
                jitter: Some(w.retry.jitter),
            }),
            rate_limit: w.rate_limit,
            max_in_flight: w.max_in_flight,
            signing_secret: String::new(),
            signing_secrets: w
                .signing_secrets
                .iter()
                .map(|s| pb::SigningSecretInfo {
                    id: s.id.clone(),
                    hint: s.hint.clone(),
                    create_time: Some(timestamp(s.created_at_ms)),
                    expire_time: s.expires_at_ms.map(timestamp),
                })
                .collect(),
            enabled: Some(w.enabled),
            disabled_reason: w.disabled_reason.clone(),
            disabled_at: w.disabled_at_ms.map(timestamp),
            labels: w.labels.clone().into_iter().collect(),
            create_time: Some(timestamp(w.created_at_ms)),
            update_time: Some(timestamp(w.updated_at_ms)),
            etag: webhook.revision.to_string(),
            oauth2: w.oauth2.as_ref().map(|o| pb::OAuth2ClientCredentials {
                token_url: o.token_url.clone(),
                client_id: o.client_id.clone(),
                client_secret: String::new(),
                scopes: o.scopes.clone(),
                audience: o.audience.clone(),
            }),
            client_certificate: w.client_certificate.as_ref().map(|c| pb::ClientCertificate {
                certificate_pem: c.certificate_pem.clone(),
                private_key_pem: String::new(),
            }),
        }
    }

    async fn create(&self, request: pb::CreateWebhookRequest) -> Result<pb::Webhook, ApiError> {
        let mut violations = Violations::default();
        let id =
            if request.webhook_id.is_empty() { new_id("wh") } else { request.webhook_id.clone() };
        check_id(&mut violations, "webhook_id", &id);
        let Some(proto) = request.webhook else {
            return Err(invalid("webhook", "is required"));
        };
        let mut webhook = self.to_domain(&proto, None, &mut violations);
        let generated = proto.signing_secret.is_empty();
        let secret = if generated {
            generate_signing_secret()
        } else {
            if let Err(reason) = check_signing_secret(&proto.signing_secret) {
                violations.add("webhook.signing_secret", reason);
            }
            Secret::new(proto.signing_secret.clone())
        };
        violations.check()?;
        webhook.signing_secrets =
            vec![SigningSecret::seal(&self.cipher, &secret, webhook.created_at_ms)];
        let stored = self.webhooks.create(&id, &webhook).await?;
        info!(webhook = %id, "webhook created");
        let mut out = self.to_proto(&stored);
        if generated {
            out.signing_secret = secret.expose().to_string();
        }
        Ok(out)
    }

    async fn update(&self, request: pb::UpdateWebhookRequest) -> Result<pb::Webhook, ApiError> {
        let Some(proto) = request.webhook else {
            return Err(invalid("webhook", "is required"));
        };
        let mut violations = Violations::default();
        check_id(&mut violations, "webhook.id", &proto.id);
        let etag = parse_etag("etag", &request.etag)?;
        let paths: Vec<String> = request.update_mask.map(|m| m.paths).unwrap_or_default();
        for path in &paths {
            let top = path.split('.').next().unwrap_or_default();
            if !WRITABLE.contains(&top) {
                violations.add("update_mask", format!("{path} is not a writable field"));
            }
        }
        violations.check()?;
        let all = paths.is_empty();
        let named = |field: &str| all || paths.iter().any(|p| p.split('.').next() == Some(field));

        // Read, merge, write with a compare on the revision read; a concurrent change without
        // a caller etag is merged again rather than lost.
        for _ in 0..5 {
            let current = self.webhooks.get(&proto.id).await?;
            if etag.is_some_and(|etag| etag != current.revision) {
                return Err(ApiError::FailedPrecondition(format!(
                    "webhook {} changed since etag {} was read (now {})",
                    proto.id, request.etag, current.revision
                )));
            }
            let mut merged = self.to_proto(&current);
            if named("description") {
                merged.description = proto.description.clone();
            }
            if named("url") {
                merged.url = proto.url.clone();
            }
            if named("method") {
                merged.method = proto.method;
            }
            if named("headers") {
                merged.headers = proto.headers.clone();
            }
            if named("body") {
                merged.body = proto.body.clone();
            }
            if named("content_type") {
                merged.content_type = proto.content_type.clone();
            }
            if named("timeout") {
                merged.timeout = proto.timeout;
            }
            if named("retry_policy") {
                merged.retry_policy = proto.retry_policy.clone();
            }
            if named("rate_limit") {
                merged.rate_limit = proto.rate_limit;
            }
            if named("max_in_flight") {
                merged.max_in_flight = proto.max_in_flight;
            }
            if named("enabled") {
                merged.enabled = Some(proto.enabled.unwrap_or(true));
            }
            if named("labels") {
                merged.labels = proto.labels.clone();
            }
            if named("oauth2") {
                merged.oauth2 = proto.oauth2.clone();
            }
            if named("client_certificate") {
                merged.client_certificate = proto.client_certificate.clone();
            }
            let mut violations = Violations::default();
            let updated = self.to_domain(&merged, Some(&current.value), &mut violations);
            let (from, to) = (
                tidings_scheduler::webhook::origin(&current.value.url),
                tidings_scheduler::webhook::origin(&updated.url),
            );
            if from != to {
                // Secrets kept by an update go along to the new origin: only someone who knows
                // them may send them elsewhere.
                for header in &current.value.headers {
                    let given = named("headers")
                        && proto.headers.iter().any(|h| {
                            h.name.eq_ignore_ascii_case(&header.name) && !h.value.is_empty()
                        });
                    if matches!(header.value, HeaderValue::Secret(_)) && !given {
                        violations.add(
                            "webhook.headers",
                            format!(
                                "the URL moves from {} to {}: give the value of secret header {} again in this update",
                                from.as_deref().unwrap_or("?"),
                                to.as_deref().unwrap_or("?"),
                                header.name
                            ),
                        );
                    }
                }
            }
            if from != to {
                let kept_secret = current.value.oauth2.is_some()
                    && updated.oauth2.is_some()
                    && proto.oauth2.as_ref().is_none_or(|o| o.client_secret.is_empty());
                if kept_secret {
                    violations.add(
                        "webhook.oauth2.client_secret",
                        "the URL moves to another origin: give the client secret again in this update",
                    );
                }
                let kept_key = current.value.client_certificate.is_some()
                    && updated.client_certificate.is_some()
                    && proto
                        .client_certificate
                        .as_ref()
                        .is_none_or(|c| c.private_key_pem.is_empty());
                if kept_key {
                    violations.add(
                        "webhook.client_certificate.private_key_pem",
                        "the URL moves to another origin: give the private key again in this update",
                    );
                }
            }
            violations.check()?;
            match self.webhooks.replace(&proto.id, &updated, current.revision).await {
                Ok(stored) => {
                    info!(webhook = %proto.id, "webhook updated");
                    return Ok(self.to_proto(&stored));
                }
                Err(DefsError::Conflict { .. }) if etag.is_none() => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(ApiError::Unavailable(format!("webhook {} is changing too often; try again", proto.id)))
    }

    async fn rotate(
        &self,
        request: pb::RotateSigningSecretRequest,
    ) -> Result<pb::RotateSigningSecretResponse, ApiError> {
        let mut violations = Violations::default();
        check_id(&mut violations, "id", &request.id);
        let grace_ms = match &request.grace_period {
            None => DEFAULT_GRACE_MS,
            Some(g) => {
                duration_ms(&mut violations, "grace_period", g, 0, MAX_GRACE_MS).unwrap_or(0)
            }
        };
        let generated = request.signing_secret.is_empty();
        let secret = if generated {
            generate_signing_secret()
        } else {
            if let Err(reason) = check_signing_secret(&request.signing_secret) {
                violations.add("signing_secret", reason);
            }
            Secret::new(request.signing_secret.clone())
        };
        violations.check()?;
        loop {
            let current = self.webhooks.get(&request.id).await?;
            let now = tidings_scheduler::now_ms();
            let mut webhook = current.value.clone();
            let expires = now + grace_ms as i64;
            webhook.signing_secrets.retain(|s| s.expires_at_ms.is_none_or(|at| at > now));
            for old in &mut webhook.signing_secrets {
                old.expires_at_ms = Some(old.expires_at_ms.map_or(expires, |at| at.min(expires)));
            }
            webhook.signing_secrets.retain(|s| s.expires_at_ms.is_none_or(|at| at > now));
            webhook.signing_secrets.insert(0, SigningSecret::seal(&self.cipher, &secret, now));
            webhook.updated_at_ms = now;
            match self.webhooks.replace(&request.id, &webhook, current.revision).await {
                Ok(stored) => {
                    info!(webhook = %request.id, "signing secret rotated");
                    return Ok(pb::RotateSigningSecretResponse {
                        webhook: Some(self.to_proto(&stored)),
                        signing_secret: if generated {
                            secret.expose().to_string()
                        } else {
                            String::new()
                        },
                    });
                }
                Err(DefsError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// The context a test or a preview renders with: the given contact and event data, or samples.
fn sample_context(
    contact: Option<&prost_types::Struct>,
    event_data: Option<&prost_types::Struct>,
    delivery_id: &str,
) -> Context {
    let contact = match contact {
        Some(c) => serde_json::Value::Object(struct_to_json(c)),
        None => serde_json::json!({
            "id": "sample-contact",
            "attributes": {"email": "ada@example.com", "first_name": "Ada"},
            "timezone": "UTC",
            "unsubscribed": false,
        }),
    };
    let data = match event_data {
        Some(d) => serde_json::Value::Object(struct_to_json(d)),
        None => serde_json::json!({"sample": true}),
    };
    Context {
        contact,
        event: serde_json::json!({"id": "evt_sample", "type": "tidings.test", "data": data}),
        campaign: serde_json::json!({"id": "", "data": {}}),
        run: serde_json::Value::Null,
        delivery: serde_json::json!({"id": delivery_id}),
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn header_value_ok(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

fn check_labels(
    labels: &std::collections::HashMap<String, String>,
    violations: &mut Violations,
) -> BTreeMap<String, String> {
    if labels.len() > MAX_LABELS {
        violations.add("webhook.labels", format!("must have at most {MAX_LABELS} entries"));
    }
    for (key, value) in labels {
        if key.is_empty()
            || key.len() > 63
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_./".contains(c))
        {
            violations.add(
                format!("webhook.labels[{key}]"),
                "keys must be 1 to 63 of a-z, 0-9, '-', '_', '.', '/'",
            );
        }
        if value.chars().count() > 256 {
            violations
                .add(format!("webhook.labels[{key}]"), "values must be at most 256 characters");
        }
    }
    labels.clone().into_iter().collect()
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    #[instrument(skip_all, fields(webhook = %request.get_ref().webhook_id))]
    async fn create_webhook(
        &self,
        request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(webhook = %request.get_ref().id))]
    async fn get_webhook(
        &self,
        request: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        let id = request.into_inner().id;
        let mut violations = Violations::default();
        check_id(&mut violations, "id", &id);
        violations.check()?;
        let stored = self.webhooks.get(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(self.to_proto(&stored)))
    }

    #[instrument(skip_all)]
    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let request = request.into_inner();
        let (items, next_page_token) =
            super::list_page(&self.webhooks, &request.page_token, request.page_size).await?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: items.iter().map(|w| self.to_proto(w)).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(webhook = tracing::field::Empty))]
    async fn update_webhook(
        &self,
        request: Request<pb::UpdateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        if let Some(webhook) = &request.get_ref().webhook {
            tracing::Span::current().record("webhook", webhook.id.as_str());
        }
        Ok(Response::new(self.update(request.into_inner()).await?))
    }

    #[instrument(skip_all, fields(webhook = %request.get_ref().id))]
    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        check_id(&mut violations, "id", &request.id);
        violations.check()?;
        let etag = parse_etag("etag", &request.etag)?;
        let user = tidings_scheduler::app::campaigns::webhook_user(&self.campaigns, &request.id)
            .await
            .map_err(ApiError::from)?;
        if let Some(user) = user {
            return Err(ApiError::FailedPrecondition(format!(
                "webhook {} is used by campaign {user}; archive the campaign first",
                request.id
            ))
            .into());
        }
        self.webhooks.delete(&request.id, etag).await.map_err(ApiError::from)?;
        info!(webhook = %request.id, "webhook deleted");
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    #[instrument(skip_all, fields(webhook = %request.get_ref().id))]
    async fn send_test(
        &self,
        request: Request<pb::SendTestRequest>,
    ) -> Result<Response<pb::SendTestResponse>, Status> {
        let traceparent = super::events::traceparent(&request);
        Ok(Response::new(self.send_test(request.into_inner(), &traceparent).await?))
    }

    #[instrument(skip_all, fields(webhook = %request.get_ref().id))]
    async fn rotate_signing_secret(
        &self,
        request: Request<pb::RotateSigningSecretRequest>,
    ) -> Result<Response<pb::RotateSigningSecretResponse>, Status> {
        Ok(Response::new(self.rotate(request.into_inner()).await?))
    }
}
