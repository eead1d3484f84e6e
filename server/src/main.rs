fn main() -> std::process::ExitCode {
    tidings_server::cli::main()
}
