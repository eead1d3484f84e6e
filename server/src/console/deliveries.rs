//! Deliveries: a search by contact, campaign, webhook, run, status and time, paged over the
//! indexes; one delivery's attempts as a timeline; redelivery.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use maud::{Markup, html};
use tidings_api::v1 as pb;
use tidings_api::v1::delivery_service_server::DeliveryService;
use tonic::Request;

use super::view::{self, Area, Errors, Field};
use super::{Console, Page, Post, Who, method};

pub(crate) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/deliveries", get(list))
        .route("/deliveries/{id}", get(show))
        .route("/deliveries/{id}/redeliver", post(redeliver))
}

/// Rows per page.
const PAGE: u32 = 50;

const STATUSES: [(&str, pb::DeliveryStatus); 5] = [
    ("pending", pb::DeliveryStatus::Pending),
    ("sending", pb::DeliveryStatus::Sending),
    ("delivered", pb::DeliveryStatus::Delivered),
    ("failed", pb::DeliveryStatus::Failed),
    ("skipped", pb::DeliveryStatus::Skipped),
];

/// A delivery status's name.
pub(crate) fn status_name(status: i32) -> &'static str {
    STATUSES.iter().find(|(_, s)| *s as i32 == status).map_or("unknown", |(n, _)| n)
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(crate) struct Search {
    contact: String,
    campaign: String,
    webhook: String,
    run: String,
    status: String,
    since: String,
    until: String,
    page: String,
}

impl Search {
    fn pairs(&self) -> [(&'static str, &str); 7] {
        [
            ("contact", &self.contact),
            ("campaign", &self.campaign),
            ("webhook", &self.webhook),
            ("run", &self.run),
            ("status", &self.status),
            ("since", &self.since),
            ("until", &self.until),
        ]
    }
}

async fn list(State(console): State<Arc<Console>>, who: Who, Query(search): Query<Search>) -> Page {
    let mut problems = Vec::new();
    let status = match search.status.as_str() {
        "" => pb::DeliveryStatus::Unspecified,
        name => STATUSES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).unwrap_or_else(|| {
            problems.push(("filter.status".to_string(), format!("{name:?} is not a status")));
            pb::DeliveryStatus::Unspecified
        }),
    };
    let mut time = |text: &str, field: &str| {
        view::parse_time(text).unwrap_or_else(|e| {
            problems.push((field.to_string(), e));
            None
        })
    };
    let start_time = time(&search.since, "filter.start_time");
    let end_time = time(&search.until, "filter.end_time");
    let (deliveries, next, errors) = if problems.is_empty() {
        let listed = console
            .call(
                &who,
                &method("DeliveryService", "ListDeliveries"),
                console.api.deliveries.list_deliveries(Request::new(pb::ListDeliveriesRequest {
                    filter: Some(pb::DeliveryFilter {
                        webhook_id: search.webhook.trim().into(),
                        campaign_id: search.campaign.trim().into(),
                        contact_id: search.contact.trim().into(),
                        run_id: search.run.trim().into(),
                        status: status as i32,
                        start_time,
                        end_time,
                    }),
                    page_size: PAGE,
                    page_token: search.page.clone(),
                })),
            )
            .await;
        match listed {
            Ok(r) => (r.deliveries, r.next_page_token, Errors::none()),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                (Vec::new(), String::new(), Errors::of(&status))
            }
            Err(status) => return Err(status.into()),
        }
    } else {
        (Vec::new(), String::new(), Errors::fields(problems))
    };
    let statuses: Vec<(String, String)> = std::iter::once(("".to_string(), "any".to_string()))
        .chain(STATUSES.iter().map(|(n, _)| (n.to_string(), n.to_string())))
        .collect();
    let body = html! {
        form.filters method="get" action="/deliveries" role="search" {
            (Field::new("contact", "filter.contact_id", "Contact").input(&errors, "text", &search.contact))
            (Field::new("campaign", "filter.campaign_id", "Campaign").input(&errors, "text", &search.campaign))
            (Field::new("webhook", "filter.webhook_id", "Webhook").input(&errors, "text", &search.webhook))
            (Field::new("run", "filter.run_id", "Run").input(&errors, "text", &search.run))
            (Field::new("status", "filter.status", "Status").select(&errors, &statuses, &search.status))
            (Field::new("since", "filter.start_time", "Since (UTC)").input(&errors, "datetime-local", &search.since))
            (Field::new("until", "filter.end_time", "Until (UTC)").input(&errors, "datetime-local", &search.until))
            div.field.actions { button type="submit" { "Search" } }
        }
        (errors.summary())
        (table(&deliveries))
        nav.pager aria-label="Pages" {
            @if !search.page.is_empty() {
                a href={"/deliveries?" (view::query_with(&search.pairs()))} { "First page" }
            }
            @if !next.is_empty() {
                a rel="next" href={"/deliveries?" (next_page(&search, &next))} { "Next page" }
            }
        }
    };
    Ok(view::page(&who, Area::Deliveries, "Deliveries", body))
}

