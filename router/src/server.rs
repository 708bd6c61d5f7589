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
        .route("/chat_tokenize", post(openai::chat_tokenize))
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
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
