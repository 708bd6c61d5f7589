//! End-to-end KV on demand: on a KV cache too small for every request's full length, concurrent
//! generations are admitted together, some are preempted as they grow and resume where they
//! stopped; every output (greedy and seeded sampling, streamed or not) equals its run alone.

mod router_common;

use futures::StreamExt;
use router_common::{metric, start_with, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;

/// KV cache bytes: as small as the shard goes with the harness's 512-token prefill budget (about
/// 590 tokens), for 8 requests of up to 20 + 200 tokens: fewer than three fit at their full length,
/// so preemptions happen whatever the timing.
const KV_BYTES: &str = "6000000";
const NEW: u32 = 200;
const CLIENTS: usize = 8;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_with("preemption", &["--kv-cache-memory", KV_BYTES], &[]))
}

fn body(i: usize) -> Value {
    let mut parameters = json!({"max_new_tokens": NEW, "details": true, "stop": []});
    if i % 3 == 1 {
        parameters["do_sample"] = json!(true);
        parameters["temperature"] = json!(0.8);
        parameters["seed"] = json!(100 + i);
    }
    json!({
        "inputs": format!("Story number {i}: once upon a time there was a"),
        "parameters": parameters,
    })
}

/// Generated text and token ids of one `/generate` call.
async fn generate(i: usize) -> (String, Vec<u64>) {
    let r: Value = reqwest::Client::new()
        .post(format!("{}/generate", server().base))
        .json(&body(i))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = r["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {r}"))
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    (r["generated_text"].as_str().unwrap().to_string(), ids)
}

/// The same through `/generate_stream`: the streamed token ids and the final text.
async fn stream(i: usize) -> (String, Vec<u64>) {
    let response = reqwest::Client::new()
        .post(format!("{}/generate_stream", server().base))
        .json(&body(i))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream();
    let (mut text, mut ids, mut buffer) = (String::new(), Vec::new(), String::new());
    while let Some(chunk) = events.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let v: Value = serde_json::from_str(data.trim()).unwrap();
            assert!(v.get("error").is_none(), "stream error: {v}");
            ids.push(v["token"]["id"].as_u64().unwrap());
            if let Some(t) = v["generated_text"].as_str() {
                text = t.to_string();
            }
        }
    }
    (text, ids)
}

async fn preemptions() -> f64 {
    let text = reqwest::get(format!("{}/metrics", server().base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric(&text, "tessera_request_preemptions_total")
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_requests_resume_with_the_output_they_have_alone() {
    let mut alone = Vec::new();
    for i in 0..CLIENTS {
        alone.push(generate(i).await);
    }
    assert_eq!(
        preemptions().await,
        0.0,
        "one at a time, every request fits"
    );

    let together = futures::future::join_all((0..CLIENTS).map(|i| async move {
        match i % 2 {
            0 => generate(i).await,
            _ => stream(i).await,
        }
    }))
    .await;
    let preempted = preemptions().await;
    assert!(
        preempted > 0.0,
        "{CLIENTS} × {NEW} tokens exceed the KV cache"
    );
    for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(got.1, want.1, "request {i}: token ids");
        assert_eq!(got.0, want.0, "request {i}: text");
    }
    println!("{CLIENTS} concurrent requests, {preempted} preemptions, outputs equal to alone");
}
