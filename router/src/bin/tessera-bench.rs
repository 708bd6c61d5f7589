//! `tessera-bench`: a closed-loop load generator for a running router. At each concurrency level, that
//! many clients stream `/generate_stream` requests back to back; it reports requests/s, output tokens/s,
//! and time-to-first-token and inter-token latency percentiles as a Markdown table.
//!
//! `--soak N` instead sends N mixed requests (valid, invalid, cancelled, streaming, `n > 1`, stop
//! sequences, long prompts) at the first concurrency level and checks the router afterwards
//! (`tessera_bench/soak.rs`); it exits non-zero when a request was lost, a 5xx came back or the KV
//! blocks did not return.

#[path = "tessera_bench/soak.rs"]
mod soak;

use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

/// Load test a running Tessera (or TGI) router.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Router base URL.
    #[arg(long, env, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Concurrency levels to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,
    /// Seconds each level runs (requests in flight at the end are still awaited and counted).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Tokens each request generates (greedy).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// A TGI `grammar` parameter (JSON) every request carries, e.g.
    /// `{"type": "json", "value": {"type": "object", …}}`, to measure constrained decoding.
    #[arg(long, value_parser = parse_json)]
    grammar: Option<serde_json::Value>,
    /// Bearer token, when the router has `--api-key`.
    #[arg(long, env)]
    api_key: Option<String>,
    /// Soak test: send this many mixed requests at the first `--concurrency` level, then check
    /// that none was lost, none got a 5xx and the KV blocks returned.
    #[arg(long)]
    soak: Option<usize>,
    /// Router process(es) whose RSS the soak reports (default: processes named tessera-router).
    #[arg(long, value_delimiter = ',')]
    router_pid: Vec<u32>,
    /// Shard process(es) whose RSS the soak reports (default: processes named tessera-shard).
    #[arg(long, value_delimiter = ',')]
    shard_pid: Vec<u32>,
}

const PROMPTS: [&str; 8] = [
    "Once upon a time",
    "The robot picked up the brush and",
    "The history of the Roman Empire begins",
    "def quicksort(items):",
    "Rainbows form when",
    "In the beginning of the twenty-first century, cities",
    "Here is a recipe for a chocolate cake:",
    "The three laws of thermodynamics are",
];

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// What one request measured.
#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
    ok: bool,
}

async fn one_request(client: &reqwest::Client, args: &Args, prompt: &str) -> Sample {
    let mut body = json!({"inputs": prompt, "parameters": {"max_new_tokens": args.max_new_tokens}});
    if let Some(grammar) = &args.grammar {
        body["parameters"]["grammar"] = grammar.clone();
    }
    let mut request = client
        .post(format!("{}/generate_stream", args.url))
        .json(&body);
    if let Some(key) = &args.api_key {
        request = request.bearer_auth(key);
    }
    let start = Instant::now();
    let mut sample = Sample::default();
    let Ok(response) = request.send().await else {
        return sample;
    };
    if !response.status().is_success() {
        return sample;
    }
    let mut last = start;
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(bytes)) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if !event.trim_start().starts_with("data:") {
                continue;
            }
            if event.contains("\"error\"") {
                return sample;
            }
            let now = Instant::now();
            match sample.ttft {
                None => sample.ttft = Some(now - start),
                Some(_) => sample.gaps.push(now - last),
            }
            last = now;
            sample.tokens += 1;
        }
    }
    sample.ok = sample.tokens > 0;
    sample
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn run_level(client: &reqwest::Client, args: &Args, concurrency: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let start = Instant::now();
    let workers = (0..concurrency).map(|w| async move {
        let mut samples = Vec::new();
        let mut i = w;
        while Instant::now() < deadline {
            samples.push(one_request(client, args, PROMPTS[i % PROMPTS.len()]).await);
            i += concurrency;
        }
        samples
    });
    let samples: Vec<Sample> = futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<Duration> = ok.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<Duration> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    ttft.sort();
    itl.sort();
    format!(
        "| {concurrency} | {} | {} | {:.2} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
        ok.len(),
        samples.len() - ok.len(),
        ok.len() as f64 / elapsed,
        tokens as f64 / elapsed,
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.99),
        percentile(&itl, 0.5),
        percentile(&itl, 0.99),
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("HTTP client");
    if let Some(requests) = args.soak {
        let pids = |given: &[u32], name: &str| {
            if given.is_empty() {
                soak::pids_named(name)
            } else {
                given.to_vec()
            }
        };
        let soak_args = soak::SoakArgs {
            url: &args.url,
            api_key: args.api_key.as_deref(),
            requests,
            concurrency: args.concurrency.first().copied().unwrap_or(1),
            router_pids: pids(&args.router_pid, "tessera-router"),
            shard_pids: pids(&args.shard_pid, "tessera-shard"),
        };
        let passed = soak::run(&client, &soak_args).await;
        std::process::exit(if passed { 0 } else { 1 });
    }
    println!("| concurrency | requests | failed | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &concurrency in &args.concurrency {
        println!("{}", run_level(&client, &args, concurrency).await);
    }
}
