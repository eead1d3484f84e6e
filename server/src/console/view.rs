//! The layout and the parts every page uses: form fields that show their violations, tables,
//! status badges, times, and charts drawn as SVG on the server.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use tonic::Status;
use tonic_types::StatusExt;

use super::Who;

/// The areas of the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Overview,
    Webhooks,
    Segments,
    Contacts,
    Campaigns,
    Deliveries,
}

const AREAS: [(Area, &str, &str); 6] = [
    (Area::Overview, "/", "Overview"),
    (Area::Webhooks, "/webhooks", "Webhooks"),
    (Area::Segments, "/segments", "Segments"),
    (Area::Contacts, "/contacts", "Contacts"),
    (Area::Campaigns, "/campaigns", "Campaigns"),
    (Area::Deliveries, "/deliveries", "Deliveries"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Tidings" }
            link rel="icon" href="/assets/icon.svg";
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

/// A whole page.
pub(crate) fn page(who: &Who, area: Area, title: &str, body: Markup) -> Response {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body data-csrf=(who.csrf) {
                a.skip href="#main" { "Skip to the content" }
                header.top {
                    a.brand href="/" { "Tidings" }
                    nav aria-label="Main" {
                        ul {
                            @for (a, href, label) in AREAS {
                                li { a href=(href) aria-current=[(a == area).then_some("page")] { (label) } }
                            }
                        }
                    }
                    @if who.auth {
                        form.signout method="post" action="/sign-out" {
                            (csrf(who))
                            @if !who.can_write() { span.badge.muted title="this token can read but not change anything" { "read only" } }
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
    .into_response()
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf(who: &Who) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// The sign-in page.
pub(crate) fn sign_in(csrf: &str, next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main #main .narrow {
                    h1 { "Sign in to Tidings" }
                    p { "Paste a token. The first admin token is in " code { "admin.token" } " in the node's data directory; "
                        code { "tidings tokens create" } " makes others, with the scopes they need." }
                    form method="post" action="/sign-in" {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="next" value=(next);
                        div.field.invalid[error.is_some()] {
                            label for="token" { "Token" }
                            input #token type="password" name="token" autocomplete="current-password" required
                                aria-invalid=[error.map(|_| "true")] aria-describedby=[error.map(|_| "token-error")];
                            @if let Some(error) = error { p.error #token-error { (error) } }
                        }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// A page with only a message, for failures.
pub(crate) fn failure(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main #main .narrow {
                    h1 { (title) }
                    p.error role="alert" { (message) }
                    p { a href="/" { "Back to the overview" } }
                }
            }
        }
    };
    (status, markup).into_response()
}

/// What a refused call said, for a form shown again: its violations by field, or its message.
#[derive(Default)]
pub(crate) struct Errors {
    message: Option<String>,
    fields: Vec<(String, String)>,
}

impl Errors {
    /// No errors.
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// The errors of a status.
    pub(crate) fn of(status: &Status) -> Self {
        let fields: Vec<(String, String)> = status
            .get_details_bad_request()
            .map(|bad| bad.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
            .unwrap_or_default();
        Self { message: Some(status.message().to_string()), fields }
    }

    /// Violations found before calling the API, under the API's field names.
    pub(crate) fn fields(fields: Vec<(String, String)>) -> Self {
        Self { message: Some("the form has problems".into()), fields }
    }

    /// The field violations, for a caller that adds them to its own.
    pub(crate) fn into_fields(self) -> Vec<(String, String)> {
        self.fields
    }

    /// One error of the form as a whole.
    pub(crate) fn message(message: impl Into<String>) -> Self {
        Self { message: Some(message.into()), fields: Vec::new() }
    }

    /// The violations of `field` and the fields under it.
    pub(crate) fn of_field(&self, field: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(f, _)| {
                f == field
                    || f.strip_prefix(field)
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            })
            .map(|(_, reason)| reason.as_str())
            .collect()
    }

    /// The summary shown above a form.
    pub(crate) fn summary(&self) -> Markup {
        html! {
            @if let Some(message) = &self.message {
                div.alert role="alert" {
                    @if self.fields.is_empty() {
                        p { (message) }
                    } @else {
                        p { "The request was refused:" }
                        ul { @for (field, reason) in &self.fields { li { code { (field) } ": " (reason) } } }
                    }
                }
            }
        }
    }
}

/// The parts of one form field.
pub(crate) struct Field<'a> {
    /// The input's name in the form.
    pub name: &'a str,
    /// The field in the API's violations.
    pub path: &'a str,
    /// Its label.
    pub label: &'a str,
    /// A hint under the label.
    pub hint: &'a str,
}

impl<'a> Field<'a> {
    /// A field.
    pub(crate) fn new(name: &'a str, path: &'a str, label: &'a str) -> Self {
        Self { name, path, label, hint: "" }
    }

    /// With a hint.
    pub(crate) fn hint(self, hint: &'a str) -> Self {
        Self { hint, ..self }
    }

    fn wrap(&self, errors: &Errors, control: Markup) -> Markup {
        let reasons = errors.of_field(self.path);
        html! {
            div.field.invalid[!reasons.is_empty()] {
                label for=(self.name) { (self.label) }
                @if !self.hint.is_empty() { p.hint #{(self.name) "-hint"} { (self.hint) } }
                (control)
                @for reason in &reasons { p.error #{(self.name) "-error"} { (reason) } }
            }
        }
    }

    fn described(&self, errors: &Errors) -> Option<String> {
        let mut ids = Vec::new();
        if !self.hint.is_empty() {
            ids.push(format!("{}-hint", self.name));
        }
        if !errors.of_field(self.path).is_empty() {
            ids.push(format!("{}-error", self.name));
        }
        (!ids.is_empty()).then(|| ids.join(" "))
    }

    /// A one-line input.
    pub(crate) fn input(&self, errors: &Errors, kind: &str, value: &str) -> Markup {
        let invalid = !errors.of_field(self.path).is_empty();
        self.wrap(
            errors,
            html! {
                input id=(self.name) name=(self.name) type=(kind) value=(value)
                    aria-invalid=[invalid.then_some("true")] aria-describedby=[self.described(errors)];
            },
        )
    }

    /// A text area.
    pub(crate) fn textarea(&self, errors: &Errors, rows: u32, value: &str) -> Markup {
        let invalid = !errors.of_field(self.path).is_empty();
        self.wrap(
            errors,
            html! {
                textarea id=(self.name) name=(self.name) rows=(rows) spellcheck="false"
                    aria-invalid=[invalid.then_some("true")] aria-describedby=[self.described(errors)] { (value) }
            },
        )
    }

    /// A choice among `options` (value, label).
    pub(crate) fn select(
        &self,
        errors: &Errors,
        options: &[(String, String)],
        value: &str,
    ) -> Markup {
        self.wrap(
            errors,
            html! {
                select id=(self.name) name=(self.name) aria-describedby=[self.described(errors)] {
                    @for (v, label) in options { option value=(v) selected[v == value] { (label) } }
                }
            },
        )
    }
}

/// A badge for a state or status.
pub(crate) fn badge(text: &str) -> Markup {
    let tone = match text {
        "delivered" | "active" | "completed" | "closed" | "enabled" | "owned" => "good",
        "failed" | "disabled" | "open" | "cancelled" => "bad",
        "pending" | "sending" | "paused" | "running" | "scheduled" | "half open" => "warn",
        _ => "muted",
    };
    html! { span class={"badge " (tone)} { (text) } }
}

/// A time as `2026-12-02 01:30:05 UTC`.
pub(crate) fn time_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A proto timestamp, or "".
pub(crate) fn timestamp(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| time_ms(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)).unwrap_or_default()
}

/// A proto duration as text: `150ms`, `2s`, `1h 30m`.
pub(crate) fn duration(d: Option<&prost_types::Duration>) -> String {
    let Some(d) = d else { return String::new() };
    let ms = d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000;
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
    }
}

/// Parses `1h30m`-style text into a proto duration; `None` when empty.
pub(crate) fn parse_duration(text: &str) -> Result<Option<prost_types::Duration>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 30s, 5m or 1h30m"))?;
    Ok(Some(prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }))
}

/// Parses a `datetime-local` value (UTC) into a timestamp; `None` when empty.
pub(crate) fn parse_time(text: &str) -> Result<Option<prost_types::Timestamp>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let parsed = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| "write a time as 2026-12-02T09:30 (UTC)".to_string())?;
    let t = parsed.and_utc();
    Ok(Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 }))
}

