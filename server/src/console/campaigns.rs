//! Campaigns: the form for every trigger, rules, caps and windows; the follow-up chain drawn as
//! a chain; the dry run with the exact requests; state changes; runs with live counters.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use futures::StreamExt;
use maud::{Markup, html};
use tidings_api::v1 as pb;
use tidings_api::v1::campaign_service_server::CampaignService;
use tonic::Request;

use super::view::{self, Area, Errors, Field};
use super::webhooks::object;
use super::{Console, Fields, Page, Post, Who, form_error, method};

pub(crate) fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/campaigns", get(list).post(create))
        .route("/campaigns/new", get(new))
        .route("/campaigns/{id}", get(show).post(update))
        .route("/campaigns/{id}/preview", get(dry_run))
        .route("/campaigns/{id}/state", post(change_state))
        .route("/campaigns/{id}/run", post(run_now))
        .route("/campaigns/{id}/runs/{run}", get(run_page))
        .route("/campaigns/{id}/runs/{run}/live", get(run_live))
        .route("/campaigns/{id}/runs/{run}/control", post(run_control))
}

/// A campaign state's name.
fn state_name(state: i32) -> String {
    pb::CampaignState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("CAMPAIGN_STATE_").to_ascii_lowercase())
        .unwrap_or_default()
}

/// A run state's name.
fn run_state_name(state: i32) -> String {
    pb::RunState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("RUN_STATE_").to_ascii_lowercase())
        .unwrap_or_default()
}

/// The statuses a follow-up may wait on.
const FOLLOW_STATUSES: [(&str, pb::DeliveryStatus); 3] = [
    ("delivered", pb::DeliveryStatus::Delivered),
    ("failed", pb::DeliveryStatus::Failed),
    ("skipped", pb::DeliveryStatus::Skipped),
];

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// What the form holds, as text.
#[derive(Default)]
struct Form {
    id: String,
    description: String,
    webhook_id: String,
    segment_id: String,
    audience_filter: String,
    trigger: String,
    event_type: String,
    event_filter: String,
    every: String,
    cron: String,
    timezone: String,
    after_campaign_id: String,
    on_status: Vec<String>,
    delay: String,
    unless_interactions: String,
    rules: String,
    max_sends: String,
    cap_period: String,
    across_campaigns: bool,
    days: Vec<u32>,
    window_start: String,
    window_end: String,
    exit_events: String,
    data: String,
    start_time: String,
    end_time: String,
    etag: String,
}

fn list_text(items: &[String]) -> String {
    items.join(", ")
}

