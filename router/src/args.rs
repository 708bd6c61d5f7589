//! The router's command line: clap-derive groups (TGI's router flags), public so the launcher can build
//! the router's argv from the same structs (`RouterArgs::to_argv`, round-trip tested).

use crate::scheduler::{KvAllocation, SchedulingPolicy};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Tessera router: TGI and OpenAI HTTP APIs in front of the shards.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub router: RouterArgs,
}

/// Subcommands besides serving (the default).
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Print the OpenAPI document and exit.
    PrintSchema,
}

/// Everything the serving router needs.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct RouterArgs {
    #[command(flatten)]
    pub shard: ShardArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub batching: BatchingArgs,
}

/// Where the shards and the tokenizer are.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ShardArgs {
    /// Unix socket of shard rank 0; the others are found with ServiceDiscovery.
    #[arg(long, env, default_value = "/tmp/tessera-server-0")]
    pub master_shard_uds_path: PathBuf,
    /// Tokenizer: a local Hugging Face model folder or a .gguf file (also the chat template's source).
    #[arg(long, env)]
    pub tokenizer_name: PathBuf,
    /// Model id reported by /info and /v1/models (defaults to the tokenizer's folder or file name).
    #[arg(long, env)]
    pub model_id: Option<String>,
}

/// The HTTP listener and its cross-cutting layers.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    /// Port to listen on.
    #[arg(long, short, env, default_value_t = 3000)]
    pub port: u16,
    /// Bearer token required on generation routes (compared in constant time).
    #[arg(long, env)]
    pub api_key: Option<String>,
    /// Largest accepted request body in bytes (413 above it).
    #[arg(long, env, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Allowed CORS origins (repeatable); any origin when none is given.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Log as JSON lines.
    #[arg(long, env)]
    pub json_output: bool,
    /// Export spans over OTLP/gRPC to this collector (e.g. `http://localhost:4317`); a W3C
    /// `traceparent` header on a request continues the caller's trace.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[arg(long, env, default_value = "text-generation-inference.router")]
    pub otlp_service_name: String,
    /// Also serve the Prometheus text (every path answers it, as TGI's exporter does) on this port of
    /// `--hostname`; `/metrics` stays on `--port` too. 0 (the default) turns it off: TGI's default, 9000,
    /// would make a second router on the same host, or tests that start routers in parallel, fail to start
    /// on the taken port. Pass `--prometheus-port 9000` for TGI's layout.
    #[arg(long, env, default_value_t = 0)]
    pub prometheus_port: u16,
    /// Seconds a client has to send a request's headers; the same clock closes a kept-alive connection
    /// that sends no next request for this long (slow or idle clients cannot hold connections open).
    #[arg(long, env, default_value_t = 30)]
    pub header_read_timeout: u64,
    /// Most open HTTP connections; further clients wait in the listen backlog until one closes.
    #[arg(long, env, default_value_t = 1024)]
    pub max_connections: usize,
}

/// Per-request limits (validation) and admission.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct LimitArgs {
    /// Requests in flight (queued + running) before new ones get 429.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Largest `best_of`.
    #[arg(long, env, default_value_t = 2)]
    pub max_best_of: usize,
    /// Most stop sequences per request.
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Most alternatives per token (`top_n_tokens`, OpenAI `top_logprobs`).
    #[arg(long, env, default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// Longest prompt in tokens (default: from Warmup, `max_total_tokens - 1`).
    #[arg(long, env)]
    pub max_input_tokens: Option<u32>,
    /// Longest prompt + generation in tokens (default: from Warmup).
    #[arg(long, env)]
    pub max_total_tokens: Option<u32>,
    /// Tokenizer workers (blocking threads) for validation.
    #[arg(long, env, default_value_t = 2)]
    pub validation_workers: usize,
    /// Most prompts in one /v1/completions call; also the largest OpenAI `n`.
    #[arg(long, env, default_value_t = 4)]
    pub max_client_batch_size: usize,
    /// Refuse requests with a grammar (`grammar`, `response_format` other than text, `tool_choice`
    /// required or named) with TGI's 422 "grammar is not supported".
    #[arg(long, env)]
    pub disable_grammar_support: bool,
}

/// Continuous batching knobs.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct BatchingArgs {
    /// Tokens per prefill forward (and per mixed forward when the shard chunks).
    #[arg(long, env, default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// KV capacity in tokens; the shard's Warmup answer wins when it reports one.
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,
    /// Non-chunking shards: queue size (× running) that justifies pausing decode for a prefill.
    #[arg(long, env, default_value_t = 1.2)]
    pub waiting_served_ratio: f32,
    /// Non-chunking shards: decode steps after which a waiting request is admitted regardless.
    #[arg(long, env, default_value_t = 20)]
    pub max_waiting_tokens: usize,
    /// Hard cap on requests per batch.
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,
    /// Admission order: `fcfs` (arrival) or `priority` (the requests' `priority`, lower first, then
    /// arrival).
    #[arg(long, env, value_enum, default_value_t = SchedulingPolicy::Fcfs, hide_possible_values = true)]
    pub scheduling_policy: SchedulingPolicy,
    /// When a request's KV blocks are reserved: `on-demand` (for what it has computed plus the next
    /// step, grown as it generates; when the cache is full the least important running request is
    /// preempted and later resumed where it stopped) or `up-front` (prompt + max_new_tokens at
    /// admission, as TGI).
    #[arg(long, env, value_enum, default_value_t = KvAllocation::OnDemand, hide_possible_values = true)]
    pub kv_allocation: KvAllocation,
    /// Seconds any shard RPC may take before its requests fail and `/health` turns 503. Default: ten
    /// times the Warmup (one forward of the whole prefill budget, so it scales with the model, the
    /// device and `--max-batch-prefill-tokens`), at least 60.
    #[arg(long, env)]
    pub shard_rpc_timeout: Option<u64>,
}

