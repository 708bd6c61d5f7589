//! `tessera-router`: the HTTP front end process (TGI's `text-generation-router`); the command line
//! lives in `cli.rs`.

fn main() -> std::process::ExitCode {
    tessera_router::cli::main(std::env::args_os())
}
