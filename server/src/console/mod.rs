//! The web console: server-rendered pages over the same service implementations the gRPC API
//! serves, so a form gets the validation, the errors and the scope checks a call gets.
//!
//! - [`Console`]: the services, the token check and the routes;
//! - `view`: the layout, form fields with their violations, charts drawn as SVG;
//! - one module per area: `overview`, `webhooks`, `audience` (segments and contacts),
//!   `campaigns` (with runs) and `deliveries`.
//!
//! A browser signs in with a token, kept in an `HttpOnly`, `SameSite=Strict` cookie. Every form
//! carries a CSRF value derived from that cookie and a key of this process, and a POST whose
//! value or `Origin` does not match is refused. Pages hide what the token may not do, and every
//! action is checked again against the method it calls, exactly as the gRPC layer checks it.

mod audience;
mod campaigns;
mod deliveries;
mod overview;
mod view;
mod webhooks;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use tidings_scheduler::delivery::dispatch::Dispatcher;
use tonic::{Code, Status};

use crate::api::{CampaignApi, ClusterApi, ContactApi, DeliveryApi, WebhookApi};
use crate::auth::{Needs, OpenServices, Refused, Scope, Tokens, needs, same};
use tidings_api::v1 as pb;
use tidings_api::v1::campaign_service_server::CampaignService;
use tidings_api::v1::segment_service_server::SegmentService;
use tidings_api::v1::webhook_service_server::WebhookService;

/// The cookie that holds a signed-in browser's token.
const TOKEN_COOKIE: &str = "tidings_token";

/// Everything the pages call.
pub(crate) struct Console {
    pub(crate) api: Services,
    tokens: Option<Tokens>,
    open: OpenServices,
    key: [u8; 32],
    secure_cookies: bool,
}

/// The services the console needs, as the node built them for the gRPC API.
pub(crate) struct Services {
    pub(crate) webhooks: Arc<WebhookApi>,
    pub(crate) contacts: Arc<ContactApi>,
    pub(crate) campaigns: Arc<CampaignApi>,
    pub(crate) deliveries: Arc<DeliveryApi>,
    pub(crate) cluster: Arc<ClusterApi>,
    pub(crate) dispatcher: Dispatcher,
}

impl Console {
    /// Returns the console; `tokens` is `None` when auth is off. `csrf_key` is the same on every
    /// node, so a form rendered by one may be posted to another. `secure_cookies` marks cookies
    /// `Secure` (the listener speaks TLS).
    pub(crate) fn new(
        services: Services,
        tokens: Option<Tokens>,
        open: OpenServices,
        csrf_key: [u8; 32],
        secure_cookies: bool,
    ) -> Arc<Self> {
        Arc::new(Self { api: services, tokens, open, key: csrf_key, secure_cookies })
    }

