//! Normalizer and pre-tokenizer for byte-level BPE vocabularies, chosen by `tokenizer.ggml.pre`
//! the way llama.cpp's `llama-vocab.cpp` maps pre-types to split regexes, written in the
//! Hugging Face `tokenizer.json` form those regexes came from.

use serde_json::{json, Value};

/// Llama 3's split regex (also DBRX, Smaug).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama 3's with single digits.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek Coder's successive splits (llama.cpp `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER`).
const DEEPSEEK_CODER: &[&str] = &[
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
    r"\p{N}",
];

/// The `normalizer` and `pre_tokenizer` JSON for pre-type `pre`, and whether BPE should look up
/// whole pre-tokens in the vocabulary before merging (`ignore_merges`, Llama 3).
pub(crate) struct PreTokenization {
    pub normalizer: Value,
    pub pre_tokenizer: Value,
    pub ignore_merges: bool,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn sequence(parts: Vec<Value>) -> Value {
    json!({"type": "Sequence", "pretokenizers": parts})
}

/// Pre-tokenization for `pre`, or `None` when the pre-type is not one this crate knows.
pub(crate) fn for_pre_type(pre: &str) -> Option<PreTokenization> {
    let plain = |pre_tokenizer| PreTokenization {
        normalizer: Value::Null,
        pre_tokenizer,
        ignore_merges: false,
    };
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => plain(byte_level(true)),
        "starcoder" | "smollm" | "refact" | "codeshell" => plain(sequence(vec![
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(true),
        ])),
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => PreTokenization {
            ignore_merges: true,
            ..plain(sequence(vec![split(LLAMA3), byte_level(false)]))
        },
        "qwen2" | "stablelm2" | "megrez" => PreTokenization {
            normalizer: json!({"type": "NFC"}),
            ..plain(sequence(vec![split(QWEN2), byte_level(false)]))
        },
        "deepseek-coder" => {
            let mut parts: Vec<Value> = DEEPSEEK_CODER.iter().map(|r| split(r)).collect();
            parts.push(byte_level(false));
            plain(sequence(parts))
        }
        _ => return None,
    })
}
