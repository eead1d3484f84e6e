//! Credentials a webhook's endpoint asks for: OAuth 2.0 tokens (client credentials, fetched,
//! cached until shortly before they expire, fetched again after a 401) and HTTP clients that
//! present a webhook's client certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::secrets::{Cipher, Secret};
use crate::webhook::{ClientCertificate, OAuth2};

/// Longest a token request may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a token without `expires_in` is used.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Bytes of a refused token response kept in the error.
const ERROR_EXCERPT: usize = 300;

/// A token and the credentials it was fetched with.
struct Token {
    with: OAuth2,
    value: Secret,
    renew_at: Instant,
}

/// Tokens and certificate clients, per webhook.
#[derive(Default)]
pub(crate) struct Credentials {
    /// One lock per webhook, so concurrent attempts fetch a token once.
    tokens: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Token>>>>>,
    /// Clients with a client certificate, by webhook, with the certificate they present.
    clients: Mutex<HashMap<String, (ClientCertificate, reqwest::Client)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<f64>,
}

impl Credentials {
    /// Returns a bearer token for `webhook`, from the cache or fetched with `client`.
    pub(crate) async fn bearer(
        &self,
        client: &reqwest::Client,
        cipher: &Cipher,
        webhook: &str,
        oauth: &OAuth2,
    ) -> Result<Secret, String> {
        let slot = lock(&self.tokens).entry(webhook.to_string()).or_default().clone();
        let mut token = slot.lock().await;
        // A changed secret is sealed anew, so comparing the sealed values notices it.
        if let Some(held) = token.as_ref()
            && held.with == *oauth
            && held.renew_at > Instant::now()
        {
            return Ok(held.value.clone());
        }
        let secret =
            cipher.open(&oauth.client_secret).map_err(|e| format!("oauth2.client_secret: {e}"))?;
        let (value, lifetime) = fetch(client, oauth, secret.expose()).await?;
        // Renewed a little before it expires: at 90 % of its lifetime, at most a minute early.
        let early = (lifetime / 10).min(Duration::from_secs(60));
        *token = Some(Token {
            with: oauth.clone(),
            value: value.clone(),
            renew_at: Instant::now() + lifetime.saturating_sub(early),
        });
        Ok(value)
    }

    /// Forgets the token of `webhook` (its endpoint refused it), so the next attempt fetches one.
    pub(crate) fn forget(&self, webhook: &str) {
        if let Some(slot) = lock(&self.tokens).get(webhook).cloned()
            && let Ok(mut token) = slot.try_lock()
        {
            *token = None;
        }
    }

    /// Returns the client presenting `certificate`, built with `build` on first use or after
    /// the certificate changed.
    pub(crate) fn client_with(
        &self,
        cipher: &Cipher,
        webhook: &str,
        certificate: &ClientCertificate,
        build: impl FnOnce(reqwest::Identity) -> Result<reqwest::Client, String>,
    ) -> Result<reqwest::Client, String> {
        if let Some((held, client)) = lock(&self.clients).get(webhook)
            && held == certificate
        {
            return Ok(client.clone());
        }
        let key = cipher
            .open(&certificate.private_key)
            .map_err(|e| format!("client_certificate.private_key_pem: {e}"))?;
        let pem = format!("{}\n{}", certificate.certificate_pem.trim_end(), key.expose());
        let identity = reqwest::Identity::from_pem(pem.as_bytes())
            .map_err(|e| format!("client_certificate: {e}"))?;
        let client = build(identity)?;
        lock(&self.clients).insert(webhook.to_string(), (certificate.clone(), client.clone()));
        Ok(client)
    }
}

/// Requests a token; returns it with its lifetime.
async fn fetch(
    client: &reqwest::Client,
    oauth: &OAuth2,
    secret: &str,
) -> Result<(Secret, Duration), String> {
    let url = &oauth.token_url;
    let mut form = vec![("grant_type", "client_credentials".to_string())];
    if !oauth.scopes.is_empty() {
        form.push(("scope", oauth.scopes.join(" ")));
    }
    if !oauth.audience.is_empty() {
        form.push(("audience", oauth.audience.clone()));
    }
    let response = client
        .post(url)
        .basic_auth(&oauth.client_id, Some(secret))
        .header("accept", "application/json")
        .form(&form)
        .timeout(TOKEN_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("token request to {url} failed: {}", describe(&e)))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("token request to {url} failed: {}", describe(&e)))?;
    if !status.is_success() {
        let excerpt: String =
            String::from_utf8_lossy(&body[..body.len().min(ERROR_EXCERPT)]).into_owned();
        return Err(format!("token endpoint {url} answered {}: {excerpt}", status.as_u16()));
    }
    let token: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| format!("token endpoint {url} answered something else than a token: {e}"))?;
    if let Some(kind) = &token.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!(
            "token endpoint {url} gave a {kind} token; only bearer tokens are sent"
        ));
    }
    if token.access_token.is_empty() {
        return Err(format!("token endpoint {url} gave an empty token"));
    }
    let lifetime = token
        .expires_in
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_LIFETIME, |s| Duration::from_secs_f64(s.min(86_400.0 * 365.0)));
    Ok((Secret::new(token.access_token), lifetime))
}

/// The error and its causes on one line.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
