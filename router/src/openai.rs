//! OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/chat_tokenize`),
//! fixing TGI's warts: `finish_reason` is only `stop`/`length`/`tool_calls`, real ids, `n` > 1,
//! `top_p = 1.0`, presence penalty as OpenAI defines it, stop strings trimmed (held back in streams),
//! `usage` (and `stream_options.include_usage`), `logit_bias`, `response_format` and tool calls
//! (`tools.rs`).

use crate::api::{
    ChatTokenizeResponse, FinishReason, GenerateParameters, GrammarParam, JsonSchemaConfig, Token,
};
use crate::batcher::Generated;
use crate::common::{
    admit, counted_body, generate_all, record_failure, simple_tokens, sse_response, validate,
    AppStateRef,
};
use crate::error::{OpenAiError, Result, RouterError};
use crate::metrics as m;
use crate::openai_stream::{sse_events, ChoiceStreams, Delta, StreamSpec};
use crate::openai_types::*;
use crate::tools::{self, ToolUse};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
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

/// Renders on a blocking worker: a template (from the model files) is CPU work bounded only by
/// its fuel (`tessera_formats::chat_template::RENDER_FUEL`), which must not stall the async threads.
/// Tools reach the template when calls are allowed; a template that does not render them (or an
/// assistant's earlier calls) gets them in the messages instead.
async fn render(
    state: &AppStateRef,
    request: &ChatRequest,
    tool_use: Option<&ToolUse>,
) -> Result<String> {
    if request.messages.is_empty() {
        return Err(RouterError::InvalidRequest(
            "`messages` cannot be empty".into(),
        ));
    }
    let (state, messages, tools, tool_prompt) = (
        state.clone(),
        tools::template_messages(normalize_messages(&request.messages)),
        tool_use.map(|t| t.tools.clone()),
        request.tool_prompt.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let template = state
            .template
            .as_ref()
            .ok_or_else(|| RouterError::Template("template not found".into()))?;
        let mut messages = messages;
        if !template.renders_tool_calls() {
            tools::calls_as_content(&mut messages);
        }
        let tools = match tools {
            Some(t) if !template.renders_tools() => {
                tools::inject_tool_prompt(&mut messages, &t, tool_prompt.as_deref());
                None
            }
            other => other,
        };
        template
            .render(&messages, true, tools.as_ref())
            .map_err(|e| RouterError::Template(e.to_string()))
    })
    .await
    .map_err(|e| RouterError::Template(format!("template rendering failed: {e}")))?
}

/// OpenAI's `response_format` (or TGI's grammar in its place) as a grammar; `text` is none.
fn response_format_grammar(format: &Value) -> Result<Option<GrammarParam>> {
    let invalid = |msg: &str| RouterError::InvalidGrammar(format!("`response_format` {msg}"));
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarParam::Json(json!({"type": "object"})))),
        Some("json_schema") => {
            let config: JsonSchemaConfig = format
                .get("json_schema")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| invalid(&format!("has an invalid `json_schema`: {e}")))?
                .ok_or_else(|| invalid("of type json_schema needs `json_schema`"))?;
            Ok(Some(GrammarParam::JsonSchema(config)))
        }
        Some("json" | "regex") => serde_json::from_value(format.clone())
            .map(Some)
            .map_err(|e| invalid(&format!("is not a TGI grammar: {e}"))),
        _ => Err(invalid(
            "must have a `type` of text, json_object, json_schema, json or regex",
        )),
    }
}

/// Shared sampling mapping of both OpenAI routes. Numbers pass through unchanged (no arithmetic):
/// validation judges them.
pub fn parameters(
    s: &Sampling,
    max_new_tokens: Option<u32>,
    top_n: Option<u32>,
) -> Result<GenerateParameters> {
    let grammar = match &s.response_format {
        Some(format) => response_format_grammar(format)?,
        None => None,
    };
    let logit_bias = s
        .logit_bias
        .as_ref()
        .map(|biases| {
            biases
                .iter()
                .map(|(token, &bias)| {
                    let id = token.trim().parse::<u32>().map_err(|_| {
                        RouterError::InvalidRequest(format!(
                            "`logit_bias` keys must be token ids, got \"{token}\""
                        ))
                    })?;
                    Ok((id, bias))
                })
                .collect::<Result<_>>()
        })
        .transpose()?;
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
        min_p: s.min_p,
        priority: s.priority,
        logit_bias,
        grammar,
        ..Default::default()
    })
}

