//! The one OpenAI streaming state machine, shared by chat and completions: the `n` choices' event
//! streams merged in arrival order, stop sequences held back, tool calls held until they parse, one
//! last delta per choice with its `finish_reason`, an optional `usage` chunk, `[DONE]` — or an SSE
//! error event in place of the rest. Each route only says how a choice's delta is shaped.

use crate::api::Token;
use crate::batcher::InferEvent;
use crate::common::{first_event, json_event, request_span, AppState};
use crate::error::{Result, RouterError};
use crate::openai_types::Usage;
use crate::tools::{ToolMode, ToolUse, CALL_MARKERS};
use crate::validation::ValidRequest;
use axum::response::sse::Event;
use futures::stream::{self, select_all, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The choices of one OpenAI request, each past its first event; choice `i` is the `i`-th stream.
#[derive(Default)]
pub struct ChoiceStreams {
    firsts: Vec<InferEvent>,
    receivers: Vec<UnboundedReceiver<InferEvent>>,
    prompt_tokens: u32,
}

impl ChoiceStreams {
    /// Submit `n` choices of one prompt and wait for each one's first event, so that a failure before
    /// any token is still an HTTP status. Choice `i > 0` gets a derived seed: distinct choices, and a
    /// seeded request stays reproducible.
    pub async fn submit(
        &mut self,
        state: &AppState,
        valid: ValidRequest,
        n: usize,
        route: &'static str,
    ) -> Result<()> {
        self.prompt_tokens += valid.input_ids.len() as u32;
        let receivers: Vec<_> = (0..n)
            .map(|i| {
                let mut request = valid.clone();
                request.parameters.seed = request.parameters.seed.wrapping_add(i as u64);
                state.infer.submit(request, request_span(route))
            })
            .collect();
        for rx in receivers {
            let (first, rx) = first_event(rx).await?;
            self.firsts.push(first);
            self.receivers.push(rx);
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.firsts.len()
    }

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

/// Holds back text that could be the start of a stop sequence, so a stream never shows the stop
/// string; from a complete match on (even one inside a token with more text after it) it shows nothing.
#[derive(Clone)]
pub struct StopBuffer {
    stops: Vec<String>,
    pending: String,
    /// A stop sequence begins at this byte of `pending`.
    matched: Option<usize>,
}

impl StopBuffer {
    pub fn new(stops: Vec<String>) -> Self {
        StopBuffer {
            stops,
            pending: String::new(),
            matched: None,
        }
    }

    /// Add text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> String {
        if self.matched.is_some() {
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(at) = crate::openai::first_stop(&self.pending, &self.stops) {
            self.matched = Some(0);
            return self.pending.drain(..at).collect();
        }
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

    /// A complete stop sequence has been seen; [`StopBuffer::held`] starts with it.
    pub fn matched(&self) -> bool {
        self.matched.is_some()
    }

    /// The text held back so far.
    pub fn held(&self) -> &str {
        &self.pending
    }

    /// The held-back rest: nothing from a stop sequence on.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        match self.matched {
            Some(_) => String::new(),
            None => rest,
        }
    }
}

/// A choice's text on its way to tool calls: shown as content until a call may have begun (a
/// model's call marker with `auto`, or a JSON value opening the output; everything with `required`
/// or a named function), then held. Each call is streamed as OpenAI does once its name (one of the
/// request's functions) is read: a piece with its index, id, type and name, then its arguments' raw
/// JSON as it grows. A call only readable whole (arguments as a string, Mistral's `[ARGS]`, TGI's
/// format) comes when the choice ends.
pub struct CallBuffer {
    tools: ToolUse,
    markers: StopBuffer,
    held: Option<String>,
    shown_any: bool,
    /// Per call already announced: its id and the bytes of its arguments sent.
    streamed: Vec<(String, usize)>,
}

/// What a choice shows for one piece of text: content, and tool-call pieces (`delta.tool_calls[0]`).
#[derive(Debug, Default, PartialEq)]
pub struct Shown {
    pub content: String,
    pub calls: Vec<Value>,
}

impl CallBuffer {
    pub fn new(tools: ToolUse) -> Self {
        let held = (tools.mode != ToolMode::Auto).then(String::new);
        CallBuffer {
            tools,
            markers: StopBuffer::new(CALL_MARKERS.iter().map(|m| m.to_string()).collect()),
            held,
            shown_any: false,
            streamed: Vec::new(),
        }
    }

    /// Add text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> Shown {
        let content = self.hold(text);
        Shown {
            content,
            calls: self.stream_calls(),
        }
    }

    /// Adds `text`; returns the content to show (nothing once a call may have begun).
    fn hold(&mut self, text: &str) -> String {
        if let Some(held) = &mut self.held {
            held.push_str(text);
            return String::new();
        }
        let starts_json = !self.shown_any && text.trim_start().starts_with(['{', '[']);
        if starts_json {
            self.held = Some(text.to_string());
            return String::new();
        }
        let shown = self.markers.push(text);
        if self.markers.matched() {
            self.held = Some(self.markers.held().to_string());
        }
        self.shown_any |= !shown.trim().is_empty();
        shown
    }

    /// Pieces of the calls read so far that were not sent yet, in call order.
    fn stream_calls(&mut self) -> Vec<Value> {
        let Some(held) = &self.held else {
            return Vec::new();
        };
        let mut pieces = Vec::new();
        for (index, call) in crate::tools::partial_calls(held).into_iter().enumerate() {
            let Some(name) = call.name.filter(|n| self.tools.has_function(n)) else {
                break;
            };
            if index == self.streamed.len() {
                let id = crate::tools::call_id();
                pieces.push(json!({"index": index, "id": id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}));
                self.streamed.push((id, 0));
            }
            let Some(range) = call.arguments else { break };
            let sent = &mut self.streamed[index].1;
            let from = range.start + *sent;
            if range.end > from {
                pieces.push(
                    json!({"index": index, "function": {"arguments": &held[from..range.end]}}),
                );
                *sent = range.end - range.start;
            }
        }
        pieces
    }

    /// The rest, once the choice has ended, and whether it made tool calls.
    pub fn finish(&mut self, rest: &str) -> (Shown, bool) {
        let mut shown = self.push(rest);
        let Some(held) = self.held.take() else {
            shown.content.push_str(&self.markers.finish());
            return (shown, false);
        };
        let (content, calls) = self.tools.parse(&held);
        if calls.is_empty() && self.streamed.is_empty() {
            // Not a call after all: the held text is content.
            shown.content.push_str(&held);
            return (shown, false);
        }
        shown.content.push_str(&content.unwrap_or_default());
        // What the stream could not follow comes whole: unannounced calls, and arguments not sent.
        for (index, call) in calls.iter().enumerate() {
            if index >= self.streamed.len() {
                let mut head = call.to_openai(Some(index));
                head["function"]["arguments"] = json!("");
                shown.calls.push(head);
            } else if self.streamed[index].1 > 0 {
                continue;
            }
            let rest = json!({"index": index, "function": {"arguments": call.arguments}});
            shown.calls.push(rest);
        }
        (shown, !calls.is_empty())
    }
}

/// One choice's piece of a chunk, for the route to shape.
pub struct Delta<'a> {
    pub index: usize,
    /// Text to show now: stop-sequence prefixes held back, special tokens hidden.
    pub text: String,
    /// The token this delta comes from and its alternatives; none for echoes and last deltas.
    pub token: Option<(&'a Token, &'a [Token])>,
    /// One tool call's piece (OpenAI's `delta.tool_calls[0]`), for chat's last deltas.
    pub tool_call: Option<Value>,
    /// OpenAI's `finish_reason`, on a choice's last delta only.
    pub finish_reason: Option<&'static str>,
}