fn split_list(text: &str) -> Vec<String> {
    text.split([',', '\n']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

impl Form {
    fn blank() -> Self {
        Self { trigger: "on_demand".into(), ..Default::default() }
    }

    fn of(c: &pb::Campaign) -> Self {
        let mut form = Self {
            id: c.id.clone(),
            description: c.description.clone(),
            webhook_id: c.webhook_id.clone(),
            rules: c.rules.join("\n"),
            exit_events: list_text(&c.exit_events),
            data: c
                .data
                .as_ref()
                .map(|d| {
                    view::json_text(&serde_json::Value::Object(tidings_api::json::struct_to_json(
                        d,
                    )))
                })
                .unwrap_or_default(),
            start_time: view::time_input(c.start_time.as_ref()),
            end_time: view::time_input(c.end_time.as_ref()),
            etag: c.etag.clone(),
            trigger: "on_demand".into(),
            ..Default::default()
        };
        if let Some(a) = &c.audience {
            form.segment_id = a.segment_id.clone();
            form.audience_filter = a.filter.clone();
        }
        match c.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
            Some(pb::trigger::Kind::Event(e)) => {
                form.trigger = "event".into();
                form.event_type = e.event_type.clone();
                form.event_filter = e.filter.clone();
            }
            Some(pb::trigger::Kind::Interval(i)) => {
                form.trigger = "interval".into();
                form.every = view::duration(i.every.as_ref());
                form.cron = i.cron.clone();
                form.timezone = i.timezone.clone();
            }
            Some(pb::trigger::Kind::FollowUp(f)) => {
                form.trigger = "follow_up".into();
                form.after_campaign_id = f.after_campaign_id.clone();
                form.on_status = f
                    .on_status
                    .iter()
                    .map(|s| super::deliveries::status_name(*s).to_string())
                    .collect();
                form.delay = view::duration(f.delay.as_ref());
                form.unless_interactions = list_text(&f.unless_interactions);
            }
            _ => {}
        }
        if let Some(cap) = &c.frequency_cap {
            form.max_sends =
                if cap.max_sends > 0 { cap.max_sends.to_string() } else { String::new() };
            form.cap_period = view::duration(cap.period.as_ref());
            form.across_campaigns = cap.across_campaigns;
        }
        if let Some(w) = &c.send_window {
            form.days = w.days.clone();
            form.window_start = w.start.clone();
            form.window_end = w.end.clone();
        }
        form
    }

    fn posted(f: &Fields) -> Self {
        Self {
            id: f.trimmed("id").into(),
            description: f.get("description").into(),
            webhook_id: f.trimmed("webhook_id").into(),
            segment_id: f.trimmed("segment_id").into(),
            audience_filter: f.trimmed("audience_filter").into(),
            trigger: f.get("trigger").into(),
            event_type: f.trimmed("event_type").into(),
            event_filter: f.trimmed("event_filter").into(),
            every: f.trimmed("every").into(),
            cron: f.trimmed("cron").into(),
            timezone: f.trimmed("timezone").into(),
            after_campaign_id: f.trimmed("after_campaign_id").into(),
            on_status: f.all("on_status").into_iter().map(String::from).collect(),
            delay: f.trimmed("delay").into(),
            unless_interactions: f.get("unless_interactions").into(),
            rules: f.get("rules").into(),
            max_sends: f.trimmed("max_sends").into(),
            cap_period: f.trimmed("cap_period").into(),
            across_campaigns: f.on("across_campaigns"),
            days: f.all("days").into_iter().filter_map(|d| d.parse().ok()).collect(),
            window_start: f.trimmed("window_start").into(),
            window_end: f.trimmed("window_end").into(),
            exit_events: f.get("exit_events").into(),
            data: f.get("data").into(),
            start_time: f.trimmed("start_time").into(),
            end_time: f.trimmed("end_time").into(),
            etag: f.get("etag").into(),
        }
    }

    fn to_proto(&self) -> Result<pb::Campaign, Errors> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut duration = |text: &str, field: &str| {
            view::parse_duration(text).unwrap_or_else(|e| {
                problems.push((field.to_string(), e));
                None
            })
        };
        let every = duration(&self.every, "campaign.trigger.interval.every");
        let delay = duration(&self.delay, "campaign.trigger.follow_up.delay");
        let period = duration(&self.cap_period, "campaign.frequency_cap.period");
        let kind = match self.trigger.as_str() {
            "event" => pb::trigger::Kind::Event(pb::EventTrigger {
                event_type: self.event_type.clone(),
                filter: self.event_filter.clone(),
            }),
            "interval" => pb::trigger::Kind::Interval(pb::IntervalTrigger {
                every,
                cron: self.cron.clone(),
                timezone: self.timezone.clone(),
                ..Default::default()
            }),
            "follow_up" => pb::trigger::Kind::FollowUp(pb::FollowUpTrigger {
                after_campaign_id: self.after_campaign_id.clone(),
                on_status: self
                    .on_status
                    .iter()
                    .filter_map(|s| FOLLOW_STATUSES.iter().find(|(n, _)| n == s))
                    .map(|(_, s)| *s as i32)
                    .collect(),
                delay,
                unless_interactions: split_list(&self.unless_interactions),
            }),
            _ => pb::trigger::Kind::OnDemand(pb::OnDemandTrigger {}),
        };
        let max_sends = match self.max_sends.as_str() {
            "" => 0,
            text => text.parse().unwrap_or_else(|_| {
                problems.push((
                    "campaign.frequency_cap.max_sends".into(),
                    "must be a whole number".into(),
                ));
                0
            }),
        };
        let mut time = |text: &str, field: &str| {
            view::parse_time(text).unwrap_or_else(|e| {
                problems.push((field.to_string(), e));
                None
            })
        };
        let start_time = time(&self.start_time, "campaign.start_time");
        let end_time = time(&self.end_time, "campaign.end_time");
        let data = object(&self.data, "campaign.data").unwrap_or_else(|e| {
            problems.extend(e.into_fields());
            None
        });
        if !problems.is_empty() {
            return Err(Errors::fields(problems));
        }
        let windowed =
            !self.days.is_empty() || !self.window_start.is_empty() || !self.window_end.is_empty();
        Ok(pb::Campaign {
            description: self.description.clone(),
            webhook_id: self.webhook_id.clone(),
            audience: (!self.segment_id.is_empty() || !self.audience_filter.is_empty()).then(
                || pb::Audience {
                    segment_id: self.segment_id.clone(),
                    filter: self.audience_filter.clone(),
                },
            ),
            trigger: Some(pb::Trigger { kind: Some(kind) }),
            rules: self
                .rules
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            frequency_cap: (max_sends > 0 || period.is_some()).then_some(pb::FrequencyCap {
                max_sends,
                period,
                across_campaigns: self.across_campaigns,
            }),
            send_window: windowed.then(|| pb::SendWindow {
                days: self.days.clone(),
                start: self.window_start.clone(),
                end: self.window_end.clone(),
            }),
            start_time,
            end_time,
            exit_events: split_list(&self.exit_events),
            data,
            ..Default::default()
        })
    }
}

