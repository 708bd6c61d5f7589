//! The launcher serving SmolLM2-135M-Instruct end to end on one and on two (tensor-parallel) CPU shards:
//! the greedy reference output through /generate and /v1/chat/completions, the default model (no --model-id) from our cache, and a
//! SIGTERM that lets an in-flight request finish before a clean exit.

mod launcher_support;

use launcher_support::{assert_all_gone, http, model_arg, reference, Launcher};
use serde_json::{json, Value};
use std::time::Duration;

/// Model load + router warmup on a busy 2-core machine.
const READY: Duration = Duration::from_secs(240);
/// A small prefill budget keeps the router's warmup forward short on CPU.
const FAST_WARMUP: [&str; 4] = ["--device", "cpu", "--max-batch-prefill-tokens", "256"];

fn case(name: &str) -> Value {
    let cases = reference()["cases"].as_array().unwrap().clone();
    cases.into_iter().find(|c| c["name"] == name).unwrap()
}

fn post(launcher: &Launcher, path: &str, body: &Value) -> Value {
    let (status, text) = http(launcher.port, "POST", path, &body.to_string()).unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn generate(launcher: &Launcher, inputs: &str, max_new_tokens: u64) -> String {
    let body = json!({"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}});
    let answer = post(launcher, "/generate", &body);
    answer["generated_text"].as_str().unwrap().to_string()
}

/// Every log-probability a greedy request reports: prompt tokens, chosen tokens, top-5 alternatives.
fn logprobs(launcher: &Launcher) -> Vec<f64> {
    let body = json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8,
        "details": true, "decoder_input_details": true, "top_n_tokens": 5}});
    let details = &post(launcher, "/generate", &body)["details"];
    let mut all = Vec::new();
    let tokens = details["prefill"].as_array().unwrap().iter().skip(1);
    let tokens = tokens.chain(details["tokens"].as_array().unwrap());
    let steps = details["top_tokens"].as_array().unwrap().iter();
    let top = steps.flat_map(|step| step.as_array().unwrap());
    for t in tokens.chain(top) {
        all.push(t["logprob"].as_f64().unwrap());
    }
    assert!(all.len() > 40, "{details}");
    all
}

/// `num_shard` CPU shards (tensor-parallel when 2) answer every reference case, then stop cleanly;
/// returns the log-probabilities of one detailed request.
fn cpu_shards_serve_the_reference_outputs(num_shard: &str) -> Vec<f64> {
    let model = model_arg("smollm2-hf-float32");
    // An f32 KV cache: a bf16 one turns the ranks' different summation orders into whole bf16
    // steps of K and V (about 2e-3 in logprobs), hiding what this test compares.
    let mut args = vec![
        "--model-id",
        model.as_str(),
        "--num-shard",
        num_shard,
        "--kv-cache-dtype",
        "f32",
    ];
    args.extend(FAST_WARMUP);
    let mut launcher = Launcher::start(&args, &[]);
    launcher.wait_ready(READY);

    for name in ["story", "code"] {
        let case = case(name);
        let text = generate(
            &launcher,
            case["input"].as_str().unwrap(),
            case["new_tokens"].as_u64().unwrap(),
        );
        assert_eq!(
            text,
            case["generated_text"].as_str().unwrap(),
            "case {name}"
        );
    }
    let chat = case("chat_capital");
    let body =
        json!({"messages": chat["input"], "max_tokens": chat["new_tokens"], "temperature": 0});
    let answer = post(&launcher, "/v1/chat/completions", &body);
    let expected = chat["generated_text"]
        .as_str()
        .unwrap()
        .trim_end_matches("<|im_end|>");
    assert_eq!(answer["choices"][0]["message"]["content"], expected);
    let logprobs = logprobs(&launcher);

    let children: Vec<i32> = launcher.children().iter().map(|(pid, _)| *pid).collect();
    assert_eq!(
        children.len(),
        num_shard.parse::<usize>().unwrap() + 1,
        "the shards and the router: {:?}",
        launcher.children()
    );
    launcher.signal(15);
    assert!(
        launcher.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        launcher.output()
    );
    assert_all_gone(&children, Duration::from_secs(2));
    logprobs
}

#[test]
fn one_and_two_cpu_shards_serve_the_reference_outputs_with_the_same_logprobs() {
    let one = cpu_shards_serve_the_reference_outputs("1");
    let two = cpu_shards_serve_the_reference_outputs("2");
    assert_eq!(one.len(), two.len());
    // Row-parallel sums round differently from one rank's (shard/tests/engine_tensor_parallel.rs).
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!(
            (a - b).abs() < 2e-4,
            "logprob {i}: one shard {a}, two shards {b}"
        );
    }
}

#[test]
fn sigterm_drains_the_request_in_flight_then_exits_zero() {
    let model = model_arg("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut args = vec![
        "--model-id",
        model.as_str(),
        "--graceful-termination-timeout",
        "60",
    ];
    args.extend(FAST_WARMUP);
    let mut launcher = Launcher::start(&args, &[]);
    launcher.wait_ready(READY);
    let port = launcher.port;
    let body =
        json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 512}}).to_string();
    let request = std::thread::spawn(move || http(port, "POST", "/generate", &body).unwrap());
    // 512 tokens take seconds even on the quantized engine; one second in, the request is
    // accepted and mid-generation.
    std::thread::sleep(Duration::from_secs(1));
    launcher.signal(15);
    let (status, text) = request.join().unwrap();
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["generated_text"].as_str().unwrap().len() > 200,
        "{text}"
    );
    let status = launcher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", launcher.output());
    // The request was still generating when the signal came: it finished during the drain.
    let out = launcher.output();
    let signalled = out
        .find("SIGTERM: shutting down")
        .expect("the launcher saw SIGTERM");
    let finished = out
        .rfind("generated_tokens=512")
        .expect("the router logged the request's end");
    assert!(
        signalled < finished,
        "the request ended before SIGTERM:\n{out}"
    );
}

#[test]
fn no_model_id_serves_smollm2_from_our_cache() {
    // A fresh cache holding only the GGUF the PyPI fallback would unpack: no network is touched.
    let gguf = tessera_tests::fetched_model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let cache = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&gguf, cache.path().join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let mut launcher = Launcher::start(&FAST_WARMUP, &[("TESSERA_CACHE_DIR", cache_dir)]);
    launcher.wait_ready(READY);
    let story = case("story");
    assert_eq!(
        generate(&launcher, "Once upon a time", 32),
        story["generated_text"].as_str().unwrap()
    );
    let (_, info) = http(launcher.port, "GET", "/info", "").unwrap();
    assert!(
        info.contains("HuggingFaceTB/SmolLM2-135M-Instruct"),
        "{info}"
    );
    launcher.signal(2);
    assert!(launcher.wait_exit(Duration::from_secs(30)).success());
}
