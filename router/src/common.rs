//! What the TGI and OpenAI handlers share: the app state, admission, the validation call, request spans,
//! running a request to its end or to its first event, tokenization, and SSE plumbing.

use crate::api::{GenerateParameters, Info, SimpleToken};
use crate::batcher::{Generated, Infer, InferEvent};
use crate::error::{Result, RouterError};
use crate::metrics as m;
use crate::validation::{ValidRequest, Validation};
use axum::extract::rejection::JsonRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tessera_formats::chat_template::ChatTemplate;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;

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

/// A generation route's JSON body; a body that does not parse still counts as a request (as in TGI).
pub fn counted_body<T>(payload: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    let Json(body) = payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    Ok(body)
}

/// Count a request and reserve its concurrency slot (429 when none is left).
pub fn admit(state: &AppState) -> Result<OwnedSemaphorePermit> {
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    state.infer.admit().inspect_err(record_failure)
}

/// `tgi_request_failure` for errors raised before the batcher (which counts its own).
pub fn record_failure(error: &RouterError) {
    if !error.counted_by_batcher() {
        metrics::counter!(m::REQUEST_FAILURE, "err" => error.metric_label()).increment(1);
    }
}

/// A span per request; the batcher records its id.
pub fn request_span(route: &'static str) -> tracing::Span {
    tracing::info_span!("request", route, request_id = tracing::field::Empty)
}

/// Validate one prompt with its parameters, timing it (and counting a refusal).
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

/// The tokens of `inputs` with their text and byte offsets (`/tokenize`, `/chat_tokenize`).
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

/// An SSE `data:` event holding `value` as JSON.
pub fn json_event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// A streaming response with keep-alive comments.
pub fn sse_response(
    events: impl Stream<Item = std::result::Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
