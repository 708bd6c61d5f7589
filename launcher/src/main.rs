//! `tessera-launcher`: resolves the model, spawns N shard processes and the router, and supervises them
//! (TGI's launcher, with readiness by Health RPC, a startup timeout, and no hang when a rank dies).

mod args;
mod children;
mod health;
mod hub;
mod model;
mod process;
mod supervise;

use args::LauncherArgs;
use clap::Parser;
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args = LauncherArgs::parse();
    init_logging(args.server.json_output);
    match launch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr so stdout stays free; `LOG_LEVEL` (or `RUST_LOG`) filters, default `info`.
fn init_logging(json: bool) {
    let filter = std::env::var("LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Everything up to the supervisor runs synchronously (downloads block); the supervisor then runs on a
/// current-thread runtime so every child is forked by the main thread, which lives as long as the launcher
/// (PR_SET_PDEATHSIG fires when the forking *thread* exits).
fn launch(args: LauncherArgs) -> anyhow::Result<()> {
    let world_size = args
        .sharding
        .world_size(args.model.device)
        .map_err(anyhow::Error::msg)?;
    // An unsupported method fails before any download; whether the model suits it is known only after.
    args.model
        .check_quantize(true)
        .map_err(anyhow::Error::msg)?;
    check_port(&args.server.hostname, args.server.port)?;
    let sources = model::Sources::from_env(args.model.huggingface_hub_cache.clone());
    let model = model::resolve(
        args.model.model_id.as_deref(),
        args.model.revision.as_deref(),
        &sources,
    )?;
    let is_gguf = model
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    args.model
        .check_quantize(is_gguf)
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        "model {} at {} on {world_size} shard(s)",
        model.name,
        model.path.display()
    );
    let (shards, router) =
        children::plan_children(&args, &model, world_size).map_err(anyhow::Error::msg)?;
    let plan = supervise::Plan {
        shards,
        router,
        router_addr: (args.server.hostname.clone(), args.server.port),
        startup_timeout: Duration::from_secs(args.lifecycle.startup_timeout),
        graceful_timeout: Duration::from_secs(args.lifecycle.graceful_termination_timeout),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(supervise::run(plan))?;
    Ok(())
}

/// Fails before downloading or loading anything when the router's port is taken (the router itself
/// would fail only after the shards' load and warmup).
fn check_port(hostname: &str, port: u16) -> anyhow::Result<()> {
    match TcpListener::bind((hostname, port)) {
        Ok(listener) => {
            drop(listener);
            Ok(())
        }
        Err(e) => anyhow::bail!("cannot listen on {hostname}:{port}: {e} (pick another --port)"),
    }
}
