//! `tessera-router`: the HTTP front end process (TGI's `text-generation-router`).

use clap::Parser;
use tessera_router::args::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::PrintSchema) = cli.command {
        let schema =
            serde_json::to_string_pretty(&tessera_router::openapi::document()).unwrap_or_default();
        println!("{schema}");
        return std::process::ExitCode::SUCCESS;
    }
    init_tracing(cli.router.server.json_output);
    match tessera_router::startup::run(cli.router).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
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
