//! Contacts, segments, and on-demand runs fanned out over the partitions.

use std::time::Duration;

use tidings_client::prost_types::{Struct, Value, value::Kind as ValueKind};
use tidings_client::tonic::Code;
use tidings_client::v1::{
    ActivateCampaignRequest, Audience, BatchUpsertContactsRequest, Campaign, Contact,
    CountSegmentRequest, CreateCampaignRequest, CreateSegmentRequest, CreateWebhookRequest,
    GetContactRequest, GetRunRequest, ListContactsRequest, OnDemandTrigger, PreviewSegmentRequest,
    RunCampaignRequest, RunState, Segment, Trigger, UpsertContactRequest, Webhook, trigger::Kind,
};
use tidings_client::{ContactServiceClient, SegmentServiceClient};
use tidings_tests::{NodeOptions, NodeProcess, Receiver, setup, wait_until};
use tonic_types::StatusExt;

fn attributes(plan: &str, n: i64) -> Struct {
    Struct {
        fields: [
            ("plan".to_string(), Value { kind: Some(ValueKind::StringValue(plan.into())) }),
            ("n".to_string(), Value { kind: Some(ValueKind::NumberValue(n as f64)) }),
        ]
        .into(),
    }
}

fn fields(status: &tidings_client::tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Waits until a run is completed and returns it; a completed run says when it ended.
async fn completed(
    campaigns: &tidings_client::CampaignServiceClient<tidings_client::Transport>,
    campaign: &str,
    run: &str,
    within: Duration,
) -> tidings_client::v1::Run {
    let run = wait_until("the run to complete", within, || {
        let mut campaigns = campaigns.clone();
        let request = GetRunRequest { campaign_id: campaign.into(), run_id: run.into() };
        async move {
            let run = campaigns.get_run(request).await.ok()?.into_inner();
            (run.state == RunState::Completed as i32).then_some(run)
        }
    })
    .await
    .expect("completed");
    let (Some(start), Some(end)) = (&run.start_time, &run.end_time) else {
        panic!("a completed run has a start and an end time: {run:?}");
    };
    assert!((end.seconds, end.nanos) >= (start.seconds, start.nanos), "{run:?}");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reaches_every_member_of_its_segment_once() {
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");

    // Import 300 contacts in two stream messages; one is invalid and reported, not written.
    let all: Vec<Contact> = (0..300)
        .map(|i| Contact {
            id: format!("user-{i:03}"),
            attributes: Some(attributes(if i % 2 == 0 { "pro" } else { "free" }, i)),
            timezone: "Europe/Paris".into(),
            unsubscribed: i == 10,
            ..Default::default()
        })
        .chain([Contact { id: "bad id".into(), ..Default::default() }])
        .collect();
    let messages: Vec<BatchUpsertContactsRequest> =
        all.chunks(200).map(|c| BatchUpsertContactsRequest { contacts: c.to_vec() }).collect();
    let imported = contacts
        .batch_upsert_contacts(tokio_stream::iter(messages))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(imported.upserted, 300);
    assert_eq!(imported.rejected_count, 1);
    assert_eq!(imported.rejected[0].index, 300);
    assert!(imported.rejected[0].reason.contains("contact.id"), "{}", imported.rejected[0].reason);

    let one = contacts
        .get_contact(GetContactRequest { id: "user-004".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(one.timezone, "Europe/Paris");
    let bad_zone = contacts
        .upsert_contact(UpsertContactRequest {
            contact: Some(Contact {
                id: "x".into(),
                timezone: "Mars/Base".into(),
                ..Default::default()
            }),
            etag: String::new(),
        })
        .await
        .expect_err("bad zone");
    assert_eq!(fields(&bad_zone), vec!["contact.timezone".to_string()]);
    let stale = contacts
        .upsert_contact(UpsertContactRequest { contact: Some(one.clone()), etag: "1".into() })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let listed = contacts
        .list_contacts(ListContactsRequest {
            filter: "contact.attributes.n < 5".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.contacts.len(), 5);

    let mut segments = SegmentServiceClient::connect(node.url()).await.expect("client");
    let invalid = segments
        .create_segment(CreateSegmentRequest {
            segment_id: "broken".into(),
            segment: Some(Segment {
                filter: "contact.attributes.plan ==".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("invalid CEL");
    assert_eq!(fields(&invalid), vec!["segment.filter".to_string()]);
    let pro =
        Segment { filter: r#"contact.attributes.plan == "pro""#.into(), ..Default::default() };
    segments
        .create_segment(CreateSegmentRequest { segment_id: "pro".into(), segment: Some(pro) })
        .await
        .expect("segment");
    let count = segments
        .count_segment(CountSegmentRequest { id: "pro".into() })
        .await
        .expect("count")
        .into_inner();
    assert_eq!((count.count, count.total), (150, 300));
    let preview = segments
        .preview_segment(PreviewSegmentRequest { id: "pro".into(), sample_size: 3 })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.contacts.len(), 3);

    let mut webhooks = node.webhooks().await.expect("client");
    let webhook = Webhook {
        url: receiver.url("/notify"),
        body: r#"{"to": "{{ contact.id }}", "n": {{ contact.attributes.n }}, "promo": "{{ run.data.code }}"}"#.into(),
        ..Default::default()
    };
    webhooks
        .create_webhook(CreateWebhookRequest {
            webhook_id: "notify".into(),
            webhook: Some(webhook),
        })
        .await
        .expect("webhook");
    let mut campaigns = node.campaigns().await.expect("client");
    let campaign = Campaign {
        webhook_id: "notify".into(),
        audience: Some(Audience { segment_id: "pro".into(), filter: String::new() }),
        trigger: Some(Trigger { kind: Some(Kind::OnDemand(OnDemandTrigger {})) }),
        ..Default::default()
    };
    setup::active_campaign(&node, "promo", campaign).await;
    // The segment of a campaign that can still send cannot be deleted.
    let request =
        tidings_client::v1::DeleteSegmentRequest { id: "pro".into(), etag: String::new() };
    let in_use = segments.delete_segment(request).await.expect_err("in use");
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert!(in_use.message().contains("promo"), "{}", in_use.message());
    // A dry run: the audience and the exact requests, with nothing sent.
    let preview = campaigns
        .preview_campaign(tidings_client::v1::PreviewCampaignRequest {
            id: "promo".into(),
            sample_size: 5,
            event_data: None,
        })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.audience, 150);
    assert_eq!(preview.items.len(), 5);
    // The body reads run.data.code, which only RunCampaign gives: the preview says so.
    for item in &preview.items {
        assert!(item.request.is_none());
        assert!(item.skip_reason.starts_with("render: body"), "{}", item.skip_reason);
    }
    assert!(receiver.received().is_empty(), "a preview sends nothing");

    let code = Struct {
        fields: [(
            "code".to_string(),
            Value { kind: Some(ValueKind::StringValue("SPRING".into())) },
        )]
        .into(),
    };
    let run = campaigns
        .run_campaign(RunCampaignRequest {
            id: "promo".into(),
            data: Some(code),
            ..Default::default()
        })
        .await
        .expect("run")
        .into_inner();

    let received = receiver.wait_for(149, Duration::from_secs(30)).await.expect("deliveries");
    let mut recipients: Vec<String> = received
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")["to"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), 149, "every pro contact but the unsubscribed one, once each");
    assert!(
        received.iter().all(|r| std::str::from_utf8(&r.body).is_ok_and(|b| b.contains("SPRING")))
    );

    let done = completed(&campaigns, "promo", &run.id, Duration::from_secs(20)).await;
    assert_eq!((done.audience, done.queued, done.delivered, done.failed), (150, 149, 149, 0));
    assert_eq!(done.skipped.get("unsubscribed"), Some(&1));
    assert_eq!((done.partitions_done, done.partitions), (8, 8), "embedded mode has 8 partitions");
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    assert_eq!(receiver.received().len(), 149, "no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chatbot_case_caps_and_exit_events() {
    use tidings_client::prost_types::Duration as PbDuration;
    use tidings_client::v1::{
        DeliveryStatus, Event, EventTrigger, FollowUpTrigger, FrequencyCap, PublishRequest,
    };
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");
    let mut attrs = attributes("pro", 7);
    attrs
        .fields
        .insert("first_name".into(), Value { kind: Some(ValueKind::StringValue("Ada".into())) });
    contacts
        .upsert_contact(UpsertContactRequest {
            contact: Some(Contact {
                id: "ada".into(),
                attributes: Some(attrs),
                ..Default::default()
            }),
            etag: String::new(),
        })
        .await
        .expect("contact");

    let mut webhooks = node.webhooks().await.expect("client");
    let hook = |path: &str, body: &str| Webhook {
        url: receiver.url(path),
        body: body.into(),
        ..Default::default()
    };
    let setups = [
        (
            "recommend",
            hook(
                "/email",
                r#"{"hi": "{{ contact.attributes.first_name }}", "items": {{ event.data.items | json }}}"#,
            ),
            Kind::Event(EventTrigger {
                event_type: "chat.intent".into(),
                filter: r#"event.data.intent == "buy""#.into(),
            }),
            None,
            vec![],
        ),
        (
            "nudge",
            hook("/nudge", "{}"),
            Kind::Event(EventTrigger { event_type: "cart.viewed".into(), filter: String::new() }),
            Some(FrequencyCap {
                max_sends: 2,
                period: Some(PbDuration { seconds: 3600, nanos: 0 }),
                across_campaigns: false,
            }),
            vec![],
        ),
        (
            "abandoned",
            hook("/abandoned", "{}"),
            Kind::Event(EventTrigger {
                event_type: "cart.abandoned".into(),
                filter: String::new(),
            }),
            None,
            vec![],
        ),
        (
            "reminder",
            hook("/reminder", "{}"),
            Kind::FollowUp(FollowUpTrigger {
                after_campaign_id: "abandoned".into(),
                on_status: vec![DeliveryStatus::Delivered as i32],
                delay: Some(PbDuration { seconds: 2, nanos: 0 }),
                unless_interactions: vec!["clicked".into()],
            }),
            None,
            vec!["order.completed".to_string()],
        ),
    ];
    for (id, webhook, kind, cap, exits) in setups {
        webhooks
            .create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
            .await
            .expect("webhook");
        let campaign = Campaign {
            webhook_id: id.into(),
            trigger: Some(Trigger { kind: Some(kind) }),
            frequency_cap: cap,
            exit_events: exits,
            ..Default::default()
        };
        setup::active_campaign(&node, id, campaign).await;
    }
    let mut events = node.events().await.expect("client");
    let publish = |kind: &str, data: Option<Struct>| PublishRequest {
        event: Some(Event {
            r#type: kind.into(),
            contact_id: "ada".into(),
            data,
            ..Default::default()
        }),
    };
    let intent = |intent: &str| {
        let items = Value {
            kind: Some(ValueKind::ListValue(tidings_client::prost_types::ListValue {
                values: vec![Value { kind: Some(ValueKind::StringValue("tea".into())) }],
            })),
        };
        Struct {
            fields: [
                ("intent".to_string(), Value { kind: Some(ValueKind::StringValue(intent.into())) }),
                ("items".to_string(), items),
            ]
            .into(),
        }
    };
    // The chatbot case: the body carries the event's data and the contact's attributes; an
    // event that fails the campaign's filter sends nothing.
    events.publish(publish("chat.intent", Some(intent("browse")))).await.expect("publish");
    events.publish(publish("chat.intent", Some(intent("buy")))).await.expect("publish");
    // A frequency cap of 2 per hour: the third and fourth views send nothing.
    for _ in 0..4 {
        events.publish(publish("cart.viewed", None)).await.expect("publish");
    }
    // An exit event during a follow-up's wait cancels it.
    events.publish(publish("cart.abandoned", None)).await.expect("publish");
    receiver.wait_for(4, Duration::from_secs(15)).await.expect("arrivals");
    events.publish(publish("order.completed", None)).await.expect("publish");
    // The reminder's wait ends (without sending) before the node goes quiet.
    node.quiet(Duration::from_secs(20)).await.expect("quiet");

    let received = receiver.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    let count = |p: &str| paths.iter().filter(|x| **x == p).count();
    assert_eq!(count("/email"), 1, "{paths:?}");
    let email = received.iter().find(|r| r.path == "/email").expect("email");
    assert_eq!(&email.body[..], br#"{"hi": "Ada", "items": ["tea"]}"#);
    assert_eq!(count("/nudge"), 2, "the cap holds: {paths:?}");
    assert_eq!(count("/abandoned"), 1);
    assert_eq!(count("/reminder"), 0, "the exit event cancelled the reminder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_read_the_contacts_standing_in_other_campaigns() {
    use tidings_client::v1::{Event, EventTrigger, PublishRequest, RecordInteractionRequest};
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut webhooks = node.webhooks().await.expect("client");
    let mut campaigns = node.campaigns().await.expect("client");
    for id in ["welcome", "upsell"] {
        let webhook = Webhook {
            url: receiver.url(&format!("/{id}?c={{{{ contact.id }}}}")),
            ..Default::default()
        };
        webhooks
            .create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
            .await
            .expect("webhook");
    }
    let event = |t: &str| {
        Some(Trigger {
            kind: Some(Kind::Event(EventTrigger { event_type: t.into(), filter: String::new() })),
        })
    };
    let bad = campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "upsell".into(),
            campaign: Some(Campaign {
                webhook_id: "upsell".into(),
                trigger: event("visit"),
                rules: vec![r#"campaigns["nope"].sends > 0"#.into()],
                ..Default::default()
            }),
        })
        .await
        .expect_err("unknown campaign");
    assert_eq!(fields(&bad), vec!["campaign.rules[0]".to_string()]);
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "welcome".into(),
            campaign: Some(Campaign {
                webhook_id: "welcome".into(),
                trigger: event("signup"),
                ..Default::default()
            }),
        })
        .await
        .expect("welcome");
    // Upsell only contacts who clicked the welcome message.
    let rule = r#"has(campaigns.welcome) && "clicked" in campaigns.welcome.interactions"#;
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "upsell".into(),
            campaign: Some(Campaign {
                webhook_id: "upsell".into(),
                trigger: event("visit"),
                rules: vec![rule.into()],
                ..Default::default()
            }),
        })
        .await
        .expect("upsell");
    for id in ["welcome", "upsell"] {
        campaigns
            .activate_campaign(ActivateCampaignRequest { id: id.into() })
            .await
            .expect("activate");
    }
    let mut events = node.events().await.expect("client");
    for contact in ["clicker", "ignorer"] {
        events
            .publish(PublishRequest {
                event: Some(Event {
                    r#type: "signup".into(),
                    contact_id: contact.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("signup");
    }
    let welcomes = receiver.wait_for(2, Duration::from_secs(10)).await.expect("welcomes");
    let clicked = welcomes.iter().find(|r| r.path.ends_with("clicker")).expect("clicker's welcome");
    events
        .record_interaction(RecordInteractionRequest {
            delivery_id: clicked.header("webhook-id").expect("id").into(),
            kind: "clicked".into(),
            ..Default::default()
        })
        .await
        .expect("click");
    node.drained(Duration::from_secs(20)).await.expect("the click is recorded");
    for contact in ["clicker", "ignorer"] {
        events
            .publish(PublishRequest {
                event: Some(Event {
                    r#type: "visit".into(),
                    contact_id: contact.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("visit");
    }
    receiver.wait_for(3, Duration::from_secs(10)).await.expect("upsell");
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    let upsells: Vec<String> = receiver
        .received()
        .iter()
        .filter(|r| r.path.starts_with("/upsell"))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(upsells, vec!["/upsell?c=clicker".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_can_be_watched_cancelled_and_refuse_impossible_changes() {
    use futures::StreamExt;
    use tidings_client::prost_types::Timestamp;
    use tidings_client::v1::{CancelRunRequest, PauseRunRequest, WatchRunRequest};
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");
    let batch: Vec<Contact> = (0..20)
        .map(|i| Contact {
            id: format!("c{i}"),
            attributes: Some(attributes("pro", i)),
            ..Default::default()
        })
        .collect();
    contacts
        .batch_upsert_contacts(tokio_stream::iter([BatchUpsertContactsRequest { contacts: batch }]))
        .await
        .expect("import");
    let mut webhooks = node.webhooks().await.expect("client");
    webhooks
        .create_webhook(CreateWebhookRequest {
            webhook_id: "w".into(),
            webhook: Some(Webhook { url: receiver.url("/w"), ..Default::default() }),
        })
        .await
        .expect("webhook");
    let mut campaigns = node.campaigns().await.expect("client");
    let campaign = Campaign {
        webhook_id: "w".into(),
        trigger: Some(Trigger { kind: Some(Kind::OnDemand(OnDemandTrigger {})) }),
        ..Default::default()
    };
    setup::active_campaign(&node, "blast", campaign).await;

    // Watch a run to its end.
    let run = campaigns
        .run_campaign(RunCampaignRequest { id: "blast".into(), ..Default::default() })
        .await
        .expect("run")
        .into_inner();
    let mut updates = campaigns
        .watch_run(WatchRunRequest { campaign_id: "blast".into(), run_id: run.id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    while let Some(update) =
        tokio::time::timeout(Duration::from_secs(20), updates.next()).await.expect("updates")
    {
        last = Some(update.expect("ok"));
    }
    let last = last.expect("at least one update");
    assert_eq!(last.state, RunState::Completed as i32);
    assert_eq!(last.delivered, 20);
    let refused = campaigns
        .pause_run(PauseRunRequest { campaign_id: "blast".into(), run_id: run.id.clone() })
        .await
        .expect_err("completed");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Cancel a scheduled run before its time: it never sends.
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    let scheduled = campaigns
        .run_campaign(RunCampaignRequest {
            id: "blast".into(),
            scheduled_time: Some(Timestamp::from(later)),
            ..Default::default()
        })
        .await
        .expect("scheduled")
        .into_inner();
    let cancelled = campaigns
        .cancel_run(CancelRunRequest { campaign_id: "blast".into(), run_id: scheduled.id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, RunState::Cancelled as i32);
    // The run's timer fires at its time and finds it cancelled.
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    assert_eq!(receiver.received().len(), 20, "the cancelled run sent nothing");
    let after = campaigns
        .get_run(GetRunRequest { campaign_id: "blast".into(), run_id: scheduled.id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.state, RunState::Cancelled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_send_window_defers_the_send_to_its_opening() {
    use tidings_client::DeliveryServiceClient;
    use tidings_client::v1::{
        DeliveryFilter, DeliveryStatus, Event, EventTrigger, ListDeliveriesRequest, PublishRequest,
        SendWindow,
    };
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut webhooks = node.webhooks().await.expect("client");
    let _campaigns = node.campaigns().await.expect("client");
    // Today's weekday in UTC (1 = Monday), and the day after.
    let days_since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 86_400;
    let today = ((days_since_epoch + 3) % 7 + 1) as u32; // 1970-01-01 was a Thursday.
    let tomorrow = today % 7 + 1;
    let windows =
        [("open", vec![], "00:00", "23:59"), ("closed", vec![tomorrow], "00:00", "23:59")];
    for (id, days, start, end) in windows {
        webhooks
            .create_webhook(CreateWebhookRequest {
                webhook_id: id.into(),
                webhook: Some(Webhook {
                    url: receiver.url(&format!("/{id}")),
                    ..Default::default()
                }),
            })
            .await
            .expect("webhook");
        let campaign = Campaign {
            webhook_id: id.into(),
            trigger: Some(Trigger {
                kind: Some(Kind::Event(EventTrigger {
                    event_type: "ping".into(),
                    filter: String::new(),
                })),
            }),
            send_window: Some(SendWindow { days, start: start.into(), end: end.into() }),
            ..Default::default()
        };
        setup::active_campaign(&node, id, campaign).await;
    }
    let mut events = node.events().await.expect("client");
    events
        .publish(PublishRequest {
            event: Some(Event {
                r#type: "ping".into(),
                contact_id: "u1".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("publish");
    receiver.wait_for(1, Duration::from_secs(10)).await.expect("the open window sends");
    let mut deliveries = DeliveryServiceClient::connect(node.url()).await.expect("client");
    let deferred = wait_until("the deferred delivery", Duration::from_secs(10), || {
        let mut deliveries = deliveries.clone();
        async move {
            let filter = DeliveryFilter { campaign_id: "closed".into(), ..Default::default() };
            let list = deliveries
                .list_deliveries(ListDeliveriesRequest {
                    filter: Some(filter),
                    page_size: 10,
                    page_token: String::new(),
                })
                .await
                .ok()?
                .into_inner();
            list.deliveries.into_iter().next()
        }
    })
    .await
    .expect("deferred");
    assert_eq!(deferred.status, DeliveryStatus::Pending as i32);
    let next = deferred.next_attempt_time.expect("next attempt").seconds;
    assert_eq!(next % 86_400, 0, "it waits for midnight UTC, when tomorrow's window opens");
    assert!(next as u64 / 86_400 == days_since_epoch + 1);
    let _ = &mut deliveries;
    assert!(
        receiver.received().iter().all(|r| r.path == "/open"),
        "nothing sent outside the window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_cycle_is_refused() {
    use tidings_client::prost_types::{Duration as PbDuration, FieldMask};
    use tidings_client::v1::{EventTrigger, FollowUpTrigger, UpdateCampaignRequest};
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let mut webhooks = node.webhooks().await.expect("client");
    webhooks
        .create_webhook(CreateWebhookRequest {
            webhook_id: "w".into(),
            webhook: Some(Webhook { url: "https://example.com/w".into(), ..Default::default() }),
        })
        .await
        .expect("webhook");
    let mut campaigns = node.campaigns().await.expect("client");
    let follow = |after: &str| {
        Some(Trigger {
            kind: Some(Kind::FollowUp(FollowUpTrigger {
                after_campaign_id: after.into(),
                on_status: vec![],
                delay: Some(PbDuration { seconds: 60, nanos: 0 }),
                unless_interactions: vec![],
            })),
        })
    };
    let first = Campaign {
        webhook_id: "w".into(),
        trigger: Some(Trigger {
            kind: Some(Kind::Event(EventTrigger { event_type: "e".into(), filter: String::new() })),
        }),
        ..Default::default()
    };
    campaigns
        .create_campaign(CreateCampaignRequest { campaign_id: "a".into(), campaign: Some(first) })
        .await
        .expect("a");
    campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "b".into(),
            campaign: Some(Campaign {
                webhook_id: "w".into(),
                trigger: follow("a"),
                ..Default::default()
            }),
        })
        .await
        .expect("b");
    let missing = campaigns
        .create_campaign(CreateCampaignRequest {
            campaign_id: "c".into(),
            campaign: Some(Campaign {
                webhook_id: "w".into(),
                trigger: follow("nope"),
                ..Default::default()
            }),
        })
        .await
        .expect_err("unknown campaign followed");
    assert_eq!(fields(&missing), vec!["campaign.trigger.follow_up.after_campaign_id".to_string()]);
    let cycle = campaigns
        .update_campaign(UpdateCampaignRequest {
            campaign: Some(Campaign { id: "a".into(), trigger: follow("b"), ..Default::default() }),
            update_mask: Some(FieldMask { paths: vec!["trigger".into()] }),
            etag: String::new(),
        })
        .await
        .expect_err("cycle");
    assert_eq!(fields(&cycle), vec!["campaign.trigger.follow_up.after_campaign_id".to_string()]);
    assert!(cycle.message().contains("cycle"), "{}", cycle.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_captured_and_caps_count_every_campaign() {
    use tidings_client::prost_types::Duration as PbDuration;
    use tidings_client::v1::{Event, EventTrigger, FrequencyCap, PublishRequest};
    let receiver = Receiver::start().await.expect("receiver");
    receiver.default_reply(tidings_tests::Reply::Json(
        r#"{"ticket": {"id": "T-42"}, "queue": "billing"}"#.into(),
    ));
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");
    contacts
        .upsert_contact(UpsertContactRequest {
            contact: Some(Contact { id: "ada".into(), ..Default::default() }),
            etag: String::new(),
        })
        .await
        .expect("contact");
    let event_campaign = |kind: &str| Campaign {
        webhook_id: kind.replace('.', "-"),
        trigger: setup::trigger(Kind::Event(EventTrigger {
            event_type: kind.into(),
            filter: String::new(),
        })),
        ..Default::default()
    };
    let hook = |path: &str, body: &str| Webhook {
        url: receiver.url(path),
        body: body.into(),
        ..Default::default()
    };

    setup::webhook(&node, "support-request", hook("/open", "{}")).await;

    // Bad input names the field.
    let mut campaigns = node.campaigns().await.expect("client");
    let mut bad = event_campaign("support.request");
    bad.capture = [("ticket_id".to_string(), "ticket.id".to_string())].into();
    bad.frequency_cap = Some(FrequencyCap {
        max_sends: 1000,
        period: Some(PbDuration { seconds: 60, nanos: 0 }),
        across_campaigns: true,
    });
    let refused = campaigns
        .create_campaign(CreateCampaignRequest { campaign_id: "bad".into(), campaign: Some(bad) })
        .await
        .expect_err("bad capture and cap");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut named = fields(&refused);
    named.sort();
    assert_eq!(named, ["campaign.capture[ticket_id]", "campaign.frequency_cap.max_sends"]);

    // Capture: the ticket id from the first response reaches the contact's attributes, and a
    // later campaign's template reads it.
    setup::webhook(
        &node,
        "support-reply",
        hook("/reply", r#"{"ticket": "{{ contact.attributes.ticket_id }}"}"#),
    )
    .await;
    let mut open = event_campaign("support.request");
    open.capture = [
        ("ticket_id".to_string(), "/ticket/id".to_string()),
        ("queue".to_string(), "/queue".to_string()),
        ("absent".to_string(), "/not/there".to_string()),
    ]
    .into();
    setup::active_campaign(&node, "open-ticket", open).await;
    setup::active_campaign(&node, "ticket-reply", event_campaign("support.reply")).await;

    // Caps across campaigns: two promotions of "promo-a" count towards "promo-b"'s cap of 2.
    setup::webhook(&node, "promo-a", hook("/promo-a", "{}")).await;
    setup::webhook(&node, "promo-b", hook("/promo-b", "{}")).await;
    setup::active_campaign(&node, "promo-a", event_campaign("promo.a")).await;
    let mut capped = event_campaign("promo.b");
    capped.frequency_cap = Some(FrequencyCap {
        max_sends: 2,
        period: Some(PbDuration { seconds: 3600, nanos: 0 }),
        across_campaigns: true,
    });
    setup::active_campaign(&node, "promo-b", capped).await;

    let mut events = node.events().await.expect("client");
    let publish = |kind: &str| PublishRequest {
        event: Some(Event { r#type: kind.into(), contact_id: "ada".into(), ..Default::default() }),
    };
    events.publish(publish("support.request")).await.expect("publish");
    let captured = wait_until("the captured attributes", Duration::from_secs(10), || {
        let mut contacts = contacts.clone();
        async move {
            let contact = contacts
                .get_contact(GetContactRequest { id: "ada".into() })
                .await
                .ok()?
                .into_inner();
            let attributes = contact.attributes?.fields;
            attributes.contains_key("ticket_id").then_some(attributes)
        }
    })
    .await
    .expect("capture");
    let text = |name: &str| match captured.get(name).and_then(|v| v.kind.clone()) {
        Some(ValueKind::StringValue(s)) => s,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text("ticket_id"), "T-42");
    assert_eq!(text("queue"), "billing");
    assert!(!captured.contains_key("absent"));
    events.publish(publish("support.reply")).await.expect("publish");
    let arrived = receiver.wait_for(2, Duration::from_secs(10)).await.expect("reply");
    let reply = arrived.iter().find(|r| r.path == "/reply").expect("reply arrived");
    assert_eq!(&reply.body[..], br#"{"ticket": "T-42"}"#);

    events.publish(publish("promo.a")).await.expect("publish");
    events.publish(publish("promo.a")).await.expect("publish");
    receiver.wait_for(4, Duration::from_secs(10)).await.expect("promotions");
    events.publish(publish("promo.b")).await.expect("publish");
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    let paths: Vec<String> = receiver.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths.iter().filter(|p| *p == "/promo-a").count(), 2, "{paths:?}");
    assert_eq!(paths.iter().filter(|p| *p == "/promo-b").count(), 0, "capped: {paths:?}");
}

/// A run over more partitions, and an exit event listed by more campaigns, than one
/// transaction's writes can hold: both go on in further transactions instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_exit_events_larger_than_one_transaction() {
    use tidings_client::prost_types::Duration as PbDuration;
    use tidings_client::v1::{
        DeliveryStatus, Event, EventTrigger, FollowUpTrigger, PublishRequest,
    };
    let receiver = Receiver::start().await.expect("receiver");
    let options = NodeOptions {
        env: vec![
            ("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into()),
            ("TIDINGS_CLUSTER__PARTITIONS".into(), "300".into()),
        ],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let mut contacts = ContactServiceClient::connect(node.url()).await.expect("client");
    let all: Vec<Contact> = (0..20)
        .map(|i| Contact {
            id: format!("user-{i:02}"),
            attributes: Some(attributes("pro", i)),
            ..Default::default()
        })
        .collect();
    contacts
        .batch_upsert_contacts(tokio_stream::iter([BatchUpsertContactsRequest { contacts: all }]))
        .await
        .expect("import");
    let mut segments = SegmentServiceClient::connect(node.url()).await.expect("client");
    let everyone = Segment { filter: "contact.attributes.n >= 0".into(), ..Default::default() };
    segments
        .create_segment(CreateSegmentRequest { segment_id: "all".into(), segment: Some(everyone) })
        .await
        .expect("segment");
    let mut webhooks = node.webhooks().await.expect("client");
    for path in ["blast", "greet", "reminder"] {
        let webhook = Webhook {
            url: receiver.url(&format!("/{path}")),
            body: r#"{"to": "{{ contact.id }}"}"#.into(),
            ..Default::default()
        };
        webhooks
            .create_webhook(CreateWebhookRequest {
                webhook_id: path.into(),
                webhook: Some(webhook),
            })
            .await
            .expect("webhook");
    }

    // 300 partitions: the run's shards are written 96 at a time.
    let blast = Campaign {
        webhook_id: "blast".into(),
        audience: Some(Audience { segment_id: "all".into(), filter: String::new() }),
        trigger: Some(Trigger { kind: Some(Kind::OnDemand(OnDemandTrigger {})) }),
        ..Default::default()
    };
    setup::active_campaign(&node, "blast", blast).await;
    let mut campaigns = node.campaigns().await.expect("client");
    let run = campaigns
        .run_campaign(RunCampaignRequest { id: "blast".into(), ..Default::default() })
        .await
        .expect("run")
        .into_inner();
    let done = completed(&campaigns, "blast", &run.id, Duration::from_secs(30)).await;
    assert_eq!((done.partitions_done, done.partitions), (300, 300));
    assert_eq!((done.audience, done.delivered), (20, 20));

    // 130 campaigns list `stop` as an exit event, and so does the follow-up of `greet`, whose
    // id sorts after theirs: its exit is written by a later transaction than the first ones.
    for i in 0..130 {
        let listing = Campaign {
            webhook_id: "blast".into(),
            trigger: Some(Trigger {
                kind: Some(Kind::Event(EventTrigger {
                    event_type: "never.sent".into(),
                    filter: String::new(),
                })),
            }),
            exit_events: vec!["stop".into()],
            ..Default::default()
        };
        campaigns
            .create_campaign(CreateCampaignRequest {
                campaign_id: format!("listing-{i:03}"),
                campaign: Some(listing),
            })
            .await
            .expect("campaign");
    }
    let greet = Campaign {
        webhook_id: "greet".into(),
        trigger: Some(Trigger {
            kind: Some(Kind::Event(EventTrigger {
                event_type: "hello".into(),
                filter: String::new(),
            })),
        }),
        ..Default::default()
    };
    setup::active_campaign(&node, "greet", greet).await;
    let reminder = Campaign {
        webhook_id: "reminder".into(),
        trigger: Some(Trigger {
            kind: Some(Kind::FollowUp(FollowUpTrigger {
                after_campaign_id: "greet".into(),
                on_status: vec![DeliveryStatus::Delivered as i32],
                delay: Some(PbDuration { seconds: 2, nanos: 0 }),
                unless_interactions: vec![],
            })),
        }),
        exit_events: vec!["stop".into()],
        ..Default::default()
    };
    setup::active_campaign(&node, "zz-reminder", reminder.clone()).await;
    // A delivery starts the waits of all its campaign's follow-ups in one transaction: a
    // campaign may have 64, and the 65th is refused.
    for i in 0..64 {
        let created = campaigns
            .create_campaign(CreateCampaignRequest {
                campaign_id: format!("follow-{i:02}"),
                campaign: Some(reminder.clone()),
            })
            .await;
        if i < 63 {
            created.expect("follow-up");
        } else {
            let refused = created.expect_err("one follow-up too many");
            assert_eq!(fields(&refused), vec!["campaign.trigger.follow_up.after_campaign_id"]);
            assert!(refused.message().contains("64"), "{}", refused.message());
        }
    }

    let mut events = node.events().await.expect("client");
    let publish = |kind: &str| PublishRequest {
        event: Some(Event {
            r#type: kind.into(),
            contact_id: "user-01".into(),
            ..Default::default()
        }),
    };
    events.publish(publish("hello")).await.expect("hello");
    receiver.wait_for(21, Duration::from_secs(10)).await.expect("greeted");
    events.publish(publish("stop")).await.expect("stop");
    // The follow-ups' waits end, ended by the exit event, before the node goes quiet.
    node.quiet(Duration::from_secs(20)).await.expect("quiet");
    let paths = |received: &[tidings_tests::Received]| {
        received.iter().map(|r| r.path.clone()).collect::<Vec<_>>()
    };
    assert!(
        !paths(&receiver.received()).iter().any(|p| p == "/reminder"),
        "the follow-up was exited"
    );
    // The partition went on past the stop event.
    events.publish(publish("hello")).await.expect("hello again");
    let received = receiver.wait_for(22, Duration::from_secs(10)).await.expect("greeted again");
    assert_eq!(paths(&received).iter().filter(|p| *p == "/greet").count(), 2);
}
