//! The one async loop driving the shards: it owns the scheduler, runs each step's RPC on every shard and
//! delivers each request's events on its own channel (tokens, then exactly one end). `Infer` is the
//! handle the HTTP side uses: admission (429), submission, health.
//!
//! When the shard processes die (the launcher restarts them), every request is held — put back in the
//! queue with what it generated — until the restarted shards answer Warmup (`rejoin.rs`); then each
//! resumes where it stopped. Requests held past the RPC deadline fail instead.
//!
//! Health is the batcher's own record (`health.rs`), read by `/health` without touching the shards: the
//! last forward or Health RPC succeeded, no step has run past its deadline, the loop is alive, and the
//! server is not draining. The real check (the Health RPC, a tiny forward) runs here, between steps, when
//! the loop is idle — so it never waits behind a forward and never reorders the ranks' collectives.

use crate::api::{FinishReason, PrefillToken, Token};
use crate::client::{ForwardResult, ShardedClient};
use crate::error::{Result, RouterError};
use crate::health::{Health, IDLE_HEALTH_INTERVAL, UNHEALTHY_RETRY};
use crate::metrics as m;
use crate::rejoin::{shards_lost, Rejoin};
use crate::scheduler::{Event, NewRequest, Outcome, Scheduler, Step};
use crate::validation::ValidRequest;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_proto::v3::{self, Generation, Tokens};
use tessera_proto::RequestId;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

mod outage;

/// What a request's channel carries.
#[derive(Debug)]
pub enum InferEvent {
    Token {
        token: Token,
        top_tokens: Vec<Token>,
        /// Prompt tokens with logprobs, on the first token only and only when asked for.
        prefill: Vec<PrefillToken>,
    },
    End(End),
    Error(RouterError),
}

/// The last event of a successful request.
#[derive(Debug, Clone)]
pub struct End {
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
    pub queued: Instant,
    pub started: Instant,
}

/// A whole generation (non-streaming routes).
#[derive(Debug, Clone)]
pub struct Generated {
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    pub end: Option<End>,
    pub input_length: u32,
    /// When validation finished (the queue time starts here).
    pub validated: Instant,
}

impl Default for Generated {
    fn default() -> Self {
        Generated {
            prefill: Vec::new(),
            tokens: Vec::new(),
            top_tokens: Vec::new(),
            end: None,
            input_length: 0,
            validated: Instant::now(),
        }
    }
}

impl Generated {
    /// The end event; `generate` only returns `Ok` with one.
    pub fn end(&self) -> &End {
        self.end.as_ref().expect("a finished generation has an end")
    }

    /// Mean logprob of the generated tokens (how `best_of` ranks sequences).
    pub fn mean_logprob(&self) -> f32 {
        let n = self.tokens.len().max(1) as f32;
        self.tokens
            .iter()
            .map(|t| t.logprob)
            .filter(|l| l.is_finite())
            .sum::<f32>()
            / n
    }
}

struct Command {
    request: ValidRequest,
    tx: UnboundedSender<InferEvent>,
    span: tracing::Span,
}

/// A request in flight, as the batcher tracks it.
struct Tracked {
    tx: UnboundedSender<InferEvent>,
    arrived: Instant,
    queued: Instant,
    started: Option<Instant>,
    last_token: Option<Instant>,
    input_length: u32,
    /// Admission priority (label of the per-priority queue time).
    priority: i32,
    span: tracing::Span,
}

/// The HTTP side's handle on the batcher.
#[derive(Clone)]
pub struct Infer {
    commands: UnboundedSender<Command>,
    limiter: Arc<Semaphore>,
    health: Arc<Health>,
}

impl Infer {
    /// Start the batching loop. `kv_capacity` is the most tokens (prompt + generation) one request can
    /// ever hold in the KV cache; a request needing more is refused at once instead of waiting forever.
    pub fn spawn(
        scheduler: Scheduler,
        client: ShardedClient,
        max_concurrent_requests: usize,
        kv_capacity: KvCapacity,
        rejoin: Rejoin,
    ) -> Self {
        let (commands, rx) = unbounded_channel();
        // A step may take the RPC deadline and a FilterBatch or ClearCache after it; past twice that, the
        // loop itself is stuck.
        let step_deadline = client
            .rpc_timeout()
            .map_or(Duration::MAX, |t| t.saturating_mul(2));
        let health = Arc::new(Health::new(step_deadline));
        let batcher = Batcher {
            scheduler,
            client,
            commands: rx,
            requests: HashMap::new(),
            next_id: 0,
            health: health.clone(),
            kv_capacity,
            last_check: Instant::now(),
            rejoin,
        };
        tokio::spawn(batcher.run());
        Infer {
            commands,
            limiter: Arc::new(Semaphore::new(max_concurrent_requests)),
            health,
        }
    }

