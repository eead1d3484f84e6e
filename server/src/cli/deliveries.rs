//! `tidings deliveries`: list, get, redeliver, and tail as deliveries change.

use futures::{StreamExt, TryStreamExt};
use tidings_client::v1::{Delivery, DeliveryFilter, DeliveryStatus};

use super::messages::{to_json, to_json_list};
use super::remote::{Format, Remote, Table, Usage, colour, millis, print_json, time};

/// `tidings deliveries`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeliveriesArgs {
    #[command(subcommand)]
    action: DeliveryAction,
    #[command(flatten)]
    remote: Remote,
}

/// Which deliveries.
#[derive(Debug, Clone, clap::Args)]
struct Filter {
    /// Only deliveries of this campaign.
    #[arg(long)]
    campaign: Option<String>,
    /// Only deliveries of this webhook.
    #[arg(long)]
    webhook: Option<String>,
    /// Only deliveries to this contact.
    #[arg(long)]
    contact: Option<String>,
    /// Only deliveries of this run.
    #[arg(long)]
    run: Option<String>,
    /// Only deliveries in this status: pending, sending, delivered, failed or skipped.
    #[arg(long)]
    status: Option<String>,
}

impl Filter {
    fn to_filter(&self) -> anyhow::Result<DeliveryFilter> {
        let status = match &self.status {
            None => DeliveryStatus::Unspecified,
            Some(name) => DeliveryStatus::from_str_name(&format!(
                "DELIVERY_STATUS_{}",
                name.to_ascii_uppercase()
            ))
            .filter(|s| *s != DeliveryStatus::Unspecified)
            .ok_or_else(|| {
                Usage(format!(
                    "--status: {name:?} is not one of pending, sending, delivered, failed, skipped"
                ))
            })?,
        };
        Ok(DeliveryFilter {
            campaign_id: self.campaign.clone().unwrap_or_default(),
            webhook_id: self.webhook.clone().unwrap_or_default(),
            contact_id: self.contact.clone().unwrap_or_default(),
            run_id: self.run.clone().unwrap_or_default(),
            status: status as i32,
            ..Default::default()
        })
    }
}

#[derive(Debug, clap::Subcommand)]
enum DeliveryAction {
    /// Lists deliveries, oldest first within each partition.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Most deliveries to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Prints one delivery with its attempts.
    Get {
        /// The delivery's id (the `webhook-id` header its receiver got).
        id: String,
    },
    /// Sends a finished delivery again, keeping its id.
    Redeliver {
        /// The delivery's id.
        id: String,
    },
    /// Prints one line per delivery change as it happens, until interrupted.
    Tail {
        #[command(flatten)]
        filter: Filter,
    },
}

pub(crate) async fn deliveries(args: DeliveriesArgs) -> anyhow::Result<()> {
    let client = args.remote.connect().await?;
    let api = client.deliveries();
    let output = args.remote.output;
    match args.action {
        DeliveryAction::List { filter, limit } => {
            let all: Vec<Delivery> = api
                .list(filter.to_filter()?)
                .page_size(limit.clamp(1, 1000) as u32)
                .stream()
                .take(limit)
                .try_collect()
                .await?;
            if output == Format::Json {
                print_json(&to_json_list(&all)?);
            } else {
                let mut table = Table::new([
                    "ID", "STATUS", "CODE", "ATTEMPTS", "CONTACT", "CAMPAIGN", "UPDATED",
                ]);
                for d in &all {
                    table.row(vec![
                        d.id.clone(),
                        status(d),
                        code(d),
                        d.attempts.len().to_string(),
                        d.contact_id.clone(),
                        d.campaign_id.clone(),
                        time(d.update_time.as_ref()),
                    ]);
                }
                table.print();
            }
        }
        DeliveryAction::Get { id } => {
            let delivery = api.get(id).await?;
            if output == Format::Json {
                print_json(&to_json(&delivery)?);
            } else {
                detail(&delivery);
            }
        }
        DeliveryAction::Redeliver { id } => {
            let delivery = api.redeliver(id).await?;
            if output == Format::Json {
                print_json(&to_json(&delivery)?);
            } else {
                println!("delivery {} queued again", delivery.id);
            }
        }
        DeliveryAction::Tail { filter } => {
            let mut stream = api.watch(filter.to_filter()?).await?;
            let coloured = colour();
            // On stderr, so it never mixes with the JSON lines a script reads from stdout.
            eprintln!("following deliveries; interrupt to stop");
            while let Some(delivery) = stream.try_next().await? {
                if output == Format::Json {
                    println!("{}", serde_json::to_string(&to_json(&delivery)?)?);
                } else {
                    println!("{}", line(&delivery, coloured));
                }
            }
            anyhow::bail!("the node ended the stream; tail again");
        }
    }
    Ok(())
}

fn status(delivery: &Delivery) -> String {
    delivery.status().as_str_name().trim_start_matches("DELIVERY_STATUS_").to_ascii_lowercase()
}

fn code(delivery: &Delivery) -> String {
    match delivery.attempts.last() {
        Some(attempt) if attempt.status_code > 0 => attempt.status_code.to_string(),
        Some(_) => "-".into(),
        None => "".into(),
    }
}

/// Returns one line of `tail`: time, status, HTTP code, latency, contact, campaign, id.
fn line(delivery: &Delivery, coloured: bool) -> String {
    let status = format!("{:<9}", status(delivery));
    let status = if coloured {
        let colour = match delivery.status() {
            DeliveryStatus::Delivered => "32",
            DeliveryStatus::Failed => "31",
            DeliveryStatus::Skipped => "90",
            _ => "33",
        };
        format!("\x1b[{colour}m{status}\x1b[0m")
    } else {
        status
    };
    let latency =
        delivery.attempts.last().map_or_else(String::new, |a| millis(a.duration.as_ref()));
    let mut text = format!(
        "{}  {status}  {:>3}  {:>8}  contact={}  campaign={}  id={}",
        time(delivery.update_time.as_ref()),
        code(delivery),
        latency,
        delivery.contact_id,
        delivery.campaign_id,
        delivery.id,
    );
    if !delivery.reason.is_empty() {
        text.push_str(&format!("  reason={:?}", delivery.reason));
    }
    text
}

fn detail(d: &Delivery) {
    println!("delivery   {}", d.id);
    println!(
        "status     {}{}",
        status(d),
        if d.reason.is_empty() { String::new() } else { format!(" ({})", d.reason) }
    );
    println!("webhook    {}", d.webhook_id);
    println!("campaign   {}", d.campaign_id);
    println!("run        {}", d.run_id);
    println!("contact    {}", d.contact_id);
    println!("created    {}", time(d.create_time.as_ref()));
    println!("updated    {}", time(d.update_time.as_ref()));
    if let Some(request) = &d.request {
        println!("request    {} {}", request.method, request.url);
    }
    let mut table = Table::new(["#", "STARTED", "CODE", "DURATION", "NODE", "ERROR"]);
    for (i, a) in d.attempts.iter().enumerate() {
        table.row(vec![
            (i + 1).to_string(),
            time(a.start_time.as_ref()),
            if a.status_code > 0 { a.status_code.to_string() } else { "-".into() },
            millis(a.duration.as_ref()),
            a.node.clone(),
            a.error.clone(),
        ]);
    }
    println!();
    table.print();
}
