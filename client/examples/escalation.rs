//! The escalation chain: an email webhook on `incident.opened`; if the email is not clicked
//! within a minute, an SMS; if the SMS is not acted on within a minute, a call.
//!
//! ```sh
//! cargo run -p tidings-client --example escalation -- https://hooks.example.com
//! ```
//!
//! The three webhooks call `<base>/email`, `<base>/sms` and `<base>/call`. Receivers report
//! what the contact did with `RecordInteraction` (see `client.events().record_interaction`).

use std::time::Duration;

use tidings_client::v1::{Campaign, DeliveryStatus, Event, Webhook};
use tidings_client::{Client, Error};

async fn step(client: &Client, id: &str, base: &str, campaign: Campaign) -> Result<(), Error> {
    let webhook = Webhook::new(format!("{base}/{id}"))
        .description(format!("escalation: {id}"))
        .body(r#"{"incident": "{{ event.data.incident }}", "to": "{{ contact.id }}"}"#);
    match client.webhooks().create_with_id(id, webhook).await {
        Ok(created) => println!("webhook {id}: signing secret {}", created.signing_secret),
        Err(Error::Conflict(_)) => println!("webhook {id}: exists"),
        Err(error) => return Err(error),
    }
    let campaign = campaign.description(format!("escalation: {id}"));
    match client.campaigns().create_with_id(format!("escalate-{id}"), campaign).await {
        Ok(_) | Err(Error::Conflict(_)) => {}
        Err(error) => return Err(error),
    }
    client.campaigns().activate(format!("escalate-{id}")).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args().nth(1).unwrap_or_else(|| "https://hooks.example.com".into());
    let client = Client::builder()
        .endpoint(std::env::var("TIDINGS_ENDPOINT").unwrap_or("http://127.0.0.1:50051".into()))
        .token(std::env::var("TIDINGS_TOKEN").unwrap_or_default())
        .connect()
        .await?;
    let wait = Duration::from_secs(60);

    step(&client, "email", &base, Campaign::new("email").on_event("incident.opened")).await?;
    let sms = Campaign::new("sms")
        .follow_up("escalate-email", [DeliveryStatus::Delivered], wait)
        .unless_interactions(["clicked"]);
    step(&client, "sms", &base, sms).await?;
    let call = Campaign::new("call")
        .follow_up("escalate-sms", [DeliveryStatus::Delivered], wait)
        .unless_interactions(["actioned"]);
    step(&client, "call", &base, call).await?;

    let event = Event::new("incident.opened", "oncall-ada")
        .data(serde_json::json!({"incident": "db-latency"}));
    let published = client.events().publish(event).await?;
    println!("incident published as {}; the chain has started", published.event_id);
    Ok(())
}
