//! `tessera-shard`: the shard process entry point (the command line lives in `cli.rs`).

fn main() -> std::process::ExitCode {
    tessera_shard::cli::main(std::env::args_os())
}
