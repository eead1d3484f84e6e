//! A fast local HTTP receiver that answers 204 at once and records when each request arrived,
//! keyed by its body (the bench's webhooks send the event id as the body).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;

/// Arrivals so far.
#[derive(Default)]
pub struct Arrivals {
    /// Requests received.
    pub count: AtomicU64,
    /// Arrival time by body, when recording.
    pub at: Mutex<HashMap<Bytes, Instant>>,
    /// Whether to record bodies.
    pub record: std::sync::atomic::AtomicBool,
}

async fn handle(State(arrivals): State<Arc<Arrivals>>, body: Bytes) -> StatusCode {
    arrivals.count.fetch_add(1, Ordering::Relaxed);
    if arrivals.record.load(Ordering::Relaxed)
        && let Ok(mut at) = arrivals.at.lock()
    {
        at.insert(body, Instant::now());
    }
    StatusCode::NO_CONTENT
}

/// Starts the receiver on a free loopback port; returns its URL and its arrivals.
pub async fn start() -> anyhow::Result<(String, Arc<Arrivals>)> {
    let arrivals = Arc::new(Arrivals::default());
    let app = axum::Router::new().fallback(handle).with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, arrivals))
}
