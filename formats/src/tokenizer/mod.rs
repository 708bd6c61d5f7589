//! Tokenizers from a Hugging Face folder (`tokenizer.json`) or from GGUF metadata.
//!
//! A GGUF vocabulary is turned into the `tokenizer.json` Hugging Face would ship for the same model
//! (mirroring transformers' converters and llama.cpp's `llama-vocab.cpp` pre-type table), then
//! loaded with the `tokenizers` crate, so both sources encode through the same code.

mod pretok;
mod spm;

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Largest `tokenizer.json` read: real ones are at most a few tens of MiB, and parsing one costs
/// several times its size in memory.
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 256 << 20;

/// Loads the tokenizer of a model: a Hugging Face folder's `tokenizer.json` or a `.gguf` file's vocabulary.
pub fn load_tokenizer(model: &Path) -> Result<Tokenizer> {
    if model.is_dir() {
        let file = model.join("tokenizer.json");
        let text = crate::read_capped(&file, MAX_TOKENIZER_JSON_BYTES)?;
        return Tokenizer::from_str(&text).map_err(|e| Error::Tokenizer {
            path: file,
            msg: e.to_string(),
        });
    }
    // The file's metadata and the document are dropped before parsing: three copies of a
    // 49k-token vocabulary at once were most of a router's peak memory.
    let (text, path) = {
        let gguf = Gguf::open(model)?;
        (
            tokenizer_json(&gguf)?.to_string(),
            gguf.path().to_path_buf(),
        )
    };
    parse(&text, &path)
}

/// Builds a tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
    let text = tokenizer_json(gguf)?.to_string();
    parse(&text, gguf.path())
}

fn parse(text: &str, path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_str(text).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: format!("building tokenizer: {e}"),
    })
}

fn tok_err(gguf: &Gguf, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: gguf.path().to_path_buf(),
        msg: msg.into(),
    }
}

/// The vocabulary arrays every GGUF tokenizer has.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i64>,
}

fn read_vocab(gguf: &Gguf) -> Result<Vocab> {
    let tokens = gguf
        .get_array("tokenizer.ggml.tokens")
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.tokens is missing or not an array"))?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.tokens holds a non-string"))?;
    let types = match gguf.get_array("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .map(|v| v.as_i64())
            .collect::<Option<Vec<_>>>()
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                tok_err(
                    gguf,
                    "tokenizer.ggml.token_type is not one integer per token",
                )
            })?,
    };
    Ok(Vocab { tokens, types })
}

/// The `tokenizer.json` document for the GGUF's vocabulary.
fn tokenizer_json(gguf: &Gguf) -> Result<Value> {
    let model = gguf
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.model is missing"))?;
    if !matches!(model, "llama" | "gpt2") {
        let msg =
            format!("unsupported tokenizer.ggml.model '{model}' (llama and gpt2 are supported)");
        return Err(tok_err(gguf, msg));
    }
    let vocab = read_vocab(gguf)?;
    let (mut doc, default_add_bos) = match model {
        "llama" => (spm_json(gguf, &vocab)?, true),
        _ => {
            // gpt2: byte-level BPE.
            let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
            let llama3 = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
            (byte_level_json(gguf, &vocab, pre)?, llama3)
        }
    };
    doc["added_tokens"] = added_tokens(&vocab);
    doc["post_processor"] = post_processor(gguf, &vocab, model, default_add_bos)?;
    doc["version"] = json!("1.0");
    doc["truncation"] = Value::Null;
    doc["padding"] = Value::Null;
    Ok(doc)
}

fn vocab_map(vocab: &Vocab) -> Value {
    let map: Map<String, Value> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    Value::Object(map)
}

/// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`).
fn spm_json(gguf: &Gguf, vocab: &Vocab) -> Result<Value> {
    let scores = gguf
        .get_array("tokenizer.ggml.scores")
        .ok_or_else(|| {
            tok_err(
                gguf,
                "tokenizer.ggml.scores is missing (needed by a llama tokenizer)",
            )
        })?
        .iter()
        .map(|v| v.as_f32())
        .collect::<Option<Vec<_>>>()
        .filter(|s| s.len() == vocab.tokens.len())
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.scores is not one float per token"))?;
    let merges = spm::merges_from_scores(&vocab.tokens, &scores).map_err(|m| tok_err(gguf, m))?;
    let unk = gguf.get_u64("tokenizer.ggml.unknown_token_id").unwrap_or(0);
    let unk_token = usize::try_from(unk)
        .ok()
        .and_then(|i| vocab.tokens.get(i))
        .ok_or_else(|| tok_err(gguf, format!("unknown_token_id {unk} is out of range")))?;
    let add_space_prefix = gguf
        .get_bool("tokenizer.ggml.add_space_prefix")
        .unwrap_or(true);
    let (normalizer, decoder) = spm::normalizer_and_decoder(add_space_prefix);
    Ok(json!({
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk_token,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map(vocab), "merges": merges,
        },
    }))
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizer of pre-type `pre`.
fn byte_level_json(gguf: &Gguf, vocab: &Vocab, pre: &str) -> Result<Value> {
    let p = pretok::for_pre_type(pre)
        .ok_or_else(|| tok_err(gguf, format!("unsupported tokenizer.ggml.pre '{pre}'")))?;
    let merges = gguf
        .get_array("tokenizer.ggml.merges")
        .ok_or_else(|| {
            tok_err(
                gguf,
                "tokenizer.ggml.merges is missing (needed by a gpt2 tokenizer)",
            )
        })?
        .iter()
        .map(|v| v.as_str().and_then(|s| s.split_once(' ')))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            tok_err(
                gguf,
                "tokenizer.ggml.merges holds an entry that is not \"left right\"",
            )
        })?;
    Ok(json!({
        "normalizer": p.normalizer,
        "pre_tokenizer": p.pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": p.ignore_merges,
            "vocab": vocab_map(vocab), "merges": merges,
        },
    }))
}

/// Control and unknown tokens become special added tokens, user-defined ones plain added tokens
/// (except the "[PAD<n>]" fillers llama.cpp's converter pads vocabularies with).
fn added_tokens(vocab: &Vocab) -> Value {
    let added = vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .enumerate()
        .filter_map(|(id, (tok, &ty))| {
            let special = ty == TYPE_CONTROL || ty == TYPE_UNKNOWN;
            let filler = tok.starts_with("[PAD") && tok.ends_with(']');
            let keep = special || (ty == TYPE_USER_DEFINED && !filler);
            keep.then(|| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": !special, "special": special})
            })
        })
        .collect();
    Value::Array(added)
}

/// BOS/EOS insertion as the GGUF asks (`add_bos_token`, `add_eos_token`), after the byte-level
/// offsets fix-up for gpt2 vocabularies.
fn post_processor(gguf: &Gguf, vocab: &Vocab, model: &str, default_add_bos: bool) -> Result<Value> {
    let add_bos = gguf
        .get_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(default_add_bos);
    let add_eos = gguf
        .get_bool("tokenizer.ggml.add_eos_token")
        .unwrap_or(false);
    let special = |key: &str| -> Result<Option<(String, u64)>> {
        let Some(id) = gguf.get_u64(key) else {
            return Ok(None);
        };
        let tok = usize::try_from(id)
            .ok()
            .and_then(|i| vocab.tokens.get(i))
            .ok_or_else(|| tok_err(gguf, format!("{key} {id} is out of range")))?;
        Ok(Some((tok.clone(), id)))
    };
    let bos = if add_bos {
        special("tokenizer.ggml.bos_token_id")?
    } else {
        None
    };
    let eos = if add_eos {
        special("tokenizer.ggml.eos_token_id")?
    } else {
        None
    };
    let mut steps = Vec::new();
    if model == "gpt2" {
        steps.push(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}));
    }
    if bos.is_some() || eos.is_some() {
        steps.push(template_processing(bos, eos));
    }
    Ok(match steps.len() {
        0 => Value::Null,
        1 => steps.remove(0),
        _ => json!({"type": "Sequence", "processors": steps}),
    })
}

fn template_processing(bos: Option<(String, u64)>, eos: Option<(String, u64)>) -> Value {
    let piece = |tok: &str| json!({"SpecialToken": {"id": tok, "type_id": 0}});
    let seq = |type_id: u32| json!({"Sequence": {"id": if type_id == 0 { "A" } else { "B" }, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (i, seq_piece) in [seq(0), seq(1)].into_iter().enumerate() {
        let target = if i == 0 { &mut single } else { &mut pair };
        if let Some((t, _)) = &bos {
            target.push(piece(t));
        }
        target.push(seq_piece);
        if let Some((t, _)) = &eos {
            target.push(piece(t));
        }
    }
    let pair = [single.clone(), pair].concat();
    for (t, id) in bos.iter().chain(eos.iter()) {
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}