/// What a stream's chunks carry besides the choices.
pub struct StreamSpec {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub stops: Vec<String>,
    pub include_usage: bool,
    /// Text sent for choice `i` before any token (completions' `echo`); empty for none.
    pub echoes: Vec<String>,
    /// Chat's tools, when the choices may call them.
    pub tools: Option<ToolUse>,
}

/// One SSE message of an OpenAI stream.
#[derive(Debug, PartialEq)]
pub enum Chunk {
    Data(Value),
    Error(RouterError),
    Done,
}

impl Chunk {
    fn into_event(self) -> Event {
        match self {
            Chunk::Data(value) => json_event(&value),
            Chunk::Error(e) => e.to_openai_sse_event(),
            Chunk::Done => Event::default().data("[DONE]"),
        }
    }
}

/// The SSE events of an OpenAI stream; `permit` (the request's concurrency slot) lives as long as it.
pub fn sse_events<F>(
    streams: ChoiceStreams,
    permit: OwnedSemaphorePermit,
    spec: StreamSpec,
    shape: F,
) -> impl Stream<Item = std::result::Result<Event, Infallible>>
where
    F: Fn(Delta) -> Value + Send + 'static,
{
    chunks(streams, spec, shape).map(move |chunk| {
        let _slot = &permit;
        Ok(chunk.into_event())
    })
}

