//! An axum receiver that verifies each webhook Tidings sends before acting on it.
//!
//! ```sh
//! WEBHOOK_SECRET=whsec_... cargo run -p tidings-client --example receiver
//! ```
//!
//! It listens on 127.0.0.1:8080 (`LISTEN` to change it) and answers 204 to a request whose
//! signature verifies, 401 to any other: Tidings retries neither, and records both.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tidings_client::webhook::Verifier;

async fn receive(
    State(verifier): State<Arc<Verifier>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if let Err(error) = verifier.verify(&headers, &body) {
        eprintln!("refused: {error}");
        return StatusCode::UNAUTHORIZED;
    }
    // The webhook-id header stays the same across retries: use it to drop duplicates.
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("?");
    println!("{id}: {}", String::from_utf8_lossy(&body));
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("WEBHOOK_SECRET")
        .map_err(|_| "WEBHOOK_SECRET: set it to the webhook's signing secret (whsec_...)")?;
    let verifier = Arc::new(Verifier::new(&secret)?);
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let app = Router::new().route("/{*path}", post(receive)).with_state(verifier);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
