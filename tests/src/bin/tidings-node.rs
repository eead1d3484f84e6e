//! The `tidings` binary, built inside this package so its tests can start nodes as processes.

fn main() -> std::process::ExitCode {
    tidings_server::cli::main()
}
