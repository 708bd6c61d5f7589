//! Shard restart with request replay: a shard SIGKILLed while clients stream (1-shard and 2-shard
//! groups) is restarted by the launcher with its group; the router holds every request and resumes
//! each where it stopped. No request fails, every output (greedy and seeded sampling) equals the
//! undisturbed run's, and the pause is measured.

mod launcher_support;

use futures::StreamExt;
use launcher_support::{ready_smollm2, send_signal};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const CLIENTS: usize = 32;
const NEW: u64 = 60;

fn body(i: usize) -> Value {
    let mut parameters = json!({"max_new_tokens": NEW, "stop": []});
    if i % 2 == 1 {
        parameters["do_sample"] = json!(true);
        parameters["temperature"] = json!(0.7);
        parameters["seed"] = json!(7 + i);
    }
    json!({"inputs": format!("Tale {i}: long ago, in a quiet town,"), "parameters": parameters})
}

/// One stream: its token ids, final text, and the arrival time of each token.
struct Streamed {
    ids: Vec<u64>,
    text: String,
    times: Vec<Instant>,
}

async fn stream(
    port: u16,
    i: usize,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Streamed {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/generate_stream"))
        .json(&body(i))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut out = Streamed {
        ids: Vec::new(),
        text: String::new(),
        times: Vec::new(),
    };
    let (mut events, mut buffer) = (response.bytes_stream(), String::new());
    while let Some(chunk) = events.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.expect("the stream is not cut")).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let v: Value = serde_json::from_str(data.trim()).unwrap();
            assert!(v.get("error").is_none(), "request {i} got an error: {v}");
            out.ids.push(v["token"]["id"].as_u64().unwrap());
            out.times.push(Instant::now());
            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = v["generated_text"].as_str() {
                out.text = t.to_string();
            }
        }
    }
    out
}

async fn run_all(
    port: u16,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<Streamed> {
    futures::future::join_all((0..CLIENTS).map(|i| stream(port, i, progress.clone()))).await
}

/// Kills `rank`'s shard once the clients have received some tokens; every stream still ends
/// with its undisturbed output.
fn kill_while_streaming(num_shard: &str, rank: usize) {
    let launcher = ready_smollm2(num_shard, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let port = launcher.port;
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let undisturbed = runtime.block_on(run_all(port, progress.clone()));
    let shard = launcher
        .shards()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(&format!(" --rank {rank} ")))
        .expect("a shard child")
        .0;
    progress.store(0, std::sync::atomic::Ordering::Relaxed);
    let watched = progress.clone();
    let killer = std::thread::spawn(move || {
        let start = Instant::now();
        while watched.load(std::sync::atomic::Ordering::Relaxed) < CLIENTS * 10 {
            assert!(start.elapsed() < Duration::from_secs(120), "no tokens");
            std::thread::sleep(Duration::from_millis(5));
        }
        send_signal(shard, 9);
    });
    let disturbed = runtime.block_on(run_all(port, progress));
    killer.join().unwrap();
    let mut pause = Duration::ZERO;
    for (i, (got, want)) in disturbed.iter().zip(&undisturbed).enumerate() {
        assert_eq!(got.ids, want.ids, "request {i}: token ids");
        assert_eq!(got.text, want.text, "request {i}: text");
        // Each stream ran to its end (`max_new_tokens` or EOS): the final event carries the text.
        assert!(
            !want.text.is_empty() && want.ids.len() as u64 <= NEW,
            "request {i}: no end"
        );
        let gap = got.times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        pause = pause.max(gap);
    }
    let out = launcher.output();
    assert!(out.contains("restarting the shard group"), "{out}");
    println!(
        "{num_shard} shard(s), rank {rank} killed: {CLIENTS} streams resumed, outputs equal, longest pause {:.2} s",
        pause.as_secs_f64()
    );
}

#[test]
fn a_killed_shard_restarts_and_every_stream_resumes_unchanged() {
    kill_while_streaming("1", 0);
}

#[test]
fn a_killed_rank_restarts_its_group_and_every_stream_resumes_unchanged() {
    kill_while_streaming("2", 1);
}
