//! The test harness: real etcd processes, real nodes, and waiting on conditions.
//!
//! - [`Etcd`]: an etcd process on free ports with a temporary data directory;
//! - [`postgres::Postgres`]: a PostgreSQL server (`initdb` + `postgres`), a fresh database per
//!   test;
//! - [`NodeProcess`]: the `tidings` binary as a child process, with its logs captured;
//! - [`browser::Browser`]: headless Chromium over WebDriver, for the console;
//! - [`otlp::Collector`]: an OpenTelemetry collector (OTLP/gRPC traces and metrics);
//! - [`wait_until`]: polls a condition with a deadline and says what it waited for;
//! - [`faults`]: a store wrapper that fails reads on demand;
//! - [`conformance`]: the [`Store`](tidings_scheduler::store::Store) contract, checked against
//!   any backend; [`state_conformance`]: the state layer's, on redb and PostgreSQL.

pub mod browser;
pub mod certs;
pub mod conformance;
mod etcd;
pub mod faults;
mod node;
pub mod otlp;
pub mod postgres;
pub mod readme;
mod receiver;
pub mod setup;
pub mod state_conformance;

use std::future::Future;
use std::time::{Duration, Instant};

pub use etcd::{Etcd, EtcdTlsFiles};
pub use node::{NodeOptions, NodeProcess, cluster_postgres_url, cluster_state, node_binary};
pub use receiver::{Received, Receiver, Reply};

/// Returns a port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Returns a key prefix no other test uses.
pub fn unique_prefix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("/test-{}-{n}-{:x}/", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Sends `GET path` over HTTP/1.1 to 127.0.0.1:`port`; returns the response's head and body,
/// or `None` when nothing answered.
pub async fn http_request(port: u16, path: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// A fixed secrets key for tests, so every node of a test cluster shares it.
pub const TEST_SECRETS_KEY: &str = "dGlkaW5ncy10ZXN0LWtleS0zMi1ieXRlcy1sb25nISE=";
