//! Prefill and Decode: gather the batches, plan each request's tokens (prefill chunks and decode
//! tokens together), run one ragged forward, then sample, detokenize and check stops.
//! Everything that can be rejected is checked before any batch is taken out of the engine, so a
//! bad request leaves the held batches untouched; a refused request of a new batch is left out of
//! it rather than failing its neighbours.

use rayon::prelude::*;
use std::collections::HashSet;
use std::time::Instant;

use super::request::Seq;
use super::types::{KvGrant, NewBatch, Refused, StepOut, Timings};
use super::Engine;
use crate::forward::ForwardBatch;
use crate::Error;

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

fn duplicate(ids: impl IntoIterator<Item = u64>) -> Option<u64> {
    let mut seen = HashSet::new();
    ids.into_iter().find(|id| !seen.insert(*id))
}

impl Engine {
    /// Builds the new batch and, when given, runs it in one forward with a cached batch (TGI's
    /// chunking Prefill); the merged batch keeps the cached batch's id. A request that cannot be
    /// served is logged and left out (no generation, not in the returned batch) while the others
    /// go on; only when nothing at all is left to run does the RPC fail, with the first refusal.
    pub(super) fn prefill(
        &mut self,
        batch: NewBatch,
        cached: Option<u64>,
        grants: Vec<KvGrant>,
    ) -> Result<StepOut, Error> {
        let start = Instant::now();
        let id = batch.id;
        let (new, refused) = self.admit(batch, cached)?;
        self.grant(cached.as_slice(), grants)?;
        for r in &refused {
            tracing::warn!(
                request_id = r.id,
                batch_id = id,
                "request refused: {}",
                r.error
            );
        }
        if new.is_empty() && cached.is_none() {
            if let Some(first) = refused.into_iter().next() {
                return Err(first.error);
            }
        }
        let concat = Instant::now();
        let (id, seqs, concat_ns) = match cached {
            Some(cached) => {
                let mut seqs = self.batches.remove(&cached).unwrap_or_default();
                seqs.extend(new);
                (cached, seqs, Some(elapsed_ns(concat)))
            }
            None => (id, new, None),
        };
        self.step(id, seqs, concat_ns, start)
    }

    /// Checks a new batch against the held ones (an error refuses the whole RPC) and builds each
    /// request, in order: the sequences to run and the requests refused.
    pub(super) fn admit(
        &self,
        batch: NewBatch,
        cached: Option<u64>,
    ) -> Result<(Vec<Seq>, Vec<Refused>), Error> {
        if batch.requests.is_empty() {
            return Err(Error::InvalidArgument {
                field: "batch.requests".into(),
                reason: "a batch needs at least one request".into(),
            });
        }
        if self.batches.contains_key(&batch.id) && cached != Some(batch.id) {
            return Err(Error::InvalidArgument {
                field: "batch.id".into(),
                reason: format!("batch {} already exists", batch.id),
            });
        }
        if let Some(id) = cached.filter(|id| !self.batches.contains_key(id)) {
            return Err(Error::BatchNotFound(id));
        }
        let cached_ids = cached
            .iter()
            .flat_map(|id| self.batches[id].iter().map(|s| s.id));
        let new_ids = batch.requests.iter().map(|r| match r {
            Ok(r) => r.id,
            Err(r) => r.id,
        });
        // Generations are matched to requests by id: two requests under one id is a router bug
        // that no answer could make sense of.
        if let Some(dup) = duplicate(cached_ids.chain(new_ids)) {
            return Err(Error::InvalidArgument {
                field: "batch.requests.id".into(),
                reason: format!("request {dup} appears twice"),
            });
        }
        let mut seqs = Vec::with_capacity(batch.requests.len());
        let mut refused = Vec::new();
        for (i, r) in batch.requests.into_iter().enumerate() {
            let built = r.and_then(|r| {
                let id = r.id;
                Seq::new(r, &self.ctx).map_err(|e| Refused {
                    id,
                    error: in_request(e, i),
                })
            });
            match built {
                Ok(seq) => seqs.push(seq),
                Err(r) => refused.push(r),
            }
        }
        Ok((seqs, refused))
    }

    /// One decode step over one or more held batches, concatenated under the first id.
    pub(super) fn decode(&mut self, ids: &[u64], grants: Vec<KvGrant>) -> Result<StepOut, Error> {
        let start = Instant::now();
        let Some(&first) = ids.first() else {
            return Err(Error::InvalidArgument {
                field: "batches".into(),
                reason: "Decode needs at least one batch".into(),
            });
        };
        if let Some(&missing) = ids.iter().find(|id| !self.batches.contains_key(id)) {
            return Err(Error::BatchNotFound(missing));
        }
        if let Some(dup) = duplicate(ids.iter().copied()) {
            return Err(Error::InvalidArgument {
                field: "batches.id".into(),
                reason: format!("batch {dup} appears twice"),
            });
        }
        self.grant(ids, grants)?;
        let concat = Instant::now();
        let mut seqs = Vec::new();
        for id in ids {
            seqs.extend(self.batches.remove(id).unwrap_or_default());
        }
        let concat_ns = (ids.len() > 1).then(|| elapsed_ns(concat));
        self.step(first, seqs, concat_ns, start)
    }

