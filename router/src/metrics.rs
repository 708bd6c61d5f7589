//! Prometheus metrics, every name declared once here: TGI's `tgi_*` series exactly as TGI exports them
//! (names, labels, histogram buckets; TGI's counters carry no `_total` suffix, and its Grafana dashboard
//! queries them that way), plus Tessera's own series under `tessera_*`. `docs/metrics.md` documents each.

use metrics::Unit;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const REQUEST_COUNT: &str = "tgi_request_count";
pub const REQUEST_SUCCESS: &str = "tgi_request_success";
pub const REQUEST_FAILURE: &str = "tgi_request_failure";
pub const REQUEST_DURATION: &str = "tgi_request_duration";
pub const REQUEST_VALIDATION_DURATION: &str = "tgi_request_validation_duration";
pub const REQUEST_QUEUE_DURATION: &str = "tgi_request_queue_duration";
pub const REQUEST_INFERENCE_DURATION: &str = "tgi_request_inference_duration";
pub const REQUEST_MEAN_TIME_PER_TOKEN: &str = "tgi_request_mean_time_per_token_duration";
pub const REQUEST_GENERATED_TOKENS: &str = "tgi_request_generated_tokens";
pub const REQUEST_INPUT_LENGTH: &str = "tgi_request_input_length";
pub const REQUEST_MAX_NEW_TOKENS: &str = "tgi_request_max_new_tokens";
pub const REQUEST_SKIPPED_TOKENS: &str = "tgi_request_skipped_tokens";
pub const QUEUE_SIZE: &str = "tgi_queue_size";
pub const BATCH_CURRENT_SIZE: &str = "tgi_batch_current_size";
pub const BATCH_CURRENT_MAX_TOKENS: &str = "tgi_batch_current_max_tokens";
pub const BATCH_MAX_TOTAL_TOKENS: &str = "tgi_batch_max_total_tokens";
pub const BATCH_NEXT_SIZE: &str = "tgi_batch_next_size";
pub const BATCH_INFERENCE_COUNT: &str = "tgi_batch_inference_count";
pub const BATCH_INFERENCE_SUCCESS: &str = "tgi_batch_inference_success";
pub const BATCH_INFERENCE_FAILURE: &str = "tgi_batch_inference_failure";
pub const BATCH_INFERENCE_DURATION: &str = "tgi_batch_inference_duration";
pub const BATCH_FORWARD_DURATION: &str = "tgi_batch_forward_duration";
pub const BATCH_DECODE_DURATION: &str = "tgi_batch_decode_duration";
pub const BATCH_FILTER_DURATION: &str = "tgi_batch_filter_duration";
pub const BATCH_CONCAT_DURATION: &str = "tgi_batch_concat_duration";
pub const BATCH_CONCAT: &str = "tgi_batch_concat";
pub const TIME_TO_FIRST_TOKEN: &str = "tessera_request_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "tessera_request_inter_token_latency_seconds";
pub const KV_BLOCKS_USED: &str = "tessera_kv_blocks_used";
pub const KV_BLOCKS_FREE: &str = "tessera_kv_blocks_free";
pub const PREFIX_CACHE_HIT_TOKENS: &str = "tessera_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_PROMPT_TOKENS: &str = "tessera_prefix_cache_prompt_tokens_total";
pub const QUEUE_DURATION_BY_PRIORITY: &str = "tessera_request_queue_duration_seconds";
pub const PREEMPTIONS: &str = "tessera_request_preemptions_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(Buckets),
}

/// Bucket families, as TGI sizes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buckets {
    /// 35 geometric buckets from 150 µs, ×1.5 (TGI's, for every `*_duration`).
    Durations,
    /// 100 linear buckets up to `max_input_tokens`.
    UpToMaxInput,
    /// 100 linear buckets up to `max_total_tokens`.
    UpToMaxTotal,
    /// 1, 2, … 1024.
    BatchSizes,
    /// 0, 1, … `speculate`.
    Speculated,
}

/// One exported series family: its name, type, label (with every value it takes) and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub label: Option<(&'static str, &'static [&'static str])>,
    pub help: &'static str,
}

const METHOD: Option<(&str, &[&str])> = Some(("method", &["prefill", "decode"]));

const fn metric(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        unit: None,
        label: None,
        help,
    }
}

const fn seconds(name: &'static str, help: &'static str) -> Metric {
    Metric {
        unit: Some(Unit::Seconds),
        ..metric(name, Kind::Histogram(Buckets::Durations), help)
    }
}

const fn by_method(m: Metric) -> Metric {
    Metric { label: METHOD, ..m }
}

