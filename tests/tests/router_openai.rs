//! End-to-end: OpenAI routes of the real router over a real shard on SmolLM2 (chat and completions,
//! streaming and not, `n`, logprobs, stop trimming, usage, errors).

mod router_common;

use router_common::{reference_case, start, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start("openai", &[]))
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", server().base))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn chunks(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

fn capital() -> Value {
    reference_case("chat_capital")["input"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_matches_the_reference_without_the_eos_text() {
    let body = json!({"model": "tgi", "messages": capital(), "temperature": 0, "max_tokens": 48});
    let out: Value = post("/v1/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert!(out["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(out["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        out["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(out["choices"][0]["finish_reason"], "stop");
    assert_eq!(out["usage"]["prompt_tokens"], 37);
    assert_eq!(out["usage"]["completion_tokens"], 8);
    assert_eq!(out["usage"]["total_tokens"], 45);
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_tokenize_renders_the_template() {
    let out: Value = post("/chat_tokenize", json!({"messages": capital()}))
        .await
        .json()
        .await
        .unwrap();
    let case = reference_case("chat_capital");
    assert_eq!(out["templated_text"], case["templated_text"]);
    let ids: Vec<&Value> = out["tokenize_response"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(
        ids,
        case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_stream_ends_with_usage_and_done() {
    let body = json!({"messages": capital(), "temperature": 0, "max_tokens": 48, "stream": true,
                      "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2});
    let response = post("/v1/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    let data = chunks(&response.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "The capital of France is Paris.");
    let finish: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec!["stop"]);
    assert_eq!(
        events[0]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(events.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_stop_trimming_and_top_p_one() {
    let body = json!({"messages": capital(), "n": 3, "max_tokens": 8, "top_p": 1.0, "seed": 5, "presence_penalty": 0.5});
    let out: Value = post("/v1/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    let choices = out["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    }

    let body =
        json!({"messages": capital(), "temperature": 0, "max_tokens": 48, "stop": ["France"]});
    let out: Value = post("/v1/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(out["choices"][0]["message"]["content"], "The capital of ");
    assert_eq!(out["choices"][0]["finish_reason"], "stop");

    let body = json!({"messages": capital(), "temperature": 0, "max_tokens": 48, "stop": ["France"], "stream": true});
    let data = chunks(
        &post("/v1/chat/completions", body)
            .await
            .text()
            .await
            .unwrap(),
    );
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, "The capital of ");
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_with_prompt_lists_streams_and_logprobs() {
    let story = reference_case("story");
    let body = json!({"prompt": [story["input"], "def fibonacci(n):"], "max_tokens": 4, "temperature": 0, "logprobs": 2});
    let out: Value = post("/v1/completions", body).await.json().await.unwrap();
    assert_eq!(out["object"], "text_completion");
    assert_eq!(out["choices"][0]["text"], ", the city of");
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["choices"][1]["index"], 1);
    assert_eq!(
        out["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(out["usage"]["prompt_tokens"], 4 + 6);

    let body = json!({"prompt": story["input"], "max_tokens": 4, "temperature": 0, "stream": true, "echo": true});
    let data = chunks(&post("/v1/completions", body).await.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| e["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(text, "Once upon a time, the city of");
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_errors_have_real_statuses() {
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "a", "suffix": "b"}),
            "Suffix is not supported",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b", "c", "d", "e"]}),
            "maximum allowed batch size of 4",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": capital(), "n": 9}),
            "`n` must be > 0 and <= 4",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": capital(), "temperature": -1, "stream": true}),
            "`temperature` must be strictly positive",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": capital(), "top_p": 1.5}),
            "`top_p` must be > 0.0 and <= 1.0",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            "`messages` cannot be empty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": capital(), "response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "grammar is not valid",
        ),
    ];
    for (path, body, message) in cases {
        let response = post(path, body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        // OpenAI's error shape (the SDKs read `error.message`) plus TGI's `error_type`.
        let error: Value = response.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{error} vs {message}"
        );
        assert_eq!(error["error"]["code"], 422);
        assert!(error["error_type"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invocations_dispatch_on_the_body() {
    let chat: Value = post(
        "/invocations",
        json!({"messages": capital(), "temperature": 0, "max_tokens": 3}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(chat["object"], "chat.completion");
    let completion: Value = post("/invocations", json!({"prompt": "Hi", "max_tokens": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "text_completion");
    let tgi: Value = post(
        "/invocations",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(tgi[0]["generated_text"].is_string());
}