    /// Returns the console's routes; paths it does not serve go to `fallback`.
    pub(crate) fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/", get(overview::page))
            .route("/sign-in", get(sign_in_page).post(sign_in))
            .route("/sign-out", post(sign_out))
            .route("/assets/{name}", get(asset))
            .merge(webhooks::routes())
            .merge(audience::routes())
            .merge(campaigns::routes())
            .merge(deliveries::routes())
            .with_state(self.clone())
    }

    /// Checks that `who` may call the gRPC method at `path`, as the API's auth layer does.
    pub(crate) fn allow(&self, who: &Who, path: &str) -> Result<(), Status> {
        let Some(tokens) = &self.tokens else { return Ok(()) };
        let Needs::Scope(needed) = needs(path, &self.open) else { return Ok(()) };
        let header = who.token.as_ref().map(|t| format!("Bearer {t}"));
        tokens
            .check(header.as_deref(), needed, tidings_scheduler::now_ms())
            .map(|_| ())
            .map_err(Status::from)
    }

    /// Calls a service method as `who`: the scope check first, then the method. Service futures
    /// do nothing until polled, so a refused call never starts.
    pub(crate) async fn call<R>(
        &self,
        who: &Who,
        path: &str,
        call: impl Future<Output = Result<tonic::Response<R>, Status>>,
    ) -> Result<R, Status> {
        self.allow(who, path)?;
        Ok(call.await?.into_inner())
    }

    /// Every webhook, page by page.
    pub(crate) async fn all_webhooks(&self, who: &Who) -> Result<Vec<pb::Webhook>, Status> {
        every(|page_token| async move {
            let path = method("WebhookService", "ListWebhooks");
            let request = pb::ListWebhooksRequest { page_size: 1000, page_token };
            let page = self.call(
                who,
                &path,
                self.api.webhooks.list_webhooks(tonic::Request::new(request)),
            );
            page.await.map(|p| (p.webhooks, p.next_page_token))
        })
        .await
    }

    /// Every segment, page by page.
    pub(crate) async fn all_segments(&self, who: &Who) -> Result<Vec<pb::Segment>, Status> {
        every(|page_token| async move {
            let path = method("SegmentService", "ListSegments");
            let request = pb::ListSegmentsRequest { page_size: 1000, page_token };
            let page = self.call(
                who,
                &path,
                self.api.contacts.list_segments(tonic::Request::new(request)),
            );
            page.await.map(|p| (p.segments, p.next_page_token))
        })
        .await
    }

    /// Every campaign, page by page.
    pub(crate) async fn all_campaigns(&self, who: &Who) -> Result<Vec<pb::Campaign>, Status> {
        every(|page_token| async move {
            let path = method("CampaignService", "ListCampaigns");
            let request = pb::ListCampaignsRequest { state: 0, page_size: 1000, page_token };
            let page = self.call(
                who,
                &path,
                self.api.campaigns.list_campaigns(tonic::Request::new(request)),
            );
            page.await.map(|p| (p.campaigns, p.next_page_token))
        })
        .await
    }

    fn csrf_for(&self, token: Option<&str>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update(token.unwrap_or_default().as_bytes());
        hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    fn who(&self, headers: &HeaderMap) -> Who {
        let token = cookie(headers, TOKEN_COOKIE);
        let csrf = self.csrf_for(token.as_deref());
        let can = |scope: Scope| match &self.tokens {
            None => true,
            Some(tokens) => {
                let header = token.as_ref().map(|t| format!("Bearer {t}"));
                tokens.check(header.as_deref(), scope, tidings_scheduler::now_ms()).is_ok()
            }
        };
        Who {
            write: can(Scope::Write),
            read: can(Scope::Read),
            auth: self.tokens.is_some(),
            token,
            csrf,
        }
    }
}

/// The browser behind a request: its token and what the token allows.
#[derive(Clone)]
pub(crate) struct Who {
    token: Option<String>,
    /// The CSRF value its forms carry.
    pub(crate) csrf: String,
    /// Whether auth is on.
    pub(crate) auth: bool,
    read: bool,
    write: bool,
}

impl Who {
    /// Whether the write actions are shown.
    pub(crate) fn can_write(&self) -> bool {
        self.write
    }
}

impl FromRequestParts<Arc<Console>> for Who {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Self, Self::Rejection> {
        let who = console.who(&parts.headers);
        if !who.read {
            let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let query = view::query_with(&[("next", next)]);
            return Err(Redirect::to(&format!("/sign-in?{query}")).into_response());
        }
        Ok(who)
    }
}

/// A form post, after its CSRF value and origin were checked.
pub(crate) struct Post {
    pub(crate) who: Who,
    pub(crate) fields: Fields,
}

impl FromRequest<Arc<Console>> for Post {
    type Rejection = Response;

    async fn from_request(request: Request, console: &Arc<Console>) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        check_origin(&parts.headers, &parts.uri)?;
        let who = Who::from_request_parts(&mut parts, console).await?;
        let request = Request::from_parts(parts, body);
        let axum::Form(pairs) = axum::Form::<Vec<(String, String)>>::from_request(request, console)
            .await
            .map_err(|e| view::failure(StatusCode::BAD_REQUEST, &format!("the form: {e}")))?;
        let fields = Fields(pairs);
        if !same(fields.get("csrf"), &who.csrf) {
            return Err(view::failure(
                StatusCode::FORBIDDEN,
                "the form has expired or came from another site; reload the page and try again",
            ));
        }
        Ok(Post { who, fields })
    }
}

/// Refuses a post whose `Origin` is another site's. The site is the `Host` header, or on
/// HTTP/2 (which browsers choose over TLS) the request's `:authority`, found in its URI.
#[allow(clippy::result_large_err)]
fn check_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> Result<(), Response> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(origin);
    if origin == "null" || origin_host != host {
        return Err(view::failure(StatusCode::FORBIDDEN, "cross-site posts are refused"));
    }
    Ok(())
}

