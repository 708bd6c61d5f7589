//! End-to-end: TGI routes of the real router over a real shard on SmolLM2 — reference outputs, response
//! shapes, every validation error (including on the stream route), disconnects, batch invariance.

mod router_common;

use futures::StreamExt;
use router_common::{metric, reference_case, start, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Tests that look at the batch gauges run one at a time.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start("tgi", &[]))
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", server().base))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(path: &str) -> reqwest::Response {
    reqwest::get(format!("{}{path}", server().base))
        .await
        .unwrap()
}

fn ids(tokens: &Value) -> Vec<u64> {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

/// SSE `data:` payloads of a body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_matches_the_reference_with_details_and_timing_headers() {
    for name in ["story", "code"] {
        let case = reference_case(name);
        let body = json!({"inputs": case["input"], "parameters": {"max_new_tokens": case["new_tokens"], "details": true}});
        let response = post("/generate", body).await;
        assert_eq!(response.status(), 200);
        for header in [
            "x-compute-type",
            "x-total-time",
            "x-queue-time",
            "x-inference-time",
            "x-time-per-token",
        ] {
            assert!(response.headers().contains_key(header), "{header}");
        }
        assert_eq!(
            response.headers()["x-prompt-tokens"],
            case["prompt_ids"]
                .as_array()
                .unwrap()
                .len()
                .to_string()
                .as_str()
        );
        let out: Value = response.json().await.unwrap();
        assert_eq!(out["generated_text"], case["generated_text"]);
        let details = &out["details"];
        assert_eq!(details["finish_reason"], "length");
        assert_eq!(details["generated_tokens"], case["new_tokens"]);
        let expected: Vec<u64> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids(&details["tokens"]), expected);
        let first_logprob = details["tokens"][0]["logprob"].as_f64().unwrap();
        assert!((first_logprob - case["generated_logprobs"][0].as_f64().unwrap()).abs() < 1e-2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_route_returns_an_array_and_streams() {
    let case = reference_case("story");
    let out: Value = post(
        "/",
        json!({"inputs": case["input"], "parameters": {"max_new_tokens": 4}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(out.is_array());
    assert_eq!(out[0]["generated_text"], ", the city of");
    let body = json!({"inputs": case["input"], "parameters": {"max_new_tokens": 4, "details": true}, "stream": true});
    let text = post("/", body).await.text().await.unwrap();
    let events: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3]["details"]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_stream_sends_one_event_per_token_and_the_text_last() {
    let case = reference_case("story");
    let body = json!({"inputs": case["input"], "parameters": {"max_new_tokens": 6, "details": true, "top_n_tokens": 2}});
    let response = post("/generate_stream", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    let events: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 6);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["index"], i + 1);
        assert_eq!(e["top_tokens"].as_array().unwrap().len(), 2);
        assert_eq!(e["generated_text"].is_null(), i < 5);
    }
    assert_eq!(events[5]["generated_text"], ", the city of Nova Haven");
    assert_eq!(events[5]["details"]["input_length"], 4);
    assert_eq!(events[5]["details"]["generated_tokens"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn parameters_best_of_prefill_stop_and_full_text() {
    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 20, "stop": [" Nova"], "details": true,
        "decoder_input_details": true, "return_full_text": true}});
    let out: Value = post("/generate", body).await.json().await.unwrap();
    assert_eq!(out["generated_text"], "Once upon a time, the city of Nova");
    assert_eq!(out["details"]["finish_reason"], "stop_sequence");
    assert_eq!(ids(&out["details"]["prefill"]), vec![6403, 1980, 253, 655]);

    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5, "best_of": 2, "do_sample": true, "details": true}});
    let out: Value = post("/generate", body).await.json().await.unwrap();
    assert_eq!(
        out["details"]["best_of_sequences"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(out["details"]["seed"].is_u64());

    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "do_sample": true, "seed": 7}});
    let a: Value = post("/generate", body.clone()).await.json().await.unwrap();
    let b: Value = post("/generate", body).await.json().await.unwrap();
    assert_eq!(a, b, "a seed makes sampling reproducible");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_info_health_models_docs_and_metrics() {
    let tokens: Value = post("/tokenize", json!({"inputs": "Once upon a time"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&tokens), vec![6403, 1980, 253, 655]);
    assert_eq!(tokens[1]["text"], " upon");
    assert_eq!(tokens[1]["start"], 4);

    let info: Value = get("/info").await.json().await.unwrap();
    for field in [
        "model_id",
        "max_input_tokens",
        "max_total_tokens",
        "max_concurrent_requests",
        "max_best_of",
        "version",
        "router",
    ] {
        assert!(!info[field].is_null(), "{field}");
    }
    assert_eq!(get("/health").await.status(), 200);
    assert_eq!(get("/ping").await.status(), 200);
    let models: Value = get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    let doc: Value = get("/api-doc/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/generate"]["post"].is_object());
    assert!(get("/docs")
        .await
        .text()
        .await
        .unwrap()
        .contains("/api-doc/openapi.json"));

    post(
        "/generate",
        json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    )
    .await;
    // Swagger UI's files come from the router, not a CDN.
    for asset in ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"] {
        assert_eq!(get(asset).await.status(), 200, "{asset}");
    }
    let text = get("/metrics").await.text().await.unwrap();
    // TGI's names exactly (its counters have no `_total`), including every series TGI's Grafana dashboard
    // queries.
    for name in [
        "tgi_request_count ",
        "tgi_request_success ",
        "tgi_request_failure{",
        "tgi_batch_concat{",
        "tgi_request_skipped_tokens_bucket",
        "tgi_request_duration_bucket",
        "tgi_batch_current_size",
        "tgi_batch_inference_count{",
        "tessera_request_time_to_first_token_seconds_bucket",
        "tessera_request_inter_token_latency_seconds_bucket",
        "tessera_kv_blocks_used",
        "tessera_kv_blocks_free",
        "tessera_prefix_cache_hit_tokens_total",
        "tessera_prefix_cache_prompt_tokens_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(!text.contains("tgi_request_count_total"));
    assert!(metric(&text, "tgi_request_count") > 0.0);
    assert!(metric(&text, "tgi_request_skipped_tokens_count") > 0.0);
    assert!(metric(&text, "tessera_prefix_cache_prompt_tokens_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_validation_error_is_a_422_with_tgis_message_even_when_streaming() {
    let cases = [
        (
            json!({"best_of": 2}),
            "you must use sampling when `best_of` is > 1",
        ),
        (
            json!({"temperature": 0.0}),
            "`temperature` must be strictly positive",
        ),
        (
            json!({"repetition_penalty": 0.0}),
            "`repetition_penalty` must be strictly positive",
        ),
        (
            json!({"frequency_penalty": 2.5}),
            "`frequency_penalty` must be >= -2.0 and <= 2.0",
        ),
        (json!({"top_p": 0.0}), "`top_p` must be > 0.0 and <= 1.0"),
        (
            json!({"typical_p": 1.0}),
            "`typical_p` must be > 0.0 and < 1.0",
        ),
        (json!({"top_k": 0}), "`top_k` must be strictly positive"),
        (
            json!({"max_new_tokens": 0}),
            "`max_new_tokens` must be strictly positive",
        ),
        (
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            "`stop` supports up to 4 stop sequences. Given: 5",
        ),
        (
            json!({"best_of": 2, "do_sample": true, "seed": 3}),
            "`seed` must not be set when `best_of` > 1",
        ),
        (
            json!({"top_n_tokens": 6}),
            "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
        ),
        (
            json!({"truncate": 0}),
            "`truncate` must be strictly positive and less than",
        ),
        (
            json!({"max_new_tokens": 100000}),
            "`inputs` tokens + `max_new_tokens` must be <=",
        ),
        (
            json!({"grammar": {"type": "regex", "value": "(a+"}}),
            "grammar is not valid",
        ),
        (
            json!({"best_of": 3, "do_sample": true}),
            "`best_of` must be > 0 and <= 2. Given: 3",
        ),
    ];
    for (parameters, message) in cases {
        let response = post(
            "/generate",
            json!({"inputs": "Hello", "parameters": parameters}),
        )
        .await;
        assert_eq!(response.status(), 422, "{parameters}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error_type"], "validation", "{parameters}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with("Input validation error: ") && error.contains(message),
            "{error} vs {message}"
        );
    }
    let empty = post("/generate", json!({"inputs": ""})).await;
    assert_eq!(empty.status(), 422);
    assert!(empty
        .text()
        .await
        .unwrap()
        .contains("`inputs` cannot be empty"));
    let long = post(
        "/generate",
        json!({"inputs": "hello ".repeat(20000), "parameters": {"max_new_tokens": 1}}),
    )
    .await;
    assert_eq!(long.status(), 422);
    let body: Value = long.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("must be <="),
        "{body}"
    );

    // The stream route answers a real status, not a 200 with an error event.
    for (parameters, message) in [
        (json!({"top_k": -1}), "`top_k` must be strictly positive"),
        (
            json!({"best_of": 2, "do_sample": true}),
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            json!({"decoder_input_details": true}),
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ] {
        let response = post(
            "/generate_stream",
            json!({"inputs": "Hello", "parameters": parameters}),
        )
        .await;
        assert_eq!(response.status(), 422);
        assert!(response.text().await.unwrap().contains(message));
    }
    let malformed = reqwest::Client::new()
        .post(format!("{}/generate", server().base))
        .header("content-type", "application/json")
        .body("{\"inputs\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 422);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error_type"], "validation");
}

