//! `tessera-bench --soak N`: N requests at a fixed concurrency over a mix of valid, invalid,
//! cancelled-mid-stream, streaming, `n > 1`, stop-sequence and long-prompt requests, then the
//! router's health after the storm: nothing lost, no 5xx, KV blocks back to idle, RSS before/after.

use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long one request may take before it counts as lost (a hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// What the soak needs from the command line.
pub struct SoakArgs<'a> {
    pub url: &'a str,
    pub api_key: Option<&'a str>,
    pub requests: usize,
    pub concurrency: usize,
    pub router_pids: Vec<u32>,
    pub shard_pids: Vec<u32>,
}

/// The request shapes, taken in turn.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Generate,
    Stream,
    Invalid,
    Cancelled,
    ChatN,
    CompletionStreamStop,
    LongPrompt,
    InvalidOpenAi,
    Stop,
}

const KINDS: [Kind; 9] = [
    Kind::Generate,
    Kind::Stream,
    Kind::Invalid,
    Kind::Cancelled,
    Kind::ChatN,
    Kind::CompletionStreamStop,
    Kind::LongPrompt,
    Kind::InvalidOpenAi,
    Kind::Stop,
];

const PROMPTS: [&str; 4] = [
    "Once upon a time",
    "The history of the Roman Empire begins",
    "def quicksort(items):",
    "Rainbows form when",
];

impl Kind {
    /// Route, body, whether it streams and whether it must be refused with a 4xx.
    fn request(self, i: usize) -> (&'static str, Value, bool, bool) {
        let prompt = PROMPTS[i % PROMPTS.len()];
        let tgi = |p: Value| json!({"inputs": prompt, "parameters": p});
        match self {
            Kind::Generate => ("/generate", tgi(json!({"max_new_tokens": 8})), false, false),
            Kind::Stream => (
                "/generate_stream",
                tgi(json!({"max_new_tokens": 8, "details": true})),
                true,
                false,
            ),
            Kind::Invalid => ("/generate", tgi(json!({"temperature": -1.0})), false, true),
            Kind::Cancelled => (
                "/generate_stream",
                tgi(json!({"max_new_tokens": 64})),
                true,
                false,
            ),
            Kind::ChatN => (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}], "n": 2, "max_tokens": 8}),
                false,
                false,
            ),
            Kind::CompletionStreamStop => (
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": 16, "stop": [".", "\n"], "stream": true}),
                true,
                false,
            ),
            Kind::LongPrompt => (
                "/generate",
                json!({"inputs": "The quick brown fox jumps over the lazy dog. ".repeat(60),
                       "parameters": {"max_new_tokens": 4}}),
                false,
                false,
            ),
            Kind::InvalidOpenAi => (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}], "n": 0}),
                false,
                true,
            ),
            Kind::Stop => (
                "/generate",
                tgi(json!({"max_new_tokens": 16, "stop": [" the", "\n"], "do_sample": true})),
                false,
                false,
            ),
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A result, or the refusal it was meant to get.
    Ok,
    /// An error answer or error event the request was not meant to get (not a 5xx).
    Error,
    /// A 5xx status.
    ServerError,
    /// No result and no error: a transport failure, a stream that ended without its last event,
    /// or a timeout.
    Lost,
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    errors: AtomicUsize,
    server_errors: AtomicUsize,
    lost: AtomicUsize,
}

impl Tally {
    fn add(&self, outcome: Outcome) {
        let slot = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error => &self.errors,
            Outcome::ServerError => &self.server_errors,
            Outcome::Lost => &self.lost,
        };
        slot.fetch_add(1, Ordering::Relaxed);
    }
}

