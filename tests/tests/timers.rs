//! Durable timers through the public API: interval campaigns and scheduled runs, across
//! restarts in embedded mode, and the validation of schedules.

use std::time::Duration;

use tidings_client::prost_types::{Duration as PbDuration, Timestamp};
use tidings_client::tonic::Code;
use tidings_client::v1::{
    ActivateCampaignRequest, Campaign, CreateCampaignRequest, CreateWebhookRequest, GetRunRequest,
    IntervalTrigger, ListRunsRequest, MisfirePolicy, OnDemandTrigger, Run, RunCampaignRequest,
    RunState, Trigger, Webhook, trigger::Kind,
};
use tidings_tests::{NodeOptions, NodeProcess, wait_until};
use tonic_types::StatusExt;

fn ms(t: &Option<Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn at(ms: i64) -> Timestamp {
    Timestamp { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

async fn webhook(node: &NodeProcess) {
    let mut api = node.webhooks().await.expect("client");
    let webhook = Webhook { url: "https://example.com/hook".into(), ..Default::default() };
    api.create_webhook(CreateWebhookRequest { webhook_id: "hook".into(), webhook: Some(webhook) })
        .await
        .expect("webhook");
}

fn campaign(kind: Kind) -> Campaign {
    Campaign {
        webhook_id: "hook".into(),
        trigger: Some(Trigger { kind: Some(kind) }),
        ..Default::default()
    }
}

fn every_second(misfire: MisfirePolicy) -> Kind {
    Kind::Interval(IntervalTrigger {
        every: Some(PbDuration { seconds: 1, nanos: 0 }),
        misfire_policy: misfire as i32,
        misfire_limit: 100,
        ..Default::default()
    })
}

async fn runs(node: &NodeProcess, campaign: &str) -> Vec<Run> {
    let mut api = node.campaigns().await.expect("client");
    let request =
        ListRunsRequest { campaign_id: campaign.into(), page_size: 1000, ..Default::default() };
    api.list_runs(request).await.expect("runs").into_inner().runs
}

/// Asserts that no run started before its scheduled time. A run listed before it started has
/// no start time yet, which says nothing about earliness.
fn never_early(runs: &[Run]) {
    for run in runs.iter().filter(|run| run.start_time.is_some()) {
        assert!(
            ms(&run.start_time) >= ms(&run.scheduled_time),
            "run {} started at {} ms, before its scheduled time {} ms",
            run.id,
            ms(&run.start_time),
            ms(&run.scheduled_time)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_occurrences_missed_during_a_crash_fire_after_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let options = NodeOptions { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    webhook(&node).await;
    let mut api = node.campaigns().await.expect("client");
    for (id, misfire) in [
        ("all", MisfirePolicy::FireAll),
        ("once", MisfirePolicy::FireOnce),
        ("skip", MisfirePolicy::Skip),
    ] {
        let request = CreateCampaignRequest {
            campaign_id: id.into(),
            campaign: Some(campaign(every_second(misfire))),
        };
        api.create_campaign(request).await.expect("create");
        api.activate_campaign(ActivateCampaignRequest { id: id.into() }).await.expect("activate");
    }
    wait_until("two firings", Duration::from_secs(10), || async {
        (runs(&node, "all").await.len() >= 2).then_some(())
    })
    .await
    .expect("fired");
    node.kill();
    let down = now_ms();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node = NodeProcess::start(options).await.expect("restart");
    let up = now_ms();
    wait_until("firings after the restart", Duration::from_secs(10), || async {
        let runs = runs(&node, "all").await;
        runs.iter().any(|r| ms(&r.scheduled_time) > up).then_some(())
    })
    .await
    .expect("fires again");

    let all = runs(&node, "all").await;
    never_early(&all);
    let times: Vec<i64> = all.iter().map(|r| ms(&r.scheduled_time)).collect();
    assert!(
        times.windows(2).all(|w| w[1] - w[0] == 1000),
        "every occurrence fired once: {times:?}"
    );
    let once = runs(&node, "once").await;
    never_early(&once);
    let missed_once =
        once.iter().filter(|r| ms(&r.scheduled_time) > down && ms(&r.scheduled_time) < up).count();
    assert_eq!(missed_once, 1, "fire once: one run for the whole outage");
    let skip = runs(&node, "skip").await;
    never_early(&skip);
    let missed_skip = skip
        .iter()
        .filter(|r| ms(&r.scheduled_time) > down + 1000 && ms(&r.scheduled_time) < up)
        .count();
    assert_eq!(missed_skip, 0, "skip: nothing for the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_starts_at_its_time_not_before_even_across_a_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let options = NodeOptions { data_dir: Some(data.path().to_path_buf()), ..Default::default() };
    let mut node = NodeProcess::start(options.clone()).await.expect("node");
    webhook(&node).await;
    let mut api = node.campaigns().await.expect("client");
    let request = CreateCampaignRequest {
        campaign_id: "blast".into(),
        campaign: Some(campaign(Kind::OnDemand(OnDemandTrigger {}))),
    };
    api.create_campaign(request).await.expect("create");
    let inactive = api
        .run_campaign(RunCampaignRequest { id: "blast".into(), ..Default::default() })
        .await
        .expect_err("a draft does not run");
    assert_eq!(inactive.code(), Code::FailedPrecondition);
    api.activate_campaign(ActivateCampaignRequest { id: "blast".into() }).await.expect("activate");

    let past = api
        .run_campaign(RunCampaignRequest {
            id: "blast".into(),
            scheduled_time: Some(at(now_ms() - 60_000)),
            ..Default::default()
        })
        .await
        .expect_err("past");
    assert_eq!(past.code(), Code::InvalidArgument);
    let fields: Vec<String> = past
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, vec!["scheduled_time".to_string()]);

    let due = now_ms() + 3000;
    let run = api
        .run_campaign(RunCampaignRequest {
            id: "blast".into(),
            scheduled_time: Some(at(due)),
            idempotency_key: "nightly-1".into(),
            ..Default::default()
        })
        .await
        .expect("scheduled")
        .into_inner();
    assert_eq!(run.state, RunState::Scheduled as i32);
    let again = api
        .run_campaign(RunCampaignRequest {
            id: "blast".into(),
            scheduled_time: Some(at(due)),
            idempotency_key: "nightly-1".into(),
            ..Default::default()
        })
        .await
        .expect("idempotent")
        .into_inner();
    assert_eq!(again.id, run.id);

    // The timer is durable: a crash before it is due does not lose it.
    node.kill();
    let node = NodeProcess::start(options).await.expect("restart");
    let mut api = node.campaigns().await.expect("client");
    let started = wait_until("the scheduled run to start", Duration::from_secs(15), || {
        let mut api = api.clone();
        let id = run.id.clone();
        async move {
            let run = api
                .get_run(GetRunRequest { campaign_id: "blast".into(), run_id: id })
                .await
                .ok()?
                .into_inner();
            (run.state == RunState::Running as i32 || run.state == RunState::Completed as i32)
                .then_some(run)
        }
    })
    .await
    .expect("started");
    assert!(ms(&started.start_time) >= due, "never early");
    let ran_now = api
        .run_campaign(RunCampaignRequest { id: "blast".into(), ..Default::default() })
        .await
        .expect("now");
    assert_eq!(ran_now.get_ref().state, RunState::Running as i32);

    // The webhook of a campaign that can still send cannot be deleted.
    let mut webhooks = node.webhooks().await.expect("client");
    let request =
        tidings_client::v1::DeleteWebhookRequest { id: "hook".into(), etag: String::new() };
    let in_use = webhooks.delete_webhook(request).await.expect_err("in use");
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert!(in_use.message().contains("blast"), "{}", in_use.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schedules_name_the_field() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    webhook(&node).await;
    let mut api = node.campaigns().await.expect("client");
    let interval = |f: fn(&mut IntervalTrigger)| {
        let mut trigger =
            IntervalTrigger { cron: "0 0 9 * * MON-FRI".into(), ..Default::default() };
        f(&mut trigger);
        campaign(Kind::Interval(trigger))
    };
    let cases: Vec<(&str, Campaign)> = vec![
        ("campaign.trigger.interval.cron", interval(|t| t.cron = "0 0 25 * * *".into())),
        ("campaign.trigger.interval.cron", interval(|t| t.cron = "every day".into())),
        ("campaign.trigger.interval.timezone", interval(|t| t.timezone = "Europe/Atlantis".into())),
        (
            "campaign.trigger.interval.end_time",
            interval(|t| {
                t.start_time = Some(at(now_ms() + 7_200_000));
                t.end_time = Some(at(now_ms() + 3_600_000));
            }),
        ),
        ("campaign.trigger.interval", interval(|t| t.cron = "0 0 0 30 2 *".into())),
        (
            "campaign.trigger.interval.every",
            interval(|t| {
                t.cron = String::new();
                t.every = Some(PbDuration { seconds: 0, nanos: 1000 });
            }),
        ),
        (
            "campaign.trigger.interval.cron",
            interval(|t| t.every = Some(PbDuration { seconds: 60, nanos: 0 })),
        ),
        (
            "campaign.trigger",
            Campaign { trigger: None, ..campaign(Kind::OnDemand(OnDemandTrigger {})) },
        ),
        (
            "campaign.webhook_id",
            Campaign {
                webhook_id: "missing".into(),
                ..campaign(Kind::OnDemand(OnDemandTrigger {}))
            },
        ),
    ];
    for (field, campaign) in cases {
        let status = api
            .create_campaign(CreateCampaignRequest {
                campaign_id: "bad".into(),
                campaign: Some(campaign),
            })
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let fields: Vec<String> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        assert!(fields.contains(&field.to_string()), "{field}: {fields:?} {}", status.message());
    }
}

/// A replay of more missed occurrences than one transaction can start (each run takes two
/// writes, and etcd allows 128 per transaction) goes on over several firings: every occurrence
/// becomes a run, and the partition is never refused a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_many_missed_occurrences_fires_them_all() {
    use tidings_scheduler::store::Store;
    use tidings_scheduler::timers::{Timer, TimerKind};
    let etcd = tidings_tests::Etcd::start().await.expect("etcd");
    let prefix = tidings_tests::unique_prefix();
    let store = etcd.store_at(&prefix).await.expect("store");
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    webhook(&node).await;
    // Every second, ending 5 s from now: its own chain fires a few times at most, and the
    // planted timer below replays the 100 seconds before.
    let mut api = node.campaigns().await.expect("client");
    let kind = Kind::Interval(IntervalTrigger {
        every: Some(PbDuration { seconds: 1, nanos: 0 }),
        start_time: Some(at((now_ms() / 1000 - 200) * 1000)),
        end_time: Some(at(now_ms() + 5_000)),
        misfire_policy: MisfirePolicy::FireAll as i32,
        misfire_limit: 1000,
        ..Default::default()
    });
    api.create_campaign(CreateCampaignRequest {
        campaign_id: "replay".into(),
        campaign: Some(campaign(kind)),
    })
    .await
    .expect("create");
    api.activate_campaign(ActivateCampaignRequest { id: "replay".into() }).await.expect("activate");
    let stored = store.get(b"defs/campaigns/replay").await.expect("read").expect("campaign");
    let generation =
        serde_json::from_slice::<serde_json::Value>(&stored.value).expect("json")["generation"]
            .as_u64()
            .expect("generation");

    // The timer of an occurrence 100 s ago, as if no node had run for 100 s.
    let due = (now_ms() / 1000 - 100) * 1000;
    let timer = Timer {
        id: format!("replay-{generation}"),
        due_ms: due,
        kind: TimerKind::Interval { campaign: "replay".into(), occurrence_ms: due, generation },
    };
    let write = tidings_scheduler::state::Write::timer(5, &timer).expect("timer");
    let state = tidings_tests::cluster_state(&etcd.endpoint(), &prefix).await.expect("state");
    state.write(vec![write]).await.expect("plant the timer");
    // An owner learns of timers it did not write when it loads the partition: stop the node
    // (it hands its partitions back) and start another on the same store.
    let mut node = node;
    node.terminate().await.expect("stop");
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node again");
    let fired =
        wait_until("every missed occurrence to start a run", Duration::from_secs(60), || {
            let node = &node;
            async move {
                let runs = runs(node, "replay").await;
                (runs.len() >= 101).then_some(runs)
            }
        })
        .await
        .expect("runs");
    let mut times: Vec<i64> = fired.iter().map(|r| ms(&r.scheduled_time)).collect();
    times.sort_unstable();
    times.dedup();
    assert!(times.len() >= 101, "{} distinct occurrences", times.len());
    assert_eq!(times[0], due, "the replay starts at the planted occurrence");
    assert!(
        times.windows(2).all(|w| w[1] - w[0] == 1000),
        "no occurrence skipped: {:?}",
        &times[..times.len().min(5)]
    );
    assert!(!node.logs().contains("partition write refused"), "{}", node.logs());
}