/// The choices of the form's selects: webhooks, segments and campaigns by id.
struct Choices {
    webhooks: Vec<(String, String)>,
    segments: Vec<(String, String)>,
    campaigns: Vec<(String, String)>,
}

async fn choices(console: &Console, who: &Who) -> Result<Choices, tonic::Status> {
    let webhooks = console.all_webhooks(who).await?;
    let segments = console.all_segments(who).await?;
    let campaigns = console.all_campaigns(who).await?;
    let labelled = |id: &str, description: &str| {
        let label =
            if description.is_empty() { id.to_string() } else { format!("{id} — {description}") };
        (id.to_string(), label)
    };
    Ok(Choices {
        webhooks: webhooks.iter().map(|w| labelled(&w.id, &w.description)).collect(),
        segments: std::iter::once((String::new(), "every contact".to_string()))
            .chain(segments.iter().map(|s| labelled(&s.id, &s.description)))
            .collect(),
        campaigns: std::iter::once((String::new(), "choose a campaign".to_string()))
            .chain(campaigns.iter().map(|c| labelled(&c.id, &c.description)))
            .collect(),
    })
}

fn trigger_summary(c: &pb::Campaign) -> String {
    match c.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(pb::trigger::Kind::Event(e)) => format!("on event {}", e.event_type),
        Some(pb::trigger::Kind::Interval(i)) if !i.cron.is_empty() => {
            let zone = if i.timezone.is_empty() { "UTC" } else { &i.timezone };
            format!("cron {} ({zone})", i.cron)
        }
        Some(pb::trigger::Kind::Interval(i)) => {
            format!("every {}", view::duration(i.every.as_ref()))
        }
        Some(pb::trigger::Kind::FollowUp(f)) => {
            format!("{} after {}", view::duration(f.delay.as_ref()), f.after_campaign_id)
        }
        _ => "on demand".into(),
    }
}

fn after_of(c: &pb::Campaign) -> Option<&pb::FollowUpTrigger> {
    match c.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(pb::trigger::Kind::FollowUp(f)) => Some(f),
        _ => None,
    }
}