/// `n` against `--max-client-batch-size`.
pub fn choices_count(max: usize, n: Option<usize>) -> Result<usize> {
    let n = n.unwrap_or(1);
    if n == 0 || n > max {
        return Err(RouterError::N(max, n));
    }
    Ok(n)
}

/// A chat request's parameters: `max_completion_tokens` (or the older `max_tokens`),
/// `top_logprobs` alternatives when `logprobs` is on, and the grammar of a required tool call.
pub fn chat_parameters(
    request: &ChatRequest,
    tool_use: Option<&ToolUse>,
) -> Result<GenerateParameters> {
    if request.top_logprobs.is_some() && !request.logprobs.unwrap_or(false) {
        return Err(RouterError::TopLogprobsWithoutLogprobs);
    }
    let top_n = request
        .logprobs
        .unwrap_or(false)
        .then_some(request.top_logprobs.unwrap_or(0));
    let mut params = parameters(
        &request.sampling,
        request.max_completion_tokens.or(request.max_tokens),
        top_n,
    )?;
    if let Some(schema) = tool_use.and_then(ToolUse::grammar) {
        if params.grammar.is_some() {
            return Err(RouterError::Tool(
                "Grammar and tools are mutually exclusive".into(),
            ));
        }
        params.grammar = Some(GrammarParam::Json(schema));
    }
    Ok(params)
}

/// OpenAI text: no trailing special token (EOS), and nothing from the stop sequence on (the stop
/// may sit inside a token with more text after it).
fn clean_text(generated: &Generated, stops: &[String]) -> String {
    let end = generated.end();
    let mut text = end.text.clone();
    if let Some(last) = generated.tokens.last().filter(|t| t.special) {
        if text.ends_with(&last.text) {
            text.truncate(text.len() - last.text.len());
        }
    }
    if end.finish_reason == FinishReason::StopSequence {
        if let Some(at) = first_stop(&text, stops) {
            text.truncate(at);
        }
    }
    text
}

/// Where the earliest stop sequence in `text` begins: generation stopped at the first match.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, description = "JSON, or SSE of chunks with `stream`",
               content((ChatCompletion = "application/json"), (Object = "text/event-stream"))),
              (status = 413, body = Object, description = "OpenAI error body"),
              (status = 422, body = Object, description = "OpenAI error body"),
              (status = 424, body = Object, description = "OpenAI error body"),
              (status = 429, body = Object, description = "OpenAI error body")))]
pub async fn chat_completions(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    Ok(chat_inner(state, counted_body(payload)?).await?)
}

/// The chat route on an already parsed body (also SageMaker's `/invocations`).
pub async fn chat_inner(state: AppStateRef, request: ChatRequest) -> Result<Response> {
    let permit = admit(&state)?;
    let prepared = (|| {
        let n = choices_count(state.info.max_client_batch_size, request.sampling.n)?;
        let tool_use = ToolUse::from_request(
            request.tools.as_ref(),
            request.tool_choice.as_ref(),
            request.parallel_tool_calls,
        )?;
        let params = chat_parameters(&request, tool_use.as_ref())?;
        Ok((n, params, tool_use))
    })();
    let (n, params, tool_use) = prepared.inspect_err(record_failure)?;
    let inputs = render(&state, &request, tool_use.as_ref())
        .await
        .inspect_err(record_failure)?;
    let valid = validate(&state, inputs, &params, false).await?;
    let stops = params.stop.clone();
    let model = state.info.model_id.clone();
    let with_logprobs = request.logprobs.unwrap_or(false);
    if request.sampling.stream {
        let mut streams = ChoiceStreams::default();
        streams.submit(&state, valid, n, "chat_completions").await?;
        let mut spec = stream_spec(
            "chatcmpl",
            "chat.completion.chunk",
            model,
            stops,
            &request.sampling,
        );
        spec.tools = tool_use;
        let events = sse_events(streams, permit, spec, move |d| chat_delta(d, with_logprobs));
        return Ok(sse_response(events));
    }
    let runs = generate_all(&state, valid, n, "chat_completions").await?;
    let choices = runs
        .iter()
        .enumerate()
        .map(|(index, run)| {
            let text = clean_text(run, &stops);
            let (content, calls) = match &tool_use {
                Some(t) => t.parse(&text),
                None => (Some(text), Vec::new()),
            };
            let finish_reason = match calls.is_empty() {
                true => run.end().finish_reason.openai(),
                false => "tool_calls",
            };
            ChatChoice {
                index,
                message: ChatMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls: (!calls.is_empty())
                        .then(|| calls.iter().map(|c| c.to_openai(None)).collect()),
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
                finish_reason: finish_reason.into(),
            }
        })
        .collect();
    let usage = Usage::new(
        runs[0].input_length,
        runs.iter()
            .fold(0u32, |sum, r| sum.saturating_add(r.end().generated_tokens)),
    );
    Ok(Json(ChatCompletion {
        id: new_id("chatcmpl"),
        object: "chat.completion".into(),
        created: unix_now(),
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage,
    })
    .into_response())
}

