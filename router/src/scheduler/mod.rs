//! The continuous-batching scheduler: a pure, synchronous state machine (vLLM v1's split of scheduler and
//! executor, TGI v3's batching rules). `schedule(now)` says which shard RPC to run next; `update(outcome)`
//! takes its result and returns per-request events. No tokio, no gRPC, no clock inside.
//!
//! Invariants: every running request holds KV blocks for every token the next forward feeds it
//! (`KvAllocation::OnDemand`: what it has computed plus the next step, grown before each forward and
//! granted to the shards with it; `UpFront`: prompt + max_new_tokens, as TGI) until it finishes,
//! fails, is cancelled or is preempted; the shards' batches never hold a request the scheduler has
//! dropped when a forward runs (Filter and Clear steps come first); requests are admitted in queue
//! order (arrival, or priority then arrival) under a token budget, chunking the last one. A head whose
//! KV does not fit yet lets later requests that fit go first at most `MAX_BYPASS` times, then waits
//! alone: small requests are not held behind a large one, and the large one is not starved.
//!
//! Preemption: when a running request cannot grow, the least important running request (highest
//! priority value under the priority policy, then latest arrival) gives its blocks back — its
//! computed KV into the prefix cache — and returns to the queue at its arrival place with the tokens
//! it generated; readmitted, the shards recompute its context and continue where it stopped.

mod blocks;
mod preemption;
mod queue;
mod radix;
#[cfg(test)]
mod tests;

pub use blocks::{Allocation, BlockAllocator, BlockId, BlockPool, KvBlock};
pub use queue::{KvAllocation, NewRequest, SchedulingPolicy};
pub use radix::{PrefixCache, PrefixLease};

use crate::error::RouterError;
use queue::{Queue, Waiting};

/// How many admissions may pass over a head request whose KV blocks are not free yet.
pub const MAX_BYPASS: u32 = 16;
/// How deep into the queue an admission looks for a request that fits, past the head.
const BYPASS_WINDOW: usize = 64;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tessera_proto::v3::{Batch, CachedBatch, Generation};
use tessera_proto::RequestId;

/// What the scheduler needs to know about the shards and the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub block_size: u32,
    /// KV blocks the shards hold (block 0 included: it is reserved for health).
    pub num_blocks: u32,
    /// Tokens computed in one forward (prefill chunks plus, when chunking, decode tokens).
    pub max_batch_prefill_tokens: u32,
    pub max_batch_size: Option<usize>,
    /// The shard merges a new prefill into the running batch (`Prefill(new, cached)`).
    pub support_chunking: bool,
    pub prefix_caching: bool,
    pub speculate: u32,
    /// Non-chunking only: see TGI's `waiting_served_ratio` / `max_waiting_tokens`.
    pub waiting_served_ratio: f32,
    pub max_waiting_tokens: usize,
    pub policy: SchedulingPolicy,
    pub kv_allocation: KvAllocation,
}

/// The next shard RPC.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Prefill `batch`; with `cached`, merged into the running batch in one forward.
    Prefill {
        batch: Batch,
        cached: Option<CachedBatch>,
        /// Requests admitted by this step and how long each waited.
        admitted: Vec<(RequestId, Duration)>,
    },
    Decode {
        batches: Vec<CachedBatch>,
    },
    /// Keep only `request_ids` in the shards' batch.
    Filter {
        batch_id: u64,
        request_ids: Vec<u64>,
    },
    /// Drop a batch from the shards.
    Clear {
        batch_id: u64,
    },
}

/// The result of running a step.
#[derive(Debug, Clone)]
pub enum Outcome {
    Forward {
        generations: Vec<Generation>,
        batch: Option<CachedBatch>,
    },
    Filtered(Option<CachedBatch>),
    Cleared,
    /// The RPC failed; the error goes to every request it involved.
    Failed(RouterError),
    /// The shards are gone (a process died): every running request goes back to the queue with what
    /// it generated, to resume once the shards are back; nothing they held (batches, cached
    /// prefixes) exists any more.
    ShardsLost,
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Tokens; the request is finished when `generated_text` is set.
    Generation(Box<Generation>),
    Failed {
        id: RequestId,
        error: RouterError,
    },
}

/// Gauges for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub queued: usize,
    pub running: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    pub max_tokens: u32,
    /// Running requests preempted since start.
    pub preemptions: u64,
}

