//! The shard's command line (`tessera-shard …`, or `tessera-launcher shard …` in the launcher's
//! multi-call binary): subcommands and the process entry point both binaries call.

use crate::serve::{self, ServeArgs};
use crate::tools::bench::{self, BenchArgs};
use crate::tools::benchmark::{self, BenchmarkArgs};
use crate::tools::convert::{self, ConvertArgs};
use crate::tools::generate::{self, GenerateArgs};
use crate::tools::random_model::{self, RandomModelArgs};
use crate::Error;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;

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
    /// Convert a GGUF file to a Hugging Face model folder (safetensors, config, tokenizer).
    Convert(ConvertArgs),
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

/// Runs the shard command line `argv` (argv[0] included) to completion.
pub fn main<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    tessera_formats::heap::one_arena_per_core();
    let cli = Cli::parse_from(argv);
    // Filter: TGI's `LOG_LEVEL` first (the launcher's children inherit it), then `RUST_LOG`.
    let otlp = match &cli.command {
        Command::Serve(args) => {
            args.otlp_endpoint
                .as_deref()
                .map(|endpoint| tessera_telemetry::Otlp {
                    endpoint,
                    service_name: &args.otlp_service_name,
                })
        }
        _ => None,
    };
    let telemetry = match tessera_telemetry::init(tessera_telemetry::LogConfig {
        json: false,
        writer: tessera_telemetry::Writer::Stderr,
        otlp,
    }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(serve::run(args))),
        Command::Benchmark(args) => runtime().and_then(|rt| rt.block_on(benchmark::run(args))),
        Command::RandomModel(args) => random_model::run(&args),
        Command::Convert(args) => convert::run(&args),
    };
    // The last RPCs' spans leave before the process does.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
