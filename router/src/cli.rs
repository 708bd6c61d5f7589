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
    tessera_formats::heap::one_arena_per_core();
    let cli = Cli::parse_from(argv);
    if let Some(Command::PrintSchema) = cli.command {
        let schema = serde_json::to_string_pretty(&crate::openapi::document()).unwrap_or_default();
        println!("{schema}");
        return ExitCode::SUCCESS;
    }
    let server = &cli.router.server;
    let telemetry = match tessera_telemetry::init(tessera_telemetry::LogConfig {
        json: server.json_output,
        writer: tessera_telemetry::Writer::Stdout,
        otlp: server
            .otlp_endpoint
            .as_deref()
            .map(|endpoint| tessera_telemetry::Otlp {
                endpoint,
                service_name: &server.otlp_service_name,
            }),
    }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(crate::startup::run(cli.router)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    // The last requests' spans leave before the process does.
    drop(runtime);
    telemetry.shutdown();
    code
}
