//! Webhooks: their health, the form with a live preview of the rendered request, a test send,
//! and redelivery of what failed.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use maud::{Markup, html};
use tidings_api::v1 as pb;
use tidings_api::v1::delivery_service_server::DeliveryService;
use tidings_api::v1::webhook_service_server::WebhookService;
use tidings_scheduler::delivery::dispatch::CircuitState;
use tonic::Request;

use super::view::{self, Area, Errors, Field};
use super::{Console, Fields, Page, Post, Who, form_error, method};

pub(crate) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/webhooks", get(list).post(create))
        .route("/webhooks/new", get(new))
        .route("/webhooks/preview", post(preview))
        .route("/webhooks/{id}", get(show).post(update))
        .route("/webhooks/{id}/test", post(test))
        .route("/webhooks/{id}/redeliver-failed", post(redeliver_failed))
}

const METHODS: [(pb::HttpMethod, &str); 5] = [
    (pb::HttpMethod::Post, "POST"),
    (pb::HttpMethod::Put, "PUT"),
    (pb::HttpMethod::Patch, "PATCH"),
    (pb::HttpMethod::Delete, "DELETE"),
    (pb::HttpMethod::Get, "GET"),
];

const SAMPLE_CONTACT: &str = r#"{
  "id": "ada",
  "attributes": {"email": "ada@example.com", "first_name": "Ada", "plan": "pro"},
  "timezone": "Europe/London"
}"#;

const SAMPLE_EVENT: &str = r#"{"order_id": "o-1001", "total": 42}"#;

/// What the form holds, as text.
#[derive(Default)]
struct Form {
    id: String,
    description: String,
    url: String,
    method: String,
    headers: String,
    secret_headers: String,
    body: String,
    content_type: String,
    timeout: String,
    rate_limit: String,
    max_in_flight: String,
    enabled: bool,
    etag: String,
    sample_contact: String,
    sample_event: String,
}

impl Form {
    fn blank() -> Self {
        Self {
            method: "POST".into(),
            // Only contact fields: a campaign run on demand or as a follow-up has no event data.
            body: "{\"email\": \"{{ contact.attributes.email }}\", \"name\": \"{{ contact.attributes.first_name }}\"}"
                .into(),
            content_type: "application/json".into(),
            enabled: true,
            sample_contact: SAMPLE_CONTACT.into(),
            sample_event: SAMPLE_EVENT.into(),
            ..Default::default()
        }
    }

    fn of(w: &pb::Webhook) -> Self {
        let plain = w.headers.iter().filter(|h| !h.secret);
        // Secret values are never sent to the browser: an empty value keeps the stored one.
        let secret = w.headers.iter().filter(|h| h.secret);
        Self {
            id: w.id.clone(),
            description: w.description.clone(),
            url: w.url.clone(),
            method: METHODS
                .iter()
                .find(|(m, _)| *m as i32 == w.method)
                .map_or("POST", |(_, name)| name)
                .into(),
            headers: plain
                .map(|h| format!("{}: {}", h.name, h.value))
                .collect::<Vec<_>>()
                .join("\n"),
            secret_headers: secret.map(|h| format!("{}:", h.name)).collect::<Vec<_>>().join("\n"),
            body: w.body.clone(),
            content_type: w.content_type.clone(),
            timeout: view::duration(w.timeout.as_ref()),
            rate_limit: if w.rate_limit > 0.0 { w.rate_limit.to_string() } else { String::new() },
            max_in_flight: if w.max_in_flight > 0 {
                w.max_in_flight.to_string()
            } else {
                String::new()
            },
            enabled: w.enabled.unwrap_or(true),
            etag: w.etag.clone(),
            sample_contact: SAMPLE_CONTACT.into(),
            sample_event: SAMPLE_EVENT.into(),
        }
    }

    fn posted(f: &Fields) -> Self {
        Self {
            id: f.trimmed("id").into(),
            description: f.get("description").into(),
            url: f.trimmed("url").into(),
            method: f.get("method").into(),
            headers: f.get("headers").into(),
            secret_headers: f.get("secret_headers").into(),
            body: f.get("body").into(),
            content_type: f.trimmed("content_type").into(),
            timeout: f.trimmed("timeout").into(),
            rate_limit: f.trimmed("rate_limit").into(),
            max_in_flight: f.trimmed("max_in_flight").into(),
            enabled: f.on("enabled"),
            etag: f.get("etag").into(),
            sample_contact: f.get("sample_contact").into(),
            sample_event: f.get("sample_event").into(),
        }
    }

