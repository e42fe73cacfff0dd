//! The `quire` binary: everything lives in `quire::cli`.

fn main() -> std::process::ExitCode {
    quire::cli::main()
}
