//! SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies as a Hugging Face BPE with byte
//! fallback, built the way transformers' `LlamaConverter` / `SentencePieceExtractor` does, so the
//! result encodes exactly like the `tokenizer.json` Hugging Face ships for such models.

use std::collections::HashMap;

use serde_json::{json, Value};

/// Most work [`merges_from_scores`] may do, in bytes hashed: trying every split of a piece costs
/// its length in characters times its length in bytes, so one hostile megabyte-long piece would
/// cost 10^12. Real vocabularies need under 10^8 (pieces are rarely past a few dozen bytes).
const MAX_SPLIT_WORK: u64 = 1 << 31;

/// Merges derived from piece scores: every split of a piece into two vocabulary pieces, ordered
/// by the merged piece's score (highest first), ties by piece id, then by the halves' ids.
/// `Err` names the piece that takes the work past [`MAX_SPLIT_WORK`].
pub(crate) fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
) -> Result<Vec<(String, String)>, String> {
    let mut work = 0u64;
    for (id, piece) in tokens.iter().enumerate() {
        work =
            work.saturating_add((piece.chars().count() as u64).saturating_mul(piece.len() as u64));
        if work > MAX_SPLIT_WORK {
            return Err(format!(
                "vocabulary pieces are too long to derive merges from (piece {id} is {} bytes)",
                piece.len()
            ));
        }
    }
    // A duplicated piece maps to its last id, as in the converter's Python dict.
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri));
            }
        }
        local.sort_unstable();
        let score = scores.get(id).copied().unwrap_or(0.0);
        merges.extend(local.into_iter().map(|(l, r)| (score, id, l, r)));
    }
    // Stable sort on score only keeps the (piece id, left id, right id) order within ties.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect())
}

/// The normalizer and decoder of Llama's (legacy) `tokenizer.json`: spaces become "▁", and a
/// "▁" is prepended when the model adds a space prefix.
pub(crate) fn normalizer_and_decoder(add_space_prefix: bool) -> (Value, Value) {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let strip = if add_space_prefix { 1 } else { 0 };
    let decoder = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": strip, "stop": 0}
    ]});
    (normalizer, decoder)
}
