//! `tessera-launcher`: resolves the model, spawns N shard processes and the router, and supervises them
//! (TGI's launcher, with readiness by Health RPC, a startup timeout, and no hang when a rank dies).
//! A multi-call binary: `tessera-launcher shard …` and `tessera-launcher router …` run the shard and the
//! router, which is how the launcher starts its children, so one `cargo run` builds everything.

mod args;
mod children;
mod health;
mod hub;
mod model;
mod process;
mod supervise;
mod tgi_compat;

use args::LauncherArgs;
use clap::{CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // A child role comes before anything of the launcher's own: the child parses and logs by itself.
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("shard") => return run_role(c"tessera-shard", argv, tessera_shard::cli::main),
        Some("router") => return run_role(c"tessera-router", argv, tessera_router::cli::main),
        _ => {}
    }
    let translated = match tgi_compat::translate(argv, |name| std::env::var(name).ok()) {
        Ok(translated) => translated,
        Err(refusal) => {
            eprintln!("error: {refusal}");
            return ExitCode::from(2);
        }
    };
    let command = LauncherArgs::command().after_long_help(tgi_compat::help());
    let matches = command.get_matches_from(translated.argv);
    let args = LauncherArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(args.server.json_output);
    for warning in translated.warnings {
        tracing::warn!("{warning}");
    }
    match launch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a child role: `tessera-launcher shard serve …` parses as `tessera-shard serve …` would, with
/// `tessera-launcher shard` in its usage lines and `name` as the process name `ps` and `top` show.
fn run_role(
    name: &std::ffi::CStr,
    argv: Vec<OsString>,
    role_main: fn(Vec<OsString>) -> ExitCode,
) -> ExitCode {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_NAME copies at most 16 bytes from a valid NUL-terminated string.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
    let mut own = argv.into_iter().skip(1);
    let role = own.next().unwrap_or_default();
    let mut program = OsString::from("tessera-launcher ");
    program.push(role);
    role_main(std::iter::once(program).chain(own).collect())
}

/// Logs go to stderr so stdout stays free; `LOG_LEVEL` (or `RUST_LOG`) filters, default `info` (the same
/// setup as the children's, without span export: the launcher runs no requests).
fn init_logging(json: bool) {
    let config = tessera_telemetry::LogConfig {
        json,
        writer: tessera_telemetry::Writer::Stderr,
        otlp: None,
    };
    match tessera_telemetry::init(config) {
        // Nothing to flush without an exporter.
        Ok(telemetry) => drop(telemetry),
        Err(e) => eprintln!("warning: {e}"),
    }
}

/// Everything up to the supervisor runs synchronously (downloads block); the supervisor then runs on a
/// current-thread runtime so every child is forked by the main thread, which lives as long as the launcher
/// (PR_SET_PDEATHSIG fires when the forking *thread* exits).
fn launch(mut args: LauncherArgs) -> anyhow::Result<()> {
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
    // Lives until the children are gone: dropping it removes the private socket directory.
    let sockets = children::SocketDir::for_launch(args.sharding.shard_uds_path.as_deref())
        .map_err(anyhow::Error::msg)?;
    args.sharding.shard_uds_path = Some(sockets.prefix().to_path_buf());
    let (shards, router) =
        children::plan_children(&args, &model, world_size).map_err(anyhow::Error::msg)?;
    let plan = supervise::Plan {
        shards,
        router,
        router_addr: (args.server.hostname.clone(), args.server.port),
        api_key: args.server.api_key.is_some(),
        startup_timeout: Duration::from_secs(args.lifecycle.startup_timeout),
        graceful_timeout: Duration::from_secs(args.lifecycle.graceful_termination_timeout),
        shard_restart_limit: args.lifecycle.shard_restart_limit,
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