    /// A slot among `max_concurrent_requests`, held for the life of the response.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit> {
        self.limiter
            .clone()
            .try_acquire_owned()
            .map_err(|_| RouterError::Overloaded)
    }

    /// Queue a validated request; dropping the receiver cancels it.
    pub fn submit(
        &self,
        request: ValidRequest,
        span: tracing::Span,
    ) -> UnboundedReceiver<InferEvent> {
        let (tx, rx) = unbounded_channel();
        // The batcher lives as long as the process; if it is gone the receiver just ends.
        let _ = self.commands.send(Command { request, tx, span });
        rx
    }

    /// Run a request to its end and collect everything it produced.
    pub async fn generate(&self, request: ValidRequest, span: tracing::Span) -> Result<Generated> {
        let input_length = request.input_ids.len() as u32;
        let validated = Instant::now();
        let mut rx = self.submit(request, span);
        let mut generated = Generated {
            input_length,
            validated,
            ..Default::default()
        };
        while let Some(event) = rx.recv().await {
            match event {
                InferEvent::Token {
                    token,
                    top_tokens,
                    prefill,
                } => {
                    if !prefill.is_empty() {
                        generated.prefill = prefill;
                    }
                    generated.tokens.push(token);
                    generated.top_tokens.push(top_tokens);
                }
                InferEvent::End(end) => {
                    generated.end = Some(end);
                    return Ok(generated);
                }
                InferEvent::Error(e) => return Err(e),
            }
        }
        Err(RouterError::IncompleteGeneration)
    }

    /// The batcher's health record, read without waiting on the shards: `Unhealthy` when the last shard
    /// call failed, a step is stuck past its deadline, the batching loop is gone, or the server drains.
    pub fn health(&self) -> Result<()> {
        let problem = match self.commands.is_closed() {
            true => Some("the batching loop has stopped".to_string()),
            false => self.health.problem(),
        };
        match problem {
            None => Ok(()),
            Some(why) => {
                // The batcher logs each change of state; probes repeat every few seconds.
                tracing::debug!("/health: unhealthy: {why}");
                Err(RouterError::Unhealthy)
            }
        }
    }

    /// From now on `/health` answers 503 (the server is shutting down).
    pub fn start_draining(&self) {
        self.health.start_draining();
    }
}

/// The KV cache as one request sees it: blocks of `block_size` tokens, block 0 reserved for the Health
/// forward, `speculate` extra positions per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCapacity {
    pub num_blocks: u32,
    pub block_size: u32,
    pub speculate: u32,
}

impl KvCapacity {
    /// The most prompt + generated tokens one request can hold: the scheduler reserves
    /// `ceil((total + speculate - 1) / block_size)` blocks of the `num_blocks - 1` it hands out.
    pub fn max_request_tokens(&self) -> u32 {
        let usable = u64::from(self.num_blocks.saturating_sub(1)) * u64::from(self.block_size);
        (usable + 1)
            .saturating_sub(u64::from(self.speculate))
            .min(u64::from(u32::MAX)) as u32
    }
}

struct Batcher {
    scheduler: Scheduler,
    client: ShardedClient,
    commands: UnboundedReceiver<Command>,
    requests: HashMap<RequestId, Tracked>,
    next_id: u64,
    health: Arc<Health>,
    kv_capacity: KvCapacity,
    /// When the shards last proved healthy or were last checked (a forward or the Health RPC).
    last_check: Instant,
    rejoin: Rejoin,
}

