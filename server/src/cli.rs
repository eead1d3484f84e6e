//! The `tidings` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, Overrides};
use crate::node::Node;

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
    }
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
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidings: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "node failed");
            eprintln!("tidings: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let node = Node::start(config).await?;
    let token = node.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
    });
    node.wait().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
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

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
}
