//! Startup (TGI's `connect_backend` + router `main`): shards → ClearCache → Info → Warmup, limits derived
//! and checked against each other (and capped to what the KV cache can ever hold), then the HTTP server
//! with graceful shutdown.

use crate::api::Info;
use crate::args::RouterArgs;
use crate::batcher::{Infer, KvCapacity};
use crate::client::ShardedClient;
use crate::error::{Result, RouterError};
use crate::rejoin::Rejoin;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::server::{router, serve, AppState, ConnectionLimits};
use crate::validation::{Limits, Validation};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tessera_formats::chat_template::ChatTemplate;
use tessera_proto::v3;
use tokenizers::Tokenizer;

/// Limits after Warmup, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedLimits {
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_batch_total_tokens: u32,
}

/// TGI §1.3 step 5: the Warmup answer (and the flags) give the limits; inconsistent ones are errors.
///
/// `max_total_tokens` (and so the default `max_new_tokens`) never exceeds what one request can hold in
/// the KV cache: a smaller cache than the model's context (any long-context model) caps the default,
/// and an explicit flag above it is an error — otherwise a request without a token limit would reserve
/// more blocks than exist and wait at the queue head forever.
pub fn derive_limits(
    args: &RouterArgs,
    warmup: &v3::WarmupResponse,
    shard: &v3::InfoResponse,
) -> Result<DerivedLimits> {
    let prefill = args.batching.max_batch_prefill_tokens;
    let max_batch_total_tokens = match warmup.max_supported_total_tokens {
        Some(supported) => {
            if let Some(asked) = args.limits.max_total_tokens.filter(|&t| t > supported) {
                return Err(RouterError::NotEnoughMemory(asked, supported));
            }
            if let Some(asked) = args.batching.max_batch_total_tokens {
                tracing::warn!("--max-batch-total-tokens={asked} ignored: the shards' Warmup measured {supported}");
            }
            supported
        }
        None => args.batching.max_batch_total_tokens.unwrap_or(
            16000
                .max(args.limits.max_total_tokens.unwrap_or(0))
                .max(prefill),
        ),
    };
    let config = |message: String| Err(RouterError::Config(message));
    let kv = kv_capacity(max_batch_total_tokens, shard);
    let capacity = kv.max_request_tokens();
    let max_total_tokens = match args.limits.max_total_tokens {
        Some(asked) if asked > capacity => {
            return config(format!(
                "`max_total_tokens`({asked}) must be <= {capacity}, the most one request can hold in the KV \
                 cache ({} blocks of {} tokens, block 0 reserved); give the shards more KV memory or lower it",
                kv.num_blocks, kv.block_size
            ));
        }
        Some(asked) => asked,
        None if warmup.max_total_tokens > capacity => {
            tracing::info!(
                "max_total_tokens capped from {} to {capacity}: the KV cache holds {} blocks of {} tokens",
                warmup.max_total_tokens,
                kv.num_blocks,
                kv.block_size
            );
            capacity
        }
        None => warmup.max_total_tokens,
    };
    let max_input_tokens = args.limits.max_input_tokens.unwrap_or(
        warmup
            .max_input_tokens
            .min(max_total_tokens.saturating_sub(1)),
    );
    if max_input_tokens >= max_total_tokens {
        return config(format!("`max_input_tokens`({max_input_tokens}) must be < `max_total_tokens`({max_total_tokens})"));
    }
    if !shard.support_chunking && max_input_tokens > prefill {
        return config(format!("`max_batch_prefill_tokens`({prefill}) must be >= `max_input_tokens`({max_input_tokens})"));
    }
    if prefill > max_batch_total_tokens {
        return config(format!("`max_batch_prefill_tokens`({prefill}) must be <= `max_batch_total_tokens`({max_batch_total_tokens})"));
    }
    if max_total_tokens > max_batch_total_tokens {
        return config(format!("`max_total_tokens`({max_total_tokens}) must be <= `max_batch_total_tokens`({max_batch_total_tokens})"));
    }
    Ok(DerivedLimits {
        max_input_tokens,
        max_total_tokens,
        max_batch_total_tokens,
    })
}