    /// Appends granted KV blocks to requests of the held batches `ids`. Every grant is checked
    /// before any is applied, so a bad one leaves the batches as they were.
    fn grant(&mut self, ids: &[u64], grants: Vec<KvGrant>) -> Result<(), Error> {
        let holds = |request_id: u64| {
            ids.iter()
                .filter_map(|id| self.batches.get(id))
                .flatten()
                .any(|s| s.id == request_id)
        };
        for (i, g) in grants.iter().enumerate() {
            let field = |what: &str| format!("kv_grants[{i}].{what}");
            if !holds(g.request_id) {
                let reason = format!(
                    "request {} is not in the batches of this forward",
                    g.request_id
                );
                return Err(Error::InvalidArgument {
                    field: field("request_id"),
                    reason,
                });
            }
            if let Some(&b) = g
                .blocks
                .iter()
                .find(|&&b| b as usize >= self.ctx.num_blocks)
            {
                let reason = format!(
                    "block {b} is past the KV cache ({} blocks)",
                    self.ctx.num_blocks
                );
                return Err(Error::InvalidArgument {
                    field: field("blocks"),
                    reason,
                });
            }
        }
        let block_size = self.ctx.block_size;
        for (id, seqs) in self.batches.iter_mut() {
            if !ids.contains(id) {
                continue;
            }
            for seq in seqs.iter_mut() {
                let id = seq.id;
                for g in grants.iter().filter(|g| g.request_id == id) {
                    seq.grant(&g.blocks, block_size);
                }
            }
        }
        Ok(())
    }

    /// Runs one forward over `seqs` and keeps the unfinished ones as batch `id`. On error the
    /// requests are dropped: their KV state is unknown, and the router clears the batch anyway.
    pub(super) fn step(
        &mut self,
        id: u64,
        seqs: Vec<Seq>,
        concat_ns: Option<u64>,
        start: Instant,
    ) -> Result<StepOut, Error> {
        let mut budget = self.opts.max_prefill_tokens;
        let plan: Vec<usize> = seqs.iter().map(|s| s.next_len(&mut budget)).collect();
        if let Some((seq, &n)) = seqs.iter().zip(&plan).find(|(s, &n)| !s.has_slots(n)) {
            return Err(Error::InvalidBatch(format!(
                "request {} has no KV slot for the {n} tokens of this forward (the router grants blocks first)",
                seq.id
            )));
        }
        let forward = ForwardBatch {
            seqs: seqs
                .iter()
                .zip(&plan)
                .filter(|(_, &n)| n > 0)
                .map(|(s, &n)| s.input(n))
                .collect(),
        };
        let t = Instant::now();
        // Grammar masks depend only on the tokens so far: compute them while the forward runs.
        let mut seqs = seqs;
        let (model, cache) = (&self.model, &mut self.cache);
        let (rows, ()) = rayon::join(
            || model.forward(&forward, cache),
            || {
                seqs.par_iter_mut()
                    .zip(&plan)
                    .for_each(|(s, &n)| s.prepare_choice(n))
            },
        );
        let rows = rows?;
        let forward_ns = elapsed_ns(t);
        if rows.len() != forward.seqs.len() {
            return Err(Error::InvalidBatch(format!(
                "forward returned {} logits sets for {} sequences",
                rows.len(),
                forward.seqs.len()
            )));
        }
        let t = Instant::now();
        // Token choice and detokenization of each sequence are independent: run them in parallel,
        // then keep the batch order (and report the first error in it).
        let mut rows = rows.into_iter();
        let mut seqs: Vec<(Seq, usize, Vec<f32>)> = seqs
            .into_iter()
            .zip(plan)
            .map(|(seq, n)| {
                let logits = if n > 0 {
                    rows.next().unwrap_or_default()
                } else {
                    Vec::new()
                };
                (seq, n, logits)
            })
            .collect();
        let ctx = &self.ctx;
        let advanced: Vec<_> = seqs
            .par_iter_mut()
            .map(|(seq, n, logits)| (*n > 0).then(|| seq.advance(*n, logits, ctx)))
            .collect();
        let mut generations = Vec::new();
        let mut kept = Vec::with_capacity(seqs.len());
        for ((seq, _, _), generation) in seqs.into_iter().zip(advanced) {
            let Some(generation) = generation else {
                kept.push(seq);
                continue;
            };
            let generation = generation?;
            let finished = generation.as_ref().is_some_and(|g| g.finished.is_some());
            if let Some(g) = generation.filter(|g| self.owns(g.request_id)) {
                generations.push(g);
            }
            if !finished {
                kept.push(seq);
            }
        }
        let decode_ns = elapsed_ns(t);
        let batch = (!kept.is_empty()).then(|| {
            let info = self.batch_info(id, &kept);
            self.batches.insert(id, kept);
            info
        });
        Ok(StepOut {
            generations,
            batch,
            timings: Timings {
                forward_ns,
                decode_ns,
                total_ns: elapsed_ns(start),
                concat_ns,
            },
        })
    }

    /// With several ranks each reports only its share of the requests (TGI's rule), so the
    /// router's concatenation of all ranks' answers holds each generation once.
    fn owns(&self, request_id: u64) -> bool {
        request_id % self.opts.world_size as u64 == self.opts.rank as u64
    }
}

/// Prefixes a request error's field with its index, so the router can tell which request it was.
pub(super) fn in_request(e: Error, index: usize) -> Error {
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: format!("batch.requests[{index}].{field}"),
            reason,
        },
        other => other,
    }
}
