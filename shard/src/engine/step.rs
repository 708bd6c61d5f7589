//! Prefill and Decode: gather the batches, plan each request's tokens (prefill chunks and decode
//! tokens together), run one ragged forward, then sample, detokenize and check stops.
//! Everything that can be rejected is checked before any batch is taken out of the engine, so a
//! bad request leaves the held batches untouched.

use rayon::prelude::*;
use std::collections::HashSet;
use std::time::Instant;

use super::request::Seq;
use super::types::{NewBatch, StepOut, Timings};
use super::Engine;
use crate::forward::ForwardBatch;
use crate::Error;

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

fn duplicate<'a>(ids: impl IntoIterator<Item = &'a u64>) -> Option<u64> {
    let mut seen = HashSet::new();
    ids.into_iter().copied().find(|id| !seen.insert(*id))
}

impl Engine {
    /// Builds the new batch and, when given, runs it in one forward with a cached batch (TGI's
    /// chunking Prefill); the merged batch keeps the cached batch's id.
    pub(super) fn prefill(
        &mut self,
        batch: NewBatch,
        cached: Option<u64>,
    ) -> Result<StepOut, Error> {
        let start = Instant::now();
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
            .flat_map(|id| self.batches[id].iter().map(|s| &s.id));
        if let Some(dup) = duplicate(cached_ids.chain(batch.requests.iter().map(|r| &r.id))) {
            return Err(Error::InvalidArgument {
                field: "batch.requests.id".into(),
                reason: format!("request {dup} appears twice"),
            });
        }
        let new: Vec<Seq> = batch
            .requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| Seq::new(r, &self.ctx).map_err(|e| in_request(e, i)))
            .collect::<Result<_, _>>()?;
        let concat = Instant::now();
        let (id, seqs, concat_ns) = match cached {
            Some(id) => {
                let mut seqs = self.batches.remove(&id).unwrap_or_default();
                seqs.extend(new);
                (id, seqs, Some(elapsed_ns(concat)))
            }
            None => (batch.id, new, None),
        };
        self.step(id, seqs, concat_ns, start)
    }

    /// One decode step over one or more held batches, concatenated under the first id.
    pub(super) fn decode(&mut self, ids: &[u64]) -> Result<StepOut, Error> {
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
        if let Some(dup) = duplicate(ids) {
            return Err(Error::InvalidArgument {
                field: "batches.id".into(),
                reason: format!("batch {dup} appears twice"),
            });
        }
        let concat = Instant::now();
        let mut seqs = Vec::new();
        for id in ids {
            seqs.extend(self.batches.remove(id).unwrap_or_default());
        }
        let concat_ns = (ids.len() > 1).then(|| elapsed_ns(concat));
        self.step(first, seqs, concat_ns, start)
    }

    /// Runs one forward over `seqs` and keeps the unfinished ones as batch `id`. On error the
    /// requests are dropped: their KV state is unknown, and the router clears the batch anyway.
    fn step(
        &mut self,
        id: u64,
        seqs: Vec<Seq>,
        concat_ns: Option<u64>,
        start: Instant,
    ) -> Result<StepOut, Error> {
        let mut budget = self.opts.max_prefill_tokens;
        let plan: Vec<usize> = seqs.iter().map(|s| s.next_len(&mut budget)).collect();
        let forward = ForwardBatch {
            seqs: seqs
                .iter()
                .zip(&plan)
                .filter(|(_, &n)| n > 0)
                .map(|(s, &n)| s.input(n))
                .collect(),
        };
        let t = Instant::now();
        let rows = self.model.forward(&forward, &mut self.cache)?;
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
fn in_request(e: Error, index: usize) -> Error {
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: format!("batch.requests[{index}].{field}"),
            reason,
        },
        other => other,
    }
}
