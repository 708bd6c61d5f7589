//! The HTTP server: routes, API-key and body-limit layers, and TGI's own endpoints (`/generate`,
//! `/generate_stream`, `/`, `/tokenize`, `/health`, `/info`, `/metrics`, `/docs`). OpenAI routes live in
//! `openai.rs`.

use crate::api::*;
use crate::batcher::{End, Generated, Infer, InferEvent};
use crate::error::{Result, RouterError};
use crate::metrics as m;
use crate::openai;
use crate::validation::{ValidRequest, Validation};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;
use tessera_formats::chat_template::ChatTemplate;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

/// Everything the handlers share.
pub struct AppState {
    pub infer: Infer,
    pub validation: Validation,
    pub template: Option<ChatTemplate>,
    pub info: Info,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub api_key: Option<String>,
    pub compute_type: String,
}

pub type AppStateRef = Arc<AppState>;

/// The full route table.
pub fn router(state: AppStateRef, payload_limit: usize, cors_origins: &[String]) -> Router {
    let protected = Router::new()
        .route("/", post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/tokenize", post(tokenize))
        .route("/invocations", post(openai::invocations))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let open = Router::new()
        .route("/", get(health))
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/chat_tokenize", post(openai::chat_tokenize))
        .route("/api-doc/openapi.json", get(openapi_json))
        .merge(crate::swagger::routes());
    let cors = if cors_origins.is_empty() {
        CorsLayer::new().allow_origin(AllowOrigin::any())
    } else {
        let origins = cors_origins
            .iter()
            .filter_map(|o| o.parse::<HeaderValue>().ok());
        CorsLayer::new().allow_origin(AllowOrigin::list(origins))
    }
    .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
    .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]);
    protected
        .merge(open)
        .fallback(|| async { RouterError::NotFound })
        .layer(DefaultBodyLimit::max(payload_limit))
        .layer(cors)
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

/// Count a request and reserve its concurrency slot (429 when none is left).
pub fn admit(state: &AppState) -> Result<OwnedSemaphorePermit> {
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    state.infer.admit().inspect_err(record_failure)
}

/// `tgi_request_failure` for errors raised before the batcher (which counts its own).
pub fn record_failure(error: &RouterError) {
    if !matches!(error, RouterError::Generation(_)) {
        metrics::counter!(m::REQUEST_FAILURE, "err" => error.metric_label()).increment(1);
    }
}

/// A span per request; the batcher records its id.
pub fn request_span(route: &'static str) -> tracing::Span {
    tracing::info_span!("request", route, request_id = tracing::field::Empty)
}

pub async fn validate(
    state: &AppState,
    inputs: String,
    p: &GenerateParameters,
    add_special: bool,
) -> Result<ValidRequest> {
    let start = Instant::now();
    let valid = state
        .validation
        .validate(inputs, p, add_special)
        .await
        .inspect_err(record_failure)?;
    metrics::histogram!(m::REQUEST_VALIDATION_DURATION).record(start.elapsed().as_secs_f64());
    Ok(valid)
}

/// Run one request (or `best_of` copies of it with distinct seeds) to completion.
pub async fn generate_all(
    state: &AppState,
    valid: ValidRequest,
    copies: usize,
    route: &'static str,
) -> Result<Vec<Generated>> {
    let runs = (0..copies).map(|i| {
        let mut request = valid.clone();
        if i > 0 {
            request.parameters.seed = rand::random();
        }
        state.infer.generate(request, request_span(route))
    });
    futures::future::try_join_all(runs).await
}

#[utoipa::path(post, path = "/generate", request_body = GenerateRequest,
    responses((status = 200, body = GenerateResponse), (status = 422, body = crate::error::ErrorResponse),
              (status = 424, body = crate::error::ErrorResponse), (status = 429, body = crate::error::ErrorResponse)))]
pub async fn generate(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let Json(request) =
        payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    let (headers, response) = generate_inner(&state, request).await?;
    Ok((headers, Json(response)).into_response())
}