    /// The webhook the form describes; problems the API cannot see (a number that is not one)
    /// are reported under the API's field names.
    fn to_proto(&self) -> Result<pb::Webhook, Errors> {
        let mut problems = Vec::new();
        let mut headers = Vec::new();
        for (text, secret) in [(&self.headers, false), (&self.secret_headers, true)] {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match line.split_once(':') {
                    Some((name, value)) => headers.push(pb::Header {
                        name: name.trim().into(),
                        value: value.trim().into(),
                        secret,
                    }),
                    None => problems.push((
                        "webhook.headers".to_string(),
                        format!("{line:?} is not `Name: value`"),
                    )),
                }
            }
        }
        let timeout = view::parse_duration(&self.timeout).unwrap_or_else(|e| {
            problems.push(("webhook.timeout".into(), e));
            None
        });
        let rate_limit = match self.rate_limit.as_str() {
            "" => 0.0,
            text => text.parse().unwrap_or_else(|_| {
                problems.push(("webhook.rate_limit".into(), "must be a number".into()));
                0.0
            }),
        };
        let max_in_flight = match self.max_in_flight.as_str() {
            "" => 0,
            text => text.parse().unwrap_or_else(|_| {
                problems.push(("webhook.max_in_flight".into(), "must be a whole number".into()));
                0
            }),
        };
        let method =
            METHODS.iter().find(|(_, name)| *name == self.method).map_or(0, |(m, _)| *m as i32);
        if !problems.is_empty() {
            return Err(Errors::fields(problems));
        }
        Ok(pb::Webhook {
            description: self.description.clone(),
            url: self.url.clone(),
            method,
            headers,
            body: self.body.clone(),
            content_type: self.content_type.clone(),
            timeout,
            rate_limit,
            max_in_flight,
            enabled: Some(self.enabled),
            ..Default::default()
        })
    }
}

/// Parses a JSON object typed into a form.
pub(crate) fn object(text: &str, field: &str) -> Result<Option<prost_types::Struct>, Errors> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(Some(tidings_api::json::json_to_struct(&map))),
        Ok(_) => Err(Errors::fields(vec![(field.into(), "must be a JSON object".into())])),
        Err(e) => Err(Errors::fields(vec![(field.into(), format!("is not JSON: {e}"))])),
    }
}