/// The scheduler's view of a KV cache of `max_batch_total_tokens` tokens.
pub fn kv_capacity(max_batch_total_tokens: u32, shard: &v3::InfoResponse) -> KvCapacity {
    let block_size = shard.block_size.max(1);
    KvCapacity {
        num_blocks: max_batch_total_tokens / block_size,
        block_size,
        speculate: shard.speculate,
    }
}

/// `--shard-rpc-timeout`, or ten times the Warmup (one forward over the whole prefill budget, the longest
/// any step can be), at least 60 s.
fn rpc_timeout(asked: Option<u64>, warmup_took: Duration) -> Duration {
    asked
        .map(Duration::from_secs)
        .unwrap_or_else(|| warmup_took.saturating_mul(10).max(Duration::from_secs(60)))
}

/// TGI's warmup batch: `_test ` prompts adding up to the prefill budget, each within `max_input`,
/// laid out in consecutive KV blocks from block 1 (block 0 belongs to health).
fn warmup_batch(
    tokenizer: &Tokenizer,
    prefill: u32,
    max_input: Option<u32>,
    max_batch_size: Option<usize>,
    block_size: u32,
) -> Result<v3::Batch> {
    let count = |k: usize| {
        tokenizer
            .encode("_test ".repeat(k), true)
            .map(|e| e.len() as u32)
            .unwrap_or(u32::MAX)
    };
    let per_repeat = count(64).div_ceil(64).max(1);
    let (mut requests, mut used, mut next_block) = (Vec::new(), 0u32, 1u32);
    while used < prefill && requests.len() < max_batch_size.unwrap_or(usize::MAX) {
        let target = max_input.unwrap_or(prefill).min(prefill - used);
        let mut k = (target / per_repeat).max(1) as usize;
        while k > 1 && count(k) > target {
            k -= 1;
        }
        let tokens = count(k);
        let max_new_tokens = 2;
        let positions = tokens + max_new_tokens - 1;
        let blocks: Vec<u32> = (next_block..next_block + positions.div_ceil(block_size)).collect();
        next_block += blocks.len() as u32;
        let slots = (0..positions)
            .map(|p| blocks[(p / block_size) as usize] * block_size + p % block_size)
            .collect();
        requests.push(v3::Request {
            id: requests.len() as u64,
            inputs: "_test ".repeat(k),
            truncate: tokens,
            parameters: Some(v3::NextTokenChooserParameters {
                temperature: 0.9,
                top_k: 10,
                top_p: 0.9,
                typical_p: 0.9,
                do_sample: true,
                seed: 0,
                repetition_penalty: 1.2,
                frequency_penalty: 0.1,
                presence_penalty: 0.1,
                ..Default::default()
            }),
            stopping_parameters: Some(v3::StoppingCriteriaParameters {
                max_new_tokens,
                stop_sequences: vec![],
                ignore_eos_token: true,
            }),
            prefill_logprobs: true,
            top_n_tokens: 20,
            add_special_tokens: true,
            blocks,
            slots,
            ..Default::default()
        });
        used += tokens;
    }
    let max_blocks = requests
        .iter()
        .map(|r| r.blocks.len() as u32)
        .max()
        .unwrap_or(0);
    Ok(v3::Batch {
        id: 0,
        size: requests.len() as u32,
        max_tokens: used,
        max_blocks,
        requests,
    })
}

fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = tessera_formats::tokenizer::load_tokenizer(path).map_err(|e| {
        RouterError::Config(format!(
            "cannot load the tokenizer from {}: {e}",
            path.display()
        ))
    })?;
    let template = ChatTemplate::load(path).unwrap_or_else(|e| {
        tracing::warn!("no usable chat template ({e}); chat routes will answer 422");
        None
    });
    // Building the tokenizer from a GGUF's vocabulary freed tens of MiB of documents.
    tessera_formats::heap::release_freed();
    Ok((tokenizer, template))
}

