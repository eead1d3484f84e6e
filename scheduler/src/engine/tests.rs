use std::time::Duration;

use super::*;
use crate::campaign::{Audience, CampaignState, SendWindow, Trigger};
use crate::clock::Clock;
use crate::delivery::dispatch::DispatchOptions;
use crate::delivery::record::{Attempt, ErrorClass};
use crate::delivery::retry::Verdict;
use crate::store::{EmbeddedStore, FlakyStore, Store};
use crate::webhook::{Method, RetryPolicy};

/// 2026-12-01 20:00:00 UTC, a Tuesday.
const EVENING_MS: i64 = 1_796_155_200_000;

struct Setup {
    engine: CampaignEngine,
    store: Arc<FlakyStore>,
    clock: Clock,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::CancellationToken,
}

fn webhook() -> Webhook {
    Webhook {
        description: String::new(),
        url: "https://example.com/{{ contact.id }}".into(),
        method: Method::Post,
        headers: Vec::new(),
        body: "{}".into(),
        content_type: "application/json".into(),
        timeout_ms: 1_000,
        retry: RetryPolicy::default(),
        rate_limit: 0.0,
        max_in_flight: 0,
        signing_secrets: Vec::new(),
        enabled: true,
        disabled_reason: String::new(),
        disabled_at_ms: None,
        labels: Default::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
        oauth2: None,
        client_certificate: None,
    }
}