async fn list(State(console): State<Arc<Console>>, who: Who) -> Page {
    let campaigns = console.all_campaigns(&who).await?;
    let body = html! {
        @if who.can_write() { p { a.button href="/campaigns/new" { "New campaign" } } }
        @if campaigns.is_empty() { p { "No campaigns yet. A campaign sends a webhook to an audience when its trigger fires." } }
        @else {
            div.scroll {
                table {
                    thead { tr { th { "Campaign" } th { "State" } th { "Trigger" } th { "Webhook" } th { "Audience" } } }
                    tbody {
                        @for c in &campaigns {
                            tr {
                                td { a href={"/campaigns/" (c.id)} { (c.id) } br; small { (c.description) } }
                                td { (view::badge(&state_name(c.state))) }
                                td { (trigger_summary(c)) }
                                td { a href={"/webhooks/" (c.webhook_id)} { (c.webhook_id) } }
                                td { @match &c.audience { Some(a) if !a.segment_id.is_empty() => { a href={"/segments/" (a.segment_id)} { (a.segment_id) } }, _ => "every contact" } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&who, Area::Campaigns, "Campaigns", body))
}

fn form_markup(
    who: &Who,
    form: &Form,
    errors: &Errors,
    choices: &Choices,
    existing: Option<&pb::Campaign>,
) -> Markup {
    let action = match existing {
        Some(c) => format!("/campaigns/{}", c.id),
        None => "/campaigns".into(),
    };
    html! {
        (errors.summary())
        form.stack.campaign method="post" action=(action) {
            (view::csrf(who))
            input type="hidden" name="etag" value=(form.etag);
            @if existing.is_none() {
                (Field::new("id", "campaign_id", "Id").hint("Leave empty to have one made.").input(errors, "text", &form.id))
            }
            (Field::new("description", "campaign.description", "Description").input(errors, "text", &form.description))
            (Field::new("webhook_id", "campaign.webhook_id", "Webhook").select(errors, &choices.webhooks, &form.webhook_id))
            fieldset {
                legend { "Audience" }
                (Field::new("segment_id", "campaign.audience.segment_id", "Segment").select(errors, &choices.segments, &form.segment_id))
                (Field::new("audience_filter", "campaign.audience.filter", "And a filter (CEL)").hint("Optional, over contact.").input(errors, "text", &form.audience_filter))
            }
            fieldset.trigger {
                legend { "Trigger" }
                div.choices role="radiogroup" {
                    @for (value, label) in [("on_demand", "On demand"), ("event", "On an event"), ("interval", "At an interval"), ("follow_up", "As a follow-up")] {
                        label.choice { input type="radio" name="trigger" value=(value) checked[form.trigger == value]; " " (label) }
                    }
                }
                div.when data-trigger="event" {
                    (Field::new("event_type", "campaign.trigger.event.event_type", "Event type").input(errors, "text", &form.event_type))
                    (Field::new("event_filter", "campaign.trigger.event.filter", "Event filter (CEL)").hint("Optional, over event and contact.").input(errors, "text", &form.event_filter))
                }
                div.when data-trigger="interval" {
                    div.row {
                        (Field::new("every", "campaign.trigger.interval.every", "Every").hint("for example 1h; or a cron below").input(errors, "text", &form.every))
                        (Field::new("cron", "campaign.trigger.interval.cron", "Cron").hint("for example 0 9 * * MON").input(errors, "text", &form.cron))
                        (Field::new("timezone", "campaign.trigger.interval.timezone", "Time zone").hint("IANA name; UTC when empty").input(errors, "text", &form.timezone))
                    }
                }
                div.when data-trigger="follow_up" {
                    (Field::new("after_campaign_id", "campaign.trigger.follow_up.after_campaign_id", "After campaign").select(errors, &choices.campaigns, &form.after_campaign_id))
                    div.field.invalid[!errors.of_field("campaign.trigger.follow_up.on_status").is_empty()] {
                        span.label #on_status-label { "When its delivery is" }
                        div.choices role="group" aria-labelledby="on_status-label" {
                            @for (name, _) in FOLLOW_STATUSES {
                                label.choice { input type="checkbox" name="on_status" value=(name) checked[form.on_status.iter().any(|s| s == name)]; " " (name) }
                            }
                        }
                        @for reason in errors.of_field("campaign.trigger.follow_up.on_status") { p.error { (reason) } }
                    }
                    div.row {
                        (Field::new("delay", "campaign.trigger.follow_up.delay", "Wait").hint("for example 10m").input(errors, "text", &form.delay))
                        (Field::new("unless_interactions", "campaign.trigger.follow_up.unless_interactions", "Unless the contact").hint("interaction kinds, comma-separated: clicked, actioned").input(errors, "text", &form.unless_interactions))
                    }
                }
            }
            (Field::new("rules", "campaign.rules", "Rules (CEL)").hint("One per line; all must hold. For example campaigns[\"welcome\"].last_status == \"delivered\".").textarea(errors, 3, &form.rules))
            fieldset {
                legend { "Frequency cap and send window" }
                div.row {
                    (Field::new("max_sends", "campaign.frequency_cap.max_sends", "At most").hint("sends per contact; empty for no cap").input(errors, "text", &form.max_sends))
                    (Field::new("cap_period", "campaign.frequency_cap.period", "Within").hint("for example 24h").input(errors, "text", &form.cap_period))
                }
                div.field.check { input #across_campaigns type="checkbox" name="across_campaigns" checked[form.across_campaigns]; label for="across_campaigns" { "Count sends of every campaign" } }
                div.field.invalid[!errors.of_field("campaign.send_window").is_empty()] {
                    span.label #days-label { "Days" }
                    div.choices role="group" aria-labelledby="days-label" {
                        @for (i, day) in DAYS.iter().enumerate() {
                            @let n = i as u32 + 1;
                            label.choice { input type="checkbox" name="days" value=(n) checked[form.days.contains(&n)]; " " (day) }
                        }
                    }
                    @for reason in errors.of_field("campaign.send_window") { p.error { (reason) } }
                }
                div.row {
                    (Field::new("window_start", "campaign.send_window.start", "From").hint("HH:MM in the contact's time zone").input(errors, "text", &form.window_start))
                    (Field::new("window_end", "campaign.send_window.end", "To").input(errors, "text", &form.window_end))
                }
            }
            div.row {
                (Field::new("start_time", "campaign.start_time", "Starts (UTC)").input(errors, "datetime-local", &form.start_time))
                (Field::new("end_time", "campaign.end_time", "Ends (UTC)").input(errors, "datetime-local", &form.end_time))
            }
            (Field::new("exit_events", "campaign.exit_events", "Exit events").hint("Event types that cancel a contact's pending follow-ups, comma-separated.").input(errors, "text", &form.exit_events))
            (Field::new("data", "campaign.data", "Data (JSON)").hint("Available to templates as campaign.data.").textarea(errors, 3, &form.data))
            @if who.can_write() { button type="submit" { @if existing.is_some() { "Save" } @else { "Create campaign" } } }
        }
    }
}

async fn new(State(console): State<Arc<Console>>, who: Who) -> Page {
    let choices = choices(&console, &who).await?;
    let body = form_markup(&who, &Form::blank(), &Errors::none(), &choices, None);
    Ok(view::page(&who, Area::Campaigns, "New campaign", body))
}

async fn create(State(console): State<Arc<Console>>, post: Post) -> Page {
    let form = Form::posted(&post.fields);
    let created = match form.to_proto() {
        Err(errors) => Err(Ok(errors)),
        Ok(campaign) => console
            .call(
                &post.who,
                &method("CampaignService", "CreateCampaign"),
                console.api.campaigns.create_campaign(Request::new(pb::CreateCampaignRequest {
                    campaign: Some(campaign),
                    campaign_id: form.id.clone(),
                })),
            )
            .await
            .map_err(form_error),
    };
    let created = match created {
        Ok(c) => Ok(c),
        Err(Ok(errors)) => Err(errors),
        Err(Err(failure)) => return Err(failure),
    };
    match created {
        Ok(c) => Ok(Redirect::to(&format!("/campaigns/{}", c.id)).into_response()),
        Err(errors) => {
            let choices = choices(&console, &post.who).await?;
            let body = form_markup(&post.who, &form, &errors, &choices, None);
            Ok(view::page(&post.who, Area::Campaigns, "New campaign", body))
        }
    }
}

async fn get_campaign(
    console: &Console,
    who: &Who,
    id: &str,
) -> Result<pb::Campaign, tonic::Status> {
    console
        .call(
            who,
            &method("CampaignService", "GetCampaign"),
            console
                .api
                .campaigns
                .get_campaign(Request::new(pb::GetCampaignRequest { id: id.into() })),
        )
        .await
}

async fn show(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let c = get_campaign(&console, &who, &id).await?;
    detail(&console, &who, &c, &Form::of(&c), &Errors::none(), None).await
}

/// The chain a campaign is part of: from the first campaign down every follow-up.
fn chain(all: &[pb::Campaign], current: &str) -> Markup {
    let find = |id: &str| all.iter().find(|c| c.id == id);
    let mut root = current.to_string();
    let mut seen = vec![root.clone()];
    while let Some(after) = find(&root).and_then(after_of).map(|f| f.after_campaign_id.clone()) {
        if seen.contains(&after) || find(&after).is_none() {
            break;
        }
        seen.push(after.clone());
        root = after;
    }
    let has_follow_ups =
        all.iter().any(|c| after_of(c).is_some_and(|f| f.after_campaign_id == current));
    if root == current && !has_follow_ups {
        return html! {};
    }
    fn node(all: &[pb::Campaign], id: &str, current: &str, depth: usize) -> Markup {
        let c = all.iter().find(|c| c.id == id);
        let next: Vec<&pb::Campaign> =
            all.iter().filter(|c| after_of(c).is_some_and(|f| f.after_campaign_id == id)).collect();
        html! {
            li {
                div.step.current[id == current] {
                    a href={"/campaigns/" (id)} { (id) }
                    @if let Some(c) = c {
                        " " (view::badge(&state_name(c.state)))
                        br; small { (trigger_summary(c)) }
                    }
                }
                @if !next.is_empty() && depth < 16 {
                    ol {
                        @for n in next {
                            @let f = after_of(n);
                            li.link {
                                span.arrow aria-hidden="true" { "↓" }
                                small {
                                    "after " (f.map(|f| view::duration(f.delay.as_ref())).unwrap_or_default())
                                    @if let Some(f) = f {
                                        @let statuses: Vec<&str> = f.on_status.iter().map(|s| super::deliveries::status_name(*s)).collect();
                                        " if " @if statuses.is_empty() { "delivered" } @else { (statuses.join(" or ")) }
                                        @if !f.unless_interactions.is_empty() { ", unless " (f.unless_interactions.join(" or ")) }
                                    }
                                }
                            }
                            (node(all, &n.id, current, depth + 1))
                        }
                    }
                }
            }
        }
    }
    html! {
        section.chain aria-label="Follow-up chain" {
            h2 { "Chain" }
            ol.chain { (node(all, &root, current, 0)) }
        }
    }
}

async fn detail(
    console: &Console,
    who: &Who,
    c: &pb::Campaign,
    form: &Form,
    errors: &Errors,
    note: Option<Markup>,
) -> Page {
    let all = console.all_campaigns(who).await?;
    let runs = console
        .call(
            who,
            &method("CampaignService", "ListRuns"),
            console.api.campaigns.list_runs(Request::new(pb::ListRunsRequest {
                campaign_id: c.id.clone(),
                page_size: 20,
                page_token: String::new(),
            })),
        )
        .await?
        .runs;
    let choices = choices(console, who).await?;
    let state = state_name(c.state);
    let on_demand = matches!(
        c.trigger.as_ref().and_then(|t| t.kind.as_ref()),
        Some(pb::trigger::Kind::OnDemand(_)) | None
    );
    let body = html! {
        @if let Some(note) = note { (note) }
        dl.facts {
            dt { "State" } dd #campaign-state { (view::badge(&state)) }
            dt { "Trigger" } dd { (trigger_summary(c)) }
            dt { "Webhook" } dd { a href={"/webhooks/" (c.webhook_id)} { (c.webhook_id) } }
        }
        div.actions {
            a.button.secondary href={"/campaigns/" (c.id) "/preview"} { "Dry run" }
            a.button.secondary href={"/deliveries?" (view::query_with(&[("campaign", &c.id)]))} { "Deliveries" }
            @if who.can_write() {
                @for (to, label) in [("active", "Activate"), ("paused", "Pause"), ("archived", "Archive")] {
                    @if state != to && state != "archived" {
                        form method="post" action={"/campaigns/" (c.id) "/state"} {
                            (view::csrf(who))
                            input type="hidden" name="to" value=(to);
                            button.secondary type="submit" { (label) }
                        }
                    }
                }
                @if on_demand && state == "active" {
                    form method="post" action={"/campaigns/" (c.id) "/run"} {
                        (view::csrf(who))
                        input type="hidden" name="idempotency_key" value=(ulid::Ulid::new().to_string().to_ascii_lowercase());
                        button type="submit" { "Run now" }
                    }
                }
            }
        }
        (chain(&all, &c.id))
        h2 { "Runs" }
        @if runs.is_empty() { p { "No runs yet." } }
        @else {
            div.scroll {
                table {
                    thead { tr { th { "Run" } th { "State" } th { "Audience" } th { "Delivered" } th { "Failed" } th { "Started" } } }
                    tbody {
                        @for r in &runs {
                            tr {
                                td { a href={"/campaigns/" (c.id) "/runs/" (r.id)} { code { (r.id) } } }
                                td { (view::badge(&run_state_name(r.state))) }
                                td { (r.audience) }
                                td { (r.delivered) }
                                td { (r.failed) }
                                td { (view::timestamp(r.start_time.as_ref().or(r.scheduled_time.as_ref()))) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Definition" }
        (form_markup(who, form, errors, &choices, Some(c)))
    };
    Ok(view::page(who, Area::Campaigns, &format!("Campaign {}", c.id), body))
}

async fn update(State(console): State<Arc<Console>>, Path(id): Path<String>, post: Post) -> Page {
    let existing = get_campaign(&console, &post.who, &id).await?;
    let form = Form::posted(&post.fields);
    let updated = match form.to_proto() {
        Err(errors) => Err(Ok(errors)),
        Ok(campaign) => console
            .call(
                &post.who,
                &method("CampaignService", "UpdateCampaign"),
                console.api.campaigns.update_campaign(Request::new(pb::UpdateCampaignRequest {
                    campaign: Some(pb::Campaign { id: id.clone(), ..campaign }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: [
                            "description",
                            "webhook_id",
                            "audience",
                            "trigger",
                            "rules",
                            "frequency_cap",
                            "send_window",
                            "start_time",
                            "end_time",
                            "exit_events",
                            "data",
                        ]
                        .iter()
                        .map(|p| p.to_string())
                        .collect(),
                    }),
                    etag: form.etag.clone(),
                })),
            )
            .await
            .map_err(form_error),
    };
    let updated = match updated {
        Ok(c) => Ok(c),
        Err(Ok(errors)) => Err(errors),
        Err(Err(failure)) => return Err(failure),
    };
    match updated {
        Ok(_) => Ok(Redirect::to(&format!("/campaigns/{id}")).into_response()),
        Err(errors) => detail(&console, &post.who, &existing, &form, &errors, None).await,
    }
}

async fn change_state(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    post: Post,
) -> Page {
    let who = &post.who;
    let done = match post.fields.get("to") {
        "active" => {
            console
                .call(
                    who,
                    &method("CampaignService", "ActivateCampaign"),
                    console.api.campaigns.activate_campaign(Request::new(
                        pb::ActivateCampaignRequest { id: id.clone() },
                    )),
                )
                .await
        }
        "paused" => {
            console
                .call(
                    who,
                    &method("CampaignService", "PauseCampaign"),
                    console
                        .api
                        .campaigns
                        .pause_campaign(Request::new(pb::PauseCampaignRequest { id: id.clone() })),
                )
                .await
        }
        "archived" => {
            console
                .call(
                    who,
                    &method("CampaignService", "ArchiveCampaign"),
                    console.api.campaigns.archive_campaign(Request::new(
                        pb::ArchiveCampaignRequest { id: id.clone() },
                    )),
                )
                .await
        }
        other => Err(tonic::Status::invalid_argument(format!("{other:?} is not a campaign state"))),
    };
    match done {
        Ok(_) => Ok(Redirect::to(&format!("/campaigns/{id}")).into_response()),
        Err(status) => {
            let c = get_campaign(&console, who, &id).await?;
            detail(
                &console,
                who,
                &c,
                &Form::of(&c),
                &Errors::none(),
                Some(form_error(status)?.summary()),
            )
            .await
        }
    }
}

async fn run_now(State(console): State<Arc<Console>>, Path(id): Path<String>, post: Post) -> Page {
    let run = console
        .call(
            &post.who,
            &method("CampaignService", "RunCampaign"),
            console.api.campaigns.run_campaign(Request::new(pb::RunCampaignRequest {
                id: id.clone(),
                idempotency_key: post.fields.trimmed("idempotency_key").into(),
                ..Default::default()
            })),
        )
        .await;
    match run {
        Ok(run) => Ok(Redirect::to(&format!("/campaigns/{id}/runs/{}", run.id)).into_response()),
        Err(status) => {
            let c = get_campaign(&console, &post.who, &id).await?;
            detail(
                &console,
                &post.who,
                &c,
                &Form::of(&c),
                &Errors::none(),
                Some(form_error(status)?.summary()),
            )
            .await
        }
    }
}

async fn dry_run(State(console): State<Arc<Console>>, who: Who, Path(id): Path<String>) -> Page {
    let preview = console
        .call(
            &who,
            &method("CampaignService", "PreviewCampaign"),
            console.api.campaigns.preview_campaign(Request::new(pb::PreviewCampaignRequest {
                id: id.clone(),
                sample_size: 5,
                event_data: None,
            })),
        )
        .await?;
    let body = html! {
        p { "Nothing is sent. The audience holds " strong #dry-run-audience { (preview.audience) } " contacts; here is what the first of them would get." }
        p { a href={"/campaigns/" (id)} { "Back to the campaign" } }
        @for item in &preview.items {
            section.item {
                h2 { @if let Some(c) = &item.contact { a href={"/contacts/" (c.id)} { (c.id) } } }
                @if !item.skip_reason.is_empty() { p { (view::badge("skipped")) " " (item.skip_reason) } }
                @if let Some(r) = &item.request { (view::request(r)) }
            }
        }
    };
    Ok(view::page(&who, Area::Campaigns, &format!("Dry run of {id}"), body))
}

async fn get_run(
    console: &Console,
    who: &Who,
    id: &str,
    run: &str,
) -> Result<pb::Run, tonic::Status> {
    console
        .call(
            who,
            &method("CampaignService", "GetRun"),
            console.api.campaigns.get_run(Request::new(pb::GetRunRequest {
                campaign_id: id.into(),
                run_id: run.into(),
            })),
        )
        .await
}

fn run_json(r: &pb::Run) -> serde_json::Value {
    serde_json::json!({
        "state": run_state_name(r.state),
        "audience": r.audience,
        "queued": r.queued,
        "delivered": r.delivered,
        "failed": r.failed,
        "skipped": r.skipped.values().sum::<u64>(),
        "skipped_by_reason": r.skipped,
        "partitions_done": r.partitions_done,
        "partitions": r.partitions,
    })
}

async fn run_page(
    State(console): State<Arc<Console>>,
    who: Who,
    Path((id, run)): Path<(String, String)>,
) -> Page {
    let r = get_run(&console, &who, &id, &run).await?;
    let state = run_state_name(r.state);
    let mut skipped: Vec<_> = r.skipped.iter().collect();
    skipped.sort();
    let live = !matches!(state.as_str(), "completed" | "cancelled");
    let body = html! {
        p { "Run of " a href={"/campaigns/" (id)} { (id) } ", scheduled " (view::timestamp(r.scheduled_time.as_ref())) "." }
        div data-run=(run_json(&r).to_string()) data-live=[live.then(|| format!("/campaigns/{id}/runs/{run}/live"))] {
            dl.facts {
                dt { "State" } dd { span #run-state data-counter="state" { (view::badge(&state)) } }
            }
            section.cards aria-label="Counters" aria-live="polite" {
                div.card { span.figure #run-audience data-counter="audience" { (r.audience) } span { "audience" } }
                div.card { span.figure #run-queued data-counter="queued" { (r.queued) } span { "queued" } }
                div.card { span.figure #run-delivered data-counter="delivered" { (r.delivered) } span { "delivered" } }
                div.card { span.figure #run-failed data-counter="failed" { (r.failed) } span { "failed" } }
                div.card { span.figure #run-skipped data-counter="skipped" { (r.skipped.values().sum::<u64>()) } span { "skipped" } }
                div.card { span.figure data-counter="partitions_done" { (r.partitions_done) } span { "of " (r.partitions) " partitions done" } }
            }
            figure.chart.progress {
                figcaption { span { "Progress" } span.latest data-counter="progress" {} }
                svg #run-progress viewBox="0 0 600 120" preserveAspectRatio="none" role="img" aria-label="Contacts done over time" {
                    line x1="0" y1="120" x2="600" y2="120" class="axis" {}
                    polyline class="done" points="" {}
                }
            }
            h2 { "Skipped, by reason" }
            ul #skipped-reasons { @for (reason, n) in &skipped { li { (reason) ": " (n) } } @if skipped.is_empty() { li { "none" } } }
        }
        @if who.can_write() && live {
            div.actions {
                @for (action, label) in [("pause", "Pause"), ("resume", "Resume"), ("cancel", "Cancel")] {
                    form method="post" action={"/campaigns/" (id) "/runs/" (run) "/control"} {
                        (view::csrf(&who))
                        input type="hidden" name="action" value=(action);
                        button.secondary type="submit" { (label) }
                    }
                }
            }
        }
        p { a href={"/deliveries?" (view::query_with(&[("campaign", &id), ("run", &run)]))} { "This run's deliveries" } }
    };
    Ok(view::page(&who, Area::Campaigns, &format!("Run {run}"), body))
}

async fn run_live(
    State(console): State<Arc<Console>>,
    who: Who,
    Path((id, run)): Path<(String, String)>,
) -> Result<impl IntoResponse, super::Failure> {
    let stream = console
        .call(
            &who,
            &method("CampaignService", "WatchRun"),
            console
                .api
                .campaigns
                .watch_run(Request::new(pb::WatchRunRequest { campaign_id: id, run_id: run })),
        )
        .await?;
    let events = stream.map(|item| {
        Ok::<_, Infallible>(match item {
            Ok(run) => Event::default().event("run").data(run_json(&run).to_string()),
            Err(status) => Event::default().event("failed").data(status.message()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn run_control(
    State(console): State<Arc<Console>>,
    Path((id, run)): Path<(String, String)>,
    post: Post,
) -> Page {
    let who = &post.who;
    let (campaign_id, run_id) = (id.clone(), run.clone());
    let done = match post.fields.get("action") {
        "pause" => {
            console
                .call(
                    who,
                    &method("CampaignService", "PauseRun"),
                    console
                        .api
                        .campaigns
                        .pause_run(Request::new(pb::PauseRunRequest { campaign_id, run_id })),
                )
                .await
        }
        "resume" => {
            console
                .call(
                    who,
                    &method("CampaignService", "ResumeRun"),
                    console
                        .api
                        .campaigns
                        .resume_run(Request::new(pb::ResumeRunRequest { campaign_id, run_id })),
                )
                .await
        }
        "cancel" => {
            console
                .call(
                    who,
                    &method("CampaignService", "CancelRun"),
                    console
                        .api
                        .campaigns
                        .cancel_run(Request::new(pb::CancelRunRequest { campaign_id, run_id })),
                )
                .await
        }
        other => Err(tonic::Status::invalid_argument(format!("{other:?} is not a run action"))),
    };
    done?;
    Ok(Redirect::to(&format!("/campaigns/{id}/runs/{run}")).into_response())
}
