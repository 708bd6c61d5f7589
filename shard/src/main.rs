//! `tessera-shard`: the shard process entry point.

use clap::{Parser, Subcommand};
use tessera_shard::bench::{self, BenchArgs};
use tessera_shard::benchmark::{self, BenchmarkArgs};
use tessera_shard::generate::{self, GenerateArgs};
use tessera_shard::random_model::{self, RandomModelArgs};
use tessera_shard::serve::{self, ServeArgs};
use tessera_shard::Error;

#[derive(Parser)]
#[command(
    name = "tessera-shard",
    version,
    about = "Tessera shard: one model rank served over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Greedy generation from the command line.
    Generate(GenerateArgs),
    /// Engine throughput on this machine: prefill and decode tokens/s, peak RSS.
    Bench(BenchArgs),
    /// Serve TextGenerationService on the unix socket `{uds-path}-{rank}`.
    Serve(ServeArgs),
    /// Drive running shards over gRPC and report prefill/decode latency and throughput.
    Benchmark(BenchmarkArgs),
    /// Write a Llama-shaped model folder with seeded random weights (for benchmarks).
    RandomModel(RandomModelArgs),
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    // The engine has its own thread; the async side only converts messages.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            path: "tokio runtime".into(),
            source,
        })
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(serve::run(args))),
        Command::Benchmark(args) => runtime().and_then(|rt| rt.block_on(benchmark::run(args))),
        Command::RandomModel(args) => random_model::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
