//! Spans over OTLP: a real `tessera-shard serve` (SmolLM2) and `tessera-router` export to a small
//! OTLP/gRPC collector running inside the test; a request carrying a W3C `traceparent` must come back
//! as one trace running from the caller's span through the router's spans into the shard's.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_tests::{binary, fetched_model, free_port, spawn_logged as spawn};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// One span as the collector received it (ids in lower-case hex).
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Children killed when the test ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM, then wait for a clean exit: the exporters flush on the way out.
fn terminate(child: &mut Child, name: &str) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "{name} exited with {status} after SIGTERM"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} did not exit within 60 s of SIGTERM");
}

fn logs(dir: &Path) -> String {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    format!(
        "--- shard ---\n{}\n--- router ---\n{}",
        read("shard.log"),
        read("router.log")
    )
}

#[test]
fn traceparent_continues_through_router_into_shard_spans() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = std::env::temp_dir().join(format!("tessera-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = fetched_model("smollm2-hf-float32");
    let uds = dir.join("shard");
    let port = free_port();
    let mut children = Children(Vec::new());
    children.0.push(spawn(
        Command::new(binary("tessera-shard"))
            .args(["serve", "--model-id"])
            .arg(&model)
            .arg("--uds-path")
            .arg(&uds)
            .args(["--kv-cache-memory", "300000000"])
            .args(["--otlp-endpoint", &endpoint])
            .args(["--otlp-service-name", "test.shard"]),
        &dir.join("shard.log"),
    ));
    children.0.push(spawn(
        Command::new(binary("tessera-router"))
            .arg("--master-shard-uds-path")
            .arg(tessera_proto::uds::shard_socket(&uds, 0))
            .arg("--tokenizer-name")
            .arg(&model)
            .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
            .args(["--max-batch-prefill-tokens", "512"])
            .args(["--otlp-endpoint", &endpoint])
            .args(["--otlp-service-name", "test.router"]),
        &dir.join("router.log"),
    ));

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        for child in &mut children.0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("a child exited during startup: {status}\n{}", logs(&dir));
            }
        }
        let health = runtime.block_on(http.get(format!("{base}/health")).send());
        if health.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no /health in 300 s\n{}",
            logs(&dir)
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let response = runtime
        .block_on(
            http.post(format!("{base}/generate"))
                .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
                .json(&serde_json::json!({
                    "inputs": "The capital of France is",
                    "parameters": {"max_new_tokens": 4}
                }))
                .send(),
        )
        .unwrap();
    assert_eq!(response.status(), 200, "{}", logs(&dir));

    // The batch exporters' period (5 s) has not passed: what arrives now was flushed at shutdown.
    let mut router = children.0.pop().unwrap();
    terminate(&mut router, "router");
    let mut shard = children.0.pop().unwrap();
    terminate(&mut shard, "shard");

    let spans = collector.spans.lock().unwrap().clone();
    let in_trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    let dump = format!("{in_trace:#?}\n{}", logs(&dir));
    let find = |service: &str, name: &str| {
        in_trace
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .copied()
            .collect::<Vec<_>>()
    };

    // Router: caller → HTTP span → request span → prefill/decode spans.
    let http_span = find("test.router", "POST /generate");
    assert_eq!(http_span.len(), 1, "one HTTP span in the trace\n{dump}");
    assert_eq!(
        http_span[0].parent, CALLER_SPAN,
        "the HTTP span's parent is the caller's span from `traceparent`\n{dump}"
    );
    let request = find("test.router", "request");
    assert_eq!(request.len(), 1, "one request span\n{dump}");
    assert_eq!(request[0].parent, http_span[0].span_id, "{dump}");
    let prefill = find("test.router", "prefill");
    assert_eq!(prefill.len(), 1, "one prefill span\n{dump}");
    assert_eq!(prefill[0].parent, request[0].span_id, "{dump}");
    let decodes = find("test.router", "decode");
    assert!(!decodes.is_empty(), "decode spans\n{dump}");

    // Shard: its RPC spans are children of the router's spans that sent them.
    let shard_prefill = find("test.shard", "generate.v3.TextGenerationService/Prefill");
    assert_eq!(shard_prefill.len(), 1, "the shard's Prefill span\n{dump}");
    assert_eq!(shard_prefill[0].parent, prefill[0].span_id, "{dump}");
    let shard_decodes = find("test.shard", "generate.v3.TextGenerationService/Decode");
    assert_eq!(shard_decodes.len(), decodes.len(), "{dump}");
    for decode in shard_decodes {
        assert!(
            decodes.iter().any(|d| d.span_id == decode.parent),
            "a shard Decode span's parent is a router decode span\n{dump}"
        );
    }
}