impl Batcher {
    async fn run(mut self) {
        let mut stalled = false;
        loop {
            // 1. With nothing to do, sleep until a request arrives, checking the shards now and then.
            if self.scheduler.is_idle() || stalled {
                let Some(command) = self.wait_idle().await else {
                    return;
                };
                self.enqueue(command);
            }
            // 2. Take every other request that arrived meanwhile.
            while let Ok(command) = self.commands.try_recv() {
                self.enqueue(command);
            }
            // 3. Drop requests whose client went away (their blocks are freed now).
            self.cancel_disconnected();
            // 4. Ask the scheduler for the next shard RPC.
            let step = self.scheduler.schedule(Instant::now());
            stalled = step.is_none();
            if let Some(step) = step {
                // 5. Run it on every shard, in a span the shards continue.
                let span = self.step_span(&step);
                self.health.step_started(step_name(&step));
                let outcome = match self.execute(&step).instrument(span).await {
                    Outcome::Failed(e) if shards_lost(&e) => {
                        tracing::error!("{} failed: {e}", step_name(&step));
                        Outcome::ShardsLost
                    }
                    outcome => outcome,
                };
                self.health.step_finished();
                self.record_health(&step, &outcome);
                // 6. Feed the result back; deliver each request's events.
                let delivering = Instant::now();
                let lost = matches!(outcome, Outcome::ShardsLost);
                for event in self.scheduler.update(outcome) {
                    self.deliver(event);
                }
                // 7. Shards gone: hold every request until they are back.
                if lost {
                    self.await_shards().await;
                }
                let method = match step {
                    Step::Prefill { .. } => Some("prefill"),
                    Step::Decode { .. } => Some("decode"),
                    _ => None,
                };
                if let Some(method) = method {
                    metrics::histogram!(m::BATCH_FILTER_DURATION, "method" => method)
                        .record(delivering.elapsed().as_secs_f64());
                }
            }
            // 8. Publish the gauges.
            self.publish_gauges();
        }
    }

    /// The next command; while none comes, the Health RPC every `IDLE_HEALTH_INTERVAL` (every
    /// `UNHEALTHY_RETRY` while unhealthy). `None` once every `Infer` is gone.
    async fn wait_idle(&mut self) -> Option<Command> {
        loop {
            let every = match self.health.is_ok() {
                true => IDLE_HEALTH_INTERVAL,
                false => UNHEALTHY_RETRY,
            };
            let due = self.last_check + every;
            match tokio::time::timeout_at(due.into(), self.commands.recv()).await {
                Ok(command) => return command,
                Err(_) => self.check_health().await,
            }
        }
    }

    async fn check_health(&mut self) {
        self.health.step_started("Health");
        let outcome = self.client.health().await;
        self.health.step_finished();
        self.last_check = Instant::now();
        let lost = outcome.as_ref().is_err_and(shards_lost);
        self.health.record(outcome.map_err(|e| e.to_string()));
        if lost {
            self.scheduler.update_idle_loss();
            self.await_shards().await;
        }
    }

    /// A forward that succeeded proves the shards healthy; any failed step but a request's own invalid
    /// argument (isolated to it, the shards are fine) marks them unhealthy until the next success.
    fn record_health(&mut self, step: &Step, outcome: &Outcome) {
        match outcome {
            Outcome::Failed(RouterError::Shard(s)) if s.code == tonic::Code::InvalidArgument => {}
            Outcome::Failed(e) => {
                self.last_check = Instant::now();
                self.health.record(Err(format!("{}: {e}", step_name(step))));
            }
            Outcome::Forward { .. } => {
                self.last_check = Instant::now();
                self.health.record(Ok(()));
            }
            _ => {}
        }
    }

