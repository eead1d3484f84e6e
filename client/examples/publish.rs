//! Publishes a few events to a node.
//!
//! ```sh
//! cargo run -p tidings-client --example publish -- order.shipped user-42
//! ```
//!
//! `TIDINGS_ENDPOINT` (default `http://127.0.0.1:50051`) and `TIDINGS_TOKEN` say where and as
//! whom.

use tidings_client::Client;
use tidings_client::v1::Event;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let event_type = args.next().unwrap_or_else(|| "order.shipped".into());
    let contact = args.next().unwrap_or_else(|| "user-42".into());

    let client = Client::builder()
        .endpoint(std::env::var("TIDINGS_ENDPOINT").unwrap_or("http://127.0.0.1:50051".into()))
        .token(std::env::var("TIDINGS_TOKEN").unwrap_or_default())
        .connect()
        .await?;

    // One event: durable once `publish` returns. The client gives it an idempotency key, so
    // the retries it makes on UNAVAILABLE cannot publish it twice.
    let order = 1234;
    let published = client
        .events()
        .publish(
            Event::new(&event_type, &contact)
                .data(serde_json::json!({"order": order, "carrier": "ups"}))
                .idempotency_key(format!("{event_type}-{order}")),
        )
        .await?;
    println!("published {} (duplicate: {})", published.event_id, published.duplicate);

    // A batch: each event is validated on its own.
    let batch = (0..10)
        .map(|i| {
            Event::new(&event_type, format!("{contact}-{i}")).data(serde_json::json!({"i": i}))
        })
        .collect();
    for result in client.events().publish_batch(batch).await? {
        match result.error.as_str() {
            "" => println!("published {}", result.event_id),
            error => println!("rejected: {error}"),
        }
    }
    Ok(())
}
