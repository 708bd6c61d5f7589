//! `tessera-shard generate`: greedy generation from the command line, and the single-sequence
//! greedy loop tests use to check the engine against reference outputs.

use std::path::PathBuf;

use serde_json::json;
use tessera_formats::chat_template::ChatTemplate;
use tokenizers::Tokenizer;

use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};
use crate::kv_cache::{KvCache, KvCacheDtype, KvCacheDtypeParser, DEFAULT_BLOCK_SIZE};
use crate::loader::{self, Device, LoadOptions, WeightDtype};
use crate::models::Model;
use crate::weights::quant::Scheme;
use crate::{Error, Result};

/// Arguments of `tessera-shard generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Model folder (Hugging Face layout) or `.gguf` file.
    #[arg(long)]
    pub model_id: PathBuf,
    /// Prompt text; empty starts from BOS when the tokenizer adds one.
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for `--chat`.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// What the KV cache stores: bf16 (half the memory of f32), f16, or f32; attention math is
    /// f32 either way. TGI's fp8 values are refused.
    #[arg(long, value_parser = KvCacheDtypeParser, default_value_t = KvCacheDtype::default())]
    pub kv_cache_dtype: KvCacheDtype,
    #[arg(long, value_enum, default_value_t = WeightDtype::Auto)]
    pub dtype: WeightDtype,
    /// Quantize dense matrices at load (`q8_0`, `q4_k`).
    #[arg(long, value_enum)]
    pub quantize: Option<Scheme>,
    /// Print one JSON line with ids, text and the first token's top-5 logits.
    #[arg(long)]
    pub json: bool,
}

/// What a greedy run produced.
#[derive(Debug, Clone)]
pub struct Greedy {
    pub generated_ids: Vec<u32>,
    /// Logits of the position after the prompt (the first generated token's distribution).
    pub first_logits: Vec<f32>,
}

/// Greedy decoding of one sequence: prefill `prompt`, then one token per forward until
/// `max_new` tokens or an id in `eos` (included).
pub fn greedy(model: &Model, prompt: &[u32], max_new: usize, eos: &[u32]) -> Result<Greedy> {
    if prompt.is_empty() {
        return Err(Error::InvalidBatch(
            "empty prompt: nothing to condition on".into(),
        ));
    }
    let bs = DEFAULT_BLOCK_SIZE;
    let total = prompt.len() + max_new;
    let blocks: Vec<u32> = (0..total.div_ceil(bs) as u32).collect();
    let mut cache = KvCache::new(model.cache_shape(), blocks.len(), bs);
    let seq = |tokens: Vec<u32>, start: usize| SeqInput {
        slots: (start..start + tokens.len()).map(|p| p as u32).collect(),
        tokens,
        start_pos: start,
        block_table: blocks.clone(),
        logits: LogitsWanted::Last,
        decoded_from: None,
    };
    let mut logits = model
        .forward(
            &ForwardBatch {
                seqs: vec![seq(prompt.to_vec(), 0)],
            },
            &mut cache,
        )?
        .remove(0);
    let first_logits = logits.clone();
    let mut out = Vec::new();
    while out.len() < max_new {
        let next = argmax(&logits);
        out.push(next);
        if eos.contains(&next) || out.len() == max_new {
            break;
        }
        let pos = prompt.len() + out.len() - 1;
        logits = model
            .forward(
                &ForwardBatch {
                    seqs: vec![seq(vec![next], pos)],
                },
                &mut cache,
            )?
            .remove(0);
    }
    Ok(Greedy {
        generated_ids: out,
        first_logits,
    })
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest logits as `(id, logit)`, largest first.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter()
        .take(k)
        .map(|i| (i as u32, logits[i]))
        .collect()
}

/// Encodes the prompt as `generate` does: templated text without special tokens, plain text with.
pub fn encode_prompt(tokenizer: &Tokenizer, text: &str, templated: bool) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, !templated)
        .map_err(|e| Error::Tokenizer(format!("encoding the prompt: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Runs the `generate` subcommand and prints its result.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let opts = LoadOptions {
        dtype: args.dtype,
        quantize: args.quantize,
        device: args.device,
        kv_cache_dtype: args.kv_cache_dtype,
        ..LoadOptions::default()
    };
    let loaded = loader::load(&args.model_id, &opts)?;
    let text = if args.chat {
        render_chat(&args.model_id, loaded.chat_template.as_ref(), args)?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = encode_prompt(&loaded.tokenizer, &text, args.chat)?;
    let g = greedy(
        &loaded.model,
        &prompt_ids,
        args.max_new_tokens,
        &loaded.config.eos_token_ids,
    )?;
    let generated_text = loaded
        .tokenizer
        .decode(&g.generated_ids, false)
        .map_err(|e| Error::Tokenizer(format!("decoding: {e}")))?;
    if args.json {
        let top5: Vec<_> = top_k(&g.first_logits, 5)
            .into_iter()
            .map(|(i, l)| json!([i, l]))
            .collect();
        let line = json!({
            "prompt_ids": prompt_ids,
            "generated_ids": g.generated_ids,
            "generated_text": generated_text,
            "first_token_top5": top5,
        });
        println!("{line}");
    } else {
        println!("{text}{generated_text}");
    }
    Ok(())
}

fn render_chat(
    model: &std::path::Path,
    template: Option<&ChatTemplate>,
    args: &GenerateArgs,
) -> Result<String> {
    let template = template.ok_or_else(|| {
        Error::Tokenizer(format!(
            "{}: the model has no chat template",
            model.display()
        ))
    })?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": args.prompt}));
    Ok(template.render(&messages, true, None)?)
}
