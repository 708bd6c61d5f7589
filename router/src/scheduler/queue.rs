//! The FIFO of requests waiting for admission, and the request record the scheduler keeps.

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
    /// The shard request without its memory fields (`blocks`, `slots`, `cache_len`, `chunk_len`).
    pub request: v3::Request,
}

impl NewRequest {
    /// Saturating: validation keeps prompts far below u32::MAX.
    pub fn input_length(&self) -> u32 {
        u32::try_from(self.input_ids.len()).unwrap_or(u32::MAX)
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

/// A waiting request.
#[derive(Debug)]
pub struct Waiting {
    pub request: NewRequest,
    pub enqueued_at: Instant,
}

/// Waiting requests in arrival order.
#[derive(Debug, Default)]
pub struct Queue {
    entries: VecDeque<Waiting>,
}

impl Queue {
    pub fn push(&mut self, request: NewRequest, now: Instant) {
        self.entries.push_back(Waiting {
            request,
            enqueued_at: now,
        });
    }

    pub fn pop(&mut self) -> Option<Waiting> {
        self.entries.pop_front()
    }

    /// Put back a request that could not be admitted; it keeps its place at the head.
    pub fn push_front(&mut self, waiting: Waiting) {
        self.entries.push_front(waiting);
    }

    /// Remove a waiting request; false when it is not waiting.
    pub fn remove(&mut self, id: RequestId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|w| w.request.id != id);
        self.entries.len() != before
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
