//! TGI's own endpoints: `/generate`, `/generate_stream`, `POST /` (compat), `/tokenize`, `/health`,
//! `/info`, `/metrics`, with TGI's timing headers and its token-per-event stream.

use crate::api::*;
use crate::batcher::{End, Generated, InferEvent};
use crate::common::{
    admit, counted_body, first_event, generate_all, json_event, record_failure, request_span,
    simple_tokens, sse_response, validate, AppState, AppStateRef,
};
use crate::error::{Result, RouterError};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use std::convert::Infallible;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;

#[utoipa::path(post, path = "/generate", request_body = GenerateRequest,
    responses((status = 200, body = GenerateResponse), (status = 413, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse),
              (status = 424, body = crate::error::ErrorResponse), (status = 429, body = crate::error::ErrorResponse)))]
pub async fn generate(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let request = counted_body(payload)?;
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

/// TGI's `x-*` timing headers of a finished request.
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
    responses((status = 200, description = "SSE of StreamResponse", content((StreamResponse = "text/event-stream"))),
              (status = 413, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse),
              (status = 424, body = crate::error::ErrorResponse), (status = 429, body = crate::error::ErrorResponse)))]
pub async fn generate_stream(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let request = counted_body(payload)?;
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
    let mut response = sse_response(stream);
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
    json_event(&StreamResponse {
        index,
        token,
        top_tokens,
        generated_text,
        details,
    })
}

/// `POST /`: `/generate` answered as a one-element array, or `/generate_stream` when `stream`.
#[utoipa::path(post, path = "/", request_body = CompatGenerateRequest,
    responses((status = 200, description = "JSON, or SSE of StreamResponse with `stream`",
               content((Vec<GenerateResponse> = "application/json"), (StreamResponse = "text/event-stream"))),
              (status = 413, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse),
              (status = 424, body = crate::error::ErrorResponse), (status = 429, body = crate::error::ErrorResponse)))]
pub async fn compat_generate(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<CompatGenerateRequest>, JsonRejection>,
) -> Result<Response> {
    let request = counted_body(payload)?;
    compat_inner(state, request).await
}

/// The compat route on an already parsed body (also SageMaker's `/invocations` for TGI bodies).
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

#[utoipa::path(post, path = "/tokenize", request_body = GenerateRequest, responses((status = 200, body = [SimpleToken]), (status = 413, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse)))]
pub async fn tokenize(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<Vec<SimpleToken>>> {
    let Json(request) = payload?;
    Ok(Json(simple_tokens(&state, request.inputs, true).await?))
}

/// Readiness from the batcher's record (never a shard call, so it answers in microseconds even during a
/// long forward): 503 when the last shard call failed, a step is stuck, the batcher is gone, or draining.
#[utoipa::path(get, path = "/health", responses((status = 200), (status = 503, body = crate::error::ErrorResponse)))]
pub async fn health(State(state): State<AppStateRef>) -> Result<StatusCode> {
    state.infer.health()?;
    Ok(StatusCode::OK)
}

/// Liveness: 200 while the process serves HTTP, whatever the shards do.
#[utoipa::path(get, path = "/ping", responses((status = 200)))]
pub async fn ping() -> StatusCode {
    StatusCode::OK
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
