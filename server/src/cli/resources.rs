//! `tidings webhooks|segments|campaigns`: list, get, create, update and delete definitions
//! from YAML or JSON files; test a webhook; activate and run a campaign.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use tidings_client::v1::{Campaign, CampaignState, Run, RunState, Segment, Webhook, trigger};

use super::messages::{from_file, origin, to_json, to_json_list};
use super::remote::{Format, Remote, Table, colour, count, millis, print_json};

/// What to do with definitions of one kind.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Action {
    /// Lists them.
    List,
    /// Prints one.
    Get {
        /// Its id.
        id: String,
    },
    /// Creates one from a YAML or JSON file (`-` for stdin).
    Create {
        /// The file.
        #[arg(long, short)]
        file: PathBuf,
        /// Its id; generated when not given here or in the file (`id:`).
        #[arg(long)]
        id: Option<String>,
    },
    /// Changes the fields a YAML or JSON file sets, keeping the others.
    Update {
        /// Its id.
        id: String,
        /// The file: only the fields it sets change. With `etag:` the update fails when the
        /// definition changed since that etag was read.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Deletes one.
    Delete {
        /// Its id.
        id: String,
    },
}

/// `tidings webhooks`.
#[derive(Debug, clap::Args)]
pub(crate) struct WebhooksArgs {
    #[command(subcommand)]
    action: WebhookAction,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Subcommand)]
enum WebhookAction {
    #[command(flatten)]
    Common(Action),
    /// Sends one test request now and shows the request and the response.
    Test {
        /// The webhook's id.
        id: String,
    },
}

/// `tidings segments`.
#[derive(Debug, clap::Args)]
pub(crate) struct SegmentsArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    remote: Remote,
}

/// `tidings campaigns`.
#[derive(Debug, clap::Args)]
pub(crate) struct CampaignsArgs {
    #[command(subcommand)]
    action: CampaignAction,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Subcommand)]
enum CampaignAction {
    #[command(flatten)]
    Common(Action),
    /// Activates a campaign: its trigger starts firing.
    Activate {
        /// The campaign's id.
        id: String,
    },
    /// Pauses a campaign.
    Pause {
        /// The campaign's id.
        id: String,
    },
    /// Archives a campaign.
    Archive {
        /// The campaign's id.
        id: String,
    },
    /// Starts a run now; with --watch, shows its counters until it ends.
    Run {
        /// The campaign's id.
        id: String,
        /// Follows the run until it completes or is cancelled.
        #[arg(long)]
        watch: bool,
    },
}

fn with_id(file_id: &str, flag: Option<String>) -> String {
    flag.unwrap_or_else(|| file_id.to_string())
}

/// Returns the fields of an update mask from the fields a file set: output-only fields and the
/// id are not changed by an update.
fn mask(fields: Vec<String>) -> Vec<String> {
    const KEPT: [&str; 5] = ["id", "etag", "create_time", "update_time", "state"];
    fields.into_iter().filter(|f| !KEPT.contains(&f.as_str())).collect()
}

pub(crate) async fn webhooks(args: WebhooksArgs) -> anyhow::Result<()> {
    let client = args.remote.connect().await?;
    let api = client.webhooks();
    let output = args.remote.output;
    let shown = match args.action {
        WebhookAction::Common(Action::List) => {
            let all: Vec<Webhook> = api.list().page_size(500).all().await?;
            if output == Format::Json {
                print_json(&to_json_list(&all)?);
            } else {
                let mut table = Table::new(WEBHOOK_COLUMNS);
                all.iter().for_each(|w| table.row(webhook_row(w)));
                table.print();
            }
            return Ok(());
        }
        WebhookAction::Common(Action::Get { id }) => api.get(id).await?,
        WebhookAction::Common(Action::Create { file, id }) => {
            let (webhook, _) = from_file::<Webhook>(&file)?;
            let id = with_id(&webhook.id, id);
            let created = api.create_with_id(id, webhook).await.context(origin(&file))?;
            if output == Format::Table && !created.signing_secret.is_empty() {
                println!("created webhook {}", created.id);
                println!("signing secret {} (shown this once)", created.signing_secret);
                return Ok(());
            }
            created
        }
        WebhookAction::Common(Action::Update { id, file }) => {
            let (mut webhook, fields) = from_file::<Webhook>(&file)?;
            webhook.id = id;
            api.update(webhook, mask(fields)).await.context(origin(&file))?
        }
        WebhookAction::Common(Action::Delete { id }) => {
            api.delete(&id).await?;
            return deleted(output, "webhook", &id);
        }
        WebhookAction::Test { id } => {
            let response = api.send_test(id).await?;
            if output == Format::Json {
                print_json(&to_json(&response)?);
            } else {
                if let Some(request) = &response.request {
                    println!("> {} {}", request.method, request.url);
                    let mut headers: Vec<_> = request.headers.iter().collect();
                    headers.sort();
                    for (name, value) in headers {
                        println!("> {name}: {value}");
                    }
                    println!(">\n> {}", String::from_utf8_lossy(&request.body));
                }
                if let Some(attempt) = &response.attempt {
                    println!();
                    if attempt.status_code > 0 {
                        println!(
                            "< {} in {}",
                            attempt.status_code,
                            millis(attempt.duration.as_ref())
                        );
                    }
                    if !attempt.error.is_empty() {
                        println!("< error: {}", attempt.error);
                    }
                    let mut headers: Vec<_> = attempt.response_headers.iter().collect();
                    headers.sort();
                    for (name, value) in headers {
                        println!("< {name}: {value}");
                    }
                    if !attempt.response_body.is_empty() {
                        println!("<\n< {}", String::from_utf8_lossy(&attempt.response_body));
                    }
                }
            }
            return Ok(());
        }
    };
    show(output, &shown, || {
        let mut table = Table::new(WEBHOOK_COLUMNS);
        table.row(webhook_row(&shown));
        table.print();
    })
}

