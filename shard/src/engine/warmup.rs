//! Warmup (check the router's max-size batch, prove the model runs with a few of its tokens, and
//! size the KV cache from the memory left after what a max-size prefill needs in activations,
//! counted from the model's shape) and Health (a real one-token forward into block 0, which the
//! router reserves for it).

use std::time::Instant;

use super::request::{prompt_len, Seq};
use super::step::in_request;
use super::types::{NewBatch, WarmupIn, WarmupOut};
use super::Engine;
use crate::config::ModelConfig;
use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};
use crate::kv_cache::KvCache;
use crate::Error;

/// Tokens of the warmup's probe forward: enough to run every kernel shape a prefill chunk uses
/// (several rows, causal attention over earlier positions), a few milliseconds on any model.
const PROBE_TOKENS: usize = 8;

const MIB: f64 = 1024.0 * 1024.0;

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

/// The largest forward the engine will be asked to run after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaxForward {
    /// Tokens in one forward (prefill chunks and decode tokens together).
    pub tokens: usize,
    /// Logits rows it returns: every token when a request asks for prompt logprobs.
    pub logit_rows: usize,
    /// Positions one sequence attends over.
    pub span: usize,
    /// Threads running attention at once, each with its own scratch.
    pub threads: usize,
}

/// Peak bytes of one rank's activations during `f`, beyond weights and KV cache, counted from
/// what `models/decoder.rs` keeps alive at once: a layer's buffers are freed before the next
/// layer, so the per-token cost is one layer's (residual, norm output, fused qkv and its split,
/// attention output, o, gate|up, swiglu, down, one input-sized scratch for packing or quantizing
/// a matmul's activations, RoPE tables and the flattened plan; a mixture of experts adds its
/// output, each expert's gathered rows and its `top_k` experts' FFN widths), and the logits stage holds the
/// picked rows, their norm, this rank's logits, the gathered logits, the per-sequence copies and
/// the sampler's working row. Math is f32 whatever the weights' dtype.
pub(crate) fn activation_bytes(c: &ModelConfig, world_size: usize, f: MaxForward) -> u64 {
    let ranks = world_size.max(1);
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q, kv) = (c.q_dim() / ranks, c.kv_dim() / ranks);
    // A token's routed experts together are `top_k` FFNs wide.
    let moe = c.moe.as_ref().map_or(0, |m| m.top_k * m.intermediate_size);
    let ff = c.intermediate_size.max(moe) / ranks;
    let moe_rows = if c.moe.is_some() { 2 * h } else { 0 };
    let (vocab, local_vocab) = (c.vocab_size, c.vocab_size.div_ceil(ranks));
    let heads = (c.num_heads / ranks).max(1);
    // Four index arrays of the flattened plan (tokens, positions, sequence, slot), 8 bytes each.
    let plan = 4 * 8 / 4;
    let per_token = 6 * h + 2 * (q + 2 * kv) + q + 3 * ff + h.max(ff).max(q) + hd + plan + moe_rows;
    let per_logit_row = 2 * h + local_vocab + 3 * vocab;
    let attention_scratch = f.threads.max(1) * (heads + 2 * hd) * f.span;
    let floats = f.tokens as u64 * per_token as u64
        + f.logit_rows as u64 * per_logit_row as u64
        + attention_scratch as u64;
    floats * 4
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
        // Every request of the batch must build, exactly as a Prefill would build it.
        let (seqs, refused) = self.admit(batch, None)?;
        if let Some(first) = refused.into_iter().next() {
            return Err(first.error);
        }
        let max = self.max_forward(&seqs, w.max_total_tokens);
        let need = activation_bytes(&self.config, self.opts.world_size, max);
        let start = Instant::now();
        self.probe(&seqs)
            .map_err(|e| Error::Device(format!("warmup forward failed: {e}")))?;
        drop(seqs);
        tracing::info!(
            prefill_tokens = max.tokens,
            activations_mib = format!("{:.0}", need as f64 / MIB),
            probe_ms = start.elapsed().as_millis() as u64,
            "warmup forward ran"
        );

        let num_blocks = self
            .kv_blocks_for_memory(need, max.tokens)?
            .max(warmup_blocks);
        self.resize_cache(num_blocks)?;
        // The probe's activations and the first cache are gone: return their pages.
        tessera_formats::heap::release_freed();
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

    /// The largest forward serving may run: the warmup batch's first forward or a full prefill
    /// budget, whichever is larger, with prompt logprobs on every row (any request may ask).
    fn max_forward(&self, seqs: &[Seq], max_total_tokens: Option<u32>) -> MaxForward {
        let mut budget = self.opts.max_prefill_tokens;
        let batch: usize = seqs.iter().map(|s| s.next_len(&mut budget)).sum();
        let tokens = batch.max(self.opts.max_prefill_tokens);
        let positions = self.config.max_position_embeddings;
        MaxForward {
            tokens,
            logit_rows: tokens,
            span: max_total_tokens
                .map_or(positions, |t| t as usize)
                .min(positions),
            threads: rayon::current_num_threads(),
        }
    }

    /// Prepares the warmup batch as TGI's own shard does with what TGI's router sends: requests
    /// without `blocks`/`slots` get blocks of their own (after every block the router named, and
    /// after block 0, which health checks use), and the requests, which that router numbers all
    /// 0, are numbered privately. Each request needs slots for its prompt only: nothing of it is
    /// kept past warmup. Returns the batch and the blocks the cache needs for it.
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

    /// A forward of the first request's first few tokens, in its own slots: proves the weights,
    /// kernels and cache work together without paying for a max-size prefill, whose memory
    /// `activation_bytes` counts instead. Its logits must be finite.
    fn probe(&mut self, seqs: &[Seq]) -> Result<(), Error> {
        let Some(first) = seqs.first() else {
            return self.health();
        };
        let n = first.next_len(&mut usize::MAX.clone()).min(PROBE_TOKENS);
        if n == 0 {
            return self.health();
        }
        let input = SeqInput {
            logits: LogitsWanted::Last,
            decoded_from: None,
            ..first.input(n)
        };
        let rows = self
            .model
            .forward(&ForwardBatch { seqs: vec![input] }, &mut self.cache)?;
        self.check_logits(&rows, "warmup probe")
    }

    /// Blocks that fit in `--kv-cache-memory`, or in this rank's share of the available memory
    /// (measured after dropping the current cache, so its own pages count as free) less what the
    /// ranks' largest prefills need: the cache never takes memory a prefill will ask for.
    fn kv_blocks_for_memory(&mut self, need: u64, tokens: usize) -> Result<usize, Error> {
        let per_block =
            KvCache::bytes_per_block(self.model.cache_shape(), self.ctx.block_size) as u64;
        self.resize_cache(1)?;
        let ranks = self.opts.world_size.max(1) as u64;
        let available = mem_available()?;
        let left = available.checked_sub(need * ranks).ok_or_else(|| {
            Error::Device(format!(
                "a prefill of {tokens} tokens needs {:.0} MiB of activations on each of {ranks} \
                 rank(s), {:.0} MiB is available: decrease --max-batch-prefill-tokens",
                need as f64 / MIB,
                available as f64 / MIB
            ))
        })? / ranks;
        let bytes = match self.opts.kv_cache_memory {
            Some(bytes) => bytes,
            None => {
                let share = (available as f64 * self.opts.kv_memory_fraction) as u64 / ranks;
                share.min(left)
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
                decoded_from: None,
            }],
        };
        let rows = self.model.forward(&batch, &mut self.cache)?;
        self.check_logits(&rows, "health")
    }

    fn check_logits(&self, rows: &[Vec<f32>], what: &str) -> Result<(), Error> {
        let ok = rows
            .first()
            .is_some_and(|r| r.len() == self.ctx.vocab_size && r.iter().all(|v| v.is_finite()));
        if ok {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "{what} forward produced no finite logits"
            )))
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

    fn smollm2() -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2
        });
        ModelConfig::from_hf_json(&json).unwrap()
    }

    fn forward(tokens: usize) -> MaxForward {
        MaxForward {
            tokens,
            logit_rows: tokens,
            span: 8192,
            threads: 2,
        }
    }

    #[test]
    fn activations_of_a_max_prefill_are_counted_from_the_shape() {
        let c = smollm2();
        // Per token: 6·576 + 2·(576 + 2·192) + 576 + 3·1536 + 1536 + 64 + 8 = 12168 floats;
        // per logits row 2·576 + 49152 + 3·49152 = 197760; attention 2 threads · (9 + 128) · 8192.
        let floats = 4096 * 12168 + 4096 * 197760 + 2 * 137 * 8192;
        assert_eq!(activation_bytes(&c, 1, forward(4096)), floats * 4);
        // The gathered logits and their per-sequence copies alone are live at once.
        let logits = 2 * 4096 * 49152 * 4;
        assert!(activation_bytes(&c, 1, forward(4096)) > logits);
        // The default SmolLM2 warmup: about 3.3 GiB, almost all of it logits rows.
        let mib = activation_bytes(&c, 1, forward(4096)) / (1 << 20);
        assert!((3200..3400).contains(&mib), "{mib} MiB");
    }

    #[test]
    fn activations_grow_with_the_forward_and_split_across_ranks() {
        let c = smollm2();
        let one = activation_bytes(&c, 1, forward(512));
        assert!(activation_bytes(&c, 1, forward(1024)) > one);
        let no_logprobs = MaxForward {
            logit_rows: 1,
            ..forward(512)
        };
        assert!(activation_bytes(&c, 1, no_logprobs) < one / 10);
        // Tensor parallelism splits every per-rank buffer but the gathered logits.
        let two = activation_bytes(&c, 2, forward(512));
        assert!(two < one && two > one / 2, "{two} vs {one}");
    }
}
