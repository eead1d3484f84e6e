// The node allocates many small short-lived buffers (JSON, HTTP, CEL values): mimalloc serves
// them at a fraction of glibc malloc's cost, measured with `tidings-bench fanout`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tidings_server::cli::main()
}