const WEBHOOK_COLUMNS: [&str; 4] = ["ID", "METHOD", "ENABLED", "URL"];

fn webhook_row(webhook: &Webhook) -> Vec<String> {
    vec![
        webhook.id.clone(),
        method(webhook),
        webhook.enabled.unwrap_or(true).to_string(),
        webhook.url.clone(),
    ]
}

fn method(webhook: &Webhook) -> String {
    match webhook.method() {
        tidings_client::v1::HttpMethod::Unspecified => "POST".into(),
        other => other.as_str_name().trim_start_matches("HTTP_METHOD_").into(),
    }
}

fn deleted(output: Format, kind: &str, id: &str) -> anyhow::Result<()> {
    if output == Format::Json {
        print_json(&serde_json::json!({ "deleted": id }));
    } else {
        println!("deleted {kind} {id}");
    }
    Ok(())
}

fn show<M: super::messages::Named>(
    output: Format,
    message: &M,
    table: impl FnOnce(),
) -> anyhow::Result<()> {
    if output == Format::Json {
        print_json(&to_json(message)?);
    } else {
        table();
    }
    Ok(())
}

pub(crate) async fn segments(args: SegmentsArgs) -> anyhow::Result<()> {
    let client = args.remote.connect().await?;
    let api = client.segments();
    let output = args.remote.output;
    let row = |s: &Segment| vec![s.id.clone(), s.filter.clone(), s.description.clone()];
    let shown = match args.action {
        Action::List => {
            let all: Vec<Segment> = api.list().page_size(500).all().await?;
            if output == Format::Json {
                print_json(&to_json_list(&all)?);
            } else {
                let mut table = Table::new(["ID", "FILTER", "DESCRIPTION"]);
                all.iter().for_each(|s| table.row(row(s)));
                table.print();
            }
            return Ok(());
        }
        Action::Get { id } => api.get(id).await?,
        Action::Create { file, id } => {
            let (segment, _) = from_file::<Segment>(&file)?;
            let id = with_id(&segment.id, id);
            api.create_with_id(id, segment).await.context(origin(&file))?
        }
        Action::Update { id, file } => {
            let (mut segment, fields) = from_file::<Segment>(&file)?;
            segment.id = id;
            api.update(segment, mask(fields)).await.context(origin(&file))?
        }
        Action::Delete { id } => {
            api.delete(&id).await?;
            return deleted(output, "segment", &id);
        }
    };
    show(output, &shown, || {
        let mut table = Table::new(["ID", "FILTER", "DESCRIPTION"]);
        table.row(row(&shown));
        table.print();
    })
}

fn trigger_name(campaign: &Campaign) -> String {
    match campaign.trigger.as_ref().and_then(|t| t.kind.as_ref()) {
        None | Some(trigger::Kind::OnDemand(_)) => "on demand".into(),
        Some(trigger::Kind::Event(event)) => format!("event {}", event.event_type),
        Some(trigger::Kind::Interval(interval)) if !interval.cron.is_empty() => {
            format!("cron {}", interval.cron)
        }
        Some(trigger::Kind::Interval(interval)) => {
            format!("every {}", millis(interval.every.as_ref()))
        }
        Some(trigger::Kind::FollowUp(follow)) => format!("after {}", follow.after_campaign_id),
    }
}

fn state(campaign: &Campaign) -> String {
    campaign.state().as_str_name().trim_start_matches("CAMPAIGN_STATE_").to_ascii_lowercase()
}