/// Every metric the router exports. Each (name, label value) series is registered at startup, so
/// dashboards and `rate()` see every series at 0 before its first event.
pub const CATALOG: &[Metric] = &[
    metric(REQUEST_COUNT, Kind::Counter, "Requests received"),
    metric(REQUEST_SUCCESS, Kind::Counter, "Requests that completed"),
    Metric {
        // TGI's values of `err` (`dropped`: the client went away before the end).
        label: Some((
            "err",
            &[
                "overloaded",
                "validation",
                "generation",
                "incomplete",
                "dropped",
                "template",
            ],
        )),
        ..metric(
            REQUEST_FAILURE,
            Kind::Counter,
            "Requests that failed, by `err`",
        )
    },
    seconds(REQUEST_DURATION, "End-to-end request duration"),
    seconds(
        REQUEST_VALIDATION_DURATION,
        "Validation and tokenization time",
    ),
    seconds(REQUEST_QUEUE_DURATION, "Time spent waiting for admission"),
    seconds(
        REQUEST_INFERENCE_DURATION,
        "Time from admission to the last token",
    ),
    seconds(
        REQUEST_MEAN_TIME_PER_TOKEN,
        "Inference time per generated token",
    ),
    metric(
        REQUEST_GENERATED_TOKENS,
        Kind::Histogram(Buckets::UpToMaxTotal),
        "Generated tokens per request",
    ),
    metric(
        REQUEST_INPUT_LENGTH,
        Kind::Histogram(Buckets::UpToMaxInput),
        "Prompt tokens per request",
    ),
    metric(
        REQUEST_MAX_NEW_TOKENS,
        Kind::Histogram(Buckets::UpToMaxTotal),
        "Requested max_new_tokens per request",
    ),
    metric(
        REQUEST_SKIPPED_TOKENS,
        Kind::Histogram(Buckets::Speculated),
        "Speculated tokens accepted per decode step of a request",
    ),
    metric(QUEUE_SIZE, Kind::Gauge, "Requests waiting for admission"),
    metric(
        BATCH_CURRENT_SIZE,
        Kind::Gauge,
        "Requests in the running batch",
    ),
    metric(
        BATCH_CURRENT_MAX_TOKENS,
        Kind::Gauge,
        "Tokens reserved by the running batch",
    ),
    metric(
        BATCH_MAX_TOTAL_TOKENS,
        Kind::Gauge,
        "KV-cache capacity in tokens",
    ),
    metric(
        BATCH_NEXT_SIZE,
        Kind::Histogram(Buckets::BatchSizes),
        "Requests admitted per prefill",
    ),
    by_method(metric(
        BATCH_INFERENCE_COUNT,
        Kind::Counter,
        "Shard forwards, by `method`",
    )),
    by_method(metric(
        BATCH_INFERENCE_SUCCESS,
        Kind::Counter,
        "Successful shard forwards, by `method`",
    )),
    by_method(metric(
        BATCH_INFERENCE_FAILURE,
        Kind::Counter,
        "Failed shard forwards, by `method`",
    )),
    by_method(seconds(
        BATCH_INFERENCE_DURATION,
        "Router-side forward time, by `method`",
    )),
    by_method(seconds(
        BATCH_FORWARD_DURATION,
        "Shard model forward time, by `method`",
    )),
    by_method(seconds(
        BATCH_DECODE_DURATION,
        "Shard sampling and detokenization time, by `method`",
    )),
    by_method(seconds(
        BATCH_FILTER_DURATION,
        "Delivering tokens and filtering the batch, by `method`",
    )),
    // `prefill` when a chunking prefill merges new requests into the running batch, `decode` when a
    // decode step carries several batches.
    by_method(seconds(
        BATCH_CONCAT_DURATION,
        "Shard batch concatenation time, by `method`",
    )),
    Metric {
        // `wait_exceeded` is TGI's non-chunking admission after `max_waiting_tokens`; Tessera reports
        // such admissions as `backpressure`, so it is never emitted.
        label: Some(("reason", &["backpressure", "chunking"])),
        ..metric(
            BATCH_CONCAT,
            Kind::Counter,
            "Admissions into a running batch, by `reason`",
        )
    },
    Metric {
        unit: Some(Unit::Seconds),
        ..metric(
            TIME_TO_FIRST_TOKEN,
            Kind::Histogram(Buckets::Durations),
            "Request arrival to its first generated token",
        )
    },
    Metric {
        unit: Some(Unit::Seconds),
        // Priority 0 (every request's default) is registered up front; others appear when used.
        label: Some(("priority", &["0"])),
        ..metric(
            QUEUE_DURATION_BY_PRIORITY,
            Kind::Histogram(Buckets::Durations),
            "Time spent waiting for admission, by the request's `priority`",
        )
    },
    Metric {
        unit: Some(Unit::Seconds),
        ..metric(
            INTER_TOKEN_LATENCY,
            Kind::Histogram(Buckets::Durations),
            "Time between consecutive generated tokens of a request",
        )
    },
    metric(
        KV_BLOCKS_USED,
        Kind::Gauge,
        "KV-cache blocks held by requests or the prefix cache",
    ),
    metric(
        KV_BLOCKS_FREE,
        Kind::Gauge,
        "KV-cache blocks on the free list",
    ),
    metric(
        PREEMPTIONS,
        Kind::Counter,
        "Running requests preempted (KV blocks given back) to let others grow; each resumes later",
    ),
    metric(
        PREFIX_CACHE_HIT_TOKENS,
        Kind::Counter,
        "Prompt tokens served from the prefix cache",
    ),
    metric(
        PREFIX_CACHE_PROMPT_TOKENS,
        Kind::Counter,
        "Prompt tokens admitted",
    ),
];