async fn list(State(console): State<Arc<Console>>, who: Who) -> Page {
    let webhooks = console.all_webhooks(&who).await?;
    let now = tidings_scheduler::now_ms();
    let body = html! {
        @if who.can_write() { p { a.button href="/webhooks/new" { "New webhook" } } }
        @if webhooks.is_empty() {
            p { "No webhooks yet. A webhook is an endpoint with the request Tidings sends to it." }
        } @else {
            p.hint { "Health covers the last hour of this node's attempts." }
            div.scroll {
                table {
                    thead { tr { th { "Webhook" } th { "Endpoint" } th { "State" } th { "Success" } th { "p95" } th { "Circuit" } } }
                    tbody {
                        @for w in &webhooks {
                            @let health = console.api.dispatcher.pulse().webhook(&w.id, now);
                            tr {
                                td { a href={"/webhooks/" (w.id)} { (w.id) } br; small { (w.description) } }
                                td { code { (w.url) } }
                                td {
                                    @if w.enabled.unwrap_or(true) { (view::badge("enabled")) }
                                    @else { (view::badge("disabled")) br; small { (w.disabled_reason) } }
                                }
                                td { @if let Some(r) = health.success_rate() { (format!("{:.1}%", r * 100.0)) " of " (health.attempts) } @else { "–" } }
                                td { @if let Some(p) = health.p95_ms { "≤ " (p) " ms" } @else { "–" } }
                                td { (circuit(console.api.dispatcher.circuit(&w.id))) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&who, Area::Webhooks, "Webhooks", body))
}

/// A `datetime-local` value for a day ago.
fn day_ago() -> String {
    let seconds = tidings_scheduler::now_ms() / 1000 - 86_400;
    view::time_input(Some(&prost_types::Timestamp { seconds, nanos: 0 }))
}

fn circuit(state: CircuitState) -> Markup {
    match state {
        CircuitState::Closed => view::badge("closed"),
        CircuitState::HalfOpen => view::badge("half open"),
        CircuitState::Open { retry_in, failures } => html! {
            (view::badge("open")) br;
            small { (failures) " failures; probe in " (humantime::format_duration(std::time::Duration::from_secs(retry_in.as_secs()))) }
        },
    }
}

async fn new(who: Who) -> Page {
    Ok(form_page(&who, &Form::blank(), &Errors::none()))
}

fn form_page(who: &Who, form: &Form, errors: &Errors) -> axum::response::Response {
    view::page(who, Area::Webhooks, "New webhook", form_markup(who, form, errors, None))
}

fn form_markup(who: &Who, form: &Form, errors: &Errors, existing: Option<&pb::Webhook>) -> Markup {
    let action = match existing {
        Some(w) => format!("/webhooks/{}", w.id),
        None => "/webhooks".into(),
    };
    let methods: Vec<(String, String)> =
        METHODS.iter().map(|(_, n)| (n.to_string(), n.to_string())).collect();
    html! {
        (errors.summary())
        div.split {
            form.stack method="post" action=(action) data-preview="/webhooks/preview" data-target="#preview" {
                (view::csrf(who))
                input type="hidden" name="etag" value=(form.etag);
                @if existing.is_none() {
                    (Field::new("id", "webhook_id", "Id").hint("Lowercase letters, digits, - and _. Leave empty to have one made.").input(errors, "text", &form.id))
                }
                (Field::new("description", "webhook.description", "Description").input(errors, "text", &form.description))
                (Field::new("url", "webhook.url", "Endpoint URL").hint("https://… The path and query may use Liquid, for example {{ contact.id }}.").input(errors, "url", &form.url))
                (Field::new("method", "webhook.method", "Method").select(errors, &methods, &form.method))
                (Field::new("headers", "webhook.headers", "Headers").hint("One `Name: value` per line; values may use Liquid.").textarea(errors, 3, &form.headers))
                (Field::new("secret_headers", "webhook.headers", "Secret headers").hint("Sealed at rest and never shown again; leave a value empty to keep the stored one.").textarea(errors, 2, &form.secret_headers))
                (Field::new("body", "webhook.body", "Body").hint("Liquid over contact, event, campaign, run and delivery.").textarea(errors, 6, &form.body))
                (Field::new("content_type", "webhook.content_type", "Content type").input(errors, "text", &form.content_type))
                div.row {
                    (Field::new("timeout", "webhook.timeout", "Timeout").hint("15s when empty").input(errors, "text", &form.timeout))
                    (Field::new("rate_limit", "webhook.rate_limit", "Requests per second").hint("across the cluster; empty for no limit").input(errors, "text", &form.rate_limit))
                    (Field::new("max_in_flight", "webhook.max_in_flight", "In flight per node").hint("64 when empty").input(errors, "text", &form.max_in_flight))
                }
                @if existing.is_some() {
                    div.field.check { input #enabled type="checkbox" name="enabled" checked[form.enabled]; label for="enabled" { "Enabled" } }
                } @else {
                    input type="hidden" name="enabled" value="on";
                }
                fieldset {
                    legend { "Preview with" }
                    (Field::new("sample_contact", "contact", "Sample contact (JSON)").textarea(errors, 5, &form.sample_contact))
                    (Field::new("sample_event", "event_data", "Sample event data (JSON)").textarea(errors, 2, &form.sample_event))
                }
                @if who.can_write() {
                    button type="submit" { @if existing.is_some() { "Save" } @else { "Create webhook" } }
                }
            }
            section.preview aria-live="polite" {
                h2 { "Preview" }
                div #preview { p.hint { "The request appears here as you type." } }
            }
        }
    }
}

async fn preview(State(console): State<Arc<Console>>, post: Post) -> Page {
    let form = Form::posted(&post.fields);
    let rendered = async {
        let webhook = form.to_proto()?;
        let contact = object(&form.sample_contact, "contact")?;
        let event = object(&form.sample_event, "event_data")?;
        console
            .allow(&post.who, &method("WebhookService", "CreateWebhook"))
            .map_err(|s| Errors::of(&s))?;
        console
            .api
            .webhooks
            .preview(&webhook, contact.as_ref(), event.as_ref())
            .map_err(|e| Errors::of(&e.into()))
    }
    .await;
    Ok(match rendered {
        Ok(request) => html! {
            (view::request(&request))
            p.hint { "Sent with webhook-id, webhook-timestamp and webhook-signature headers (Standard Webhooks)." }
        },
        Err(errors) => errors.summary(),
    }
    .into_response())
}

async fn create(State(console): State<Arc<Console>>, post: Post) -> Page {
    let form = Form::posted(&post.fields);
    let webhook = match form.to_proto() {
        Ok(w) => w,
        Err(errors) => return Ok(form_page(&post.who, &form, &errors)),
    };
    let created = console
        .call(
            &post.who,
            &method("WebhookService", "CreateWebhook"),
            console.api.webhooks.create_webhook(Request::new(pb::CreateWebhookRequest {
                webhook: Some(webhook),
                webhook_id: form.id.clone(),
            })),
        )
        .await;
    let created = match created {
        Ok(w) => w,
        Err(status) => return Ok(form_page(&post.who, &form, &form_error(status)?)),
    };
    let body = html! {
        div.notice role="status" {
            p { "Webhook " code { (created.id) } " was created." }
            @if !created.signing_secret.is_empty() {
                p { "Its signing secret, shown this once — configure your receiver with it:" }
                pre.secret #signing-secret { (created.signing_secret) }
            }
        }
        p { a.button href={"/webhooks/" (created.id)} { "Open the webhook" } }
    };
    Ok(view::page(&post.who, Area::Webhooks, "Webhook created", body))
}

async fn show(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let webhook = get_webhook(&console, &who, &id).await?;
    Ok(detail(&console, &who, &webhook, &Form::of(&webhook), &Errors::none(), None))
}

async fn get_webhook(console: &Console, who: &Who, id: &str) -> Result<pb::Webhook, tonic::Status> {
    console
        .call(
            who,
            &method("WebhookService", "GetWebhook"),
            console.api.webhooks.get_webhook(Request::new(pb::GetWebhookRequest { id: id.into() })),
        )
        .await
}

fn detail(
    console: &Console,
    who: &Who,
    webhook: &pb::Webhook,
    form: &Form,
    errors: &Errors,
    extra: Option<Markup>,
) -> axum::response::Response {
    let health = console.api.dispatcher.pulse().webhook(&webhook.id, tidings_scheduler::now_ms());
    let top = html! {
        section.cards aria-label="Health" {
            div.card { span.figure { @if webhook.enabled.unwrap_or(true) { (view::badge("enabled")) } @else { (view::badge("disabled")) } } span { (webhook.disabled_reason) } }
            div.card { span.figure { @if let Some(r) = health.success_rate() { (format!("{:.1}%", r * 100.0)) } @else { "–" } } span { "success, last hour (" (health.attempts) " attempts)" } }
            div.card { span.figure { @if let Some(p) = health.p95_ms { "≤ " (p) " ms" } @else { "–" } } span { "p95 latency" } }
            div.card { span.figure { (circuit(console.api.dispatcher.circuit(&webhook.id))) } span { "circuit" } }
        }
        p {
            a href={"/deliveries?" (view::query_with(&[("webhook", &webhook.id)]))} { "Deliveries" } " · "
            a href={"/deliveries?" (view::query_with(&[("webhook", &webhook.id), ("status", "failed")]))} { "Failed deliveries" }
        }
        @if let Some(extra) = extra { (extra) }
        @if who.can_write() {
            div.split {
                form.stack method="post" action={"/webhooks/" (webhook.id) "/test"} {
                    h2 { "Send a test" }
                    (view::csrf(who))
                    (Field::new("test_contact", "contact", "Contact (JSON)").textarea(&Errors::none(), 4, SAMPLE_CONTACT))
                    (Field::new("test_event", "event_data", "Event data (JSON)").textarea(&Errors::none(), 2, SAMPLE_EVENT))
                    button type="submit" { "Send test" }
                }
                form.stack method="post" action={"/webhooks/" (webhook.id) "/redeliver-failed"} {
                    h2 { "Redeliver failed" }
                    (view::csrf(who))
                    (Field::new("since", "start_time", "Failed since (UTC)").hint("A day ago unless you say.").input(&Errors::none(), "datetime-local", &day_ago()))
                    button type="submit" { "Redeliver every failed delivery" }
                }
            }
        }
        h2 { "Definition" }
    };
    let body = html! {
        (top)
        (form_markup(who, form, errors, Some(webhook)))
    };
    view::page(who, Area::Webhooks, &format!("Webhook {}", webhook.id), body)
}

async fn update(State(console): State<Arc<Console>>, Path(id): Path<String>, post: Post) -> Page {
    let existing = get_webhook(&console, &post.who, &id).await?;
    let form = Form::posted(&post.fields);
    let webhook = match form.to_proto() {
        Ok(w) => pb::Webhook { id: id.clone(), ..w },
        Err(errors) => return Ok(detail(&console, &post.who, &existing, &form, &errors, None)),
    };
    let mask = [
        "description",
        "url",
        "method",
        "headers",
        "body",
        "content_type",
        "timeout",
        "rate_limit",
        "max_in_flight",
        "enabled",
    ];
    let updated = console
        .call(
            &post.who,
            &method("WebhookService", "UpdateWebhook"),
            console.api.webhooks.update_webhook(Request::new(pb::UpdateWebhookRequest {
                webhook: Some(webhook),
                update_mask: Some(prost_types::FieldMask {
                    paths: mask.iter().map(|p| p.to_string()).collect(),
                }),
                etag: form.etag.clone(),
            })),
        )
        .await;
    match updated {
        Ok(_) => Ok(Redirect::to(&format!("/webhooks/{id}")).into_response()),
        Err(status) => {
            Ok(detail(&console, &post.who, &existing, &form, &form_error(status)?, None))
        }
    }
}

async fn test(State(console): State<Arc<Console>>, Path(id): Path<String>, post: Post) -> Page {
    let webhook = get_webhook(&console, &post.who, &id).await?;
    let parsed = object(post.fields.get("test_contact"), "contact")
        .and_then(|c| Ok((c, object(post.fields.get("test_event"), "event_data")?)));
    let result = match parsed {
        Err(errors) => errors.summary(),
        Ok((contact, event_data)) => {
            let sent = console
                .call(
                    &post.who,
                    &method("WebhookService", "SendTest"),
                    console.api.webhooks.send_test(Request::new(pb::SendTestRequest {
                        id: id.clone(),
                        contact,
                        event_data,
                    })),
                )
                .await;
            match sent {
                Err(status) => form_error(status)?.summary(),
                Ok(sent) => html! {
                    section.result #test-result aria-live="polite" {
                        h2 { "Test result" }
                        @if let Some(a) = &sent.attempt { (super::deliveries::attempt(a)) }
                        @if let Some(r) = &sent.request { details { summary { "Request sent" } (view::request(r)) } }
                    }
                },
            }
        }
    };
    Ok(detail(&console, &post.who, &webhook, &Form::of(&webhook), &Errors::none(), Some(result)))
}

async fn redeliver_failed(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    post: Post,
) -> Page {
    let webhook = get_webhook(&console, &post.who, &id).await?;
    let since = match view::parse_time(post.fields.get("since")) {
        Ok(t) => t,
        Err(e) => {
            let errors = Errors::message(format!("Failed since: {e}"));
            return Ok(detail(
                &console,
                &post.who,
                &webhook,
                &Form::of(&webhook),
                &Errors::none(),
                Some(errors.summary()),
            ));
        }
    };
    let done = console
        .call(
            &post.who,
            &method("DeliveryService", "RedeliverFailed"),
            console.api.deliveries.redeliver_failed(Request::new(pb::RedeliverFailedRequest {
                webhook_id: id.clone(),
                start_time: since,
                end_time: None,
            })),
        )
        .await;
    let note = match done {
        Ok(r) => {
            html! { div.notice role="status" { p #redelivered { (r.queued) " failed deliveries were queued again." } } }
        }
        Err(status) => form_error(status)?.summary(),
    };
    Ok(detail(&console, &post.who, &webhook, &Form::of(&webhook), &Errors::none(), Some(note)))
}
