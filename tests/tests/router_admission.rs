//! End-to-end: admission on the real router — API key (401), payload limit (413), concurrency limit
//! (429 `overloaded` with `Retry-After`), and serving on after all of them.

mod router_common;

use router_common::{start, Server};
use serde_json::{json, Value};
use std::sync::OnceLock;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        start(
            "admission",
            &[
                "--max-concurrent-requests",
                "2",
                "--payload-limit",
                "4000",
                "--api-key",
                "s3cret",
            ],
        )
    })
}

async fn post(path: &str, key: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", server().base))
        .json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_payload_limit_and_overload() {
    let small = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}});
    assert_eq!(post("/generate", None, small.clone()).await.status(), 401);
    assert_eq!(
        post("/generate", Some("s3cre"), small.clone())
            .await
            .status(),
        401
    );
    assert_eq!(
        post(
            "/v1/chat/completions",
            Some("wrong"),
            json!({"messages": []})
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        post("/generate", Some("s3cret"), small.clone())
            .await
            .status(),
        200
    );
    // The tokenizers sit behind the key like generation; health, info and metrics stay open.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}]});
    for (route, body) in [("/tokenize", small.clone()), ("/chat_tokenize", chat)] {
        assert_eq!(
            post(route, None, body.clone()).await.status(),
            401,
            "{route}"
        );
        assert_eq!(
            post(route, Some("s3cret"), body).await.status(),
            200,
            "{route}"
        );
    }
    for route in ["/health", "/ping", "/info", "/metrics"] {
        let status = reqwest::get(format!("{}{route}", server().base))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{route}");
    }

    let big = json!({"inputs": "x".repeat(5000)});
    let response = post("/generate", Some("s3cret"), big).await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string());

    let long = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 64}});
    let responses =
        futures::future::join_all((0..6).map(|_| post("/generate", Some("s3cret"), long.clone())))
            .await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        4,
        "{statuses:?}"
    );
    for response in responses.into_iter().filter(|r| r.status() == 429) {
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": "Model is overloaded", "error_type": "overloaded"})
        );
    }
    // Still serving.
    assert_eq!(post("/generate", Some("s3cret"), small).await.status(), 200);
}