/// What the bucket bounds depend on (known after Warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLimits {
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub speculate: u32,
}

impl Buckets {
    /// TGI's bounds (`router/src/server.rs`), float steps included, so `le` labels match TGI's and
    /// a fleet mixing both aggregates by bucket.
    pub fn bounds(self, limits: BucketLimits) -> Vec<f64> {
        let linear = |max: u32| -> Vec<f64> {
            (0..100)
                .map(|x| (max as f64 / 100.0) * (x + 1) as f64)
                .collect()
        };
        match self {
            Buckets::Durations => (0..35).map(|i| 0.00015 * 1.5f64.powi(i)).collect(),
            Buckets::UpToMaxInput => linear(limits.max_input_tokens),
            Buckets::UpToMaxTotal => linear(limits.max_total_tokens),
            Buckets::BatchSizes => (1..=1024).map(f64::from).collect(),
            Buckets::Speculated => (0..=limits.speculate).map(f64::from).collect(),
        }
    }
}

fn builder(limits: BucketLimits) -> anyhow::Result<PrometheusBuilder> {
    let mut builder = PrometheusBuilder::new();
    for m in CATALOG {
        if let Kind::Histogram(buckets) = m.kind {
            let bounds = buckets.bounds(limits);
            // A zero limit would give all-zero bounds, which the exporter rejects as unsorted.
            if bounds.windows(2).any(|w| w[0] >= w[1]) {
                anyhow::bail!("{}: bucket bounds not increasing for {limits:?}", m.name);
            }
            builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), &bounds)?;
        }
    }
    Ok(builder)
}

/// A recorder that is not installed globally (tests render through it with `with_local_recorder`).
pub fn recorder(limits: BucketLimits) -> anyhow::Result<PrometheusRecorder> {
    Ok(builder(limits)?.build_recorder())
}

