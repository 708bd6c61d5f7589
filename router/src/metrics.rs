//! Prometheus metrics: every name declared once here (TGI's `tgi_*` names and labels, plus Tessera's TTFT,
//! inter-token latency, KV-block and prefix-cache series). Counters carry the `_total` suffix that
//! Prometheus' naming rules (and `promtool check metrics`) require.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUEST_COUNT: &str = "tgi_request_count_total";
pub const REQUEST_SUCCESS: &str = "tgi_request_success_total";
pub const REQUEST_FAILURE: &str = "tgi_request_failure_total";
pub const REQUEST_DURATION: &str = "tgi_request_duration";
pub const REQUEST_VALIDATION_DURATION: &str = "tgi_request_validation_duration";
pub const REQUEST_QUEUE_DURATION: &str = "tgi_request_queue_duration";
pub const REQUEST_INFERENCE_DURATION: &str = "tgi_request_inference_duration";
pub const REQUEST_MEAN_TIME_PER_TOKEN: &str = "tgi_request_mean_time_per_token_duration";
pub const REQUEST_GENERATED_TOKENS: &str = "tgi_request_generated_tokens";
pub const REQUEST_INPUT_LENGTH: &str = "tgi_request_input_length";
pub const REQUEST_MAX_NEW_TOKENS: &str = "tgi_request_max_new_tokens";
pub const QUEUE_SIZE: &str = "tgi_queue_size";
pub const BATCH_CURRENT_SIZE: &str = "tgi_batch_current_size";
pub const BATCH_CURRENT_MAX_TOKENS: &str = "tgi_batch_current_max_tokens";
pub const BATCH_MAX_TOTAL_TOKENS: &str = "tgi_batch_max_total_tokens";
pub const BATCH_NEXT_SIZE: &str = "tgi_batch_next_size";
pub const BATCH_INFERENCE_COUNT: &str = "tgi_batch_inference_count_total";
pub const BATCH_INFERENCE_SUCCESS: &str = "tgi_batch_inference_success_total";
pub const BATCH_INFERENCE_FAILURE: &str = "tgi_batch_inference_failure_total";
pub const BATCH_INFERENCE_DURATION: &str = "tgi_batch_inference_duration";
pub const BATCH_FORWARD_DURATION: &str = "tgi_batch_forward_duration";
pub const BATCH_DECODE_DURATION: &str = "tgi_batch_decode_duration";
pub const BATCH_FILTER_DURATION: &str = "tgi_batch_filter_duration";
pub const BATCH_CONCAT_DURATION: &str = "tgi_batch_concat_duration";
pub const BATCH_CONCAT: &str = "tgi_batch_concat_total";
pub const TIME_TO_FIRST_TOKEN: &str = "tessera_request_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "tessera_request_inter_token_latency_seconds";
pub const KV_BLOCKS_USED: &str = "tessera_kv_blocks_used";
pub const KV_BLOCKS_FREE: &str = "tessera_kv_blocks_free";
pub const PREFIX_CACHE_HIT_TOKENS: &str = "tessera_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_PROMPT_TOKENS: &str = "tessera_prefix_cache_prompt_tokens_total";

/// TGI's duration buckets: 35 geometric buckets from 150 µs, ×1.5.
fn duration_buckets() -> Vec<f64> {
    (0..35).map(|i| 0.00015 * 1.5f64.powi(i)).collect()
}

/// `n` evenly spaced integer buckets up to `max` (deduplicated when `max < n`).
fn linear_buckets(max: f64, n: usize) -> Vec<f64> {
    let mut bounds: Vec<u64> = (1..=n)
        .map(|i| ((max * i as f64 / n as f64).round() as u64).max(1))
        .collect();
    bounds.dedup();
    bounds.into_iter().map(|b| b as f64).collect()
}