/// Connect, size everything with Warmup, serve until SIGINT/SIGTERM.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    // The metrics exporter's clock (quanta) calibrates its TSC against the OS clock on first use,
    // for up to 200 ms where the TSC is noisy (VMs): begun now, on a thread of its own, it
    // overlaps loading the tokenizer and warming the shards instead of delaying readiness.
    std::thread::spawn(quanta::Instant::now);
    // Bound before the shards are reached, so a taken port fails in milliseconds rather than after
    // Warmup; scrapes wait in the backlog until the recorder exists.
    let prometheus = bind_prometheus(&args.server.hostname, args.server.prometheus_port).await?;
    let (tokenizer, template) = load_tokenizer(&args.shard.tokenizer_name)?;
    let client = ShardedClient::connect_with_retry(
        &args.shard.master_shard_uds_path,
        Duration::from_secs(120),
    )
    .await?;
    client.clear_cache(None).await?;
    let shard_info = client.info().await?;
    let block_size = shard_info.block_size.max(1);
    let batching = &args.batching;
    let warming = std::time::Instant::now();
    let warmup_request = v3::WarmupRequest {
        batch: Some(warmup_batch(
            &tokenizer,
            batching.max_batch_prefill_tokens,
            args.limits.max_input_tokens,
            batching.max_batch_size,
            block_size,
        )?),
        max_input_tokens: args.limits.max_input_tokens,
        max_prefill_tokens: batching.max_batch_prefill_tokens,
        max_total_tokens: args.limits.max_total_tokens,
    };
    let warmup = client.warmup(warmup_request.clone()).await?;
    let limits = derive_limits(&args, &warmup, &shard_info)?;
    let rpc_timeout = rpc_timeout(batching.shard_rpc_timeout, warming.elapsed());
    let client = client.with_rpc_timeout(rpc_timeout);
    tracing::info!(
        ?limits,
        world_size = client.world_size(),
        block_size,
        rpc_timeout_s = rpc_timeout.as_secs_f64(),
        "shards warmed up"
    );

    let metrics = crate::metrics::install(crate::metrics::BucketLimits {
        max_input_tokens: limits.max_input_tokens,
        max_total_tokens: limits.max_total_tokens,
        speculate: shard_info.speculate,
    })?;
    metrics::gauge!(crate::metrics::BATCH_MAX_TOTAL_TOKENS)
        .set(limits.max_batch_total_tokens as f64);
    crate::metrics::spawn_upkeep(metrics.clone());
    if let Some(listener) = prometheus {
        tokio::spawn(serve_prometheus(listener, metrics.clone()));
    }
    let scheduler = Scheduler::new(SchedulerConfig {
        block_size,
        num_blocks: limits.max_batch_total_tokens / block_size,
        max_batch_prefill_tokens: batching.max_batch_prefill_tokens,
        max_batch_size: batching.max_batch_size,
        support_chunking: shard_info.support_chunking,
        prefix_caching: shard_info.use_prefix_caching,
        speculate: shard_info.speculate,
        waiting_served_ratio: batching.waiting_served_ratio,
        max_waiting_tokens: batching.max_waiting_tokens,
        policy: batching.scheduling_policy,
        kv_allocation: batching.kv_allocation,
    });
    let infer = Infer::spawn(
        scheduler,
        client.clone(),
        args.limits.max_concurrent_requests,
        kv_capacity(limits.max_batch_total_tokens, &shard_info),
        Rejoin {
            master: args.shard.master_shard_uds_path.clone(),
            warmup: warmup_request,
            max_batch_total_tokens: limits.max_batch_total_tokens,
            rpc_timeout,
            patience: rpc_timeout,
        },
    );
    let validation = Validation::new(
        tokenizer,
        args.limits.validation_workers,
        Limits {
            max_best_of: args.limits.max_best_of,
            max_stop_sequences: args.limits.max_stop_sequences,
            max_top_n_tokens: args.limits.max_top_n_tokens,
            max_input_tokens: limits.max_input_tokens,
            max_total_tokens: limits.max_total_tokens,
            grammar_support: !args.limits.disable_grammar_support,
        },
    );
    let info = model_info(&args, &limits, &shard_info, client.world_size());
    let state = Arc::new(AppState {
        infer: infer.clone(),
        validation,
        template,
        info,
        metrics,
        api_key: args.server.api_key.clone(),
        compute_type: std::env::var("COMPUTE_TYPE")
            .unwrap_or_else(|_| format!("{}-{}", client.world_size(), shard_info.device_type)),
    });
    let app = router(
        state,
        args.server.payload_limit,
        &args.server.cors_allow_origin,
    );
    let address = format!("{}:{}", args.server.hostname, args.server.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|e| RouterError::Config(format!("cannot listen on {address}: {e}")))?;
    tracing::info!("listening on {address}");
    let connections = ConnectionLimits {
        header_read_timeout: Duration::from_secs(args.server.header_read_timeout),
        max_connections: args.server.max_connections,
    };
    let draining = async move {
        shutdown_signal().await;
        infer.start_draining();
    };
    serve(listener, app, connections, draining).await?;
    Ok(())
}

