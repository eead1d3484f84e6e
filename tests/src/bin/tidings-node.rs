//! The `tidings` binary, built inside this package so its tests can start nodes as processes.

// The same allocator as the `tidings` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tidings_server::cli::main()
}
