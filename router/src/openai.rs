//! OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/chat_tokenize`,
//! `/invocations`), fixing TGI's warts: `finish_reason` is only `stop`/`length`, real ids, `n` > 1,
//! `top_p = 1.0`, presence penalty as OpenAI defines it, stop strings trimmed (held back in streams),
//! `usage` (and `stream_options.include_usage`).

use crate::api::{
    ChatTokenizeResponse, CompatGenerateRequest, FinishReason, GenerateParameters, Token,
};
use crate::batcher::{Generated, InferEvent};
use crate::error::{OpenAiError, Result, RouterError};
use crate::metrics as m;
use crate::openai_types::*;
use crate::server::{
    admit, compat_inner, first_event, generate_all, record_failure, request_span, simple_tokens,
    validate, AppState, AppStateRef,
};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, select_all, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::UnboundedReceiverStream;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fingerprint() -> String {
    format!("{}-native", env!("CARGO_PKG_VERSION"))
}

/// Chat-message content may be a list of parts; templates want a string.
fn normalize_messages(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|message| {
            let mut message = message.clone();
            if let Some(parts) = message.get("content").and_then(Value::as_array) {
                let text: String = parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                message["content"] = Value::String(text);
            }
            message
        })
        .collect()
}

fn render(state: &AppState, request: &ChatRequest) -> Result<String> {
    let template = state
        .template
        .as_ref()
        .ok_or_else(|| RouterError::Template("template not found".into()))?;
    if request.messages.is_empty() {
        return Err(RouterError::InvalidRequest(
            "`messages` cannot be empty".into(),
        ));
    }
    template
        .render(
            &normalize_messages(&request.messages),
            true,
            request.tools.as_ref(),
        )
        .map_err(|e| RouterError::Template(e.to_string()))
}

/// Shared sampling mapping of both OpenAI routes.
fn parameters(
    s: &Sampling,
    max_new_tokens: Option<u32>,
    top_n: Option<u32>,
) -> Result<GenerateParameters> {
    if s.response_format
        .as_ref()
        .is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text"))
    {
        return Err(RouterError::Grammar);
    }
    // OpenAI: temperature 0 means greedy; otherwise sample (default temperature 1).
    let (do_sample, temperature) = match s.temperature {
        Some(0.0) => (false, None),
        other => (true, other),
    };
    Ok(GenerateParameters {
        temperature,
        do_sample,
        top_p: s.top_p,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
        max_new_tokens,
        stop: s
            .stop
            .clone()
            .map(StopSequences::into_vec)
            .unwrap_or_default(),
        top_n_tokens: top_n,
        details: true,
        ..Default::default()
    })
}

fn choices_count(state: &AppState, n: Option<usize>) -> Result<usize> {
    let n = n.unwrap_or(1);
    let max = state.info.max_client_batch_size;
    if n == 0 || n > max {
        return Err(RouterError::N(max, n));
    }
    Ok(n)
}

/// OpenAI text: no trailing special token (EOS) and no stop sequence.
fn clean_text(generated: &Generated, stops: &[String]) -> String {
    let end = generated.end();
    let mut text = end.text.clone();
    if let Some(last) = generated.tokens.last().filter(|t| t.special) {
        if text.ends_with(&last.text) {
            text.truncate(text.len() - last.text.len());
        }
    }
    if end.finish_reason == FinishReason::StopSequence {
        if let Some(stop) = stops.iter().find(|s| text.ends_with(s.as_str())) {
            text.truncate(text.len() - stop.len());
        }
    }
    text
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, body = ChatCompletion), (status = 422, body = crate::error::ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let Json(request) =
        payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    Ok(chat_inner(state, request).await?)
}