async fn generate_inner(
    state: &AppState,
    request: GenerateRequest,
) -> Result<(HeaderMap, GenerateResponse)> {
    let arrived = Instant::now();
    let _permit = admit(state)?;
    let p = &request.parameters;
    let copies = state
        .validation
        .validate_best_of(p.best_of.unwrap_or(1))
        .inspect_err(record_failure)?;
    let valid = validate(state, request.inputs.clone(), p, true).await?;
    let mut runs = generate_all(state, valid, copies, "generate").await?;
    // Best mean logprob first; the others become `best_of_sequences`.
    runs.sort_by(|a, b| b.mean_logprob().total_cmp(&a.mean_logprob()));
    let best = runs.remove(0);
    let prefix = if p.return_full_text.unwrap_or(false) {
        request.inputs.as_str()
    } else {
        ""
    };
    let end = best.end();
    let headers = timing_headers(state, arrived, &best, request.inputs.len());
    let details = p.details.then(|| Details {
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: end.seed,
        prefill: best.prefill.clone(),
        tokens: best.tokens.clone(),
        best_of_sequences: (copies > 1)
            .then(|| runs.iter().map(|r| best_of_sequence(r, prefix)).collect()),
        top_tokens: top_tokens(&best),
    });
    Ok((
        headers,
        GenerateResponse {
            generated_text: format!("{prefix}{}", end.text),
            details,
        },
    ))
}

fn top_tokens(generated: &Generated) -> Vec<Vec<Token>> {
    if generated.top_tokens.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        generated.top_tokens.clone()
    }
}

fn best_of_sequence(run: &Generated, prefix: &str) -> BestOfSequence {
    let end = run.end();
    BestOfSequence {
        generated_text: format!("{prefix}{}", end.text),
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: end.seed,
        prefill: run.prefill.clone(),
        tokens: run.tokens.clone(),
        top_tokens: top_tokens(run),
    }
}

fn timing_headers(
    state: &AppState,
    arrived: Instant,
    generated: &Generated,
    characters: usize,
) -> HeaderMap {
    let end = generated.end();
    let total = arrived.elapsed();
    let validation = generated.validated.saturating_duration_since(arrived);
    let queue = end.started.saturating_duration_since(end.queued);
    let inference = end.started.elapsed();
    let per_token = inference / end.generated_tokens.max(1);
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put("x-compute-type", state.compute_type.clone());
    put("x-compute-time", format!("{:.6}", total.as_secs_f64()));
    put("x-compute-characters", characters.to_string());
    put("x-total-time", total.as_millis().to_string());
    put("x-validation-time", validation.as_millis().to_string());
    put("x-queue-time", queue.as_millis().to_string());
    put("x-inference-time", inference.as_millis().to_string());
    put("x-time-per-token", per_token.as_millis().to_string());
    put("x-prompt-tokens", generated.input_length.to_string());
    put("x-generated-tokens", end.generated_tokens.to_string());
    headers
}

#[utoipa::path(post, path = "/generate_stream", request_body = GenerateRequest,
    responses((status = 200, description = "SSE of StreamResponse", body = StreamResponse),
              (status = 422, body = crate::error::ErrorResponse), (status = 429, body = crate::error::ErrorResponse)))]
pub async fn generate_stream(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let Json(request) =
        payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    generate_stream_inner(state, request).await
}