/// The fields of a posted form, in order; a name may repeat (checkboxes).
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    /// The first value of `name`, or "".
    pub(crate) fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_default()
    }

    /// The trimmed first value of `name`.
    pub(crate) fn trimmed(&self, name: &str) -> &str {
        self.get(name).trim()
    }

    /// Every value of `name`.
    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    /// Whether a checkbox named `name` was ticked.
    pub(crate) fn on(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Where a sign-in may send the browser next: a path of this site only.
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

#[derive(serde::Deserialize, Default)]
struct Next {
    #[serde(default)]
    next: String,
}

async fn sign_in_page(
    axum::extract::State(console): axum::extract::State<Arc<Console>>,
    headers: HeaderMap,
    axum::extract::Query(next): axum::extract::Query<Next>,
) -> Response {
    let who = console.who(&headers);
    if !who.auth {
        return Redirect::to("/").into_response();
    }
    view::sign_in(&console.csrf_for(None), local_path(&next.next), None).into_response()
}

async fn sign_in(
    axum::extract::State(console): axum::extract::State<Arc<Console>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    axum::Form(pairs): axum::Form<Vec<(String, String)>>,
) -> Response {
    if let Err(refused) = check_origin(&headers, &uri) {
        return refused;
    }
    let fields = Fields(pairs);
    let next = local_path(fields.get("next")).to_string();
    if !same(fields.get("csrf"), &console.csrf_for(None)) {
        return view::sign_in(
            &console.csrf_for(None),
            &next,
            Some("the form has expired; try again"),
        )
        .into_response();
    }
    let Some(tokens) = &console.tokens else { return Redirect::to("/").into_response() };
    let token = fields.trimmed("token");
    let header = format!("Bearer {token}");
    let error = match tokens.check(Some(&header), Scope::Read, tidings_scheduler::now_ms()) {
        Ok(_) => None,
        Err(Refused::Forbidden(_)) => {
            Some("this token lacks the `read` scope the console needs".to_string())
        }
        Err(Refused::Unauthenticated(reason)) => Some(reason.to_string()),
    };
    if let Some(error) = error {
        let mut page = view::sign_in(&console.csrf_for(None), &next, Some(&error)).into_response();
        *page.status_mut() = StatusCode::UNAUTHORIZED;
        return page;
    }
    let secure = if console.secure_cookies { "; Secure" } else { "" };
    let value = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    let mut response = Redirect::to(&next).into_response();
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Signing out is a post like any other: the extractor checks its CSRF value.
async fn sign_out(_post: Post) -> Response {
    let mut response = Redirect::to("/sign-in").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tidings_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (include_str!("assets/console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("assets/console.js"), "text/javascript; charset=utf-8"),
        "icon.svg" => (include_str!("assets/icon.svg"), "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// What a handler returns when a call fails: the page of its status.
pub(crate) struct Failure(pub(crate) Status);

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure(status)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => return Redirect::to("/sign-in").into_response(),
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
                StatusCode::BAD_REQUEST
            }
            Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        view::failure(status, self.0.message())
    }
}

/// Sorts a refused call: bad input and conflicts go back to the form, shown by their fields;
/// anything else (no permission, the node unavailable) gets a page of its own.
pub(crate) fn form_error(status: Status) -> Result<view::Errors, Failure> {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
            Ok(view::Errors::of(&status))
        }
        _ => Err(Failure(status)),
    }
}

/// The result of a page handler.
pub(crate) type Page = Result<Response, Failure>;

/// Most definitions of a kind a page lists.
const MOST_LISTED: usize = 10_000;

/// Collects the pages `page` returns for each page token until the last, or `MOST_LISTED`.
async fn every<T, F, Fut>(mut page: F) -> Result<Vec<T>, Status>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() || out.len() >= MOST_LISTED {
            return Ok(out);
        }
        token = next;
    }
}

/// The gRPC path of a method, for the scope check.
pub(crate) fn method(service: &str, name: &str) -> String {
    format!("/tidings.v1.{service}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_only_sends_to_local_paths() {
        assert_eq!(local_path("/campaigns"), "/campaigns");
        assert_eq!(local_path("//evil.example"), "/");
        assert_eq!(local_path("https://evil.example"), "/");
        assert_eq!(local_path("/\\evil"), "/");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; tidings_token=tok_x.y"));
        assert_eq!(cookie(&headers, TOKEN_COOKIE).as_deref(), Some("tok_x.y"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:50051"));
        let path = axum::http::Uri::from_static("/sign-out");
        assert!(check_origin(&headers, &path).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:50051"));
        assert!(check_origin(&headers, &path).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(check_origin(&headers, &path).is_err());
        // HTTP/2 has no Host header: the authority is in the URI.
        headers.remove(header::HOST);
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://console.example"));
        let h2 = axum::http::Uri::from_static("https://console.example/sign-out");
        assert!(check_origin(&headers, &h2).is_ok());
        assert!(check_origin(&headers, &path).is_err());
    }
}