async fn one(client: &reqwest::Client, args: &SoakArgs<'_>, i: usize) -> Outcome {
    let kind = KINDS[i % KINDS.len()];
    let (route, body, streams, refused) = kind.request(i / KINDS.len());
    let mut request = client.post(format!("{}{route}", args.url)).json(&body);
    if let Some(key) = args.api_key {
        request = request.bearer_auth(key);
    }
    let work = async {
        let response = match request.send().await {
            Ok(r) => r,
            Err(_) => return Outcome::Lost,
        };
        let status = response.status();
        if status.is_server_error() {
            return Outcome::ServerError;
        }
        if refused || !status.is_success() {
            let expected = refused && status.is_client_error();
            // The error body must arrive whole: a cut one is a lost answer.
            return match response.bytes().await {
                Ok(_) if expected => Outcome::Ok,
                Ok(_) => Outcome::Error,
                Err(_) => Outcome::Lost,
            };
        }
        if !streams {
            return match response.bytes().await {
                Ok(b) if serde_json::from_slice::<Value>(&b).is_ok() => Outcome::Ok,
                _ => Outcome::Lost,
            };
        }
        read_stream(response, matches!(kind, Kind::Cancelled)).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .unwrap_or(Outcome::Lost)
}

/// Reads SSE events until the last one (TGI: the event with `generated_text`; OpenAI: `[DONE]`) or
/// an error event; `cancel` drops the connection after the first event.
async fn read_stream(response: reqwest::Response, cancel: bool) -> Outcome {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        let Ok(bytes) = chunk else {
            return Outcome::Lost;
        };
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if cancel {
                // Dropping the stream closes the connection mid-generation.
                return Outcome::Ok;
            }
            if data == "[DONE]" {
                return Outcome::Ok;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                return Outcome::Lost;
            };
            if value.get("error").is_some() {
                return Outcome::Error;
            }
            if value.get("generated_text").is_some_and(|t| !t.is_null()) {
                return Outcome::Ok;
            }
        }
    }
    Outcome::Lost
}

/// One gauge from the router's `/metrics` text.
async fn gauge(client: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Waits until nothing is queued or running, then reads the KV blocks in use.
async fn drained_blocks(client: &reqwest::Client, url: &str) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let queued = gauge(client, url, "tgi_queue_size").await;
        let running = gauge(client, url, "tgi_batch_current_size").await;
        if queued == Some(0.0) && running == Some(0.0) {
            // The gauges are published after each step: one more interval for the last release.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return gauge(client, url, "tessera_kv_blocks_used").await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Resident set size in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Processes whose name (`/proc/PID/comm`, which the launcher sets for its children) is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

fn total_rss(pids: &[u32]) -> String {
    let values: Vec<u64> = pids.iter().filter_map(|&p| rss_kib(p)).collect();
    if values.is_empty() {
        return "n/a".into();
    }
    format!("{:.1} MiB", values.iter().sum::<u64>() as f64 / 1024.0)
}

/// Runs the soak; returns whether it passed.
pub async fn run(client: &reqwest::Client, args: &SoakArgs<'_>) -> bool {
    // Each shape with each prompt first, so the prefix cache holds every prompt before "idle" is measured.
    for i in 0..KINDS.len() * PROMPTS.len() {
        one(client, args, i).await;
    }
    let idle = drained_blocks(client, args.url).await;
    let rss_before = (total_rss(&args.router_pids), total_rss(&args.shard_pids));

    let tally = Tally::default();
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let workers = (0..args.concurrency.max(1)).map(|_| async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= args.requests {
                break;
            }
            tally.add(one(client, args, i).await);
        }
    });
    futures::future::join_all(workers).await;
    let elapsed = start.elapsed().as_secs_f64();

    let after = drained_blocks(client, args.url).await;
    let rss_after = (total_rss(&args.router_pids), total_rss(&args.shard_pids));
    let lost = tally.lost.load(Ordering::Relaxed);
    let server_errors = tally.server_errors.load(Ordering::Relaxed);
    // Cached prompt prefixes stay after a drain; requests' own blocks must all be back.
    let blocks_back = matches!((idle, after), (Some(i), Some(a)) if a <= i);
    let show = |b: Option<f64>| b.map_or("unknown (no drain)".to_string(), |b| b.to_string());
    println!(
        "soak: {} requests at concurrency {} in {elapsed:.1} s",
        args.requests, args.concurrency
    );
    println!(
        "  ok (results and expected 4xx): {}",
        tally.ok.load(Ordering::Relaxed)
    );
    println!(
        "  unexpected errors (error answers or events, not 5xx): {}",
        tally.errors.load(Ordering::Relaxed)
    );
    println!("  lost (no result and no error): {lost}");
    println!("  5xx: {server_errors}");
    println!(
        "  KV blocks in use: idle {}, after drain {}",
        show(idle),
        show(after)
    );
    println!(
        "  RSS router: {} -> {}; shard: {} -> {}",
        rss_before.0, rss_after.0, rss_before.1, rss_after.1
    );
    let passed = lost == 0 && server_errors == 0 && blocks_back;
    println!("soak {}", if passed { "passed" } else { "FAILED" });
    passed
}