    fn enqueue(&mut self, Command { request, tx, span }: Command) {
        // The one admission check the scheduler cannot recover from: a request larger than the whole KV
        // cache would wait at the queue head forever and block everything behind it. Validation caps
        // `max_total_tokens` to the same capacity at startup, so this only fires if they disagree.
        let input_length = request.input_ids.len() as u32;
        let max_new_tokens = request.stopping.max_new_tokens;
        let capacity = self.kv_capacity.max_request_tokens();
        if u64::from(input_length) + u64::from(max_new_tokens) > u64::from(capacity) {
            let error = RouterError::MaxTotalTokens(capacity, input_length, max_new_tokens);
            span.in_scope(|| tracing::warn!("refused: {error}"));
            let _ = tx.send(InferEvent::Error(error));
            return;
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        span.record("request_id", id.0);
        let now = Instant::now();
        let tracked = Tracked {
            tx,
            arrived: request.arrived,
            queued: now,
            started: None,
            last_token: None,
            input_length: request.input_ids.len() as u32,
            priority: request.priority,
            span,
        };
        self.requests.insert(id, tracked);
        self.scheduler.enqueue(new_request(id, request), now);
    }

    fn cancel_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, t)| t.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.drop_request(id);
        }
    }

    fn drop_request(&mut self, id: RequestId) {
        if let Some(tracked) = self.requests.remove(&id) {
            tracked
                .span
                .in_scope(|| tracing::info!("client disconnected; request cancelled"));
        }
        self.scheduler.cancel(id);
        metrics::counter!(m::REQUEST_FAILURE, "err" => "dropped").increment(1);
    }

    /// The span of one shard RPC; the client's interceptor hands its context to the shards.
    ///
    /// One forward serves many requests, but a span has one parent. The span is a child of one
    /// request of the batch — for a prefill the first newly admitted one (the request that prefill
    /// is there for), otherwise the first still running — so that request's trace runs unbroken from
    /// its HTTP span through the router into the shards' spans. Every other request of the batch is
    /// linked (`follows_from`, an OpenTelemetry link), so each request's trace still points at every
    /// forward it rode in without one span per request per step.
    fn step_span(&self, step: &Step) -> tracing::Span {
        let (method, first, ids): (&str, Option<u64>, Vec<u64>) = match step {
            Step::Prefill {
                batch,
                cached,
                admitted,
            } => {
                let mut ids: Vec<u64> = batch.requests.iter().map(|r| r.id).collect();
                ids.extend(cached.iter().flat_map(|c| c.request_ids.iter().copied()));
                ("prefill", admitted.first().map(|(id, _)| id.0), ids)
            }
            Step::Decode { batches } => {
                let ids = batches.iter().flat_map(|b| b.request_ids.iter().copied());
                ("decode", None, ids.collect())
            }
            Step::Filter { request_ids, .. } => ("filter_batch", None, request_ids.clone()),
            // Every request of a cleared batch is gone: nothing to continue.
            Step::Clear { .. } => return tracing::Span::none(),
        };
        let batch_size = ids.len();
        let mut tracked = first
            .into_iter()
            .chain(ids)
            .filter_map(|id| Some((id, &self.requests.get(&RequestId(id))?.span)));
        let Some((parent_id, parent)) = tracked.next() else {
            return tracing::info_span!(parent: None, "shard_rpc", otel.name = method, batch_size);
        };
        let span = tracing::info_span!(parent: parent, "shard_rpc", otel.name = method, batch_size);
        for (id, request) in tracked {
            if id != parent_id {
                span.follows_from(request);
            }
        }
        span
    }

    async fn execute(&mut self, step: &Step) -> Outcome {
        match step {
            Step::Prefill {
                batch,
                cached,
                admitted,
            } => {
                self.on_admitted(batch, cached.is_some(), admitted);
                let result = self.client.prefill(batch.clone(), cached.clone());
                forward_outcome("prefill", result).await
            }
            Step::Decode { batches } => {
                forward_outcome("decode", self.client.decode(batches.clone())).await
            }
            Step::Filter {
                batch_id,
                request_ids,
            } => {
                match self
                    .client
                    .filter_batch(*batch_id, request_ids.clone())
                    .await
                {
                    Ok(batch) => Outcome::Filtered(batch),
                    Err(e) => Outcome::Failed(e),
                }
            }
            Step::Clear { batch_id } => {
                if let Err(e) = self.client.clear_cache(Some(*batch_id)).await {
                    tracing::warn!("ClearCache({batch_id}) failed: {e}");
                }
                Outcome::Cleared
            }
        }
    }

    fn on_admitted(&mut self, batch: &v3::Batch, merged: bool, admitted: &[(RequestId, Duration)]) {
        let now = Instant::now();
        for (id, waited) in admitted {
            if let Some(tracked) = self.requests.get_mut(id) {
                tracked.started = Some(now);
                metrics::histogram!(m::QUEUE_DURATION_BY_PRIORITY, "priority" => tracked.priority.to_string())
                    .record(waited.as_secs_f64());
            }
            metrics::histogram!(m::REQUEST_QUEUE_DURATION).record(waited.as_secs_f64());
        }
        metrics::histogram!(m::BATCH_NEXT_SIZE).record(batch.requests.len() as f64);
        if self.scheduler.stats().running > batch.requests.len() {
            let reason = if merged { "chunking" } else { "backpressure" };
            metrics::counter!(m::BATCH_CONCAT, "reason" => reason).increment(1);
        }
        let cached: u64 = batch.requests.iter().map(|r| r.cache_len as u64).sum();
        let prompt: u64 = admitted
            .iter()
            .filter_map(|(id, _)| self.requests.get(id))
            .map(|t| t.input_length as u64)
            .sum();
        metrics::counter!(m::PREFIX_CACHE_HIT_TOKENS).increment(cached);
        metrics::counter!(m::PREFIX_CACHE_PROMPT_TOKENS).increment(prompt);
    }

    fn deliver(&mut self, event: Event) {
        match event {
            Event::Generation(generation) => self.deliver_generation(*generation),
            Event::Failed { id, error } => {
                metrics::counter!(m::REQUEST_FAILURE, "err" => error.metric_label()).increment(1);
                if let Some(tracked) = self.requests.remove(&id) {
                    tracked
                        .span
                        .in_scope(|| tracing::error!("generation failed: {error}"));
                    let _ = tracked.tx.send(InferEvent::Error(error));
                }
            }
        }
    }

    fn deliver_generation(&mut self, generation: Generation) {
        let id = RequestId(generation.request_id);
        let Some(tracked) = self.requests.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        // TGI's `tgi_request_skipped_tokens`: tokens past the first in one step are accepted speculative
        // ones (0 while the shards do not speculate).
        let step_tokens = generation.tokens.as_ref().map_or(0, |t| t.ids.len());
        metrics::histogram!(m::REQUEST_SKIPPED_TOKENS).record(step_tokens.saturating_sub(1) as f64);
        let tokens = to_tokens(generation.tokens.as_ref());
        let mut prefill = to_prefill(generation.prefill_tokens.as_ref());
        for (i, token) in tokens.into_iter().enumerate() {
            match tracked.last_token {
                None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                    .record((now - tracked.arrived).as_secs_f64()),
                Some(last) => {
                    metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64())
                }
            }
            tracked.last_token = Some(now);
            let top_tokens = to_tokens(generation.top_tokens.get(i));
            let event = InferEvent::Token {
                token,
                top_tokens,
                prefill: std::mem::take(&mut prefill),
            };
            if tracked.tx.send(event).is_err() {
                self.drop_request(id);
                return;
            }
        }
        let Some(done) = generation.generated_text else {
            return;
        };
        let tracked = self.requests.remove(&id).expect("tracked above");
        let started = tracked.started.unwrap_or(tracked.queued);
        record_success(&tracked, started, done.generated_tokens);
        let finish_reason = FinishReason::from_proto(done.finish_reason);
        tracked.span.in_scope(|| {
            tracing::info!(
                generated_tokens = done.generated_tokens,
                ?finish_reason,
                "request finished"
            )
        });
        let end = End {
            text: done.text,
            generated_tokens: done.generated_tokens,
            finish_reason,
            seed: done.seed,
            queued: tracked.queued,
            started,
        };
        let _ = tracked.tx.send(InferEvent::End(end));
    }

    fn publish_gauges(&self) {
        let stats = self.scheduler.stats();
        metrics::gauge!(m::QUEUE_SIZE).set(stats.queued as f64);
        metrics::gauge!(m::BATCH_CURRENT_SIZE).set(stats.running as f64);
        metrics::gauge!(m::BATCH_CURRENT_MAX_TOKENS).set(stats.max_tokens as f64);
        metrics::gauge!(m::KV_BLOCKS_USED).set(stats.blocks_used as f64);
        metrics::gauge!(m::KV_BLOCKS_FREE).set(stats.blocks_free as f64);
        metrics::counter!(m::PREEMPTIONS).absolute(stats.preemptions);
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Prefill { .. } => "Prefill",
        Step::Decode { .. } => "Decode",
        Step::Filter { .. } => "FilterBatch",
        Step::Clear { .. } => "ClearCache",
    }
}

