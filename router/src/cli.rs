//! The router's process entry point (`tessera-router …`, or `tessera-launcher router …` in the launcher's
//! multi-call binary): parses the command line, sets up logging, serves until shutdown.

use crate::args::{Cli, Command};
use clap::Parser;
use std::ffi::OsString;
use std::process::ExitCode;

/// Runs the router command line `argv` (argv[0] included) to completion.
pub fn main<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(argv);
    if let Some(Command::PrintSchema) = cli.command {
        let schema = serde_json::to_string_pretty(&crate::openapi::document()).unwrap_or_default();
        println!("{schema}");
        return ExitCode::SUCCESS;
    }
    init_tracing(cli.router.server.json_output);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::startup::run(cli.router)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