/// A `datetime-local` value for a timestamp.
pub(crate) fn time_input(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|t| t.format("%Y-%m-%dT%H:%M").to_string())
        .unwrap_or_default()
}

/// A bar chart of one value per slot (a minute, a sample), drawn as SVG. `None` slots are
/// gaps; `format` writes a value for the tooltips and the caption.
pub(crate) fn chart(
    title: &str,
    values: &[(String, Option<f64>)],
    max: Option<f64>,
    format: impl Fn(f64) -> String,
) -> Markup {
    let top = max
        .unwrap_or_else(|| values.iter().filter_map(|(_, v)| *v).fold(0.0_f64, f64::max))
        .max(f64::MIN_POSITIVE);
    let width = 600.0;
    let height = 120.0;
    let slot = width / values.len().max(1) as f64;
    let latest = values.iter().rev().find_map(|(_, v)| *v);
    html! {
        figure.chart {
            figcaption {
                span { (title) }
                span.latest { @if let Some(v) = latest { (format(v)) } @else { "no data yet" } }
            }
            svg viewBox={"0 0 " (width) " " (height)} preserveAspectRatio="none" role="img" aria-label=(title) {
                line x1="0" y1=(height) x2=(width) y2=(height) class="axis" {}
                @for (i, (label, value)) in values.iter().enumerate() {
                    @if let Some(v) = value {
                        @let h = (v / top * (height - 4.0)).clamp(if *v > 0.0 { 1.0 } else { 0.0 }, height);
                        rect x=(format!("{:.1}", i as f64 * slot + 0.5)) y=(format!("{:.1}", height - h))
                            width=(format!("{:.1}", (slot - 1.0).max(0.5))) height=(format!("{:.1}", h)) {
                            title { (label) ": " (format(*v)) }
                        }
                    }
                }
            }
        }
    }
}

/// A JSON value shown as indented text.
pub(crate) fn json_text(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// A request as it goes out: request line, headers and body.
pub(crate) fn request(r: &tidings_api::v1::RenderedRequest) -> Markup {
    let mut headers: Vec<(&String, &String)> = r.headers.iter().collect();
    headers.sort();
    let body = String::from_utf8_lossy(&r.body);
    let body = match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(value) => json_text(&value),
        Err(_) => body.into_owned(),
    };
    html! {
        pre.request {
            strong { (r.method) " " (r.url) } "\n"
            @for (name, value) in headers { (name) ": " (value) "\n" }
            @if !body.is_empty() { "\n" (body) }
        }
    }
}

/// Text of a link that keeps the page's query and changes one parameter.
pub(crate) fn query_with(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if !v.is_empty() {
            s.append_pair(k, v);
        }
    }
    s.finish()
}