fn record_success(tracked: &Tracked, started: Instant, generated_tokens: u32) {
    let inference = started.elapsed().as_secs_f64();
    metrics::counter!(m::REQUEST_SUCCESS).increment(1);
    metrics::histogram!(m::REQUEST_DURATION).record(tracked.arrived.elapsed().as_secs_f64());
    metrics::histogram!(m::REQUEST_INFERENCE_DURATION).record(inference);
    metrics::histogram!(m::REQUEST_GENERATED_TOKENS).record(generated_tokens as f64);
    if generated_tokens > 0 {
        metrics::histogram!(m::REQUEST_MEAN_TIME_PER_TOKEN)
            .record(inference / generated_tokens as f64);
    }
}

async fn forward_outcome(
    method: &'static str,
    call: impl std::future::Future<Output = Result<ForwardResult>>,
) -> Outcome {
    let start = Instant::now();
    metrics::counter!(m::BATCH_INFERENCE_COUNT, "method" => method).increment(1);
    match call.await {
        Ok(result) => {
            metrics::counter!(m::BATCH_INFERENCE_SUCCESS, "method" => method).increment(1);
            metrics::histogram!(m::BATCH_INFERENCE_DURATION, "method" => method)
                .record(start.elapsed().as_secs_f64());
            let t = result.timings;
            metrics::histogram!(m::BATCH_FORWARD_DURATION, "method" => method)
                .record(t.forward_ns as f64 / 1e9);
            metrics::histogram!(m::BATCH_DECODE_DURATION, "method" => method)
                .record(t.decode_ns as f64 / 1e9);
            if let Some(concat) = t.concat_ns {
                metrics::histogram!(m::BATCH_CONCAT_DURATION, "method" => method)
                    .record(concat as f64 / 1e9);
            }
            Outcome::Forward {
                generations: result.generations,
                batch: result.batch,
            }
        }
        Err(e) => {
            metrics::counter!(m::BATCH_INFERENCE_FAILURE, "method" => method).increment(1);
            tracing::error!("{method} failed: {e}");
            Outcome::Failed(e)
        }
    }
}