impl RouterArgs {
    /// The argv (without the program name) that parses back into `self`.
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = Vec::new();
        let mut push = |flag: &str, value: String| {
            argv.push(format!("--{flag}"));
            argv.push(value);
        };
        let s = &self.shard;
        push(
            "master-shard-uds-path",
            s.master_shard_uds_path.display().to_string(),
        );
        push("tokenizer-name", s.tokenizer_name.display().to_string());
        if let Some(id) = &s.model_id {
            push("model-id", id.clone());
        }
        let v = &self.server;
        push("hostname", v.hostname.clone());
        push("port", v.port.to_string());
        if let Some(key) = &v.api_key {
            push("api-key", key.clone());
        }
        push("payload-limit", v.payload_limit.to_string());
        for origin in &v.cors_allow_origin {
            push("cors-allow-origin", origin.clone());
        }
        if let Some(endpoint) = &v.otlp_endpoint {
            push("otlp-endpoint", endpoint.clone());
        }
        push("otlp-service-name", v.otlp_service_name.clone());
        push("prometheus-port", v.prometheus_port.to_string());
        push("header-read-timeout", v.header_read_timeout.to_string());
        push("max-connections", v.max_connections.to_string());
        let l = &self.limits;
        push(
            "max-concurrent-requests",
            l.max_concurrent_requests.to_string(),
        );
        push("max-best-of", l.max_best_of.to_string());
        push("max-stop-sequences", l.max_stop_sequences.to_string());
        push("max-top-n-tokens", l.max_top_n_tokens.to_string());
        if let Some(n) = l.max_input_tokens {
            push("max-input-tokens", n.to_string());
        }
        if let Some(n) = l.max_total_tokens {
            push("max-total-tokens", n.to_string());
        }
        push("validation-workers", l.validation_workers.to_string());
        push("max-client-batch-size", l.max_client_batch_size.to_string());
        let b = &self.batching;
        push(
            "max-batch-prefill-tokens",
            b.max_batch_prefill_tokens.to_string(),
        );
        if let Some(n) = b.max_batch_total_tokens {
            push("max-batch-total-tokens", n.to_string());
        }
        push("waiting-served-ratio", b.waiting_served_ratio.to_string());
        push("max-waiting-tokens", b.max_waiting_tokens.to_string());
        if let Some(n) = b.max_batch_size {
            push("max-batch-size", n.to_string());
        }
        if let Some(policy) = b.scheduling_policy.to_possible_value() {
            push("scheduling-policy", policy.get_name().to_string());
        }
        if let Some(allocation) = b.kv_allocation.to_possible_value() {
            push("kv-allocation", allocation.get_name().to_string());
        }
        if let Some(secs) = b.shard_rpc_timeout {
            push("shard-rpc-timeout", secs.to_string());
        }
        if v.json_output {
            argv.push("--json-output".into());
        }
        if self.limits.disable_grammar_support {
            argv.push("--disable-grammar-support".into());
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[String]) -> RouterArgs {
        let full = std::iter::once("tessera-router".to_string()).chain(argv.iter().cloned());
        Cli::try_parse_from(full).expect("argv parses").router
    }

    #[test]
    fn argv_round_trips_defaults_and_every_option() {
        let minimal = parse(&["--tokenizer-name".into(), "/m".into()]);
        assert_eq!(parse(&minimal.to_argv()), minimal);

        let mut full = minimal.clone();
        full.shard.model_id = Some("smol".into());
        full.server.api_key = Some("k".into());
        full.server.cors_allow_origin = vec!["http://a".into(), "http://b".into()];
        full.server.json_output = true;
        full.server.otlp_endpoint = Some("http://collector:4317".into());
        full.server.otlp_service_name = "tessera".into();
        full.server.prometheus_port = 9000;
        full.limits.max_input_tokens = Some(100);
        full.limits.max_total_tokens = Some(200);
        full.batching.max_batch_total_tokens = Some(5000);
        full.batching.max_batch_size = Some(8);
        full.batching.waiting_served_ratio = 0.3;
        full.batching.shard_rpc_timeout = Some(7);
        full.server.header_read_timeout = 3;
        full.server.max_connections = 9;
        assert_eq!(parse(&full.to_argv()), full);
    }
}
