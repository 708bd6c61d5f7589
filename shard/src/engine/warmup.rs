//! Warmup (run the router's max-size prefill, placing it in the cache itself when the router sent
//! no blocks, then size the KV cache from the memory left) and
//! Health (a real one-token forward into block 0, which the router reserves for it).

use std::time::Instant;

use super::request::prompt_len;
use super::step::in_request;
use super::types::{NewBatch, WarmupIn, WarmupOut};
use super::Engine;
use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};
use crate::kv_cache::KvCache;
use crate::Error;

/// Bytes the kernel reports as available for new allocations (`MemAvailable` in /proc/meminfo).
pub fn mem_available() -> Result<u64, Error> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_mem_available(&text).ok_or_else(|| Error::Device(format!("{path}: no MemAvailable line")))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Engine {
    pub(super) fn warmup(&mut self, w: WarmupIn) -> Result<WarmupOut, Error> {
        // The router's validation (router/src/validation.rs) keeps every request within
        // `max_total_tokens`; past the model's positions `Seq::new` would refuse what it accepted.
        let positions = self.config.max_position_embeddings;
        if let Some(total) = w.max_total_tokens.filter(|&t| t as usize > positions) {
            return Err(Error::InvalidArgument {
                field: "max_total_tokens".into(),
                reason: format!("{total} exceeds the model's {positions} positions"),
            });
        }
        // Warmup replaces the cache: batches held in the old one would read garbage.
        self.batches.clear();
        let (batch, warmup_blocks) = self.place_warmup(w.batch)?;
        if warmup_blocks > self.ctx.num_blocks {
            self.resize_cache(warmup_blocks)?;
        }
        self.opts.max_prefill_tokens = (w.max_prefill_tokens as usize).max(1);
        let id = batch.id;
        let result = self.run_warmup(batch);
        self.batches.remove(&id);
        result.map_err(|e| match e {
            Error::InvalidArgument { .. } | Error::BatchNotFound(_) => e,
            e => Error::Device(format!(
                "warmup prefill of {} tokens failed ({e}): decrease --max-batch-prefill-tokens",
                w.max_prefill_tokens
            )),
        })?;

        let num_blocks = self.kv_blocks_for_memory()?.max(warmup_blocks);
        self.resize_cache(num_blocks)?;
        let bs = self.ctx.block_size;
        let supported = (num_blocks * bs).min(u32::MAX as usize) as u32;
        let positions = self.config.max_position_embeddings.min(u32::MAX as usize) as u32;
        let max_total = w.max_total_tokens.unwrap_or(supported.min(positions));
        let max_input = w.max_input_tokens.unwrap_or(max_total.saturating_sub(1));
        tracing::info!(
            num_blocks,
            supported,
            max_input,
            max_total,
            "KV cache sized by warmup"
        );
        Ok(WarmupOut {
            max_supported_total_tokens: supported,
            max_input_tokens: max_input,
            max_total_tokens: max_total,
        })
    }

    /// Prepares the warmup batch as TGI's own shard does with what TGI's router sends: requests
    /// without `blocks`/`slots` get blocks of their own (after every block the router named, and
    /// after block 0, which health checks use), and the requests, which that router numbers all
    /// 0, are numbered privately. Warmup runs a single forward whose tokens are dropped with the
    /// batch, so each request needs slots for its prompt only. Returns the batch and the blocks
    /// the cache needs for it.
    fn place_warmup(&self, batch: NewBatch) -> Result<(NewBatch, usize), Error> {
        let bs = self.ctx.block_size;
        let mut requests = batch
            .requests
            .into_iter()
            .map(|r| r.map_err(|r| r.error))
            .collect::<Result<Vec<_>, _>>()?;
        let named = requests.iter().flat_map(|r| &r.blocks).max();
        let mut next = named.map_or(1, |&b| b as usize + 1);
        for (i, r) in requests.iter_mut().enumerate() {
            r.id = i as u64;
            r.stop.max_new_tokens = 1;
            if !r.blocks.is_empty() || !r.slots.is_empty() {
                continue;
            }
            let n = prompt_len(r, &self.ctx)
                .map_err(|e| in_request(e, i))?
                .div_ceil(bs);
            r.blocks = (next..next + n)
                .map(|b| {
                    u32::try_from(b).map_err(|_| Error::InvalidArgument {
                        field: format!("batch.requests[{i}].inputs"),
                        reason: "the warmup batch needs more KV blocks than a u32 numbers".into(),
                    })
                })
                .collect::<Result<_, _>>()?;
            next += n;
        }
        let blocks = requests
            .iter()
            .flat_map(|r| &r.blocks)
            .max()
            .map_or(1, |&b| b as usize + 1);
        let requests = requests.into_iter().map(Ok).collect();
        Ok((
            NewBatch {
                id: batch.id,
                requests,
            },
            blocks,
        ))
    }

    /// The warmup forward must cover the whole batch: a request it cannot build fails warmup.
    fn run_warmup(&mut self, batch: NewBatch) -> Result<(), Error> {
        let start = Instant::now();
        let id = batch.id;
        let (seqs, refused) = self.admit(batch, None)?;
        if let Some(first) = refused.into_iter().next() {
            return Err(first.error);
        }
        self.step(id, seqs, None, start).map(drop)
    }

    /// Blocks that fit in `--kv-cache-memory`, or in this rank's share of the available memory
    /// (measured after dropping the current cache, so its own pages count as free).
    fn kv_blocks_for_memory(&mut self) -> Result<usize, Error> {
        let per_block =
            KvCache::bytes_per_block(self.model.cache_shape(), self.ctx.block_size) as u64;
        let bytes = match self.opts.kv_cache_memory {
            Some(bytes) => bytes,
            None => {
                self.resize_cache(1)?;
                let share = self.opts.kv_memory_fraction / self.opts.world_size.max(1) as f64;
                (mem_available()? as f64 * share) as u64
            }
        };
        Ok((bytes / per_block.max(1)) as usize)
    }

    fn resize_cache(&mut self, num_blocks: usize) -> Result<(), Error> {
        // Free the old cache first so both never hold memory at once.
        self.cache = KvCache::new(self.model.cache_shape(), 1, self.ctx.block_size);
        self.cache = KvCache::new(self.model.cache_shape(), num_blocks, self.ctx.block_size);
        self.ctx.num_blocks = num_blocks;
        Ok(())
    }

    /// A one-token forward at position 0 into slot 0 of block 0; the logits must be finite.
    pub(super) fn health(&mut self) -> Result<(), Error> {
        let token = self.config.bos_token_id.unwrap_or(0);
        let batch = ForwardBatch {
            seqs: vec![SeqInput {
                tokens: vec![token],
                start_pos: 0,
                slots: vec![0],
                block_table: vec![0],
                logits: LogitsWanted::Last,
            }],
        };
        let rows = self.model.forward(&batch, &mut self.cache)?;
        let ok = rows
            .first()
            .is_some_and(|r| r.len() == self.ctx.vocab_size && r.iter().all(|v| v.is_finite()));
        if ok {
            Ok(())
        } else {
            Err(Error::Device(
                "health forward produced no finite logits".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_available() {
        let text = "MemTotal:       131072000 kB\nMemFree:  1 kB\nMemAvailable:   65536 kB\n";
        assert_eq!(parse_mem_available(text), Some(65536 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert!(mem_available().unwrap() > 0);
    }
}