fn next_page(search: &Search, token: &str) -> String {
    let mut pairs = search.pairs().to_vec();
    pairs.push(("page", token));
    view::query_with(&pairs)
}

/// A table of deliveries, newest first as listed.
pub(crate) fn table(deliveries: &[pb::Delivery]) -> Markup {
    html! {
        @if deliveries.is_empty() {
            p { "No deliveries match." }
        } @else {
            div.scroll {
                table.deliveries {
                    thead { tr { th { "Delivery" } th { "Status" } th { "Contact" } th { "Campaign" } th { "Webhook" } th { "Attempts" } th { "Created" } } }
                    tbody {
                        @for d in deliveries {
                            tr {
                                td { a href={"/deliveries/" (d.id)} { code { (d.id) } } }
                                td { (view::badge(status_name(d.status))) }
                                td { a href={"/contacts/" (d.contact_id)} { (d.contact_id) } }
                                td { @if !d.campaign_id.is_empty() { a href={"/campaigns/" (d.campaign_id)} { (d.campaign_id) } } }
                                td { a href={"/webhooks/" (d.webhook_id)} { (d.webhook_id) } }
                                td { (d.attempts.len()) }
                                td { (view::timestamp(d.create_time.as_ref())) }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn show(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let d = console
        .call(
            &who,
            &method("DeliveryService", "GetDelivery"),
            console.api.deliveries.get_delivery(Request::new(pb::GetDeliveryRequest { id })),
        )
        .await?;
    let body = html! {
        dl.facts {
            dt { "Status" } dd { (view::badge(status_name(d.status))) @if !d.reason.is_empty() { " " (d.reason) } }
            dt { "Contact" } dd { a href={"/contacts/" (d.contact_id)} { (d.contact_id) } }
            dt { "Webhook" } dd { a href={"/webhooks/" (d.webhook_id)} { (d.webhook_id) } }
            @if !d.campaign_id.is_empty() {
                dt { "Campaign" } dd { a href={"/campaigns/" (d.campaign_id)} { (d.campaign_id) } }
            }
            @if !d.run_id.is_empty() {
                dt { "Run" } dd { a href={"/campaigns/" (d.campaign_id) "/runs/" (d.run_id)} { (d.run_id) } }
            }
            @if !d.event_id.is_empty() { dt { "Event" } dd { code { (d.event_id) } } }
            dt { "Created" } dd { (view::timestamp(d.create_time.as_ref())) }
            @if d.next_attempt_time.is_some() { dt { "Next attempt" } dd { (view::timestamp(d.next_attempt_time.as_ref())) } }
        }
        @if who.can_write() && matches!(status_name(d.status), "failed" | "delivered") {
            form method="post" action={"/deliveries/" (d.id) "/redeliver"} {
                (view::csrf(&who))
                button type="submit" { "Redeliver" }
            }
        }
        h2 { "Request" }
        @if let Some(r) = &d.request { (view::request(r)) } @else { p { "Not rendered." } }
        h2 { "Attempts" }
        @if d.attempts.is_empty() { p { "No attempt yet." } }
        ol.timeline {
            @for a in &d.attempts { li { (attempt(a)) } }
        }
    };
    Ok(view::page(&who, Area::Deliveries, &format!("Delivery {}", d.id), body))
}

/// One attempt: when, how long, the answer or the error.
pub(crate) fn attempt(a: &pb::Attempt) -> Markup {
    let ok = (200..300).contains(&a.status_code);
    let class = pb::ErrorClass::try_from(a.error_class)
        .map(|c| c.as_str_name().trim_start_matches("ERROR_CLASS_").to_ascii_lowercase())
        .unwrap_or_default();
    let mut headers: Vec<_> = a.response_headers.iter().collect();
    headers.sort();
    html! {
        div.attempt.ok[ok].bad[!ok] {
            p {
                strong { @if a.status_code > 0 { "HTTP " (a.status_code) } @else { (class) } }
                " · " (view::timestamp(a.start_time.as_ref()))
                " · " (view::duration(a.duration.as_ref()))
                @if !a.node.is_empty() { " · node " code { (a.node) } }
            }
            @if !a.error.is_empty() { p.error { (a.error) } }
            @if !headers.is_empty() || !a.response_body.is_empty() {
                details {
                    summary { "Response" }
                    pre {
                        @for (k, v) in headers { (k) ": " (v) "\n" }
                        @if !a.response_body.is_empty() { "\n" (String::from_utf8_lossy(&a.response_body)) }
                    }
                }
            }
        }
    }
}

async fn redeliver(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    post: Post,
) -> Page {
    let done = console
        .call(
            &post.who,
            &method("DeliveryService", "Redeliver"),
            console.api.deliveries.redeliver(Request::new(pb::RedeliverRequest { id })),
        )
        .await?;
    Ok(Redirect::to(&format!("/deliveries/{}", done.id)).into_response())
}
