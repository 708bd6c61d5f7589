//! End-to-end isolation: what the shard would refuse, and user numbers at the edges of their types,
//! are refused by the router with a 422 and its message (router/src/validation.rs, the single source
//! of request validity) while a long generation runs, and that generation finishes exactly as alone.

mod router_common;

use router_common::{start, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start("isolation", &[]))
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server().base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The error message of a TGI (`error`) or OpenAI (`error.message`) body.
fn message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .or(body["error"].as_str())
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMPTY_STOP: &str = "Input validation error: `stop` sequences cannot be empty strings";

/// Requests the router must refuse, with (a prefix of) the message they get. An empty needle: a
/// body serde cannot take (a number past its field's type), refused by the JSON-rejection mapping.
fn refused() -> Vec<(&'static str, Value, &'static str)> {
    let generate = |parameters: Value| json!({"inputs": "Hello", "parameters": parameters});
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let completion = |extra: Value| {
        let mut body = json!({"prompt": "Once upon a time"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    vec![
        ("/generate", generate(json!({"stop": [""]})), EMPTY_STOP),
        (
            "/generate_stream",
            generate(json!({"stop": ["a", ""]})),
            EMPTY_STOP,
        ),
        (CHAT, chat(json!({"stop": ""})), EMPTY_STOP),
        (COMPLETIONS, completion(json!({"stop": ""})), EMPTY_STOP),
        (
            "/generate",
            generate(json!({"max_new_tokens": u32::MAX})),
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <=",
        ),
        (
            CHAT,
            chat(json!({"max_tokens": u32::MAX})),
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <=",
        ),
        (
            "/generate",
            generate(json!({"max_new_tokens": u64::MAX})),
            "",
        ),
        (COMPLETIONS, completion(json!({"max_tokens": -1})), ""),
        ("/generate", generate(json!({"seed": -1})), ""),
        ("/generate", generate(json!({"top_k": i64::MIN})), ""),
        (
            "/generate",
            generate(json!({"top_k": i32::MIN})),
            "Input validation error: `top_k` must be strictly positive",
        ),
        // 1e39 is past f32: serde reads infinity.
        (
            "/generate",
            generate(json!({"temperature": 1e39})),
            "Input validation error: `temperature` must be strictly positive",
        ),
        (
            CHAT,
            chat(json!({"top_p": 1e39})),
            "Input validation error: `top_p` must be > 0.0 and <= 1.0",
        ),
        (
            COMPLETIONS,
            completion(json!({"frequency_penalty": -1e39})),
            "Input validation error: `frequency_penalty` must be >= -2.0 and <= 2.0",
        ),
        (
            "/generate",
            generate(json!({"repetition_penalty": 1e39})),
            "Input validation error: `repetition_penalty` must be strictly positive",
        ),
        (
            "/generate",
            generate(json!({"top_n_tokens": u32::MAX})),
            "Input validation error: `top_n_tokens` must be >= 0 and <= 5",
        ),
        (
            "/generate",
            generate(json!({"truncate": u32::MAX})),
            "Input validation error: `truncate` must be strictly positive and less than",
        ),
        (
            COMPLETIONS,
            completion(json!({"n": u64::MAX})),
            "Input validation error: `n` must be > 0 and <=",
        ),
        (
            CHAT,
            chat(json!({"logprobs": true, "top_logprobs": u32::MAX})),
            "Input validation error: `top_n_tokens` must be >= 0 and <= 5",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_requests_leave_a_running_generation_unchanged() {
    let long = json!({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 96, "details": true, "do_sample": true, "temperature": 0.8, "seed": 7}});
    let (status, alone) = post("/generate", long.clone()).await;
    assert_eq!(status, 200, "{alone}");
    assert_eq!(alone["details"]["generated_tokens"], 96);

    let running = tokio::spawn(post("/generate", long));
    // Let its prefill start before the refused requests arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rounds = 0;
    while !running.is_finished() {
        for (path, body, needle) in refused() {
            let (status, answer) = post(path, body.clone()).await;
            assert_eq!(status, 422, "{path} {body}: {answer}");
            let error_type = answer["error_type"].as_str();
            assert_eq!(error_type, Some("validation"), "{path} {body}: {answer}");
            assert!(
                message(&answer).starts_with(needle),
                "{path} {body}: {answer} lacks {needle:?}"
            );
        }
        rounds += 1;
    }
    let (status, disturbed) = running.await.unwrap();
    assert_eq!(status, 200, "{disturbed}");
    assert!(rounds >= 1);
    assert_eq!(disturbed["generated_text"], alone["generated_text"]);
    assert_eq!(disturbed["details"]["tokens"], alone["details"]["tokens"]);
}
