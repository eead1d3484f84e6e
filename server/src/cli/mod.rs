//! The `tidings` command line: `serve`, `migrate` and `generate-key` run here; the other
//! commands talk to a node over gRPC through `tidings-client`.
//!
//! - `remote`: connection flags, output formats, one-line errors;
//! - `messages`: API messages as JSON and YAML;
//! - `resources`: webhooks, segments, campaigns (and runs);
//! - `contacts`: import with progress and rejects;
//! - `deliveries`: list, get, redeliver, tail;
//! - `listen`: a local verifying receiver;
//! - `status`: the cluster at a glance.

mod contacts;
mod deliveries;
mod listen;
mod messages;
mod remote;
mod resources;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::node::Node;
use crate::telemetry::Telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Webhooks as a campaign channel: scheduled, signed, retried, recorded."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a node: embedded mode by default, cluster mode with --etcd.
    Serve(ServeArgs),
    /// Prints a new random secrets key (base64 of 32 bytes) for `secrets.key`.
    GenerateKey,
    /// Applies the PostgreSQL schema migrations not applied yet, then exits (nodes also apply
    /// them at start; run this ahead of a rolling upgrade).
    Migrate(MigrateArgs),
    /// Asks a node whether it serves (grpc.health.v1): exits 0 when it does, 1 otherwise. For
    /// container health checks and Kubernetes probes.
    Health(HealthArgs),
    /// Shows the nodes, the partitions each owns, backlogs, timers and the deliveries of the
    /// last minute.
    Status(remote::Remote),
    /// Lists, shows, creates, updates, deletes and tests webhooks.
    Webhooks(resources::WebhooksArgs),
    /// Lists, shows, creates, updates and deletes segments.
    Segments(resources::SegmentsArgs),
    /// Manages campaigns and starts runs (`run ID --watch` follows one).
    Campaigns(resources::CampaignsArgs),
    /// Imports contacts from CSV or JSON lines; shows one.
    Contacts(contacts::ContactsArgs),
    /// Lists, shows and redelivers deliveries; `tail` follows them as they change.
    Deliveries(deliveries::DeliveriesArgs),
    /// Receives webhooks on this machine, verifies and prints them.
    Listen(listen::ListenArgs),
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    #[command(flatten)]
    remote: remote::Remote,
    /// Service to ask about; the whole node when empty.
    #[arg(long, default_value = "")]
    service: String,
    /// Longest wait for the answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// TOML configuration file, applied over the defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// PostgreSQL URL (postgres.url).
    #[arg(long)]
    postgres: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file, applied over the defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address of the gRPC API (grpc.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// etcd client URLs, comma-separated; enables cluster mode (etcd.endpoints).
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Prefix of Tidings keys in etcd (etcd.prefix).
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// PostgreSQL URL, required with --etcd (postgres.url).
    #[arg(long)]
    postgres: Option<String>,
    /// Node identifier (node.id).
    #[arg(long)]
    node_id: Option<String>,
    /// Log format, plain or json (log.format).
    #[arg(long)]
    log_format: Option<String>,
    /// Log filter, for example info or debug (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Prints the effective configuration as TOML and exits.
    #[arg(long)]
    dump_config: bool,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command()
        .mut_subcommand("serve", |serve| serve.after_long_help(crate::config::keys_help()));
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match cli.command {
        Command::GenerateKey => {
            println!("{}", tidings_scheduler::secrets::Cipher::generate_key());
            ExitCode::SUCCESS
        }
        Command::Serve(args) => serve(args),
        Command::Migrate(args) => migrate(args),
        Command::Health(args) => health(args),
        Command::Status(remote) => remote::run(status::status(remote)),
        Command::Webhooks(args) => remote::run(resources::webhooks(args)),
        Command::Segments(args) => remote::run(resources::segments(args)),
        Command::Campaigns(args) => remote::run(resources::campaigns(args)),
        Command::Contacts(args) => remote::run(contacts::contacts(args)),
        Command::Deliveries(args) => remote::run(deliveries::deliveries(args)),
        Command::Listen(args) => remote::run(listen::listen(args)),
    }
}

