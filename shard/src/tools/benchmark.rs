//! `tessera-shard benchmark`: drives running shards over gRPC, bypassing the router, in the spirit
//! of TGI's text-generation-benchmark: for each batch size, Prefill then Decode steps, reporting
//! latency percentiles and throughput. Every RPC goes to all ranks (they run in lockstep).

use std::time::{Duration, Instant};

use tessera_proto::uds;
use tessera_proto::v3 as pb;
use tessera_proto::TextGenerationServiceClient;
use tonic::transport::Channel;

use crate::kv_cache::DEFAULT_BLOCK_SIZE;
use crate::serve::connect;
use crate::Error;

/// Arguments of `benchmark`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchmarkArgs {
    /// Socket prefix of the shards (rank 0 at `{uds_path}-0` tells the others).
    #[arg(long, env, default_value = "/tmp/tessera-server")]
    pub uds_path: String,
    /// Prompt length of every request.
    #[arg(long, default_value_t = 10)]
    pub prompt_tokens: u32,
    /// Tokens generated per request (one prefill + this many minus one decode steps).
    #[arg(long, default_value_t = 8)]
    pub decode_tokens: u32,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub batch_sizes: Vec<u32>,
    /// Measured runs per batch size.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Unmeasured runs per batch size.
    #[arg(long, default_value_t = 1)]
    pub warmups: usize,
}

type Client = TextGenerationServiceClient<Channel>;

/// One Prefill and its Decode steps.
struct Run {
    prefill: Duration,
    decodes: Vec<Duration>,
}

fn status(e: tonic::Status) -> Error {
    Error::Device(format!("shard answered {:?}: {}", e.code(), e.message()))
}

async fn connect_all(uds_path: &str) -> Result<Vec<Client>, Error> {
    let mut master = connect(uds::shard_socket(uds_path, 0)).await?;
    let urls = master
        .service_discovery(pb::ServiceDiscoveryRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .urls;
    let mut clients = Vec::new();
    for url in urls {
        clients.push(connect(uds::url_socket(&url)).await?);
    }
    Ok(clients)
}

/// Sends the same RPC to every rank at once and returns rank 0's answer; any rank's error fails it.
macro_rules! all_ranks {
    ($clients:expr, $method:ident, $req:expr) => {{
        let handles: Vec<_> = $clients
            .iter()
            .map(|c| {
                let (mut c, req) = (c.clone(), $req.clone());
                tokio::spawn(async move { c.$method(req).await.map(|r| r.into_inner()) })
            })
            .collect();
        let mut first = None;
        for h in handles {
            let answer = h
                .await
                .map_err(|e| Error::Device(e.to_string()))?
                .map_err(status)?;
            first.get_or_insert(answer);
        }
        first.ok_or_else(|| Error::Device("no shard to talk to".into()))
    }};
}

/// A batch of `size` identical requests of exactly `prompt` tokens (a long text truncated to its
/// last `prompt` tokens), each in its own blocks after block 0 (reserved for health checks).
fn batch(id: u64, size: u32, prompt: u32, decode: u32) -> pb::Batch {
    let bs = DEFAULT_BLOCK_SIZE as u32;
    let per_request = (prompt + decode).div_ceil(bs);
    let requests = (0..size)
        .map(|i| {
            let blocks: Vec<u32> = (0..per_request).map(|b| 1 + i * per_request + b).collect();
            pb::Request {
                id: i as u64,
                inputs: "the quick brown fox jumps over the lazy dog ".repeat(prompt as usize),
                truncate: prompt,
                parameters: Some(pb::NextTokenChooserParameters {
                    temperature: 1.0,
                    repetition_penalty: 1.0,
                    top_p: 1.0,
                    typical_p: 1.0,
                    ..Default::default()
                }),
                stopping_parameters: Some(pb::StoppingCriteriaParameters {
                    max_new_tokens: decode,
                    stop_sequences: vec![],
                    ignore_eos_token: true,
                }),
                blocks,
                ..Default::default()
            }
        })
        .collect();
    pb::Batch {
        id,
        requests,
        size,
        max_tokens: size * per_request * bs,
        max_blocks: 1 + size * per_request,
    }
}

async fn run_once(clients: &[Client], b: pb::Batch) -> Result<Run, Error> {
    let t = Instant::now();
    let prefill = pb::PrefillRequest {
        batch: Some(b),
        cached_batch: None,
    };
    let mut cached = all_ranks!(clients, prefill, prefill)?.batch;
    let prefill = t.elapsed();
    let mut decodes = Vec::new();
    while let Some(batch) = cached {
        let t = Instant::now();
        let req = pb::DecodeRequest {
            batches: vec![batch],
        };
        cached = all_ranks!(clients, decode, req)?.batch;
        decodes.push(t.elapsed());
    }
    Ok(Run { prefill, decodes })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(ms: &mut [f64]) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "{:>9.2} {:>9.2} {:>9.2}",
        percentile(ms, 50.0),
        percentile(ms, 90.0),
        percentile(ms, 99.0)
    )
}

/// The whole command: warm up the shards (sizing their KV cache), then measure each batch size.
pub async fn run(args: BenchmarkArgs) -> Result<(), Error> {
    let clients = connect_all(&args.uds_path).await?;
    let biggest = args.batch_sizes.iter().copied().max().unwrap_or(1);
    all_ranks!(clients, clear_cache, pb::ClearCacheRequest { id: None })?;
    let warm = pb::WarmupRequest {
        batch: Some(batch(0, biggest, args.prompt_tokens, args.decode_tokens)),
        max_input_tokens: None,
        max_prefill_tokens: biggest * args.prompt_tokens,
        max_total_tokens: None,
    };
    all_ranks!(clients, warmup, warm)?;
    println!(
        "prompt {} tokens, {} new tokens, {} runs\n{:>5} | {:>29} | {:>10} | {:>29} | {:>10}",
        args.prompt_tokens,
        args.decode_tokens,
        args.runs,
        "batch",
        "prefill ms p50 p90 p99",
        "tok/s",
        "decode step ms p50 p90 p99",
        "tok/s"
    );
    for (n, &size) in args.batch_sizes.iter().enumerate() {
        let mut prefill_ms = Vec::new();
        let mut decode_ms = Vec::new();
        for run in 0..args.warmups + args.runs {
            let id = (n * 10_000 + run) as u64 + 1;
            let r = run_once(
                &clients,
                batch(id, size, args.prompt_tokens, args.decode_tokens),
            )
            .await?;
            if run >= args.warmups {
                prefill_ms.push(r.prefill.as_secs_f64() * 1e3);
                decode_ms.extend(r.decodes.iter().map(|d| d.as_secs_f64() * 1e3));
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let prefill_tps = (size * args.prompt_tokens) as f64 / (mean(&prefill_ms) / 1e3);
        let decode_tps = size as f64 / (mean(&decode_ms) / 1e3);
        println!(
            "{size:>5} | {} | {prefill_tps:>10.1} | {} | {decode_tps:>10.1}",
            summary(&mut prefill_ms),
            summary(&mut decode_ms)
        );
    }
    Ok(())
}