async fn chat_inner(state: AppStateRef, request: ChatRequest) -> Result<Response> {
    let permit = admit(&state)?;
    let prepared = (|| {
        let n = choices_count(&state, request.sampling.n)?;
        if request.top_logprobs.is_some() && !request.logprobs.unwrap_or(false) {
            return Err(RouterError::TopLogprobsWithoutLogprobs);
        }
        let top_n = request
            .logprobs
            .unwrap_or(false)
            .then_some(request.top_logprobs.unwrap_or(0));
        let params = parameters(
            &request.sampling,
            request.max_completion_tokens.or(request.max_tokens),
            top_n,
        )?;
        Ok((n, params, render(&state, &request)?))
    })();
    let (n, params, inputs) = prepared.inspect_err(record_failure)?;
    let valid = validate(&state, inputs, &params, false).await?;
    let stops = params.stop.clone();
    let model = state.info.model_id.clone();
    if request.sampling.stream {
        let streams = submit_choices(&state, valid, n, "chat_completions").await?;
        let prompt_tokens = streams.prompt_tokens;
        let include_usage = request
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let shape = ChunkShape {
            stops,
            model,
            with_logprobs: request.logprobs.unwrap_or(false),
            include_usage,
            prompt_tokens,
        };
        let chunks = chat_stream(streams, permit, shape);
        return Ok(Sse::new(chunks)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let runs = generate_all(&state, valid, n, "chat_completions").await?;
    let with_logprobs = request.logprobs.unwrap_or(false);
    let choices = runs
        .iter()
        .enumerate()
        .map(|(index, run)| ChatChoice {
            index,
            message: ChatMessage {
                role: "assistant".into(),
                content: clean_text(run, &stops),
            },
            logprobs: with_logprobs.then(|| ChatLogprobs {
                content: run
                    .tokens
                    .iter()
                    .zip(&run.top_tokens)
                    .filter(|(t, _)| !t.special)
                    .map(|(t, top)| chat_logprob(t, top))
                    .collect(),
            }),
            finish_reason: run.end().finish_reason.openai().into(),
        })
        .collect();
    let usage = usage(
        runs[0].input_length,
        runs.iter().map(|r| r.end().generated_tokens).sum(),
    );
    Ok(Json(ChatCompletion {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        object: "chat.completion".into(),
        created: unix_now(),
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage,
    })
    .into_response())
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn chat_logprob(token: &Token, top: &[Token]) -> ChatTokenLogprob {
    let entry = |t: &Token| TopLogprob {
        token: t.text.clone(),
        logprob: t.logprob,
        bytes: Some(t.text.as_bytes().to_vec()),
    };
    ChatTokenLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        bytes: Some(token.text.as_bytes().to_vec()),
        top_logprobs: top.iter().map(entry).collect(),
    }
}

/// The `n` streams of one OpenAI request, each past its first event.
struct ChoiceStreams {
    firsts: Vec<InferEvent>,
    receivers: Vec<UnboundedReceiver<InferEvent>>,
    prompt_tokens: u32,
}

impl ChoiceStreams {
    /// All choices' events, tagged with their choice index.
    fn merged(self) -> impl Stream<Item = (usize, InferEvent)> + Send {
        let firsts = stream::iter(self.firsts.into_iter().enumerate());
        let rest = select_all(self.receivers.into_iter().enumerate().map(|(i, rx)| {
            UnboundedReceiverStream::new(rx)
                .map(move |e| (i, e))
                .boxed()
        }));
        firsts.chain(rest)
    }
}

async fn submit_choices(
    state: &AppState,
    valid: crate::validation::ValidRequest,
    n: usize,
    route: &'static str,
) -> Result<ChoiceStreams> {
    let prompt_tokens = valid.input_ids.len() as u32;
    let mut streams = ChoiceStreams {
        firsts: Vec::new(),
        receivers: Vec::new(),
        prompt_tokens,
    };
    let receivers: Vec<_> = (0..n)
        .map(|i| {
            let mut request = valid.clone();
            if i > 0 {
                // Distinct choices: a derived seed keeps a seeded request reproducible.
                request.parameters.seed = request.parameters.seed.wrapping_add(i as u64);
            }
            state.infer.submit(request, request_span(route))
        })
        .collect();
    for rx in receivers {
        let (first, rx) = first_event(rx).await?;
        streams.firsts.push(first);
        streams.receivers.push(rx);
    }
    Ok(streams)
}

/// Holds back text that could be the start of a stop sequence, so a stream never shows the stop string.
#[derive(Clone)]
pub struct StopBuffer {
    stops: Vec<String>,
    pending: String,
}

impl StopBuffer {
    pub fn new(stops: Vec<String>) -> Self {
        StopBuffer {
            stops,
            pending: String::new(),
        }
    }

    /// Add text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().map(|(i, c)| &s[..i + c.len_utf8()]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let shown = self.pending.len() - hold;
        self.pending.drain(..shown).collect()
    }

    /// The held-back rest, without the stop sequence when the generation stopped on one.
    pub fn finish(&mut self, stopped_on_sequence: bool) -> String {
        let mut rest = std::mem::take(&mut self.pending);
        if stopped_on_sequence {
            if let Some(stop) = self.stops.iter().find(|s| rest.ends_with(s.as_str())) {
                rest.truncate(rest.len() - stop.len());
            }
        }
        rest
    }
}

fn data(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// What a chat stream's chunks carry besides the tokens.
struct ChunkShape {
    stops: Vec<String>,
    model: String,
    with_logprobs: bool,
    include_usage: bool,
    prompt_tokens: u32,
}

fn chat_stream(
    streams: ChoiceStreams,
    permit: OwnedSemaphorePermit,
    shape: ChunkShape,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    let ChunkShape {
        stops,
        model,
        with_logprobs,
        include_usage,
        prompt_tokens,
    } = shape;
    let n = streams.firsts.len();
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let chunk = move |choices: Value, usage: Option<Usage>| {
        data(
            &json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": fingerprint(), "choices": choices, "usage": usage}),
        )
    };
    async_stream::stream! {
        let _permit = permit;
        let mut buffers = vec![StopBuffer::new(stops); n];
        let mut events = Box::pin(streams.merged());
        let (mut ended, mut completion_tokens) = (0, 0);
        while let Some((index, event)) = events.next().await {
            match event {
                InferEvent::Token { token, top_tokens, .. } => {
                    let content = if token.special { String::new() } else { buffers[index].push(&token.text) };
                    let logprobs = (with_logprobs && !token.special).then(|| ChatLogprobs { content: vec![chat_logprob(&token, &top_tokens)] });
                    let choice = json!({"index": index, "delta": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": null});
                    yield Ok(chunk(json!([choice]), None));
                }
                InferEvent::End(end) => {
                    let content = buffers[index].finish(end.finish_reason == FinishReason::StopSequence);
                    completion_tokens += end.generated_tokens;
                    let choice = json!({"index": index, "delta": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": end.finish_reason.openai()});
                    yield Ok(chunk(json!([choice]), None));
                    ended += 1;
                    if ended == n { break; }
                }
                InferEvent::Error(e) => {
                    yield Ok(e.to_openai_sse_event());
                    return;
                }
            }
        }
        if ended < n {
            yield Ok(RouterError::IncompleteGeneration.to_openai_sse_event());
            return;
        }
        if include_usage {
            yield Ok(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens))));
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, body = Completion), (status = 422, body = crate::error::ErrorResponse)))]
pub async fn completions(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let Json(request) =
        payload.inspect_err(|_| metrics::counter!(m::REQUEST_COUNT).increment(1))?;
    Ok(completions_inner(state, request).await?)
}

async fn completions_inner(state: AppStateRef, request: CompletionRequest) -> Result<Response> {
    let permit = admit(&state)?;
    let prepared = (|| {
        if request.suffix.is_some() {
            return Err(RouterError::Suffix);
        }
        let prompts = request.prompt.clone().into_vec();
        let max = state.info.max_client_batch_size;
        if prompts.len() > max {
            return Err(RouterError::BatchSizeExceeded(max));
        }
        if prompts.is_empty() {
            return Err(RouterError::EmptyInput);
        }
        let n = choices_count(&state, request.sampling.n)?;
        Ok((
            prompts,
            n,
            parameters(&request.sampling, request.max_tokens, request.logprobs)?,
        ))
    })();
    let (prompts, n, params) = prepared.inspect_err(record_failure)?;
    let mut valids = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        valids.push(validate(&state, prompt.clone(), &params, true).await?);
    }
    let model = state.info.model_id.clone();
    let stops = params.stop.clone();
    let echo = request.echo.unwrap_or(false);
    if request.sampling.stream {
        let mut all = ChoiceStreams {
            firsts: Vec::new(),
            receivers: Vec::new(),
            prompt_tokens: 0,
        };
        for valid in valids {
            let streams = submit_choices(&state, valid, n, "completions").await?;
            all.prompt_tokens += streams.prompt_tokens;
            all.firsts.extend(streams.firsts);
            all.receivers.extend(streams.receivers);
        }
        let include_usage = request
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let echoes = if echo {
            prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.clone(), n))
                .collect()
        } else {
            Vec::new()
        };
        let events = completion_stream(all, permit, stops, model, include_usage, echoes);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let runs = futures::future::try_join_all(
        valids
            .into_iter()
            .map(|v| generate_all(&state, v, n, "completions")),
    )
    .await?;
    let mut choices = Vec::new();
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    for (p, prompt_runs) in runs.iter().enumerate() {
        prompt_tokens += prompt_runs[0].input_length;
        for (j, run) in prompt_runs.iter().enumerate() {
            completion_tokens += run.end().generated_tokens;
            let prefix = if echo { prompts[p].as_str() } else { "" };
            choices.push(CompletionChoice {
                index: p * n + j,
                text: format!("{prefix}{}", clean_text(run, &stops)),
                logprobs: request
                    .logprobs
                    .map(|_| completion_logprobs(run, prefix.len())),
                finish_reason: run.end().finish_reason.openai().into(),
            });
        }
    }
    Ok(Json(Completion {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        object: "text_completion".into(),
        created: unix_now(),
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: usage(prompt_tokens, completion_tokens),
    })
    .into_response())
}

