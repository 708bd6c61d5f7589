//! The queue of requests waiting for admission (arrival order, or priority then arrival), and the
//! request record the scheduler keeps.

use std::collections::VecDeque;
use std::time::Instant;
use tessera_proto::v3;
use tessera_proto::RequestId;

/// A validated request as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: RequestId,
    /// The prompt's token ids after truncation: its length is the input length, its blocks the
    /// prefix-cache key.
    pub input_ids: Vec<u32>,
    /// Tokens to reserve for generation (the full request, never capped at 1024 as TGI does).
    pub max_new_tokens: u32,
    /// Prompt logprobs need logits for every prompt token, so such a request reuses no cached prefix.
    pub prefill_logprobs: bool,
    /// Lower runs first (vLLM's convention); only the `priority` policy reads it.
    pub priority: i32,
    /// Tokens generated before a preemption, resumed after the prompt (empty for a new request).
    pub generated: Vec<u32>,
    /// Times this request was preempted (a resumed request is not admitted a second time).
    pub preemptions: u32,
    /// The shard request without its memory fields (`blocks`, `slots`, `cache_len`, `chunk_len`).
    pub request: v3::Request,
}

impl NewRequest {
    /// Saturating: validation keeps prompts far below u32::MAX.
    pub fn input_length(&self) -> u32 {
        u32::try_from(self.input_ids.len()).unwrap_or(u32::MAX)
    }

    /// What the shard computes on (re)admission: the prompt, then the tokens generated so far.
    /// Its length is the context length, its blocks the prefix-cache key.
    pub fn context(&self) -> std::borrow::Cow<'_, [u32]> {
        match self.generated.is_empty() {
            true => self.input_ids.as_slice().into(),
            false => [self.input_ids.as_slice(), &self.generated].concat().into(),
        }
    }

    /// Prompt plus generated tokens; saturating.
    pub fn context_length(&self) -> u32 {
        u32::try_from(self.input_ids.len() + self.generated.len()).unwrap_or(u32::MAX)
    }

    /// KV slots the whole sequence needs: every prompt token and every generated token but the
    /// last (which is never fed back). Saturating, so an unvalidated `max_new_tokens` asks for
    /// more blocks than exist instead of wrapping to a small request.
    pub fn total_tokens(&self, speculate: u32) -> u32 {
        self.input_length()
            .saturating_add(self.max_new_tokens)
            .saturating_add(speculate)
            .saturating_sub(1)
    }
}

/// When a request's KV blocks are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvAllocation {
    // Blocks for what the request has computed plus the next step, granted as it grows; when they
    // run out the least important running request is preempted and later resumed.
    #[default]
    OnDemand,
    // TGI's rule: blocks for prompt + max_new_tokens at admission, held to the end.
    UpFront,
}

/// How waiting requests are ordered for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SchedulingPolicy {
    // First come, first served (TGI's order); a request's `priority` is ignored. (Plain comments:
    // clap would show doc comments as per-value help and switch the whole --help layout.)
    #[default]
    Fcfs,
    // Lowest `priority` first, arrival order among equals.
    Priority,
}

/// A waiting request.
#[derive(Debug)]
pub struct Waiting {
    pub request: NewRequest,
    pub enqueued_at: Instant,
    /// Admissions that passed over this request while it was at the head and did not fit.
    pub bypassed: u32,
}

/// Waiting requests in admission order.
#[derive(Debug, Default)]
pub struct Queue {
    entries: VecDeque<Waiting>,
    policy: SchedulingPolicy,
}

impl Queue {
    pub fn new(policy: SchedulingPolicy) -> Self {
        Queue {
            entries: VecDeque::new(),
            policy,
        }
    }

    /// The admission order key: (priority under the priority policy, arrival). Request ids are
    /// given in arrival order, so a preempted request goes back to the place it arrived at.
    pub fn key(&self, request: &NewRequest) -> (i32, RequestId) {
        match self.policy {
            SchedulingPolicy::Fcfs => (0, request.id),
            SchedulingPolicy::Priority => (request.priority, request.id),
        }
    }

    pub fn push(&mut self, request: NewRequest, now: Instant) {
        let key = self.key(&request);
        let at = self.entries.partition_point(|w| self.key(&w.request) < key);
        let waiting = Waiting {
            request,
            enqueued_at: now,
            bypassed: 0,
        };
        self.entries.insert(at, waiting);
    }

    /// The request at `index` in admission order.
    pub fn get(&self, index: usize) -> Option<&Waiting> {
        self.entries.get(index)
    }

    pub fn head_mut(&mut self) -> Option<&mut Waiting> {
        self.entries.front_mut()
    }

    /// Take the request at `index` out of the queue.
    pub fn take(&mut self, index: usize) -> Option<Waiting> {
        self.entries.remove(index)
    }

    /// Put back a request that could not be admitted, at the place it was taken from.
    pub fn put_back(&mut self, index: usize, waiting: Waiting) {
        self.entries.insert(index.min(self.entries.len()), waiting);
    }

    /// Remove a waiting request; false when it is not waiting.
    pub fn remove(&mut self, id: RequestId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|w| w.request.id != id);
        self.entries.len() != before
    }

    /// Removes the requests `remove` picks; their ids, in order.
    pub fn take_if(&mut self, remove: impl Fn(&NewRequest) -> bool) -> Vec<RequestId> {
        let (gone, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
            self.entries.drain(..).partition(|w| remove(&w.request));
        self.entries = kept;
        gone.into_iter().map(|w| w.request.id).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