fn new_request(id: RequestId, r: ValidRequest) -> NewRequest {
    let request = v3::Request {
        id: id.0,
        inputs: r.inputs.clone(),
        input_chunks: Some(v3::Input {
            chunks: vec![v3::InputChunk {
                chunk: Some(v3::input_chunk::Chunk::Text(r.inputs)),
            }],
        }),
        truncate: r.truncate,
        parameters: Some(r.parameters),
        stopping_parameters: Some(r.stopping.clone()),
        prefill_logprobs: r.decoder_input_details,
        top_n_tokens: r.top_n_tokens,
        add_special_tokens: r.add_special_tokens,
        ..Default::default()
    };
    NewRequest {
        id,
        input_ids: r.input_ids,
        max_new_tokens: r.stopping.max_new_tokens,
        prefill_logprobs: r.decoder_input_details,
        priority: r.priority,
        generated: Vec::new(),
        preemptions: 0,
        request,
    }
}

fn to_tokens(tokens: Option<&Tokens>) -> Vec<Token> {
    let Some(t) = tokens else { return Vec::new() };
    (0..t.ids.len())
        .map(|i| Token {
            id: t.ids[i],
            text: t.texts.get(i).cloned().unwrap_or_default(),
            logprob: t.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: t.is_special.get(i).copied().unwrap_or(false),
        })
        .collect()
}

fn to_prefill(tokens: Option<&Tokens>) -> Vec<PrefillToken> {
    to_tokens(tokens)
        .into_iter()
        .map(|t| PrefillToken {
            id: t.id,
            text: t.text,
            logprob: t.logprob.is_finite().then_some(t.logprob),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_request_fills_exactly_the_usable_blocks() {
        for (num_blocks, block_size, speculate) in
            [(128, 16, 0), (128, 16, 2), (2, 1, 0), (10, 7, 3)]
        {
            let kv = KvCapacity {
                num_blocks,
                block_size,
                speculate,
            };
            let max = kv.max_request_tokens();
            // The scheduler reserves ceil((total + speculate - 1) / block_size) of num_blocks - 1.
            let blocks = |total: u32| (total + speculate - 1).div_ceil(block_size);
            assert!(blocks(max) < num_blocks, "{kv:?}");
            assert!(blocks(max + 1) > num_blocks - 1, "{kv:?}");
        }
        let none = KvCapacity {
            num_blocks: 0,
            block_size: 16,
            speculate: 4,
        };
        assert_eq!(none.max_request_tokens(), 0);
    }
}