/// `--prometheus-port`: its listener, or `None` when the flag is 0.
async fn bind_prometheus(hostname: &str, port: u16) -> Result<Option<tokio::net::TcpListener>> {
    if port == 0 {
        return Ok(None);
    }
    let address = format!("{hostname}:{port}");
    let listener = tokio::net::TcpListener::bind(&address).await.map_err(|e| {
        RouterError::Config(format!(
            "cannot listen for Prometheus on {address} (--prometheus-port): {e}"
        ))
    })?;
    tracing::info!("serving Prometheus metrics on {address}");
    Ok(Some(listener))
}

/// The metrics-only server of `--prometheus-port`: every GET answers the Prometheus text, like the
/// exporter's own listener in TGI.
async fn serve_prometheus(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    let render = move || {
        let handle = handle.clone();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                handle.render(),
            )
        }
    };
    let app = axum::Router::new().fallback(axum::routing::get(render));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("Prometheus listener stopped: {e}");
    }
}

fn model_info(
    args: &RouterArgs,
    limits: &DerivedLimits,
    shard: &v3::InfoResponse,
    world_size: usize,
) -> Info {
    let path = &args.shard.tokenizer_name;
    let default_id = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Info {
        model_id: args.shard.model_id.clone().unwrap_or(default_id),
        model_sha: None,
        model_pipeline_tag: Some("text-generation".into()),
        max_concurrent_requests: args.limits.max_concurrent_requests,
        max_best_of: args.limits.max_best_of,
        max_stop_sequences: args.limits.max_stop_sequences,
        max_input_tokens: limits.max_input_tokens,
        max_total_tokens: limits.max_total_tokens,
        validation_workers: args.limits.validation_workers,
        max_client_batch_size: args.limits.max_client_batch_size,
        router: "tessera-router",
        version: env!("CARGO_PKG_VERSION"),
        sha: None,
        docker_label: None,
        max_batch_total_tokens: limits.max_batch_total_tokens,
        block_size: shard.block_size,
        support_chunking: shard.support_chunking,
        prefix_caching: shard.use_prefix_caching,
        world_size,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("signal received: draining in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cli;
    use clap::Parser;

    fn args(extra: &[&str]) -> RouterArgs {
        let argv = ["tessera-router", "--tokenizer-name", "/m"]
            .iter()
            .chain(extra);
        Cli::parse_from(argv).router
    }

    fn shard(block_size: u32, speculate: u32, support_chunking: bool) -> v3::InfoResponse {
        v3::InfoResponse {
            block_size,
            speculate,
            support_chunking,
            ..Default::default()
        }
    }

    fn warmup(supported: Option<u32>, input: u32, total: u32) -> v3::WarmupResponse {
        v3::WarmupResponse {
            max_supported_total_tokens: supported,
            max_input_tokens: input,
            max_total_tokens: total,
        }
    }

    #[tokio::test]
    async fn a_taken_prometheus_port_is_a_clear_error_and_zero_is_off() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = bind_prometheus("127.0.0.1", port).await.unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains(&format!("127.0.0.1:{port} (--prometheus-port)")),
            "{message}"
        );
        assert!(bind_prometheus("127.0.0.1", 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_prometheus_port_answers_the_scrape_on_any_path() {
        let recorder = crate::metrics::recorder(crate::metrics::BucketLimits {
            max_input_tokens: 10,
            max_total_tokens: 20,
            speculate: 0,
        })
        .unwrap();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, crate::metrics::describe_and_register);
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let listener = bind_prometheus("127.0.0.1", port).await.unwrap().unwrap();
        tokio::spawn(serve_prometheus(listener, handle));
        for path in ["/metrics", "/"] {
            let body = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(body.contains("tgi_request_count 0"), "{path}: {body}");
        }
    }

    #[test]
    fn limits_come_from_warmup_and_are_checked() {
        let l = derive_limits(
            &args(&[]),
            &warmup(Some(50_000), 8191, 8192),
            &shard(1, 0, true),
        )
        .unwrap();
        assert_eq!(
            l,
            DerivedLimits {
                max_input_tokens: 8191,
                max_total_tokens: 8192,
                max_batch_total_tokens: 50_000
            }
        );
        let e = derive_limits(
            &args(&["--max-total-tokens", "60000"]),
            &warmup(Some(50_000), 8191, 8192),
            &shard(1, 0, true),
        );
        assert_eq!(e.unwrap_err(), RouterError::NotEnoughMemory(60_000, 50_000));
        let e = derive_limits(
            &args(&["--max-input-tokens", "100", "--max-total-tokens", "100"]),
            &warmup(Some(50_000), 0, 0),
            &shard(1, 0, true),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("must be < `max_total_tokens`(100)"));
        let e = derive_limits(
            &args(&["--max-batch-prefill-tokens", "10"]),
            &warmup(Some(50_000), 8191, 8192),
            &shard(1, 0, false),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("must be >= `max_input_tokens`(8191)"));
        let e = derive_limits(
            &args(&[]),
            &warmup(Some(3000), 1000, 2000),
            &shard(1, 0, true),
        );
        assert!(e.unwrap_err().to_string().contains(
            "`max_batch_prefill_tokens`(4096) must be <= `max_batch_total_tokens`(3000)"
        ));
    }

    /// A KV cache smaller than the context: the default total is capped to what one request can hold
    /// (127 usable blocks of 16 tokens, plus the last position that is never fed back, less speculation),
    /// and an explicit larger one is an error naming that limit.
    #[test]
    fn a_small_kv_cache_caps_max_total_tokens() {
        let small = warmup(Some(2048), 2047, 2048);
        let prefill = ["--max-batch-prefill-tokens", "1024"];
        let l = derive_limits(&args(&prefill), &small, &shard(16, 0, true)).unwrap();
        assert_eq!((l.max_total_tokens, l.max_input_tokens), (2033, 2032));
        let l = derive_limits(&args(&prefill), &small, &shard(16, 2, true)).unwrap();
        assert_eq!(l.max_total_tokens, 2031);
        let kv = kv_capacity(l.max_batch_total_tokens, &shard(16, 2, true));
        // The largest request fills exactly the usable blocks.
        assert_eq!((2031 + 2 - 1_u32).div_ceil(16), kv.num_blocks - 1);
        let too_big = [&prefill[..], &["--max-total-tokens", "2040"]].concat();
        let e = derive_limits(&args(&too_big), &small, &shard(16, 0, true)).unwrap_err();
        assert!(e.to_string().contains("must be <= 2033"), "{e}");
    }

    #[test]
    fn the_rpc_deadline_defaults_to_ten_warmups_and_the_flag_wins() {
        assert_eq!(
            rpc_timeout(None, Duration::from_secs(1)),
            Duration::from_secs(60)
        );
        assert_eq!(
            rpc_timeout(None, Duration::from_secs(30)),
            Duration::from_secs(300)
        );
        assert_eq!(
            rpc_timeout(Some(5), Duration::from_secs(30)),
            Duration::from_secs(5)
        );
    }
}
