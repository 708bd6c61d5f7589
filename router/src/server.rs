//! The HTTP server: the route table, the API-key, body-limit, CORS and tracing layers, the OpenAPI
//! document's route, and the accept loop with its connection limits (header-read timeout, connection
//! cap, graceful drain). Handlers live in `tgi.rs`, `openai.rs` and `sagemaker.rs`; `/docs` in `swagger.rs`.

pub use crate::common::{AppState, AppStateRef};
use crate::error::RouterError;
use crate::{openai, sagemaker, tgi};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

/// The full route table.
pub fn router(state: AppStateRef, payload_limit: usize, cors_origins: &[String]) -> Router {
    let protected = Router::new()
        .route("/", post(tgi::compat_generate))
        .route("/generate", post(tgi::generate))
        .route("/generate_stream", post(tgi::generate_stream))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/tokenize", post(tgi::tokenize))
        .route("/chat_tokenize", post(openai::chat_tokenize))
        .route("/invocations", post(sagemaker::invocations))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let open = Router::new()
        .route("/", get(tgi::health))
        .route("/health", get(tgi::health))
        .route("/ping", get(tgi::ping))
        .route("/info", get(tgi::info))
        .route("/metrics", get(tgi::metrics))
        .route("/v1/models", get(openai::models))
        .route("/api-doc/openapi.json", get(openapi_json))
        .merge(crate::swagger::routes());
    protected
        .merge(open)
        .fallback(|| async { RouterError::NotFound })
        .layer(DefaultBodyLimit::max(payload_limit))
        .layer(cors(cors_origins))
        // Outermost, so the request's span (a child of an incoming `traceparent`) covers every layer.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(tessera_telemetry::http_server_span::<axum::body::Body>)
                .on_request(())
                .on_response(tessera_telemetry::record_http_response::<axum::body::Body>)
                .on_failure(()),
        )
        .with_state(state)
}

/// Any origin unless `--cors-allow-origin` lists some.
fn cors(origins: &[String]) -> CorsLayer {
    let allowed = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse::<HeaderValue>().ok()))
    };
    CorsLayer::new()
        .allow_origin(allowed)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
}

/// Bearer check on generation routes; the secret is compared in constant time.
async fn require_api_key(
    State(state): State<AppStateRef>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let expected = format!("Bearer {key}");
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !bool::from(given.ct_eq(expected.as_bytes())) {
            return RouterError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

async fn openapi_json() -> impl IntoResponse {
    Json(crate::openapi::document())
}

/// What one client may hold: slow or idle connections are closed, and the number open is capped.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The request head must arrive within this; hyper starts the same clock when a kept-alive
    /// connection waits for its next request, so it is the idle timeout too.
    pub header_read_timeout: Duration,
    /// Connections served at once; the next client is accepted when one closes (it waits in the
    /// kernel's listen backlog meanwhile, so a flood of idle sockets cannot starve the process).
    pub max_connections: usize,
}

/// Serve `app` on `listener` (HTTP/1.1 and h2c) until `shutdown` completes, then stop accepting and
/// wait for the open connections to finish their requests.
///
/// `axum::serve` has neither a header-read timeout nor a connection cap; this is its accept loop with
/// both (slowloris: a client trickling a header, or opening thousands of idle sockets).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: not fatal; pausing
                    // keeps an EMFILE from spinning the loop.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header timeout starts after the HTTP version is known; a client that sends
            // nothing (or a partial HTTP/2 preface) would hold its slot forever without this bound.
            let known = tokio::time::timeout(header_read_timeout, version_known(&stream)).await;
            if matches!(known, Ok(true)) {
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(connection.into_owned()).await {
                    tracing::debug!("connection closed: {e}");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Waits (without consuming anything) until the first bytes tell HTTP/1 from the HTTP/2 preface, as
/// hyper's version detection needs; false when the client closes first.
async fn version_known(stream: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = [0u8; 24];
    loop {
        match stream.peek(&mut seen).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE.len() || !PREFACE.starts_with(&seen[..n]) => return true,
            // A prefix of the preface: wait for more bytes without spinning on the same ones.
            Ok(_) => {
                if stream.readable().await.is_err() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A server answering `/ping` with the given limits, on a free port.
    async fn ping_server(limits: ConnectionLimits) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().route("/ping", get(|| async { "pong" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        port
    }

    async fn ping(port: u16) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 2,
    };

    #[tokio::test]
    async fn a_half_sent_head_or_a_silent_client_is_cut_off_after_the_header_timeout() {
        let port = ping_server(LIMITS).await;
        for partial in [&b"GET /ping HTTP/1.1\r\nHost: x\r\n"[..], b"", b"PRI * HT"] {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.write_all(partial).await.unwrap();
            let start = std::time::Instant::now();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
            assert!(read.await.is_ok(), "{partial:?}: still open after 5 s");
            let waited = start.elapsed();
            assert!(
                waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
                "{partial:?}: closed after {waited:?}"
            );
        }
        assert!(ping(port).await.ends_with("pong"));
    }

    #[tokio::test]
    async fn clients_past_the_connection_cap_wait_for_a_free_slot() {
        let port = ping_server(LIMITS).await;
        let _silent: Vec<TcpStream> = vec![
            TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
            TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = std::time::Instant::now();
        assert!(ping(port).await.ends_with("pong"));
        // Served only once the header timeout freed a slot held by a silent client.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "served after {waited:?}"
        );
    }
}
