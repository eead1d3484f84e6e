//! Segments, with a live count and sample of the filter being typed, and contacts, with their
//! attributes, their standing in each campaign and their deliveries.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use maud::{Markup, html};
use tidings_api::v1 as pb;
use tidings_api::v1::contact_service_server::ContactService;
use tidings_api::v1::delivery_service_server::DeliveryService;
use tidings_api::v1::segment_service_server::SegmentService;
use tonic::Request;

use super::deliveries::status_name;
use super::view::{self, Area, Errors, Field};
use super::{Console, Page, Post, Who, form_error, method};

pub(crate) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/segments", get(segments).post(create))
        .route("/segments/new", get(new))
        .route("/segments/preview", post(preview))
        .route("/segments/{id}", get(segment).post(update))
        .route("/contacts", get(contacts))
        .route("/contacts/{id}", get(contact))
}

async fn segments(State(console): State<Arc<Console>>, who: Who) -> Page {
    let segments = console.all_segments(&who).await?;
    let body = html! {
        @if who.can_write() { p { a.button href="/segments/new" { "New segment" } } }
        @if segments.is_empty() { p { "No segments yet. A segment is a CEL filter over contacts." } }
        @else {
            div.scroll {
                table {
                    thead { tr { th { "Segment" } th { "Filter" } th { "Updated" } } }
                    tbody {
                        @for s in &segments {
                            tr {
                                td { a href={"/segments/" (s.id)} { (s.id) } br; small { (s.description) } }
                                td { code { (s.filter) } }
                                td { (view::timestamp(s.update_time.as_ref())) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&who, Area::Segments, "Segments", body))
}

fn form(
    who: &Who,
    errors: &Errors,
    id: &str,
    existing: Option<&pb::Segment>,
    description: &str,
    filter: &str,
    members: Option<Markup>,
) -> Markup {
    let action = match existing {
        Some(s) => format!("/segments/{}", s.id),
        None => "/segments".into(),
    };
    html! {
        (errors.summary())
        div.split {
            form.stack method="post" action=(action) data-preview="/segments/preview" data-target="#preview" {
                (view::csrf(who))
                @if let Some(s) = existing { input type="hidden" name="etag" value=(s.etag); }
                @else {
                    (Field::new("id", "segment_id", "Id").hint("Leave empty to have one made.").input(errors, "text", id))
                }
                (Field::new("description", "segment.description", "Description").input(errors, "text", description))
                (Field::new("filter", "segment.filter", "Filter (CEL)")
                    .hint("Over contact.id, contact.attributes, contact.timezone and contact.unsubscribed, for example contact.attributes.plan == \"pro\".")
                    .textarea(errors, 3, filter))
                @if who.can_write() { button type="submit" { @if existing.is_some() { "Save" } @else { "Create segment" } } }
            }
            section.preview aria-live="polite" {
                h2 { "Members" }
                div #preview {
                    @match members {
                        Some(members) => (members),
                        None => p.hint { "The count and a sample appear here as you type." },
                    }
                }
            }
        }
    }
}

async fn new(who: Who) -> Page {
    let body = form(&who, &Errors::none(), "", None, "", "", None);
    Ok(view::page(&who, Area::Segments, "New segment", body))
}

fn members(count: u64, total: u64, sample: &[pb::Contact]) -> Markup {
    html! {
        p.figure #member-count { (count) } p { "of " (total) " contacts match." }
        @if !sample.is_empty() {
            ul.sample { @for c in sample { li { a href={"/contacts/" (c.id)} { (c.id) } } } }
        }
    }
}

async fn preview(State(console): State<Arc<Console>>, post: Post) -> Page {
    let segment = pb::Segment {
        description: post.fields.get("description").into(),
        filter: post.fields.trimmed("filter").into(),
        ..Default::default()
    };
    let counted = match console.allow(&post.who, &method("SegmentService", "CountSegment")) {
        Err(status) => Err(status),
        Ok(()) => console.api.contacts.try_segment(&segment, 10).await.map_err(Into::into),
    };
    Ok(match counted {
        Ok((count, total, sample)) => members(count, total, &sample),
        Err(status) => Errors::of(&status).summary(),
    }
    .into_response())
}

async fn create(State(console): State<Arc<Console>>, post: Post) -> Page {
    let f = &post.fields;
    let created = console
        .call(
            &post.who,
            &method("SegmentService", "CreateSegment"),
            console.api.contacts.create_segment(Request::new(pb::CreateSegmentRequest {
                segment: Some(pb::Segment {
                    description: f.get("description").into(),
                    filter: f.trimmed("filter").into(),
                    ..Default::default()
                }),
                segment_id: f.trimmed("id").into(),
            })),
        )
        .await;
    match created {
        Ok(s) => Ok(Redirect::to(&format!("/segments/{}", s.id)).into_response()),
        Err(status) => {
            let body = form(
                &post.who,
                &form_error(status)?,
                f.trimmed("id"),
                None,
                f.get("description"),
                f.get("filter"),
                None,
            );
            Ok(view::page(&post.who, Area::Segments, "New segment", body))
        }
    }
}

async fn segment(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let s = get_segment(&console, &who, &id).await?;
    Ok(segment_page(&console, &who, &s, &Errors::none(), &s.description, &s.filter).await)
}

async fn get_segment(console: &Console, who: &Who, id: &str) -> Result<pb::Segment, tonic::Status> {
    console
        .call(
            who,
            &method("SegmentService", "GetSegment"),
            console.api.contacts.get_segment(Request::new(pb::GetSegmentRequest { id: id.into() })),
        )
        .await
}

async fn segment_page(
    console: &Console,
    who: &Who,
    s: &pb::Segment,
    errors: &Errors,
    description: &str,
    filter: &str,
) -> axum::response::Response {
    let sample = console
        .call(
            who,
            &method("SegmentService", "PreviewSegment"),
            console.api.contacts.preview_segment(Request::new(pb::PreviewSegmentRequest {
                id: s.id.clone(),
                sample_size: 10,
            })),
        )
        .await;
    let count = console
        .call(
            who,
            &method("SegmentService", "CountSegment"),
            console
                .api
                .contacts
                .count_segment(Request::new(pb::CountSegmentRequest { id: s.id.clone() })),
        )
        .await;
    let current = match (count, sample) {
        (Ok(count), Ok(sample)) => members(count.count, count.total, &sample.contacts),
        (Err(status), _) | (_, Err(status)) => Errors::of(&status).summary(),
    };
    let body = html! {
        (form(who, errors, &s.id, Some(s), description, filter, Some(current)))
    };
    view::page(who, Area::Segments, &format!("Segment {}", s.id), body)
}

async fn update(State(console): State<Arc<Console>>, Path(id): Path<String>, post: Post) -> Page {
    let f = &post.fields;
    let existing = get_segment(&console, &post.who, &id).await?;
    let updated = console
        .call(
            &post.who,
            &method("SegmentService", "UpdateSegment"),
            console.api.contacts.update_segment(Request::new(pb::UpdateSegmentRequest {
                segment: Some(pb::Segment {
                    id: id.clone(),
                    description: f.get("description").into(),
                    filter: f.trimmed("filter").into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["description".into(), "filter".into()],
                }),
                etag: f.get("etag").into(),
            })),
        )
        .await;
    match updated {
        Ok(_) => Ok(Redirect::to(&format!("/segments/{id}")).into_response()),
        Err(status) => Ok(segment_page(
            &console,
            &post.who,
            &existing,
            &form_error(status)?,
            f.get("description"),
            f.get("filter"),
        )
        .await),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Lookup {
    id: String,
    filter: String,
    page: String,
}

async fn contacts(State(console): State<Arc<Console>>, who: Who, Query(q): Query<Lookup>) -> Page {
    if !q.id.trim().is_empty() {
        let path = format!(
            "/contacts/{}",
            url::form_urlencoded::byte_serialize(q.id.trim().as_bytes()).collect::<String>()
        );
        return Ok(Redirect::to(&path).into_response());
    }
    let listed = console
        .call(
            &who,
            &method("ContactService", "ListContacts"),
            console.api.contacts.list_contacts(Request::new(pb::ListContactsRequest {
                filter: q.filter.trim().into(),
                page_size: 50,
                page_token: q.page.clone(),
            })),
        )
        .await;
    let (contacts, next, errors) = match listed {
        Ok(r) => (r.contacts, r.next_page_token, Errors::none()),
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            (Vec::new(), String::new(), Errors::of(&status))
        }
        Err(status) => return Err(status.into()),
    };
    let body = html! {
        form.filters method="get" action="/contacts" role="search" {
            (Field::new("id", "id", "Contact id").input(&errors, "text", ""))
            (Field::new("filter", "filter", "Or a filter (CEL)").input(&errors, "text", &q.filter))
            div.field.actions { button type="submit" { "Find" } }
        }
        (errors.summary())
        div.scroll {
            table {
                thead { tr { th { "Contact" } th { "Attributes" } th { "Time zone" } th { "Updated" } } }
                tbody {
                    @for c in &contacts {
                        tr {
                            td { a href={"/contacts/" (c.id)} { (c.id) } @if c.unsubscribed { " " (view::badge("unsubscribed")) } }
                            td { code { (attributes_line(c)) } }
                            td { (c.timezone) }
                            td { (view::timestamp(c.update_time.as_ref())) }
                        }
                    }
                }
            }
        }
        @if !next.is_empty() {
            nav.pager { a rel="next" href={"/contacts?" (view::query_with(&[("filter", &q.filter), ("page", &next)]))} { "Next page" } }
        }
    };
    Ok(view::page(&who, Area::Contacts, "Contacts", body))
}

fn attributes_line(c: &pb::Contact) -> String {
    let json = c
        .attributes
        .as_ref()
        .map(|a| serde_json::Value::Object(tidings_api::json::struct_to_json(a)))
        .unwrap_or_default();
    let text = json.to_string();
    if text.chars().count() > 120 {
        format!("{}…", text.chars().take(120).collect::<String>())
    } else {
        text
    }
}

async fn contact(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let c = console
        .call(
            &who,
            &method("ContactService", "GetContact"),
            console
                .api
                .contacts
                .get_contact(Request::new(pb::GetContactRequest { id: id.clone() })),
        )
        .await?;
    let deliveries = console
        .call(
            &who,
            &method("DeliveryService", "ListDeliveries"),
            console.api.deliveries.list_deliveries(Request::new(pb::ListDeliveriesRequest {
                filter: Some(pb::DeliveryFilter { contact_id: id.clone(), ..Default::default() }),
                page_size: 200,
                page_token: String::new(),
            })),
        )
        .await?
        .deliveries;
    // Standing per campaign: its deliveries to this contact, by status, and the latest.
    let mut standing: BTreeMap<&str, (BTreeMap<&str, usize>, &pb::Delivery)> = BTreeMap::new();
    for d in &deliveries {
        let key = if d.campaign_id.is_empty() { "" } else { d.campaign_id.as_str() };
        let entry = standing.entry(key).or_insert_with(|| (BTreeMap::new(), d));
        *entry.0.entry(status_name(d.status)).or_default() += 1;
        if d.create_time.as_ref().map(|t| (t.seconds, t.nanos))
            > entry.1.create_time.as_ref().map(|t| (t.seconds, t.nanos))
        {
            entry.1 = d;
        }
    }
    let attributes = c
        .attributes
        .as_ref()
        .map(|a| serde_json::Value::Object(tidings_api::json::struct_to_json(a)))
        .unwrap_or_default();
    let body = html! {
        dl.facts {
            dt { "Time zone" } dd { @if c.timezone.is_empty() { "UTC" } @else { (c.timezone) } }
            dt { "Subscribed" } dd { @if c.unsubscribed { (view::badge("unsubscribed")) } @else { "yes" } }
            dt { "Updated" } dd { (view::timestamp(c.update_time.as_ref())) }
        }
        h2 { "Attributes" }
        pre { (view::json_text(&attributes)) }
        h2 { "Campaigns" }
        @if standing.is_empty() { p { "No campaign has sent to this contact." } }
        @else {
            div.scroll {
                table {
                    thead { tr { th { "Campaign" } th { "Deliveries" } th { "Latest" } th { "When" } } }
                    tbody {
                        @for (campaign, (counts, latest)) in &standing {
                            tr {
                                td { @if campaign.is_empty() { "tests" } @else { a href={"/campaigns/" (campaign)} { (campaign) } } }
                                td { @for (status, n) in counts { (n) " " (status) " " } }
                                td { a href={"/deliveries/" (latest.id)} { (view::badge(status_name(latest.status))) } }
                                td { (view::timestamp(latest.create_time.as_ref())) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Deliveries" }
        (super::deliveries::table(&deliveries))
        p { a href={"/deliveries?" (view::query_with(&[("contact", &id)]))} { "Search this contact's deliveries" } }
    };
    Ok(view::page(&who, Area::Contacts, &format!("Contact {}", c.id), body))
}
