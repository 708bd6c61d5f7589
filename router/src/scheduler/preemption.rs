//! KV on demand and preemption: growing running requests before each forward, granting the new
//! blocks to the shards with it, and giving a request's blocks back (preemption, lost shards) so it
//! resumes later from its prompt and the tokens it generated.

use super::{BlockAllocator, Event, KvAllocation, NewRequest, Running, Scheduler};
use crate::error::RouterError;
use std::time::Instant;
use tessera_proto::v3::{CachedBatch, KvGrant};
use tessera_proto::RequestId;

impl Scheduler {
    /// Frees a request's blocks. Once the shards have computed its prompt, that KV goes into the
    /// prefix cache, and with `resuming` also every generated token fed back so far (all but the
    /// last), which the request leases again when it resumes. Returns the request with what it
    /// generated.
    pub(super) fn release(&mut self, running: Running, resuming: bool) -> NewRequest {
        let Running {
            mut request,
            allocation,
            prefilled,
            generated,
            ..
        } = running;
        request.generated = generated;
        let context = request.context();
        let fed = match resuming {
            true => context.len() - usize::from(!request.generated.is_empty()),
            false => request.input_ids.len(),
        };
        let computed = prefilled.then_some(&context[..fed]);
        self.allocator.release(allocation, computed);
        request
    }

    /// Gives a running request's blocks back and queues it to resume with what it generated.
    pub(super) fn preempt(&mut self, id: RequestId, now: Instant) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        let mut request = self.release(running, true);
        request.preemptions += 1;
        request.request.generated_ids = request.generated.clone();
        if !request.generated.is_empty() {
            // The prompt's logprobs went out with the first token.
            request.prefill_logprobs = false;
            request.request.prefill_logprobs = false;
        }
        self.preemptions += 1;
        self.queue.push(request, now);
    }

    /// KV tokens a request needs for the next forward: with `generated` tokens so far, the shard
    /// feeds positions up to `input + generated - 1 + speculate`. Up front: the whole request.
    pub(super) fn kv_target(&self, request: &NewRequest, generated: usize) -> u32 {
        let total = request.total_tokens(self.config.speculate);
        match self.config.kv_allocation {
            KvAllocation::UpFront => total,
            KvAllocation::OnDemand => {
                let next = request.input_ids.len() + generated + self.config.speculate as usize;
                total.min(u32::try_from(next).unwrap_or(u32::MAX))
            }
        }
    }

    /// Grows every running request to its next forward's needs, most important first; when blocks
    /// run out, preempts the least important running request (possibly the one growing).
    pub(super) fn grow_running(&mut self, now: Instant) {
        if self.config.kv_allocation == KvAllocation::UpFront {
            return;
        }
        let mut order: Vec<(i32, RequestId)> = self
            .running
            .values()
            .map(|r| self.queue.key(&r.request))
            .collect();
        order.sort_unstable();
        for &(_, id) in &order {
            while let Some(running) = self.running.get(&id) {
                let target = self.kv_target(&running.request, running.generated.len());
                let running = self.running.get_mut(&id).expect("looked up above");
                if self.allocator.grow(&mut running.allocation, target) {
                    break;
                }
                let victim = order
                    .iter()
                    .rev()
                    .map(|&(_, v)| v)
                    .find(|v| self.running.contains_key(v))
                    .expect("the growing request is running");
                self.preempt(victim, now);
            }
        }
    }

    /// Running requests that will ask for more blocks (on demand, before reaching their total).
    pub(super) fn growing(&self) -> usize {
        match self.config.kv_allocation {
            KvAllocation::UpFront => 0,
            KvAllocation::OnDemand => self
                .running
                .values()
                .filter(|r| {
                    let total = r.request.total_tokens(self.config.speculate) as usize;
                    r.allocation.slots.len() < total
                })
                .count(),
        }
    }

    /// The batches of a forward, each carrying the blocks its requests gained since the last one.
    pub(super) fn with_grants(&mut self, batches: Vec<CachedBatch>) -> Vec<CachedBatch> {
        batches
            .into_iter()
            .map(|mut batch| {
                for &id in &batch.request_ids {
                    let Some(running) = self.running.get_mut(&RequestId(id)) else {
                        continue;
                    };
                    let blocks = &running.allocation.blocks;
                    if blocks.len() > running.granted {
                        batch.kv_grants.push(KvGrant {
                            request_id: id,
                            blocks: blocks[running.granted..].to_vec(),
                        });
                        running.granted = blocks.len();
                    }
                }
                batch
            })
            .collect()
    }

    /// The shards were found gone between steps (the idle Health check): as `Outcome::ShardsLost`.
    pub fn update_idle_loss(&mut self) {
        assert!(self.pending.is_none(), "a step is in flight");
        self.requeue_all(Instant::now());
    }

    /// Puts every running request back in the queue to be resumed, and forgets the shards' state.
    pub(super) fn requeue_all(&mut self, now: Instant) {
        let mut ids: Vec<RequestId> = self.running.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.preempt(id, now);
        }
        self.batches.clear();
        self.allocator.forget_cached();
    }

    /// Sizes the KV cache anew (restarted shards measured another one); only while nothing runs.
    /// Waiting requests that no longer fit fail.
    pub fn resize(&mut self, num_blocks: u32) -> Vec<Event> {
        assert!(self.running.is_empty(), "resize with requests running");
        self.config.num_blocks = num_blocks;
        let (bs, prefix) = (self.config.block_size, self.config.prefix_caching);
        self.allocator = BlockAllocator::new(num_blocks, bs, prefix);
        let usable = u64::from(num_blocks.saturating_sub(1)) * u64::from(bs.max(1));
        let speculate = self.config.speculate;
        let too_large = self
            .queue
            .take_if(|r| u64::from(r.total_tokens(speculate)) > usable);
        too_large
            .into_iter()
            .map(|id| Event::Failed {
                id,
                error: RouterError::Generation(format!(
                    "the restarted shards' KV cache ({usable} tokens) cannot hold this request"
                )),
            })
            .collect()
    }

    /// Fails every request, waiting or running (the shards stayed away too long). The shards'
    /// batches are forgotten with them.
    pub fn fail_all(&mut self, error: &RouterError) -> Vec<Event> {
        let mut ids: Vec<RequestId> = self.running.keys().copied().collect();
        ids.extend(self.queue.take_if(|_| true));
        ids.sort_unstable();
        for &id in &ids {
            self.finish(id);
        }
        self.batches.clear();
        ids.into_iter()
            .map(|id| Event::Failed {
                id,
                error: error.clone(),
            })
            .collect()
    }
}