/// The state machine: tokens through each choice's stop buffer, a last delta per choice, then usage
/// and `[DONE]` once every choice ended; the first error (or a stream that ends early) stops it.
pub fn chunks<F>(streams: ChoiceStreams, spec: StreamSpec, shape: F) -> impl Stream<Item = Chunk>
where
    F: Fn(Delta) -> Value + Send + 'static,
{
    let n = streams.len();
    let prompt_tokens = streams.prompt_tokens;
    let envelope = move |choices: Value, usage: Option<Usage>| {
        Chunk::Data(json!({
            "id": spec.id, "object": spec.object, "created": spec.created, "model": spec.model,
            "system_fingerprint": spec.system_fingerprint, "choices": choices, "usage": usage,
        }))
    };
    async_stream::stream! {
        let mut buffers = vec![StopBuffer::new(spec.stops.clone()); n];
        let mut calls: Vec<Option<CallBuffer>> =
            (0..n).map(|_| spec.tools.clone().map(CallBuffer::new)).collect();
        for (index, text) in spec.echoes.iter().enumerate() {
            let delta = Delta { index, text: text.clone(), token: None, tool_call: None, finish_reason: None };
            yield envelope(json!([shape(delta)]), None);
        }
        let mut events = Box::pin(streams.merged());
        let (mut ended, mut completion_tokens) = (0, 0);
        while let Some((index, event)) = events.next().await {
            match event {
                InferEvent::Token { token, top_tokens, .. } => {
                    let text = if token.special { String::new() } else { buffers[index].push(&token.text) };
                    let shown = match &mut calls[index] {
                        Some(c) => c.push(&text),
                        None => Shown { content: text, calls: Vec::new() },
                    };
                    // A token that only adds to a tool call is sent as that call's piece.
                    if !shown.content.is_empty() || shown.calls.is_empty() {
                        let delta = Delta { index, text: shown.content, token: Some((&token, &top_tokens)), tool_call: None, finish_reason: None };
                        yield envelope(json!([shape(delta)]), None);
                    }
                    for piece in shown.calls {
                        let delta = Delta { index, text: String::new(), token: None, tool_call: Some(piece), finish_reason: None };
                        yield envelope(json!([shape(delta)]), None);
                    }
                }
                InferEvent::End(end) => {
                    let rest = buffers[index].finish();
                    let (shown, called) = match &mut calls[index] {
                        Some(c) => c.finish(&rest),
                        None => (Shown { content: rest, calls: Vec::new() }, false),
                    };
                    completion_tokens += end.generated_tokens;
                    let finish_reason = if called { "tool_calls" } else { end.finish_reason.openai() };
                    let has_calls = !shown.calls.is_empty();
                    let text = if has_calls && !shown.content.is_empty() {
                        let delta = Delta { index, text: shown.content, token: None, tool_call: None, finish_reason: None };
                        yield envelope(json!([shape(delta)]), None);
                        String::new()
                    } else {
                        shown.content
                    };
                    for piece in shown.calls {
                        let delta = Delta { index, text: String::new(), token: None, tool_call: Some(piece), finish_reason: None };
                        yield envelope(json!([shape(delta)]), None);
                    }
                    let delta = Delta { index, text, token: None, tool_call: None, finish_reason: Some(finish_reason) };
                    yield envelope(json!([shape(delta)]), None);
                    ended += 1;
                    if ended == n { break; }
                }
                InferEvent::Error(e) => {
                    yield Chunk::Error(e);
                    return;
                }
            }
        }
        if ended < n {
            yield Chunk::Error(RouterError::IncompleteGeneration);
            return;
        }
        if spec.include_usage {
            yield envelope(json!([]), Some(Usage::new(prompt_tokens, completion_tokens)));
        }
        yield Chunk::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FinishReason;
    use crate::batcher::End;
    use std::time::Instant;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

    fn token(text: &str, special: bool) -> InferEvent {
        InferEvent::Token {
            token: Token {
                id: 1,
                text: text.into(),
                logprob: -0.5,
                special,
            },
            top_tokens: Vec::new(),
            prefill: Vec::new(),
        }
    }

    fn end(text: &str, generated_tokens: u32, finish_reason: FinishReason) -> InferEvent {
        InferEvent::End(End {
            text: text.into(),
            generated_tokens,
            finish_reason,
            seed: None,
            queued: Instant::now(),
            started: Instant::now(),
        })
    }

    /// `n` choices whose first events are `firsts`; the senders feed the rest.
    fn choices(firsts: Vec<InferEvent>) -> (ChoiceStreams, Vec<UnboundedSender<InferEvent>>) {
        let mut streams = ChoiceStreams {
            prompt_tokens: 7,
            ..Default::default()
        };
        let mut senders = Vec::new();
        for first in firsts {
            let (tx, rx) = unbounded_channel();
            streams.firsts.push(first);
            streams.receivers.push(rx);
            senders.push(tx);
        }
        (streams, senders)
    }

    fn spec(stops: &[&str], include_usage: bool, echoes: &[&str]) -> StreamSpec {
        StreamSpec {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 42,
            model: "m".into(),
            system_fingerprint: "f".into(),
            stops: stops.iter().map(|s| s.to_string()).collect(),
            include_usage,
            echoes: echoes.iter().map(|s| s.to_string()).collect(),
            tools: None,
        }
    }

    /// Deltas as `(index, text, finish_reason)`, plus the raw chunks.
    fn text_shape(d: Delta) -> Value {
        json!({"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
               "from_token": d.token.is_some()})
    }

    async fn collect(streams: ChoiceStreams, spec: StreamSpec) -> Vec<Chunk> {
        chunks(streams, spec, text_shape).collect().await
    }

    fn choice(chunk: &Chunk) -> (u64, String, Value) {
        let Chunk::Data(v) = chunk else {
            panic!("not data: {chunk:?}")
        };
        let c = &v["choices"][0];
        (
            c["index"].as_u64().unwrap(),
            c["text"].as_str().unwrap().to_string(),
            c["finish_reason"].clone(),
        )
    }

    #[tokio::test]
    async fn two_choices_end_with_usage_then_done() {
        let (streams, senders) = choices(vec![token("Hel", false), token("A", false)]);
        senders[0].send(token("lo", false)).unwrap();
        senders[0].send(token("</s>", true)).unwrap();
        senders[0]
            .send(end("Hello</s>", 3, FinishReason::EosToken))
            .unwrap();
        senders[1].send(end("A", 1, FinishReason::Length)).unwrap();
        drop(senders);
        let out = collect(streams, spec(&[], true, &[])).await;
        assert_eq!(out.last(), Some(&Chunk::Done));
        let Chunk::Data(usage) = &out[out.len() - 2] else {
            panic!("no usage chunk: {out:?}")
        };
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
        );
        let deltas: Vec<_> = out[..out.len() - 2].iter().map(choice).collect();
        // Firsts come first, in choice order; each choice's own events stay in order.
        assert_eq!(deltas[0], (0, "Hel".into(), Value::Null));
        assert_eq!(deltas[1], (1, "A".into(), Value::Null));
        let zero: Vec<_> = deltas.iter().filter(|d| d.0 == 0).collect();
        let texts: String = zero.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(texts, "Hello", "the special token is hidden");
        assert_eq!(zero.last().unwrap().2, json!("stop"));
        let one = deltas.iter().rfind(|d| d.0 == 1).unwrap();
        assert_eq!(one.2, json!("length"));
        let Chunk::Data(first) = &out[0] else {
            unreachable!()
        };
        assert_eq!(first["object"], "text_completion");
        assert_eq!(first["usage"], Value::Null);
    }

    #[tokio::test]
    async fn stop_sequence_is_held_back_and_trimmed() {
        let (streams, senders) = choices(vec![token("ok E", false)]);
        senders[0].send(token("N", false)).unwrap();
        senders[0].send(token("D", false)).unwrap();
        senders[0]
            .send(end("ok END", 3, FinishReason::StopSequence))
            .unwrap();
        drop(senders);
        let out = collect(streams, spec(&["END"], false, &["echo "])).await;
        assert_eq!(out.last(), Some(&Chunk::Done));
        let deltas: Vec<_> = out[..out.len() - 1].iter().map(choice).collect();
        assert_eq!(deltas[0], (0, "echo ".into(), Value::Null));
        let shown: String = deltas.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(shown, "echo ok ");
        assert_eq!(deltas.last().unwrap().2, json!("stop"));
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_without_done() {
        let (streams, senders) = choices(vec![token("a", false), token("b", false)]);
        senders[1]
            .send(InferEvent::Error(RouterError::Generation("boom".into())))
            .unwrap();
        let out = collect(streams, spec(&[], true, &[])).await;
        assert_eq!(
            out.last(),
            Some(&Chunk::Error(RouterError::Generation("boom".into())))
        );
        assert!(!out.contains(&Chunk::Done));
        drop(senders);
    }

    #[tokio::test]
    async fn a_choice_that_never_ends_is_an_incomplete_generation() {
        let (streams, senders) = choices(vec![token("a", false)]);
        drop(senders);
        let out = collect(streams, spec(&[], false, &[])).await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], Chunk::Error(RouterError::IncompleteGeneration));
    }

    #[test]
    fn stop_buffer_never_shows_the_stop_sequence() {
        let mut b = StopBuffer::new(vec!["END".into()]);
        let mut shown = String::new();
        for piece in ["Hello E", "N", "D"] {
            shown.push_str(&b.push(piece));
        }
        shown.push_str(&b.finish());
        assert_eq!(shown, "Hello ");
        let mut b = StopBuffer::new(vec!["END".into()]);
        let mut shown = b.push("an E");
        shown.push_str(&b.push("lephant"));
        shown.push_str(&b.finish());
        assert_eq!(shown, "an Elephant");
        // The stop inside one token with more text after it: nothing from the stop on shows.
        let mut b = StopBuffer::new(vec!["END".into()]);
        let mut shown = b.push("done: EN");
        shown.push_str(&b.push("D. And more"));
        shown.push_str(&b.push(" text"));
        shown.push_str(&b.finish());
        assert_eq!(shown, "done: ");
        let mut b = StopBuffer::new(vec!["\n".into()]);
        assert_eq!(b.push("a.\n\nb"), "a.");
        assert_eq!(b.finish(), "");
    }

    fn tools(choice: Value) -> ToolUse {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        ToolUse::from_request(Some(&tools), Some(&choice), None)
            .unwrap()
            .unwrap()
    }

    /// Streams `pieces` through a call buffer: (content shown, call pieces, made calls).
    fn through_calls(choice: Value, pieces: &[&str]) -> (String, Vec<Value>, bool) {
        let mut b = CallBuffer::new(tools(choice));
        let (mut content, mut calls) = (String::new(), Vec::new());
        for p in pieces {
            let shown = b.push(p);
            content.push_str(&shown.content);
            calls.extend(shown.calls);
        }
        let (rest, called) = b.finish("");
        content.push_str(&rest.content);
        calls.extend(rest.calls);
        (content, calls, called)
    }

    /// The arguments the pieces of call `index` add up to (what the SDK reassembles).
    fn arguments(pieces: &[Value], index: u64) -> String {
        pieces
            .iter()
            .filter(|p| p["index"] == index)
            .filter_map(|p| p["function"]["arguments"].as_str())
            .collect()
    }

    #[test]
    fn call_buffer_shows_text_and_streams_calls() {
        let (shown, calls, called) = through_calls(json!("auto"), &["It is", " sunny."]);
        assert_eq!(
            (shown.as_str(), calls.len(), called),
            ("It is sunny.", 0, false)
        );
        let (shown, calls, called) = through_calls(
            json!("auto"),
            &[
                "Checking. <tool",
                "_call>{\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\"",
                ": \"Oslo\"}}</tool_call>",
            ],
        );
        assert_eq!(shown, "Checking. ");
        assert!(called);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["id"].as_str().unwrap().len(), 9);
        assert!(
            calls.len() > 2,
            "the arguments come in pieces as written: {calls:?}"
        );
        assert_eq!(arguments(&calls, 0), r#"{"city": "Oslo"}"#);
        let (shown, calls, called) = through_calls(
            json!("required"),
            &["{\"name\": \"get_weather\", \"arguments\": {}}"],
        );
        assert_eq!(
            (shown.as_str(), arguments(&calls, 0).as_str(), called),
            ("", "{}", true)
        );
        // A list of calls; the second writes its arguments as a string, so it comes whole at the end.
        let (_, calls, _) = through_calls(
            json!("required"),
            &[
                "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}, ",
                "{\"name\": \"get_weather\", \"arguments\": \"{}\"}]",
            ],
        );
        assert_eq!(arguments(&calls, 0), r#"{"city": "A"}"#);
        assert_eq!(arguments(&calls, 1), "{}");
        // JSON that is no call is content after all, and so is a "call" of no declared function.
        let (shown, calls, _) = through_calls(json!("auto"), &["{\"city\"", ": 1}"]);
        assert_eq!((shown.as_str(), calls.len()), ("{\"city\": 1}", 0));
        let not_a_tool = "{\"name\": \"Paris\", \"arguments\": {}}";
        let (shown, calls, called) = through_calls(json!("auto"), &[not_a_tool]);
        assert_eq!(
            (shown.as_str(), calls.len(), called),
            (not_a_tool, 0, false)
        );
    }
}