fn campaign(trigger: Trigger) -> Campaign {
    Campaign {
        description: String::new(),
        webhook_id: "hook".into(),
        audience: Audience::default(),
        trigger,
        rules: Vec::new(),
        frequency_cap: None,
        send_window: None,
        start_ms: None,
        end_ms: None,
        exit_events: Vec::new(),
        data: Default::default(),
        capture: Default::default(),
        state: CampaignState::Active,
        generation: 1,
        activated_at_ms: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn on_event(kind: &str) -> Trigger {
    Trigger::Event { event_type: kind.into(), filter: String::new() }
}

async fn setup(campaigns: Vec<(&str, Campaign)>) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = EmbeddedStore::open(&dir.path().join("t.redb")).expect("store");
    let store = FlakyStore::new(Arc::new(inner));
    let shared: Arc<dyn Store> = store.clone();
    let webhook_defs = Definitions::new(shared.clone(), "webhook", "webhooks");
    webhook_defs.create("hook", &webhook()).await.expect("webhook");
    let campaign_defs = Definitions::new(shared.clone(), "campaign", "campaigns");
    for (id, campaign) in campaigns {
        campaign_defs.create(id, &campaign).await.expect("campaign");
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let webhooks = Cache::start(webhook_defs.clone(), stop.clone()).await.expect("cache");
    let campaigns = Cache::start(campaign_defs, stop.clone()).await.expect("cache");
    let cipher = Cipher::from_base64(&Cipher::generate_key()).expect("cipher");
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let dispatcher = Dispatcher::new(
        webhooks.clone(),
        webhook_defs,
        cipher.clone(),
        "test".into(),
        live,
        DispatchOptions::default(),
    )
    .expect("dispatcher");
    let clock = Clock::manual(EVENING_MS);
    let engine = CampaignEngine::new(
        &crate::coordination::Coordination::over(shared.clone()),
        State::new(shared),
        campaigns,
        webhooks,
        Arc::new(Templates::new()),
        cipher,
        dispatcher,
        1,
        Duration::from_secs(3600),
    )
    .with_clock(clock.clone());
    Setup { engine, store, clock, _dir: dir, _stop: stop }
}

fn event(kind: &str, contact: &str, at_ms: i64) -> Event {
    Event {
        id: format!("evt-{contact}-{at_ms}"),
        kind: kind.into(),
        contact_id: contact.into(),
        data: Default::default(),
        occurred_ms: at_ms,
        accepted_ms: at_ms,
        resume_after: None,
        exits_after: None,
        traceparent: String::new(),
    }
}

fn delivered(job: Job, at_ms: i64) -> Outcome {
    let attempt = Attempt {
        start_ms: at_ms,
        duration_ms: 5,
        status_code: 200,
        error_class: ErrorClass::None,
        error: String::new(),
        response_headers: Default::default(),
        response_body: Vec::new(),
        node: "test".into(),
    };
    Outcome { job, attempt: Some(attempt), verdict: Verdict::Success, deferred_until_ms: None }
}

/// An email on `urgent` events, and an SMS a minute after it is delivered unless clicked.
async fn email_then_sms_unless_clicked() -> Setup {
    let follow_up = Trigger::FollowUp {
        after_campaign_id: "email".into(),
        on_status: vec!["delivered".into()],
        delay_ms: 60_000,
        unless_interactions: vec!["clicked".into()],
    };
    setup(vec![("email", campaign(on_event("urgent"))), ("sms", campaign(follow_up))]).await
}

#[tokio::test]
async fn a_follow_up_waits_its_delay_and_is_not_sent_after_a_click() {
    let t = email_then_sms_unless_clicked().await;
    let mut waits = Vec::new();
    for contact in ["clicks", "ignores"] {
        let mut effects = Effects::default();
        let now = t.clock.now_ms();
        t.engine.on_event(0, &event("urgent", contact, now), &mut effects).await.expect("event");
        let job = effects.dispatch.pop().expect("the email is sent");
        let mut effects = Effects::default();
        t.engine.on_outcome(0, &delivered(job, now), &mut effects).await.expect("outcome");
        let wait = effects.timers.pop().expect("the follow-up waits");
        assert_eq!(wait.due_ms, now + 60_000, "the wait starts when the email is delivered");
        waits.push(wait);
    }
    let mut effects = Effects::default();
    let now = t.clock.now_ms();
    t.engine
        .on_interaction(0, "clicks", "email", "", "clicked", now + 10, &mut effects)
        .await
        .expect("click");
    t.clock.advance(60_000);
    let mut sent = Vec::new();
    for wait in &waits {
        let mut effects = Effects::default();
        t.engine.on_timer(0, wait, &mut effects).await.expect("wait ends");
        sent.extend(effects.dispatch.into_iter().map(|job| job.delivery.contact_id));
    }
    assert_eq!(sent, vec!["ignores".to_string()]);
}

/// A node sent an email, the contact clicked it, and the node died before recording the
/// attempt. The next owner sends the same delivery again: by its visibility timer, or, when the
/// event itself was not recorded, by handling the event again, which makes the delivery anew
/// after the click. Returns whether the SMS goes out when the wait ends.
async fn sms_after_a_click_on_a_copy_whose_node_died(event_again: bool) -> bool {
    let t = email_then_sms_unless_clicked().await;
    let urgent = event("urgent", "clicks", t.clock.now_ms());
    let mut effects = Effects::default();
    t.engine.on_event(0, &urgent, &mut effects).await.expect("event");
    let first = effects.dispatch.pop().expect("the email is sent");
    t.clock.advance(1_000);
    let mut effects = Effects::default();
    let clicked = t.clock.now_ms();
    t.engine
        .on_interaction(0, "clicks", "email", "", "clicked", clicked, &mut effects)
        .await
        .expect("click");
    t.clock.advance(20_000);
    let again = if event_again {
        let mut effects = Effects::default();
        t.engine.on_event(0, &urgent, &mut effects).await.expect("event again");
        let again = effects.dispatch.pop().expect("the email is sent again");
        assert_eq!(again.delivery.id, first.delivery.id, "the same webhook-id");
        assert!(again.delivery.created_ms > clicked);
        again
    } else {
        first
    };
    let mut effects = Effects::default();
    let outcome = delivered(again, t.clock.now_ms());
    t.engine.on_outcome(0, &outcome, &mut effects).await.expect("outcome");
    let wait = effects.timers.pop().expect("the follow-up waits");
    t.clock.advance(60_000);
    let mut effects = Effects::default();
    t.engine.on_timer(0, &wait, &mut effects).await.expect("wait ends");
    !effects.dispatch.is_empty()
}

/// Regression (both ways): the click on the first copy stops the SMS.
#[tokio::test]
async fn a_click_on_a_copy_whose_node_died_stops_the_follow_up() {
    assert!(!sms_after_a_click_on_a_copy_whose_node_died(false).await, "sent again by its timer");
    assert!(!sms_after_a_click_on_a_copy_whose_node_died(true).await, "made again by its event");
}

/// Regression: the standings cache cleared itself whenever it outgrew its size, also in the
/// middle of a batch, and a later decision of that batch read the store's older standing.
#[tokio::test]
async fn a_batch_keeps_what_it_wrote_however_large_the_cache_grows() {
    let t = setup(vec![("email", campaign(on_event("urgent")))]).await;
    let mut effects = Effects::default();
    let now = t.clock.now_ms();
    t.engine
        .on_interaction(0, "c0", "email", "", "clicked", now, &mut effects)
        .await
        .expect("click");
    for i in 1..=2 * MAX_CACHED_STANDINGS {
        let contact = format!("c{i}");
        t.engine
            .on_interaction(0, &contact, "email", "", "opened", now, &mut effects)
            .await
            .expect("open");
    }
    t.engine.on_interaction(0, "c0", "email", "", "opened", now, &mut effects).await.expect("open");
    let standing = t.engine.status(0, "c0", "email").await.expect("standing");
    assert!(
        standing.interactions.contains_key("clicked")
            && standing.interactions.contains_key("opened"),
        "the batch lost its own click: {standing:?}"
    );
    // Once the batch is committed, the partition's entries go: the store holds them.
    t.engine.on_commit(0);
    assert!(t.engine.statuses.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_send_outside_the_window_waits_for_it_to_open() {
    let mut business_hours = campaign(on_event("notice"));
    business_hours.send_window =
        Some(SendWindow { days: vec![], start_minute: 9 * 60, end_minute: 17 * 60 });
    let t = setup(vec![("notice", business_hours)]).await;
    let mut effects = Effects::default();
    let now = t.clock.now_ms();
    t.engine.on_event(0, &event("notice", "night-owl", now), &mut effects).await.expect("event");
    assert!(effects.dispatch.is_empty(), "nothing is sent at 20:00");
    let attempt = effects.timers.pop().expect("the attempt is scheduled");
    assert_eq!(attempt.due_ms, EVENING_MS + 13 * 3_600_000, "the next day at 09:00");
}

#[tokio::test]
async fn a_read_that_fails_is_an_error_never_a_default() {
    let every = crate::campaign::IntervalTrigger {
        every_ms: 60_000,
        cron: String::new(),
        timezone: String::new(),
        start_ms: None,
        end_ms: None,
        misfire: crate::schedule::Misfire::Skip,
        misfire_limit: 0,
    };
    let t = setup(vec![
        ("notice", campaign(on_event("notice"))),
        ("tick", campaign(Trigger::Interval(every))),
    ])
    .await;
    t.store.fail_reads(true);
    let mut effects = Effects::default();
    let now = t.clock.now_ms();
    let decided = t.engine.on_event(0, &event("notice", "someone", now), &mut effects).await;
    assert!(decided.is_err(), "an unreadable contact is not a subscribed one");
    let tick = Timer {
        id: "tick-1".into(),
        due_ms: now,
        kind: TimerKind::Interval { campaign: "tick".into(), occurrence_ms: now, generation: 1 },
    };
    let mut effects = Effects::default();
    assert!(t.engine.on_timer(0, &tick, &mut effects).await.is_err(), "the chain is kept");

    // Once reads work again the same inputs decide as they should.
    t.store.fail_reads(false);
    let mut effects = Effects::default();
    t.engine.on_event(0, &event("notice", "someone", now), &mut effects).await.expect("event");
    assert_eq!(effects.dispatch.len(), 1);
    let mut effects = Effects::default();
    t.engine.on_timer(0, &tick, &mut effects).await.expect("interval");
    assert!(
        effects.timers.iter().any(|t| matches!(t.kind, TimerKind::Interval { .. })),
        "the interval chain goes on: {:?}",
        effects.timers
    );
}