async fn generate_stream_inner(state: AppStateRef, request: GenerateRequest) -> Result<Response> {
    let permit = admit(&state)?;
    let p = &request.parameters;
    if p.best_of.unwrap_or(1) != 1 {
        return Err(RouterError::BestOfStream).inspect_err(record_failure);
    }
    if p.decoder_input_details {
        return Err(RouterError::PrefillDetailsStream).inspect_err(record_failure);
    }
    let valid = validate(&state, request.inputs.clone(), p, true).await?;
    let input_length = valid.input_ids.len() as u32;
    let rx = state.infer.submit(valid, request_span("generate_stream"));
    let (first, rx) = first_event(rx).await?;
    let prefix = if p.return_full_text.unwrap_or(false) {
        request.inputs.clone()
    } else {
        String::new()
    };
    let stream = tgi_stream(first, rx, permit, p.details, input_length, prefix);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&state.compute_type) {
        headers.insert("x-compute-type", v);
    }
    headers.insert(
        "x-compute-characters",
        HeaderValue::from(request.inputs.len()),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Wait for a request's first event, so that an error before any token is a real HTTP status.
pub async fn first_event(
    mut rx: UnboundedReceiver<InferEvent>,
) -> Result<(InferEvent, UnboundedReceiver<InferEvent>)> {
    match rx.recv().await {
        Some(InferEvent::Error(e)) => Err(e),
        Some(event) => Ok((event, rx)),
        None => Err(RouterError::IncompleteGeneration),
    }
}

/// TGI's stream: one event per token, the last one carrying `generated_text` (and `details`).
fn tgi_stream(
    first: InferEvent,
    mut rx: UnboundedReceiver<InferEvent>,
    permit: OwnedSemaphorePermit,
    details: bool,
    input_length: u32,
    prefix: String,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    async_stream::stream! {
        let _permit = permit;
        let mut next = Some(first);
        let mut held: Option<(Token, Vec<Token>)> = None;
        let mut index = 0u32;
        loop {
            let event = match next.take() {
                Some(event) => Some(event),
                None => rx.recv().await,
            };
            match event {
                Some(InferEvent::Token { token, top_tokens, .. }) => {
                    // Hold one token back: the last one is sent with the end's text.
                    if let Some((token, top_tokens)) = held.replace((token, top_tokens)) {
                        index += 1;
                        yield Ok(stream_event(index, token, top_tokens, None));
                    }
                }
                Some(InferEvent::End(end)) => {
                    let Some((token, top_tokens)) = held.take() else {
                        yield Ok(RouterError::IncompleteGeneration.to_sse_event());
                        break;
                    };
                    index += 1;
                    let last = (format!("{prefix}{}", end.text), details.then(|| stream_details(&end, input_length)));
                    yield Ok(stream_event(index, token, top_tokens, Some(last)));
                    break;
                }
                Some(InferEvent::Error(e)) => {
                    yield Ok(e.to_sse_event());
                    break;
                }
                None => {
                    yield Ok(RouterError::IncompleteGeneration.to_sse_event());
                    break;
                }
            }
        }
    }
}

fn stream_details(end: &End, input_length: u32) -> StreamDetails {
    StreamDetails {
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: end.seed,
        input_length,
    }
}

fn stream_event(
    index: u32,
    token: Token,
    top_tokens: Vec<Token>,
    last: Option<(String, Option<StreamDetails>)>,
) -> Event {
    let (generated_text, details) =
        last.map_or((None, None), |(text, details)| (Some(text), details));
    let response = StreamResponse {
        index,
        token,
        top_tokens,
        generated_text,
        details,
    };
    Event::default().data(serde_json::to_string(&response).unwrap_or_default())
}

/// `POST /`: `/generate` answered as a one-element array, or `/generate_stream` when `stream`.
#[utoipa::path(post, path = "/", request_body = CompatGenerateRequest,
    responses((status = 200, body = [GenerateResponse]), (status = 422, body = crate::error::ErrorResponse)))]
pub async fn compat_generate(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<CompatGenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let Json(request) =
        payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    compat_inner(state, request).await
}

pub async fn compat_inner(state: AppStateRef, request: CompatGenerateRequest) -> Result<Response> {
    let generate = GenerateRequest {
        inputs: request.inputs,
        parameters: request.parameters,
    };
    if request.stream {
        generate_stream_inner(state, generate).await
    } else {
        let (headers, response) = generate_inner(&state, generate).await?;
        Ok((headers, Json(vec![response])).into_response())
    }
}

#[utoipa::path(post, path = "/tokenize", request_body = GenerateRequest, responses((status = 200, body = [SimpleToken])))]
pub async fn tokenize(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<Vec<SimpleToken>>> {
    let Json(request) = payload?;
    Ok(Json(simple_tokens(&state, request.inputs, true).await?))
}

pub async fn simple_tokens(
    state: &AppState,
    inputs: String,
    add_special: bool,
) -> Result<Vec<SimpleToken>> {
    let encoding = state
        .validation
        .tokenize(inputs.clone(), add_special)
        .await?;
    let tokens =
        encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, stop))| SimpleToken {
                id,
                text: inputs.get(start..stop).unwrap_or_default().to_string(),
                start,
                stop,
            });
    Ok(tokens.collect())
}

#[utoipa::path(get, path = "/health", responses((status = 200), (status = 503, body = crate::error::ErrorResponse)))]
pub async fn health(State(state): State<AppStateRef>) -> Result<StatusCode> {
    state.infer.health().await?;
    Ok(StatusCode::OK)
}

#[utoipa::path(get, path = "/info", responses((status = 200, body = Info)))]
pub async fn info(State(state): State<AppStateRef>) -> Json<Info> {
    Json(state.info.clone())
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(state): State<AppStateRef>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn openapi_json() -> impl IntoResponse {
    Json(crate::openapi::document())
}