/// Install the global recorder; the handle renders `/metrics`.
pub fn install(max_input_tokens: u32, max_total_tokens: u32) -> anyhow::Result<PrometheusHandle> {
    let durations = [
        REQUEST_DURATION,
        REQUEST_VALIDATION_DURATION,
        REQUEST_QUEUE_DURATION,
        REQUEST_INFERENCE_DURATION,
        REQUEST_MEAN_TIME_PER_TOKEN,
        BATCH_INFERENCE_DURATION,
        BATCH_FORWARD_DURATION,
        BATCH_DECODE_DURATION,
        BATCH_FILTER_DURATION,
        BATCH_CONCAT_DURATION,
        TIME_TO_FIRST_TOKEN,
        INTER_TOKEN_LATENCY,
    ];
    let mut builder = PrometheusBuilder::new();
    for name in durations {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.into()), &duration_buckets())?;
    }
    let sizes: Vec<f64> = (0..=10).map(|i| 2f64.powi(i)).collect();
    let tokens: Vec<f64> = (0..=12).map(|i| 2f64.powi(i)).collect();
    builder = builder
        .set_buckets_for_metric(Matcher::Full(BATCH_NEXT_SIZE.into()), &sizes)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_GENERATED_TOKENS.into()), &tokens)?
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_INPUT_LENGTH.into()),
            &linear_buckets(max_input_tokens as f64, 100),
        )?
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_MAX_NEW_TOKENS.into()),
            &linear_buckets(max_total_tokens as f64, 100),
        )?;
    let handle = builder.install_recorder()?;
    describe();
    // Failure counters exist from the start at 0, so `rate()` and the alerts on them have a series
    // before the first failure (Prometheus' advice for counters with known labels).
    for method in ["prefill", "decode"] {
        metrics::counter!(BATCH_INFERENCE_FAILURE, "method" => method).increment(0);
    }
    Ok(handle)
}

fn describe() {
    describe_counter!(REQUEST_COUNT, "Requests received");
    describe_counter!(REQUEST_SUCCESS, "Requests that completed");
    describe_counter!(REQUEST_FAILURE, "Requests that failed, by `err`");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "End-to-end request duration"
    );
    describe_histogram!(
        REQUEST_VALIDATION_DURATION,
        Unit::Seconds,
        "Validation and tokenization time"
    );
    describe_histogram!(
        REQUEST_QUEUE_DURATION,
        Unit::Seconds,
        "Time spent waiting for admission"
    );
    describe_histogram!(
        REQUEST_INFERENCE_DURATION,
        Unit::Seconds,
        "Time from admission to the last token"
    );
    describe_histogram!(
        REQUEST_MEAN_TIME_PER_TOKEN,
        Unit::Seconds,
        "Inference time per generated token"
    );
    describe_histogram!(REQUEST_GENERATED_TOKENS, "Generated tokens per request");
    describe_histogram!(REQUEST_INPUT_LENGTH, "Prompt tokens per request");
    describe_histogram!(
        REQUEST_MAX_NEW_TOKENS,
        "Requested max_new_tokens per request"
    );
    describe_gauge!(QUEUE_SIZE, "Requests waiting for admission");
    describe_gauge!(BATCH_CURRENT_SIZE, "Requests in the running batch");
    describe_gauge!(
        BATCH_CURRENT_MAX_TOKENS,
        "Tokens reserved by the running batch"
    );
    describe_gauge!(BATCH_MAX_TOTAL_TOKENS, "KV-cache capacity in tokens");
    describe_histogram!(BATCH_NEXT_SIZE, "Requests admitted per prefill");
    describe_counter!(BATCH_INFERENCE_COUNT, "Shard forwards, by `method`");
    describe_counter!(
        BATCH_INFERENCE_SUCCESS,
        "Successful shard forwards, by `method`"
    );
    describe_counter!(
        BATCH_INFERENCE_FAILURE,
        "Failed shard forwards, by `method`"
    );
    describe_histogram!(
        BATCH_INFERENCE_DURATION,
        Unit::Seconds,
        "Router-side forward time, by `method`"
    );
    describe_histogram!(
        BATCH_FORWARD_DURATION,
        Unit::Seconds,
        "Shard model forward time, by `method`"
    );
    describe_histogram!(
        BATCH_DECODE_DURATION,
        Unit::Seconds,
        "Shard sampling and detokenization time, by `method`"
    );
    describe_histogram!(
        BATCH_FILTER_DURATION,
        Unit::Seconds,
        "Delivering tokens and filtering the batch, by `method`"
    );
    describe_histogram!(
        BATCH_CONCAT_DURATION,
        Unit::Seconds,
        "Shard batch concatenation time, by `method`"
    );
    describe_counter!(BATCH_CONCAT, "Admissions into a running batch, by `reason`");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Request arrival to its first generated token"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between consecutive generated tokens of a request"
    );
    describe_gauge!(
        KV_BLOCKS_USED,
        "KV-cache blocks held by requests or the prefix cache"
    );
    describe_gauge!(KV_BLOCKS_FREE, "KV-cache blocks on the free list");
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS,
        "Prompt tokens served from the prefix cache"
    );
    describe_counter!(PREFIX_CACHE_PROMPT_TOKENS, "Prompt tokens admitted");
}
