//! A real HTTP receiver that records every request and answers what the test says.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::wait_until;

/// What one request looked like.
#[derive(Clone, Debug)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// Returns a header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Returns the headers as a `HeaderMap`, as a verifier takes them.
    pub fn header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                axum::http::HeaderName::from_bytes(name.as_bytes()),
                axum::http::HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        headers
    }
}

/// How to answer one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// This status, at once.
    Status(u16),
    /// This status with extra headers.
    WithHeaders(u16, Vec<(String, String)>),
    /// Wait, then this status (a slow or hanging endpoint).
    Delay(Duration, u16),
    /// 200 with this JSON body.
    Json(String),
}

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    script: VecDeque<Reply>,
    default: Option<Reply>,
}

/// A receiver on 127.0.0.1, stopped when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("addr", &self.addr).finish()
    }
}

async fn handle(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.received.push(Received {
            method: method.to_string(),
            path: uri.path_and_query().map_or_else(|| uri.path().to_string(), ToString::to_string),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                })
                .collect(),
            body,
            at: Instant::now(),
        });
        shared.script.pop_front().or_else(|| shared.default.clone()).unwrap_or(Reply::Status(200))
    };
    let (status, headers, body) = match reply {
        Reply::Status(status) => (status, Vec::new(), "ok".to_string()),
        Reply::WithHeaders(status, headers) => (status, headers, "ok".to_string()),
        Reply::Delay(wait, status) => {
            tokio::time::sleep(wait).await;
            (status, Vec::new(), "ok".to_string())
        }
        Reply::Json(body) => {
            (200, vec![("content-type".to_string(), "application/json".to_string())], body)
        }
    };
    let mut response =
        (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

impl Receiver {
    /// Starts a receiver that answers 200 until told otherwise.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// Returns the URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Returns the port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answers the next requests with these replies, in order, then with the default.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.lock().script.extend(replies);
    }

    /// Answers every request without a scripted reply with this one.
    pub fn default_reply(&self, reply: Reply) {
        self.lock().default = Some(reply);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Waits until at least `count` requests arrived.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        wait_until(&format!("{count} requests at the receiver"), timeout, || {
            let received = self.received();
            async move { (received.len() >= count).then_some(received) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; got {}", self.received().len()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
