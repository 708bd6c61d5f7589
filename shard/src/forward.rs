//! The input of one forward: a ragged batch of sequences (prefill chunks and decode tokens
//! together, no padding), as TGI v3 sends them (`slots`, `blocks`, `cache_len`, `chunk_len`), and
//! its validated, flattened form (`BatchPlan`) the model runs on.

/// Which logits rows a sequence wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    None,
    /// The row of the last token (the next-token distribution).
    #[default]
    Last,
    /// One row per token of this forward (prompt logprobs).
    All,
}

/// One sequence's part of a forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInput {
    /// This forward's tokens: a prefill chunk or one decode token.
    pub tokens: Vec<u32>,
    /// Tokens already in the KV cache for this sequence = position of `tokens[0]`.
    pub start_pos: usize,
    /// KV slot of each token (`block_id · block_size + offset`); `len == tokens.len()`.
    pub slots: Vec<u32>,
    /// Blocks covering positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    pub logits: LogitsWanted,
    /// Position of the sequence's first generated token. Tokens from there on are attended one
    /// query per tile, as a decode step attends them, and prompt tokens always in query tiles: so
    /// a resumed request's recomputed KV is bit-identical to the first computation, whatever the
    /// chunking (the two paths sum in different orders). `None` (callers that do not track it): a
    /// one-token tile is attended as a decode step.
    pub decoded_from: Option<usize>,
}

/// All sequences of one forward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub seqs: Vec<SeqInput>,
}

/// A validated batch, flattened to per-token arrays.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Sequence index of each token.
    pub seq_of: Vec<usize>,
    /// Write slot of each token.
    pub slots: Vec<usize>,
    /// Per sequence: the slot of every position `0..end`, from its block table.
    pub seq_slots: Vec<Vec<usize>>,
    /// Per sequence: its tokens' flat indices (sequences are contiguous).
    pub seq_tokens: Vec<std::ops::Range<usize>>,
    /// Per sequence: the flat index from which its tokens are generated ones
    /// ([`SeqInput::decoded_from`]).
    pub seq_decoded_from: Vec<Option<usize>>,
    /// Flat indices of the tokens whose logits are returned, grouped by sequence in order.
    pub logit_rows: Vec<usize>,
    /// How many of `logit_rows` belong to each sequence.
    pub logit_counts: Vec<usize>,
}

impl BatchPlan {
    /// Checks the batch against the cache geometry and vocabulary; the error names the
    /// sequence and the problem.
    pub fn new(
        batch: &ForwardBatch,
        vocab: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, String> {
        let mut plan = BatchPlan {
            tokens: Vec::new(),
            positions: Vec::new(),
            seq_of: Vec::new(),
            slots: Vec::new(),
            seq_slots: Vec::new(),
            seq_tokens: Vec::new(),
            seq_decoded_from: Vec::new(),
            logit_rows: Vec::new(),
            logit_counts: Vec::new(),
        };
        let mut seen_slots = std::collections::HashSet::new();
        for (s, seq) in batch.seqs.iter().enumerate() {
            let seq_slots = check_seq(seq, vocab, num_blocks, block_size)
                .map_err(|m| format!("sequence {s}: {m}"))?;
            let base = plan.tokens.len();
            for (i, &t) in seq.tokens.iter().enumerate() {
                let slot = seq.slots[i] as usize;
                if !seen_slots.insert(slot) {
                    return Err(format!(
                        "sequence {s}: slot {slot} is written twice in this batch"
                    ));
                }
                plan.tokens.push(t);
                plan.positions.push(seq.start_pos + i);
                plan.seq_of.push(s);
                plan.slots.push(slot);
            }
            let rows: Vec<usize> = match seq.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last => vec![base + seq.tokens.len() - 1],
                LogitsWanted::All => (base..base + seq.tokens.len()).collect(),
            };
            plan.logit_counts.push(rows.len());
            plan.logit_rows.extend(rows);
            plan.seq_slots.push(seq_slots);
            plan.seq_tokens.push(base..plan.tokens.len());
            let decoded = seq
                .decoded_from
                .map(|p| base + p.saturating_sub(seq.start_pos).min(seq.tokens.len()));
            plan.seq_decoded_from.push(decoded);
        }
        Ok(plan)
    }
}

/// Validates one sequence and returns the slot of each of its positions.
fn check_seq(
    seq: &SeqInput,
    vocab: usize,
    num_blocks: usize,
    block_size: usize,
) -> Result<Vec<usize>, String> {
    let n = seq.tokens.len();
    if n == 0 {
        return Err("no tokens".into());
    }
    if seq.slots.len() != n {
        return Err(format!("{} slots for {n} tokens", seq.slots.len()));
    }
    if let Some(t) = seq.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "token id {t} is outside the vocabulary (size {vocab})"
        ));
    }
    let end = seq.start_pos + n;
    let needed = end.div_ceil(block_size);
    if seq.block_table.len() < needed {
        return Err(format!(
            "block table has {} blocks but positions 0..{end} need {needed} (block size {block_size})",
            seq.block_table.len()
        ));
    }
    if let Some(b) = seq.block_table.iter().find(|&&b| b as usize >= num_blocks) {
        return Err(format!(
            "block {b} is out of range (cache has {num_blocks} blocks)"
        ));
    }
    let slots: Vec<usize> = (0..end)
        .map(|p| seq.block_table[p / block_size] as usize * block_size + p % block_size)
        .collect();
    for (i, &slot) in seq.slots.iter().enumerate() {
        let want = slots[seq.start_pos + i];
        if slot as usize != want {
            return Err(format!(
                "slot {slot} of token {i} (position {}) does not match its block table (expected {want})",
                seq.start_pos + i
            ));
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(tokens: Vec<u32>, start_pos: usize, blocks: Vec<u32>) -> SeqInput {
        let slots = (start_pos..start_pos + tokens.len())
            .map(|p| blocks[p / 4] * 4 + (p % 4) as u32)
            .collect();
        SeqInput {
            tokens,
            start_pos,
            slots,
            block_table: blocks,
            logits: LogitsWanted::Last,
            decoded_from: None,
        }
    }

    #[test]
    fn plan_flattens_and_validates() {
        let batch = ForwardBatch {
            seqs: vec![
                seq(vec![1, 2, 3, 4, 5], 0, vec![3, 1]),
                seq(vec![7], 6, vec![0, 2]),
            ],
        };
        let plan = BatchPlan::new(&batch, 10, 4, 4).unwrap();
        assert_eq!(plan.positions, vec![0, 1, 2, 3, 4, 6]);
        assert_eq!(plan.slots, vec![12, 13, 14, 15, 4, 10]);
        assert_eq!(plan.logit_rows, vec![4, 5]);

        let mut bad = batch.clone();
        bad.seqs[0].tokens[0] = 10;
        assert!(BatchPlan::new(&bad, 10, 4, 4)
            .unwrap_err()
            .contains("outside the vocabulary"));
        let mut bad = batch.clone();
        bad.seqs[1].block_table = vec![0, 9];
        assert!(BatchPlan::new(&bad, 10, 4, 4)
            .unwrap_err()
            .contains("out of range"));
        let mut bad = batch.clone();
        bad.seqs[1].block_table.pop();
        assert!(BatchPlan::new(&bad, 10, 4, 4)
            .unwrap_err()
            .contains("need 2"));
        let mut bad = batch;
        bad.seqs[0].slots[1] = 0;
        assert!(BatchPlan::new(&bad, 10, 4, 4)
            .unwrap_err()
            .contains("does not match"));
    }
}