/// Poll `/metrics` until `tgi_batch_current_size` is 0 (or fail after a while).
async fn wait_batch_empty() -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = get("/metrics").await.text().await.unwrap();
        if metric(&text, "tgi_batch_current_size") == 0.0 && metric(&text, "tgi_queue_size") == 0.0
        {
            return text;
        }
        assert!(Instant::now() < deadline, "batch never emptied:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_is_removed_from_the_batch() {
    let _exclusive = EXCLUSIVE.lock().await;
    let body =
        json!({"inputs": "Tell me a very long story", "parameters": {"max_new_tokens": 2000}});
    let response = post("/generate_stream", body).await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"index\":1"));
    drop(stream);
    // A non-streaming client that gives up is cancelled too.
    let slow = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let body = json!({"inputs": "Another long story", "parameters": {"max_new_tokens": 2000}});
    assert!(slow
        .post(format!("{}/generate", server().base))
        .json(&body)
        .send()
        .await
        .is_err());
    let text = wait_batch_empty().await;
    assert!(
        metric(&text, "tgi_request_failure{err=\"dropped\"}") >= 2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_concurrent_greedy_requests_match_their_solo_runs_and_the_reference() {
    let _exclusive = EXCLUSIVE.lock().await;
    let prompts = [
        "Once upon a time",
        "def fibonacci(n):",
        "The quick brown fox",
        "In a galaxy far, far away, there was a small planet where",
        "Water boils at",
        "List three colors:",
        "import numpy as np\n",
        "The meaning of life is",
    ];
    let requests: Vec<(String, u32)> = (0..32)
        .map(|i| {
            (
                prompts[i % prompts.len()].to_string(),
                4 + (i as u32 * 7) % 29,
            )
        })
        .collect();
    let run = |(inputs, n): (String, u32)| async move {
        let body = json!({"inputs": inputs, "parameters": {"max_new_tokens": n, "details": true}});
        let out: Value = post("/generate", body).await.json().await.unwrap();
        (
            out["generated_text"].as_str().unwrap().to_string(),
            ids(&out["details"]["tokens"]),
        )
    };
    let mut solo = Vec::new();
    for r in &requests {
        solo.push(run(r.clone()).await);
    }
    let together = futures::future::join_all(requests.iter().cloned().map(run)).await;
    for (i, (out, alone)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(
            out, alone,
            "request {i} ({:?}) differs in a batch",
            requests[i]
        );
    }
    for (i, (prompt, n)) in requests.iter().enumerate() {
        for case in [reference_case("story"), reference_case("code")] {
            if prompt == case["input"].as_str().unwrap() {
                let expected: Vec<u64> = case["generated_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                let n = (*n as usize).min(expected.len());
                assert_eq!(
                    together[i].1[..n],
                    expected[..n],
                    "request {i} vs reference.json"
                );
            }
        }
    }
    wait_batch_empty().await;
}