/// A chat stream's choice: the delta as an assistant message (text, or one tool call's piece),
/// logprobs of visible tokens when asked.
fn chat_delta(d: Delta, with_logprobs: bool) -> Value {
    let logprobs = d
        .token
        .filter(|(token, _)| with_logprobs && !token.special)
        .map(|(token, top)| ChatLogprobs {
            content: vec![chat_logprob(token, top)],
        });
    let delta = match d.tool_call {
        Some(call) => json!({"role": "assistant", "tool_calls": [call]}),
        None => json!({"role": "assistant", "content": d.text}),
    };
    json!({"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason})
}

/// A completions stream's choice: plain text, no streamed logprobs.
fn completion_delta(d: Delta) -> Value {
    json!({"index": d.index, "text": d.text, "logprobs": null, "finish_reason": d.finish_reason})
}

/// A stream's envelope: a fresh id, now, the model, and the request's stops and `include_usage`.
fn stream_spec(
    id_prefix: &str,
    object: &'static str,
    model: String,
    stops: Vec<String>,
    sampling: &Sampling,
) -> StreamSpec {
    StreamSpec {
        id: new_id(id_prefix),
        object,
        created: unix_now(),
        model,
        system_fingerprint: fingerprint(),
        stops,
        include_usage: sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        echoes: Vec::new(),
        tools: None,
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

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "JSON, or SSE of chunks with `stream`",
               content((Completion = "application/json"), (Object = "text/event-stream"))),
              (status = 413, body = Object, description = "OpenAI error body"),
              (status = 422, body = Object, description = "OpenAI error body"),
              (status = 424, body = Object, description = "OpenAI error body"),
              (status = 429, body = Object, description = "OpenAI error body")))]
pub async fn completions(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    Ok(completions_inner(state, counted_body(payload)?).await?)
}

/// The completions route on an already parsed body (also SageMaker's `/invocations`).
pub async fn completions_inner(state: AppStateRef, request: CompletionRequest) -> Result<Response> {
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
        let n = choices_count(max, request.sampling.n)?;
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
        // Choice `p * n + j` is prompt `p`'s `j`-th choice, as in the non-streaming answer.
        let mut streams = ChoiceStreams::default();
        for valid in valids {
            streams.submit(&state, valid, n, "completions").await?;
        }
        let mut spec = stream_spec("cmpl", "text_completion", model, stops, &request.sampling);
        if echo {
            spec.echoes = prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.clone(), n))
                .collect();
        }
        return Ok(sse_response(sse_events(
            streams,
            permit,
            spec,
            completion_delta,
        )));
    }
    let runs = futures::future::try_join_all(
        valids
            .into_iter()
            .map(|v| generate_all(&state, v, n, "completions")),
    )
    .await?;
    let mut choices = Vec::new();
    let mut prompt_tokens: u32 = 0;
    let mut completion_tokens: u32 = 0;
    for (p, prompt_runs) in runs.iter().enumerate() {
        prompt_tokens = prompt_tokens.saturating_add(prompt_runs[0].input_length);
        for (j, run) in prompt_runs.iter().enumerate() {
            completion_tokens = completion_tokens.saturating_add(run.end().generated_tokens);
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
        id: new_id("cmpl"),
        object: "text_completion".into(),
        created: unix_now(),
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens),
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

#[utoipa::path(post, path = "/chat_tokenize", request_body = ChatRequest, responses((status = 200, body = ChatTokenizeResponse), (status = 413, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse)))]
pub async fn chat_tokenize(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Json<ChatTokenizeResponse>> {
    let Json(request) = payload?;
    metrics::counter!(m::REQUEST_COUNT).increment(1);
    let tool_use = ToolUse::from_request(
        request.tools.as_ref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls,
    )
    .inspect_err(record_failure)?;
    let templated_text = render(&state, &request, tool_use.as_ref())
        .await
        .inspect_err(record_failure)?;
    let tokenize_response = simple_tokens(&state, templated_text.clone(), false).await?;
    Ok(Json(ChatTokenizeResponse {
        tokenize_response,
        templated_text,
    }))
}