fn completion_logprobs(run: &Generated, offset: usize) -> CompletionLogprobs {
    let mut text_offset = Vec::new();
    let mut at = offset;
    for token in &run.tokens {
        text_offset.push(at);
        at += token.text.len();
    }
    CompletionLogprobs {
        tokens: run.tokens.iter().map(|t| t.text.clone()).collect(),
        token_logprobs: run.tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs: run
            .top_tokens
            .iter()
            .map(|top| top.iter().map(|t| (t.text.clone(), t.logprob)).collect())
            .collect(),
        text_offset,
    }
}

fn completion_stream(
    streams: ChoiceStreams,
    permit: OwnedSemaphorePermit,
    stops: Vec<String>,
    model: String,
    include_usage: bool,
    echoes: Vec<String>,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> {
    let n = streams.firsts.len();
    let prompt_tokens = streams.prompt_tokens;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();
    let chunk = move |choices: Value, usage: Option<Usage>| {
        data(
            &json!({"id": id, "object": "text_completion", "created": created, "model": model,
                     "system_fingerprint": fingerprint(), "choices": choices, "usage": usage}),
        )
    };
    async_stream::stream! {
        let _permit = permit;
        let mut buffers = vec![StopBuffer::new(stops); n];
        for (index, echo) in echoes.iter().enumerate() {
            yield Ok(chunk(json!([{"index": index, "text": echo, "logprobs": null, "finish_reason": null}]), None));
        }
        let mut events = Box::pin(streams.merged());
        let (mut ended, mut completion_tokens) = (0, 0);
        while let Some((index, event)) = events.next().await {
            match event {
                InferEvent::Token { token, .. } => {
                    let text = if token.special { String::new() } else { buffers[index].push(&token.text) };
                    yield Ok(chunk(json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]), None));
                }
                InferEvent::End(end) => {
                    let text = buffers[index].finish(end.finish_reason == FinishReason::StopSequence);
                    completion_tokens += end.generated_tokens;
                    yield Ok(chunk(json!([{"index": index, "text": text, "logprobs": null, "finish_reason": end.finish_reason.openai()}]), None));
                    ended += 1;
                    if ended == n { break; }
                }
                InferEvent::Error(e) => {
                    yield Ok(e.to_openai_sse_event());
                    return;
                }
            }
        }
        if ended < n {
            yield Ok(RouterError::IncompleteGeneration.to_openai_sse_event());
            return;
        }
        if include_usage {
            yield Ok(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens))));
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn models(State(state): State<AppStateRef>) -> Json<ModelList> {
    let id = state.info.model_id.clone();
    Json(ModelList {
        object: "list".into(),
        data: vec![Model {
            id: id.clone(),
            object: "model".into(),
            created: 0,
            owned_by: id,
        }],
    })
}

