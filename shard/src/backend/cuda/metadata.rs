//! The per-step metadata the CUDA kernels read, packed from the same `ForwardBatch` the CPU engine
//! takes and validated by the same `BatchPlan`: token ids, positions and write slots per token;
//! `cu_seqlens_q` (FlashAttention's varlen convention: sequence s owns query rows
//! `cu[s]..cu[s+1]`); context lengths; block tables flattened to `[num_seqs, stride]` i32 rows.

use crate::forward::{BatchPlan, ForwardBatch};
use crate::{Error, Result};

/// Pads a block-table row past the blocks a sequence needs. Kernels read only positions below the
/// context length; a padded entry read by mistake is an out-of-range address, not a silent read.
pub const BLOCK_PAD: i32 = -1;

/// Host copies of one step's metadata, in the exact layouts the kernels take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMetadata {
    pub tokens: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i32>,
    /// `num_seqs + 1` offsets into the token rows.
    pub cu_seqlens_q: Vec<i32>,
    /// Per sequence: tokens in the cache after this step's writes (start_pos + chunk length).
    pub context_lens: Vec<i32>,
    /// `[num_seqs, block_table_stride]`, row s holding the blocks of positions `0..context_lens[s]`.
    pub block_tables: Vec<i32>,
    pub block_table_stride: usize,
    pub max_q_len: usize,
    pub max_context_len: usize,
    /// Token rows whose logits are computed (the lm_head runs on these rows only).
    pub logit_rows: Vec<i32>,
    pub logit_counts: Vec<usize>,
}

impl StepMetadata {
    /// Validates `batch` against the cache geometry (the CPU engine's checks) and packs it.
    pub fn pack(
        batch: &ForwardBatch,
        vocab: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        if num_blocks * block_size > i32::MAX as usize {
            return Err(Error::Device(format!(
                "a KV cache of {num_blocks} blocks of {block_size} slots exceeds the kernels' i32 slot index"
            )));
        }
        let plan =
            BatchPlan::new(batch, vocab, num_blocks, block_size).map_err(Error::InvalidBatch)?;
        Ok(Self::from_plan(batch, &plan, block_size))
    }

    fn from_plan(batch: &ForwardBatch, plan: &BatchPlan, block_size: usize) -> Self {
        // Every index below is bounded by the cache size, checked to fit i32 in `pack`.
        let to_i32 = |v: usize| v as i32;
        let context_lens: Vec<usize> = batch
            .seqs
            .iter()
            .map(|s| s.start_pos + s.tokens.len())
            .collect();
        let stride = context_lens
            .iter()
            .map(|c| c.div_ceil(block_size))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut block_tables = vec![BLOCK_PAD; batch.seqs.len() * stride];
        for (s, seq) in batch.seqs.iter().enumerate() {
            let needed = context_lens[s].div_ceil(block_size);
            for (dst, &b) in block_tables[s * stride..s * stride + needed]
                .iter_mut()
                .zip(&seq.block_table)
            {
                *dst = b as i32;
            }
        }
        let mut cu_seqlens_q = Vec::with_capacity(batch.seqs.len() + 1);
        cu_seqlens_q.push(0);
        cu_seqlens_q.extend(plan.seq_tokens.iter().map(|r| to_i32(r.end)));
        StepMetadata {
            tokens: plan.tokens.clone(),
            positions: plan.positions.iter().copied().map(to_i32).collect(),
            slots: plan.slots.iter().copied().map(to_i32).collect(),
            cu_seqlens_q,
            context_lens: context_lens.iter().copied().map(to_i32).collect(),
            block_tables,
            block_table_stride: stride,
            max_q_len: plan.seq_tokens.iter().map(|r| r.len()).max().unwrap_or(0),
            max_context_len: context_lens.iter().copied().max().unwrap_or(0),
            logit_rows: plan.logit_rows.iter().copied().map(to_i32).collect(),
            logit_counts: plan.logit_counts.clone(),
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Every sequence adds one token: the step can use the flash-decoding kernel (query row s is
    /// sequence s). Otherwise the prefill kernel runs all sequences, decode ones included.
    pub fn is_decode_only(&self) -> bool {
        self.max_q_len == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{LogitsWanted, SeqInput};

    fn seq(
        n: usize,
        start_pos: usize,
        blocks: Vec<u32>,
        bs: usize,
        logits: LogitsWanted,
    ) -> SeqInput {
        SeqInput {
            tokens: (0..n as u32).map(|t| t % 7).collect(),
            start_pos,
            slots: (start_pos..start_pos + n)
                .map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32)
                .collect(),
            block_table: blocks,
            logits,
            decoded_from: None,
        }
    }

    #[test]
    fn packs_a_mixed_prefill_and_decode_batch() {
        let batch = ForwardBatch {
            seqs: vec![
                // A prefill chunk after a 3-token cached prefix, blocks out of order.
                seq(5, 3, vec![6, 2], 4, LogitsWanted::All),
                // One decode token; its table is longer than it needs.
                seq(1, 4, vec![0, 5, 7], 4, LogitsWanted::Last),
                seq(2, 0, vec![1], 4, LogitsWanted::None),
            ],
        };
        let m = StepMetadata::pack(&batch, 10, 8, 4).unwrap();
        assert_eq!(m.num_tokens(), 8);
        assert_eq!(m.cu_seqlens_q, vec![0, 5, 6, 8]);
        assert_eq!(m.positions, vec![3, 4, 5, 6, 7, 4, 0, 1]);
        assert_eq!(m.slots, vec![27, 8, 9, 10, 11, 20, 4, 5]);
        assert_eq!(m.context_lens, vec![8, 5, 2]);
        assert_eq!(m.block_table_stride, 2);
        assert_eq!(m.block_tables, vec![6, 2, 0, 5, 1, BLOCK_PAD]);
        assert_eq!((m.max_q_len, m.max_context_len), (5, 8));
        assert_eq!(m.logit_rows, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(m.logit_counts, vec![5, 1, 0]);
        assert!(!m.is_decode_only());
    }

    #[test]
    fn decode_only_batches_and_slots_agree_with_block_tables() {
        let batch = ForwardBatch {
            seqs: vec![
                seq(1, 16, vec![3, 0], 16, LogitsWanted::Last),
                seq(1, 0, vec![1], 16, LogitsWanted::Last),
            ],
        };
        let m = StepMetadata::pack(&batch, 10, 4, 16).unwrap();
        assert!(m.is_decode_only());
        for s in 0..m.num_seqs() {
            let pos = m.positions[s] as usize;
            let block = m.block_tables[s * m.block_table_stride + pos / 16];
            assert_eq!(m.slots[s], block * 16 + (pos % 16) as i32);
        }
    }

    #[test]
    fn rejects_what_the_cpu_engine_rejects() {
        let mut bad = ForwardBatch {
            seqs: vec![seq(2, 0, vec![1], 4, LogitsWanted::Last)],
        };
        bad.seqs[0].slots[1] = 9;
        let err = StepMetadata::pack(&bad, 10, 4, 4).unwrap_err().to_string();
        assert!(err.contains("does not match its block table"), "{err}");
        let huge = ForwardBatch {
            seqs: vec![seq(1, 0, vec![0], 1 << 16, LogitsWanted::Last)],
        };
        assert!(StepMetadata::pack(&huge, 10, 1 << 16, 1 << 16).is_err());
    }
}
