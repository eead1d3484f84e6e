//! What every command that talks to a node shares: how to reach it, how to print for people
//! or for scripts, and how a failure is reported (one line, naming the field).

use std::future::Future;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidings_client::{Client, RetryPolicy};

/// Where the node is and how to prove who we are.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Remote {
    /// The node: http://host:port, or https://host:port when it speaks TLS.
    #[arg(long, env = "TIDINGS_ENDPOINT", default_value = "http://127.0.0.1:50051", global = true)]
    pub(crate) endpoint: String,
    /// Bearer token (see `auth` in the README).
    #[arg(long, env = "TIDINGS_TOKEN", hide_env_values = true, global = true)]
    pub(crate) token: Option<String>,
    /// PEM CA the node's certificate chains to (https:// endpoints); the system's roots when
    /// unset.
    #[arg(long, env = "TIDINGS_CA", global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// PEM client certificate, for a node that asks for one (grpc.tls.client_ca_file).
    #[arg(long, env = "TIDINGS_CLIENT_CERT", global = true)]
    pub(crate) client_cert: Option<PathBuf>,
    /// Key of --client-cert.
    #[arg(long, env = "TIDINGS_CLIENT_KEY", global = true)]
    pub(crate) client_key: Option<PathBuf>,
    /// How to print results: a table for people, JSON for scripts.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    pub(crate) output: Format,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns, coloured on a terminal.
    Table,
    /// JSON: one document, or one object per line for streams.
    Json,
}

/// A mistake in the command line itself: reported like any failure, with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(pub(crate) String);

impl Remote {
    /// Connects to the node. Reads are retried a few times, so a blip does not fail a command,
    /// but a node that is down is reported within seconds.
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let mut builder = Client::builder()
            .endpoint(&self.endpoint)
            .user_agent(format!("tidings-cli/{}", env!("CARGO_PKG_VERSION")))
            .retry_policy(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() });
        if let Some(token) = &self.token {
            builder = builder.token(token);
        }
        if let Some(ca) = &self.ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            builder = builder.ca_certificate(pem);
        }
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("--client-cert: cannot read {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("--client-key: cannot read {}", key.display()))?;
                builder = builder.client_certificate(cert, key);
            }
            (None, None) => {}
            _ => {
                return Err(Usage("--client-cert and --client-key go together".into()).into());
            }
        }
        builder.connect().await.map_err(|error| match error {
            tidings_client::Error::Config(reason) => Usage(format!("--{reason}")).into(),
            other => anyhow::Error::new(other).context(self.endpoint.clone()),
        })
    }
}

/// Runs a command on a runtime of its own and turns its outcome into the exit code: 0, 1 for a
/// failure, 2 for a usage mistake; a failure is printed as one line on stderr.
pub(crate) fn run<F>(command: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    run_as(command, 2)
}

/// Runs a command as [`run`] does, with `usage` as the exit code of a usage mistake.
pub(crate) fn run_as<F>(command: F, usage: u8) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("tidings: cannot start the runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidings: {}", describe(&error));
            if error.chain().any(|cause| cause.is::<Usage>()) {
                ExitCode::from(usage)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Returns an error as one line: field violations as `field: reason`, joined; the context
/// (a file name, an endpoint) first.
pub(crate) fn describe(error: &anyhow::Error) -> String {
    let api = error.chain().find_map(|cause| cause.downcast_ref::<tidings_client::Error>());
    let contexts: Vec<String> = error
        .chain()
        .take_while(|cause| cause.downcast_ref::<tidings_client::Error>().is_none())
        .map(ToString::to_string)
        .collect();
    let detail = match api {
        Some(api) if !api.violations().is_empty() => api
            .violations()
            .iter()
            .map(|v| format!("{}: {}", v.field, v.reason))
            .collect::<Vec<_>>()
            .join("; "),
        Some(api) => api.to_string(),
        None => return contexts.join(": "),
    };
    contexts.into_iter().chain([detail]).collect::<Vec<_>>().join(": ")
}

/// Whether stdout is a terminal, so colours and redrawn lines make sense.
pub(crate) fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Columns of text, padded to line up.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Returns a table with this header.
    pub(crate) fn new<const N: usize>(header: [&str; N]) -> Self {
        Self { rows: vec![header.iter().map(|h| h.to_string()).collect()] }
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table; only the header when it has no rows.
    pub(crate) fn print(&self) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        print!("{out}");
    }
}

/// Prints a JSON document, indented.
pub(crate) fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Returns a number with thousands separators: 100,000.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Returns a timestamp as RFC 3339 in UTC, to the second; `-` when unset.
pub(crate) fn time(value: Option<&prost_types::Timestamp>) -> String {
    value
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// Returns a duration in milliseconds; `-` when unset.
pub(crate) fn millis(value: Option<&prost_types::Duration>) -> String {
    value.map_or_else(
        || "-".into(),
        |d| format!("{} ms", d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(100_000), "100,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn violations_are_one_line_naming_each_field() {
        let error = tidings_client::Error::InvalidArgument {
            message: "2 problems".into(),
            violations: vec![
                tidings_client::FieldViolation {
                    field: "webhook.url".into(),
                    reason: "bad".into(),
                },
                tidings_client::FieldViolation {
                    field: "webhook.timeout".into(),
                    reason: "long".into(),
                },
            ],
        };
        let error = anyhow::Error::new(error).context("hook.yaml");
        assert_eq!(describe(&error), "hook.yaml: webhook.url: bad; webhook.timeout: long");
    }
}