#[utoipa::path(post, path = "/chat_tokenize", request_body = ChatRequest, responses((status = 200, body = ChatTokenizeResponse)))]
pub async fn chat_tokenize(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Json<ChatTokenizeResponse>> {
    let Json(request) = payload?;
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    let templated_text = render(&state, &request).inspect_err(record_failure)?;
    let tokenize_response = simple_tokens(&state, templated_text.clone(), false).await?;
    Ok(Json(ChatTokenizeResponse {
        tokenize_response,
        templated_text,
    }))
}

/// SageMaker's single route: a chat, completions or TGI body, told apart by its fields.
#[utoipa::path(post, path = "/invocations", request_body = Object, responses((status = 200)))]
pub async fn invocations(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<Value>, JsonRejection>,
) -> Result<Response> {
    let Json(body) = payload?;
    let parse = |e: serde_json::Error| RouterError::InvalidRequest(e.to_string());
    if body.get("messages").is_some() {
        chat_inner(state, serde_json::from_value(body).map_err(parse)?).await
    } else if body.get("prompt").is_some() {
        completions_inner(state, serde_json::from_value(body).map_err(parse)?).await
    } else {
        compat_inner(
            state,
            serde_json::from_value::<CompatGenerateRequest>(body).map_err(parse)?,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::StopBuffer;

    #[test]
    fn stop_buffer_never_shows_the_stop_sequence() {
        let mut b = StopBuffer::new(vec!["END".into()]);
        let mut shown = String::new();
        for piece in ["Hello E", "N", "D"] {
            shown.push_str(&b.push(piece));
        }
        shown.push_str(&b.finish(true));
        assert_eq!(shown, "Hello ");
        let mut b = StopBuffer::new(vec!["END".into()]);
        let mut shown = b.push("an E");
        shown.push_str(&b.push("lephant"));
        shown.push_str(&b.finish(false));
        assert_eq!(shown, "an Elephant");
    }
}