fn health(args: HealthArgs) -> ExitCode {
    let timeout = args.timeout;
    let endpoint = args.remote.endpoint.clone();
    // Container runtimes read 1 as unhealthy and reserve 2, so every failure exits with 1.
    remote::run_as(
        async move {
            match tokio::time::timeout(timeout, ask_health(&args)).await {
                Ok(Ok(status)) if status == "SERVING" => {
                    println!("{status}");
                    Ok(())
                }
                Ok(Ok(status)) => {
                    println!("{status}");
                    Err(anyhow::anyhow!("{endpoint}: {status}"))
                }
                Ok(Err(error)) => Err(error),
                Err(_) => Err(anyhow::anyhow!(
                    "{endpoint}: no answer within {}",
                    humantime::format_duration(timeout)
                )),
            }
        },
        1,
    )
}

async fn ask_health(args: &HealthArgs) -> anyhow::Result<String> {
    use tonic_health::pb::health_client::HealthClient;
    let client = args.remote.connect().await?;
    let mut health = HealthClient::new(client.transport());
    let request = tonic_health::pb::HealthCheckRequest { service: args.service.clone() };
    let response = health.check(request).await.map_err(|status| {
        anyhow::Error::new(tidings_client::Error::from(status))
            .context(args.remote.endpoint.clone())
    })?;
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(
        response.into_inner().status,
    )
    .map_or("UNKNOWN", |s| s.as_str_name());
    Ok(status.to_string())
}

fn migrate(args: MigrateArgs) -> ExitCode {
    let overrides = Overrides { postgres: args.postgres, ..Default::default() };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tidings: {error}");
            return ExitCode::from(2);
        }
    };
    if config.postgres.url.is_empty() {
        eprintln!("tidings: postgres.url: required (set --postgres or TIDINGS_POSTGRES__URL)");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidings: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = config.postgres.options();
    match runtime.block_on(tidings_scheduler::state::postgres::migrate(&options)) {
        Ok(applied) if applied.is_empty() => {
            println!("schema up to date");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            let names: Vec<String> = applied.iter().map(|v| format!("{v:04}")).collect();
            println!("applied migrations {}", names.join(", "));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tidings: postgres.url: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        listen: args.listen,
        etcd: args.etcd,
        etcd_prefix: args.etcd_prefix,
        postgres: args.postgres,
        log_format: args.log_format,
        log_level: args.log_level,
    };
    let mut config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tidings: {error}");
            return ExitCode::from(2);
        }
    };
    if args.dump_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if config.node.id.is_empty() {
        config.node.id =
            format!("node-{}", &ulid::Ulid::new().to_string().to_ascii_lowercase()[16..]);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidings: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _entered = runtime.enter();
        match Telemetry::start(&config) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("tidings: invalid configuration: {error}");
                return ExitCode::from(2);
            }
        }
    };
    let result = runtime.block_on(run(config, &telemetry));
    {
        let _entered = runtime.enter();
        telemetry.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "node failed");
            eprintln!("tidings: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, telemetry: &Telemetry) -> anyhow::Result<()> {
    // Taken before the node announces that it listens: a SIGTERM sent as soon as it does
    // stops it cleanly rather than killing it.
    let signals = Signals::install();
    let metrics = config.metrics.address();
    let node = Node::start(config).await?;
    let token = node.shutdown_token();
    if let (Some(listen), Some(registry)) = (metrics, telemetry.registry()) {
        let bound =
            crate::telemetry::serve_metrics(listen, registry.clone(), token.child_token()).await?;
        tracing::info!(address = %bound, "serving metrics at /metrics");
    }
    tokio::spawn(async move {
        signals.wait().await;
        token.cancel();
    });
    node.wait().await
}

/// SIGTERM and SIGINT, handled from when this is made.
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Returns when one of them arrives.
    async fn wait(self) {
        #[cfg(unix)]
        {
            let Some((mut term, mut int)) = self.streams else {
                let _ = tokio::signal::ctrl_c().await;
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
