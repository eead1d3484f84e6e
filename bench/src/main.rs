//! `tidings-bench`: measures Tidings on this machine and prints how it was run.
//!
//! ```text
//! cargo run --release -p tidings-bench -- timers  [--store embedded|postgres] [--count N]
//! cargo run --release -p tidings-bench -- publish [--store embedded|postgres] [--seconds S]
//! cargo run --release -p tidings-bench -- deliver [--store embedded|postgres] [--count N]
//! cargo run --release -p tidings-bench -- latency [--store embedded|postgres] [--rate R] [--seconds S]
//! cargo run --release -p tidings-bench -- fanout  [--store embedded|postgres] [--count N]
//! cargo run --release -p tidings-bench -- ceiling [--seconds S]
//! cargo run --release -p tidings-bench -- failover [--lease-ttl SECONDS]
//! cargo run --release -p tidings-bench -- rolling [--rate R] [--seconds S]
//! cargo run --release -p tidings-bench -- contacts [--count N]
//! any scenario: [--telemetry on|off] (nodes export over OTLP and serve /metrics)
//! cargo run --release -p tidings-bench -- all
//! ```
//!
//! Nodes run as child processes of this binary (it serves as the `tidings` binary when its first
//! argument is `serve`), so their CPU and memory are measured apart from the load generator.
//! etcd, when used, is a private `etcd` process on free ports with a temporary data directory.

mod proc_stats;
mod receiver;
mod scenarios;

use std::process::ExitCode;

// The same allocator as the `tidings` binary, since this binary also serves as the node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return tidings_server::cli::main();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidings-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scenarios::run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidings-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
