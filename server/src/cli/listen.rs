//! `tidings listen`: a local receiver that verifies each webhook it gets and prints it
//! readably, to try campaigns on a laptop without writing a receiver.

use std::io::Write;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use tidings_client::webhook::Verifier;

use super::remote::{Format, Usage, colour};

/// `tidings listen`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListenArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on; only this machine by default.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// The webhook's signing secret (whsec_…): each request is verified, and answered 401 when
    /// its signature does not verify. Without it requests are printed unverified.
    #[arg(long, env = "TIDINGS_LISTEN_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Status to answer a request that verifies.
    #[arg(long, default_value_t = 204)]
    status: u16,
    /// How to print requests: readable, or one JSON object per request.
    #[arg(long, short, value_enum, default_value = "table")]
    output: Format,
}

struct Listener {
    verifier: Option<Verifier>,
    status: StatusCode,
    output: Format,
    colour: bool,
}

pub(crate) async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let verifier = match &args.secret {
        Some(secret) => {
            Some(Verifier::new(secret).map_err(|error| Usage(format!("--secret: {error}")))?)
        }
        None => None,
    };
    let status = StatusCode::from_u16(args.status)
        .ok()
        .filter(|s| s.is_success())
        .ok_or_else(|| Usage(format!("--status: {} is not a 2xx status", args.status)))?;
    let address = format!("{}:{}", args.bind, args.port);
    let socket = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|error| Usage(format!("--port: cannot listen on {address}: {error}")))?;
    let bound = socket.local_addr()?;
    let state = Arc::new(Listener { verifier, status, output: args.output, colour: colour() });
    let app = axum::Router::new().fallback(receive).with_state(state.clone());
    if args.output == Format::Table {
        let verifying = if state.verifier.is_some() {
            "verifying signatures"
        } else {
            "not verifying (no --secret)"
        };
        println!("listening on http://{bound}, {verifying}; interrupt to stop");
    }
    std::io::stdout().flush()?;
    axum::serve(socket, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn receive(
    State(listener): State<Arc<Listener>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let verdict = listener.verifier.as_ref().map(|v| v.verify(&headers, &body));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let answer = match &verdict {
        Some(Err(_)) => StatusCode::UNAUTHORIZED,
        _ => listener.status,
    };
    if listener.output == Format::Json {
        let entry = serde_json::json!({
            "method": method.as_str(),
            "path": path,
            "webhook_id": header("webhook-id"),
            "webhook_timestamp": header("webhook-timestamp"),
            "verified": verdict.as_ref().map(Result::is_ok),
            "error": verdict.as_ref().and_then(|v| v.as_ref().err()).map(ToString::to_string),
            "headers": headers
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_str().unwrap_or(""))))
                .collect::<serde_json::Map<_, _>>(),
            "body": String::from_utf8_lossy(&body),
            "answer": answer.as_u16(),
        });
        println!("{entry}");
        return answer;
    }
    let (ok, bad) = if listener.colour { ("\x1b[32m", "\x1b[31m") } else { ("", "") };
    let reset = if listener.colour { "\x1b[0m" } else { "" };
    let verdict = match &verdict {
        None => "unverified".to_string(),
        Some(Ok(())) => format!("{ok}verified{reset}"),
        Some(Err(error)) => format!("{bad}signature refused: {error}{reset}"),
    };
    let mut text = format!(
        "{} {method} {path}  webhook-id={}  {verdict}  -> {}\n",
        chrono::Utc::now().format("%H:%M:%S"),
        header("webhook-id"),
        answer.as_u16()
    );
    let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        if name.starts_with("webhook-") || name == "content-type" || name == "traceparent" {
            continue;
        }
        text.push_str(&format!("  {name}: {}\n", header(name)));
    }
    let pretty = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| serde_json::to_string_pretty(&json).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    for line in pretty.lines() {
        text.push_str(&format!("  {line}\n"));
    }
    print!("{text}");
    let _ = std::io::stdout().flush();
    answer
}