#[derive(Debug)]
struct Running {
    request: NewRequest,
    allocation: Allocation,
    /// The shard has computed the whole prompt (a token came back), so its KV is cacheable.
    prefilled: bool,
    /// Every token generated so far, those of earlier runs included.
    generated: Vec<u32>,
    /// Leading blocks of `allocation` the shards hold; the rest go with the next forward.
    granted: usize,
}

/// The step whose outcome `update` is waiting for.
#[derive(Debug)]
struct Pending {
    /// Batches the step consumed (the shards replace them with the returned one).
    consumed: Vec<u64>,
    /// Batch a non-merged prefill creates.
    created: Option<u64>,
    /// Requests the step involved.
    involved: Vec<RequestId>,
    /// A failed Clear is not retried (that could loop forever); the batch id is never reused.
    is_clear: bool,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    queue: Queue,
    allocator: BlockAllocator,
    running: HashMap<RequestId, Running>,
    /// The shards' batches holding `running` requests (two between a non-merged prefill and its decode).
    batches: Vec<CachedBatch>,
    pending: Option<Pending>,
    next_batch_id: u64,
    /// Decode steps since the last admission (non-chunking fairness rule).
    waiting_steps: usize,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let allocator =
            BlockAllocator::new(config.num_blocks, config.block_size, config.prefix_caching);
        Scheduler {
            queue: Queue::new(config.policy),
            config,
            allocator,
            running: HashMap::new(),
            batches: Vec::new(),
            pending: None,
            next_batch_id: 0,
            waiting_steps: 0,
            preemptions: 0,
        }
    }

    pub fn enqueue(&mut self, request: NewRequest, now: Instant) {
        self.queue.push(request, now);
    }

    /// Whether any work (waiting, running, or a step in flight) remains.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty() && self.batches.is_empty()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            queued: self.queue.len(),
            running: self.running.len(),
            blocks_used: self.allocator.used_blocks(),
            blocks_free: self.allocator.free_blocks(),
            max_tokens: self.batches.iter().map(|b| b.max_tokens).sum(),
            preemptions: self.preemptions,
        }
    }

    /// A client went away: forget the request and free its blocks. The shards' batch is filtered at the
    /// next step. Returns false when the request is unknown (already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if self.queue.remove(id) {
            return true;
        }
        self.finish(id)
    }

    fn finish(&mut self, id: RequestId) -> bool {
        let Some(running) = self.running.remove(&id) else {
            return false;
        };
        self.release(running, false);
        true
    }

    /// The next RPC to run, or `None` when there is nothing to do.
    pub fn schedule(&mut self, now: Instant) -> Option<Step> {
        assert!(
            self.pending.is_none(),
            "schedule() called before update() of the previous step"
        );
        self.grow_running(now);
        let step = self
            .cleanup_step()
            .or_else(|| self.admit(now))
            .or_else(|| self.decode_step())?;
        self.pending = Some(self.pending_for(&step));
        Some(step)
    }

    /// Filter or clear a batch that still holds requests the scheduler dropped.
    fn cleanup_step(&self) -> Option<Step> {
        self.batches.iter().find_map(|batch| {
            let live: Vec<u64> = batch
                .request_ids
                .iter()
                .copied()
                .filter(|id| self.running.contains_key(&RequestId(*id)))
                .collect();
            if live.is_empty() {
                Some(Step::Clear { batch_id: batch.id })
            } else if live.len() < batch.request_ids.len() {
                Some(Step::Filter {
                    batch_id: batch.id,
                    request_ids: live,
                })
            } else {
                None
            }
        })
    }

    fn decode_step(&mut self) -> Option<Step> {
        if self.batches.is_empty() {
            return None;
        }
        self.waiting_steps += 1;
        Some(Step::Decode {
            batches: self.with_grants(self.batches.clone()),
        })
    }

    fn pending_for(&self, step: &Step) -> Pending {
        let ids_of = |batches: &[CachedBatch]| -> Vec<RequestId> {
            batches
                .iter()
                .flat_map(|b| b.request_ids.iter().map(|&id| RequestId(id)))
                .collect()
        };
        match step {
            Step::Prefill { batch, cached, .. } => {
                let mut involved: Vec<RequestId> =
                    batch.requests.iter().map(|r| RequestId(r.id)).collect();
                involved.extend(ids_of(cached.as_slice()));
                Pending {
                    consumed: cached.iter().map(|c| c.id).collect(),
                    created: cached.is_none().then_some(batch.id),
                    involved,
                    is_clear: false,
                }
            }
            Step::Decode { batches } => Pending {
                consumed: batches.iter().map(|b| b.id).collect(),
                created: None,
                involved: ids_of(batches),
                is_clear: false,
            },
            Step::Filter { batch_id, .. } | Step::Clear { batch_id } => Pending {
                consumed: vec![*batch_id],
                created: None,
                involved: ids_of(
                    &self
                        .batches
                        .iter()
                        .filter(|b| b.id == *batch_id)
                        .cloned()
                        .collect::<Vec<_>>(),
                ),
                is_clear: matches!(step, Step::Clear { .. }),
            },
        }
    }

    /// Tokens the next forward may spend on prefill.
    fn prefill_budget(&self) -> u32 {
        let decoding: u32 = if self.config.support_chunking {
            self.batches
                .iter()
                .fold(0u32, |sum, b| sum.saturating_add(b.current_tokens))
        } else {
            0
        };
        self.config
            .max_batch_prefill_tokens
            .saturating_sub(decoding)
    }

    /// Non-chunking shards pause the running batch for a prefill; TGI's rule for when that pays.
    fn worth_pausing_decode(&self) -> bool {
        if self.config.support_chunking || self.running.is_empty() {
            return true;
        }
        if self.waiting_steps >= self.config.max_waiting_tokens {
            return true;
        }
        let min_size =
            (self.running.len() as f32 * self.config.waiting_served_ratio).floor() as usize;
        self.queue.len() >= min_size
    }

    /// Build a prefill batch from the head of the queue under the token budget and free KV blocks.
    fn admit(&mut self, now: Instant) -> Option<Step> {
        if self.queue.is_empty() || self.batches.len() > 1 || !self.worth_pausing_decode() {
            return None;
        }
        let max_size = self
            .config
            .max_batch_size
            .unwrap_or(usize::MAX)
            .saturating_sub(self.running.len());
        let mut budget = self.prefill_budget();
        // Blocks kept obtainable for the running requests' next growth, so an admission is not
        // undone by a preemption at the next step.
        let mut reserve = self.growing();
        let mut requests = Vec::new();
        let mut admitted = Vec::new();
        let mut max_tokens = 0;
        let mut max_blocks = 0;
        while requests.len() < max_size && budget > 0 {
            let Some((index, waiting, allocation)) = self.take_fitting(reserve) else {
                break;
            };
            let request = &waiting.request;
            let total = request.total_tokens(self.config.speculate);
            // The prefix cache never leases a whole context, so this is at least 1.
            let to_compute = request
                .context_length()
                .saturating_sub(allocation.prefix_len);
            let chunk_len = if to_compute <= budget {
                None
            } else if self.config.support_chunking {
                Some(budget)
            } else if requests.is_empty() && self.running.is_empty() {
                // A prompt larger than the budget cannot ever fit otherwise; validation keeps
                // max_input_tokens within the prefill budget for non-chunking shards.
                None
            } else {
                self.allocator.release(allocation, None);
                self.queue.put_back(index, waiting);
                break;
            };
            budget = budget.saturating_sub(chunk_len.unwrap_or(to_compute));
            let Waiting {
                request,
                enqueued_at,
                ..
            } = waiting;
            let mut shard_request = request.request.clone();
            shard_request.blocks = allocation.blocks.clone();
            shard_request.slots = allocation.slots.clone();
            shard_request.cache_len = allocation.prefix_len;
            shard_request.chunk_len = chunk_len;
            max_tokens = total.saturating_add(max_tokens);
            max_blocks = max_blocks.max(u32::try_from(allocation.blocks.len()).unwrap_or(u32::MAX));
            if request.preemptions == 0 {
                admitted.push((request.id, now.saturating_duration_since(enqueued_at)));
            }
            if (allocation.slots.len() as u32) < total {
                reserve += 1;
            }
            if index > 0 {
                if let Some(head) = self.queue.head_mut() {
                    head.bypassed += 1;
                }
            }
            requests.push(shard_request);
            self.running.insert(
                request.id,
                Running {
                    granted: allocation.blocks.len(),
                    generated: request.generated.clone(),
                    request,
                    allocation,
                    prefilled: false,
                },
            );
            if chunk_len.is_some() {
                break;
            }
        }
        if requests.is_empty() {
            return None;
        }
        self.waiting_steps = 0;
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let batch = Batch {
            id,
            size: u32::try_from(requests.len()).unwrap_or(u32::MAX),
            requests,
            max_tokens,
            max_blocks,
        };
        let cached = match (self.config.support_chunking, self.batches.first()) {
            (true, Some(first)) => self.with_grants(vec![first.clone()]).pop(),
            _ => None,
        };
        Some(Step::Prefill {
            batch,
            cached,
            admitted,
        })
    }

    /// The first waiting request whose KV blocks can be allocated now, with its queue index: the
    /// head, or a later one while the head has been passed over fewer than `MAX_BYPASS` times.
    /// `reserve` blocks must stay obtainable after the allocation.
    fn take_fitting(&mut self, reserve: usize) -> Option<(usize, Waiting, Allocation)> {
        for index in 0..self.queue.len().min(BYPASS_WINDOW + 1) {
            let request = &self.queue.get(index)?.request;
            let context = request.context();
            let prompt = (!request.prefill_logprobs).then_some(context.as_ref());
            let target = self.kv_target(request, request.generated.len());
            if let Some(allocation) = self.allocator.allocate(prompt, target, reserve) {
                return Some((index, self.queue.take(index)?, allocation));
            }
            // A preempted head is never passed: admissions behind it would take the blocks it
            // needs to resume and overcommit the cache again (preemption thrash).
            let head = self.queue.get(0)?;
            if index == 0 && (head.bypassed >= MAX_BYPASS || head.request.preemptions > 0) {
                return None;
            }
        }
        None
    }

    /// Take the outcome of the last scheduled step.
    pub fn update(&mut self, outcome: Outcome) -> Vec<Event> {
        let pending = self
            .pending
            .take()
            .expect("update() without a scheduled step");
        self.batches.retain(|b| !pending.consumed.contains(&b.id));
        match outcome {
            Outcome::Forward { generations, batch } => self.on_forward(pending, generations, batch),
            Outcome::Filtered(batch) => {
                self.batches.extend(batch);
                Vec::new()
            }
            Outcome::Cleared => Vec::new(),
            Outcome::Failed(_) if pending.is_clear => Vec::new(),
            Outcome::Failed(error) => self.on_failure(pending, error),
            Outcome::ShardsLost => {
                self.requeue_all(Instant::now());
                Vec::new()
            }
        }
    }

    fn on_forward(
        &mut self,
        pending: Pending,
        generations: Vec<Generation>,
        batch: Option<CachedBatch>,
    ) -> Vec<Event> {
        let mut events = Vec::with_capacity(generations.len());
        let mut finished = HashSet::new();
        for generation in generations {
            let id = RequestId(generation.request_id);
            let Some(running) = self.running.get_mut(&id) else {
                continue;
            };
            running.prefilled = true;
            if let Some(tokens) = &generation.tokens {
                running.generated.extend_from_slice(&tokens.ids);
            }
            if generation.generated_text.is_some() {
                finished.insert(id);
                self.finish(id);
            }
            events.push(Event::Generation(Box::new(generation)));
        }
        let kept: HashSet<u64> = batch
            .iter()
            .flat_map(|b| b.request_ids.iter().copied())
            .collect();
        // A live request the shards no longer hold can never produce a token: fail it rather than hang.
        for id in pending.involved {
            if !finished.contains(&id) && !kept.contains(&id.0) && self.finish(id) {
                events.push(Event::Failed {
                    id,
                    error: RouterError::Generation("the shard dropped the request".into()),
                });
            }
        }
        self.batches.extend(batch);
        events
    }

    fn on_failure(&mut self, pending: Pending, error: RouterError) -> Vec<Event> {
        let mut events = Vec::new();
        for id in pending.involved {
            if self.finish(id) {
                events.push(Event::Failed {
                    id,
                    error: error.clone(),
                });
            }
        }
        // The shards' copies of every batch the step touched are in an unknown state: clear them.
        for batch_id in pending.consumed.into_iter().chain(pending.created) {
            if !self.batches.iter().any(|b| b.id == batch_id) {
                self.batches.push(CachedBatch {
                    id: batch_id,
                    ..Default::default()
                });
            }
        }
        events
    }
}