pub(crate) async fn campaigns(args: CampaignsArgs) -> anyhow::Result<()> {
    let client = args.remote.connect().await?;
    let api = client.campaigns();
    let output = args.remote.output;
    let row = |c: &Campaign| vec![c.id.clone(), state(c), c.webhook_id.clone(), trigger_name(c)];
    let shown = match args.action {
        CampaignAction::Common(Action::List) => {
            let all: Vec<Campaign> =
                api.list(CampaignState::Unspecified).page_size(500).all().await?;
            if output == Format::Json {
                print_json(&to_json_list(&all)?);
            } else {
                let mut table = Table::new(["ID", "STATE", "WEBHOOK", "TRIGGER"]);
                all.iter().for_each(|c| table.row(row(c)));
                table.print();
            }
            return Ok(());
        }
        CampaignAction::Common(Action::Get { id }) => api.get(id).await?,
        CampaignAction::Common(Action::Create { file, id }) => {
            let (campaign, _) = from_file::<Campaign>(&file)?;
            let id = with_id(&campaign.id, id);
            api.create_with_id(id, campaign).await.context(origin(&file))?
        }
        CampaignAction::Common(Action::Update { id, file }) => {
            let (mut campaign, fields) = from_file::<Campaign>(&file)?;
            campaign.id = id;
            api.update(campaign, mask(fields)).await.context(origin(&file))?
        }
        CampaignAction::Common(Action::Delete { id }) => {
            api.delete(&id).await?;
            return deleted(output, "campaign", &id);
        }
        CampaignAction::Activate { id } => api.activate(id).await?,
        CampaignAction::Pause { id } => api.pause(id).await?,
        CampaignAction::Archive { id } => api.archive(id).await?,
        CampaignAction::Run { id, watch } => {
            let run = api.run(&id).await?;
            if !watch {
                return show(output, &run, || run_table(&run));
            }
            return watch_run(&api, run, output).await;
        }
    };
    show(output, &shown, || {
        let mut table = Table::new(["ID", "STATE", "WEBHOOK", "TRIGGER"]);
        table.row(row(&shown));
        table.print();
    })
}

fn run_state(run: &Run) -> String {
    run.state().as_str_name().trim_start_matches("RUN_STATE_").to_ascii_lowercase()
}

fn skipped(run: &Run) -> u64 {
    run.skipped.values().sum()
}

fn run_table(run: &Run) {
    let mut table =
        Table::new(["RUN", "STATE", "AUDIENCE", "QUEUED", "DELIVERED", "FAILED", "SKIPPED"]);
    table.row(vec![
        run.id.clone(),
        run_state(run),
        count(run.audience),
        count(run.queued),
        count(run.delivered),
        count(run.failed),
        count(skipped(run)),
    ]);
    table.print();
}

/// Returns a run's counters as one line, with a bar of the share of its audience done.
fn progress(run: &Run) -> String {
    let done = run.delivered + run.failed + skipped(run);
    let share = if run.audience == 0 { 0.0 } else { done as f64 / run.audience as f64 };
    let filled = (share.clamp(0.0, 1.0) * 30.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}%  {}  audience {}  queued {}  delivered {}  failed {}  skipped {}",
        "#".repeat(filled),
        "-".repeat(30 - filled),
        share * 100.0,
        run_state(run),
        count(run.audience),
        count(run.queued),
        count(run.delivered),
        count(run.failed),
        count(skipped(run)),
    )
}

async fn watch_run(
    api: &tidings_client::Campaigns,
    run: Run,
    output: Format,
) -> anyhow::Result<()> {
    let redraw = colour() && output == Format::Table;
    let mut last = run.clone();
    let mut stream = api.watch_run(&run.campaign_id, &run.id).await?;
    if output == Format::Table {
        println!("run {} of {}", run.id, run.campaign_id);
    }
    while let Some(update) = stream.try_next().await? {
        if output == Format::Json {
            println!("{}", serde_json::to_string(&to_json(&update)?)?);
        } else if redraw {
            print!("\r\x1b[2K{}", progress(&update));
            std::io::Write::flush(&mut std::io::stdout())?;
        } else {
            println!("{}", progress(&update));
        }
        last = update;
        if matches!(last.state(), RunState::Completed | RunState::Cancelled) {
            break;
        }
    }
    if redraw {
        println!();
    }
    if !matches!(last.state(), RunState::Completed | RunState::Cancelled) {
        anyhow::bail!("the watch of run {} ended before the run did; watch again", last.id);
    }
    if output == Format::Table {
        let took = match (&last.start_time, &last.end_time) {
            (Some(start), Some(end)) => Duration::from_millis(
                ((end.seconds - start.seconds) * 1000
                    + i64::from(end.nanos - start.nanos) / 1_000_000)
                    .max(0) as u64,
            ),
            _ => Duration::ZERO,
        };
        println!(
            "run {} {} in {}: {} delivered, {} failed, {} skipped",
            last.id,
            run_state(&last),
            humantime::format_duration(took),
            count(last.delivered),
            count(last.failed),
            count(skipped(&last)),
        );
    }
    Ok(())
}