/// Install the global recorder, describe every metric and register every series at zero; the handle
/// renders `/metrics`.
pub fn install(limits: BucketLimits) -> anyhow::Result<PrometheusHandle> {
    let handle = builder(limits)?.install_recorder()?;
    describe_and_register();
    Ok(handle)
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Drain the recorder's histogram buffers on a timer: `install_recorder` leaves that to `render`, so
/// without scrapes every recorded sample would stay buffered (memory growing with traffic).
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

/// HELP lines, plus one zero-valued series per (metric, label value) on the current recorder.
pub fn describe_and_register() {
    for m in CATALOG {
        let values: &[&str] = m.label.map_or(&[""], |(_, values)| values);
        for value in values {
            let labels: Vec<metrics::Label> = m
                .label
                .map(|(key, _)| vec![metrics::Label::new(key, *value)])
                .unwrap_or_default();
            match m.kind {
                Kind::Counter => metrics::counter!(m.name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(m.name, labels).increment(0.0),
                // Registering is enough: the exporter renders a registered histogram with empty buckets.
                Kind::Histogram(_) => drop(metrics::histogram!(m.name, labels)),
            }
        }
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram(_), Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (Kind::Histogram(_), None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const LIMITS: BucketLimits = BucketLimits {
        max_input_tokens: 8191,
        max_total_tokens: 8192,
        speculate: 0,
    };

    /// Every `"tgi_…"`/`"tessera_…"` string literal in this file: the declared names.
    fn declared_names() -> BTreeSet<String> {
        include_str!("metrics.rs")
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                (s.starts_with("tgi_") || s.starts_with("tessera_"))
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .map(str::to_string)
            .collect()
    }

    fn render() -> String {
        let recorder = recorder(LIMITS).unwrap();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe_and_register);
        handle.render()
    }

    #[test]
    fn the_catalog_holds_every_declared_name_once() {
        let catalog: Vec<&str> = CATALOG.iter().map(|m| m.name).collect();
        let unique: BTreeSet<&str> = catalog.iter().copied().collect();
        assert_eq!(
            unique.len(),
            catalog.len(),
            "a name appears twice in CATALOG"
        );
        let declared = declared_names();
        assert_eq!(
            declared,
            unique.iter().map(|s| s.to_string()).collect(),
            "every declared name is in CATALOG and nothing else is"
        );
        assert!(declared.len() >= 30, "found only {declared:?}");
    }

    #[test]
    fn tgi_names_are_tgis_and_ours_are_prefixed() {
        for m in CATALOG {
            let tgi = m.name.starts_with("tgi_");
            assert!(tgi || m.name.starts_with("tessera_"), "{}", m.name);
            // TGI's counters have no `_total`; ours follow Prometheus' naming rules and do.
            if m.kind == Kind::Counter {
                assert_eq!(!m.name.ends_with("_total"), tgi, "{}", m.name);
            }
        }
    }

    #[test]
    fn a_fresh_scrape_has_every_series_tgis_dashboard_queries() {
        let text = render();
        for line in [
            "# TYPE tgi_request_count counter",
            "tgi_request_count 0",
            "tgi_request_success 0",
            "tgi_request_failure{err=\"validation\"} 0",
            "tgi_batch_concat{reason=\"chunking\"} 0",
            "tgi_batch_inference_failure{method=\"decode\"} 0",
            "# TYPE tgi_request_skipped_tokens histogram",
            "tgi_request_skipped_tokens_bucket{le=\"0\"} 0",
            "tgi_request_skipped_tokens_bucket{le=\"+Inf\"} 0",
            "tgi_batch_concat_duration_bucket{method=\"decode\",le=\"0.00015\"} 0",
            "tgi_request_input_length_bucket{le=\"81.91\"} 0",
            "tgi_batch_next_size_bucket{le=\"1024\"} 0",
            "tessera_prefix_cache_hit_tokens_total 0",
            "tessera_kv_blocks_free 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("tgi_request_count_total"));
        for m in CATALOG {
            assert!(text.contains(&format!("# TYPE {} ", m.name)), "{}", m.name);
            assert!(text.contains(&format!("# HELP {} ", m.name)), "{}", m.name);
        }
    }

    #[test]
    fn buckets_are_tgis() {
        let durations = Buckets::Durations.bounds(LIMITS);
        assert_eq!(durations.len(), 35);
        assert!((durations[1] - 0.000225).abs() < 1e-12);
        let input = Buckets::UpToMaxInput.bounds(LIMITS);
        assert_eq!(input.len(), 100);
        assert!((input[99] - 8191.0).abs() < 1e-9);
        assert_eq!(Buckets::BatchSizes.bounds(LIMITS).len(), 1024);
        assert_eq!(Buckets::Speculated.bounds(LIMITS), [0.0]);
        let speculating = BucketLimits {
            speculate: 2,
            ..LIMITS
        };
        assert_eq!(Buckets::Speculated.bounds(speculating), [0.0, 1.0, 2.0]);
        let zero = BucketLimits {
            max_input_tokens: 0,
            ..LIMITS
        };
        assert!(recorder(zero).is_err());
    }

    #[test]
    fn docs_metrics_md_documents_every_metric_and_no_other() {
        let doc = include_str!("../../docs/metrics.md");
        let in_doc: BTreeSet<String> = doc
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("tgi_") || s.starts_with("tessera_"))
            .map(|s| {
                let s = s.split(['{', ' ']).next().unwrap_or(s);
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        let base = s.strip_suffix(suffix)?;
                        CATALOG.iter().any(|m| m.name == base).then_some(base)
                    })
                    .unwrap_or(s)
                    .to_string()
            })
            // Patterns such as `tgi_*` name families, not metrics.
            .filter(|s| !s.contains('*'))
            .collect();
        for m in CATALOG {
            assert!(
                doc.contains(&format!("| `{}` |", m.name)),
                "docs/metrics.md has no table row for {}",
                m.name
            );
        }
        let declared = declared_names();
        let unknown: Vec<&String> = in_doc.difference(&declared).collect();
        assert!(
            unknown.is_empty(),
            "docs/metrics.md names metrics the router does not export: {unknown:?}"
        );
    }
}
