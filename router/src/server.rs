//! The HTTP server: the route table, the API-key, body-limit, CORS and tracing layers, and the OpenAPI
//! document's route. Handlers live in `tgi.rs`, `openai.rs` and `sagemaker.rs`; `/docs` in `swagger.rs`.

pub use crate::common::{AppState, AppStateRef};
use crate::error::RouterError;
use crate::{openai, sagemaker, tgi};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
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
        .route("/ping", get(tgi::health))
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
