//! `tessera-shard convert`: a GGUF file to a Hugging Face model folder (`model.safetensors`,
//! `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `special_tokens_map.json`). Tensors go through the shard's own GGUF weight source, so they are
//! dequantized and un-permuted exactly as when the shard serves the GGUF: in float32 the folder
//! holds the very weights the shard would compute with.

mod hf_json;
mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tessera_formats::gguf::Gguf;
use tessera_formats::tokenizer::tokenizer_from_gguf;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::loader::{dtype_name, WeightDtype};
use crate::weights::gguf::{gguf_name, GgufSource};
use crate::weights::{DType, WeightSource};
use crate::{Error, Result};

pub use safetensors::{write_safetensors, SafetensorsEntry};

/// Arguments of `tessera-shard convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The `.gguf` file to convert.
    pub gguf: PathBuf,
    /// Output folder (created if missing; the files listed above are overwritten).
    pub out: PathBuf,
    /// Storage dtype of `model.safetensors`; float32 keeps the GGUF's exact dequantization.
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    pub dtype: WeightDtype,
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub tensors: usize,
    pub parameters: usize,
    pub tied_embeddings: bool,
    pub dtype: DType,
}

/// HF names of every tensor a model of `config`'s shape may have (weights and biases).
fn hf_candidates(config: &ModelConfig) -> Vec<String> {
    const MODULES: [&str; 9] = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let mut names: Vec<String> = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    .map(String::from)
    .into();
    for layer in 0..config.num_layers {
        for module in MODULES {
            for suffix in ["weight", "bias"] {
                names.push(format!("model.layers.{layer}.{module}.{suffix}"));
            }
        }
    }
    names
}

/// Every GGUF tensor with its HF name, sorted by HF name (the order safetensors files use).
/// A tensor with no HF counterpart is an error rather than silently dropped.
fn tensor_plan(gguf: &Gguf, config: &ModelConfig) -> Result<Vec<(String, String)>> {
    let by_gguf: HashMap<String, String> = hf_candidates(config)
        .into_iter()
        .filter_map(|hf| gguf_name(&hf).map(|g| (g, hf)))
        .collect();
    let mut plan = Vec::with_capacity(gguf.tensors().len());
    for t in gguf.tensors() {
        if t.name == "rope_freqs.weight" {
            // Llama 3.1's long-context frequency factors: a config.json `rope_scaling` entry in HF,
            // which GGUF metadata does not spell out; converting without it would change results.
            return Err(Error::tensor(
                gguf.path(),
                &t.name,
                "rope frequency factors (Llama 3.1 rope scaling) cannot be converted",
            ));
        }
        let hf = by_gguf.get(&t.name).ok_or_else(|| {
            Error::tensor(
                gguf.path(),
                &t.name,
                "has no Hugging Face counterpart in this architecture",
            )
        })?;
        plan.push((hf.clone(), t.name.clone()));
    }
    plan.sort();
    Ok(plan)
}

/// Converts `gguf` into the folder `out` with weights stored as `dtype`.
pub fn convert(gguf_path: &Path, out: &Path, dtype: WeightDtype) -> Result<Converted> {
    let gguf = Gguf::open(gguf_path)?;
    let config = ModelConfig::from_gguf(&gguf)?;
    if !matches!(
        config.architecture,
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2
    ) || config.moe.is_some()
    {
        return Err(Error::model_file(
            gguf_path,
            format!(
                "convert writes llama, mistral and qwen2 folders; {} is served from the GGUF \
                 file directly",
                config.architecture
            ),
        ));
    }
    let unwritable = match config.rope.scaling {
        RopeScaling::None | RopeScaling::Linear { .. } => None,
        RopeScaling::Yarn(_) => Some("yarn"),
        RopeScaling::LongRope(_) => Some("per-frequency factors"),
        RopeScaling::Dynamic { .. } => Some("dynamic"),
        RopeScaling::Llama3 { .. } => Some("llama3"),
    };
    if let Some(kind) = unwritable {
        return Err(Error::model_file(
            gguf_path,
            format!(
                "convert writes plain and linear rope scaling; this file's {kind} rope scaling \
                 is served from the GGUF file directly"
            ),
        ));
    }
    let dtype = match dtype {
        WeightDtype::Auto | WeightDtype::F32 => DType::F32,
        WeightDtype::Bf16 => DType::Bf16,
        WeightDtype::F16 => DType::F16,
    };
    // The tokenizer first: a vocabulary we cannot convert fails before minutes of weight writing.
    let tokenizer = tokenizer_from_gguf(&gguf)?;
    let plan = tensor_plan(&gguf, &config)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let src = GgufSource::new(&gguf, config.num_heads, config.num_kv_heads);
    let mut entries = Vec::with_capacity(plan.len());
    for (hf, g) in &plan {
        let shape = gguf.tensor_info(g)?.shape();
        entries.push(SafetensorsEntry {
            name: hf.clone(),
            shape,
        });
    }
    // Written under a temporary name and renamed last, so a folder with `model.safetensors` is
    // always a complete conversion (the fetch script relies on it).
    let partial = out.join("model.safetensors.partial");
    let written = write_safetensors(&partial, &entries, dtype, |name| {
        src.tensor(name).map(|t| t.data)
    });
    let parameters = written.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;

    let tied = !plan.iter().any(|(hf, _)| hf == "lm_head.weight");
    let files = hf_json::files(&gguf, &config, &tokenizer, dtype_name(dtype))?;
    for (name, doc) in files {
        let path = out.join(name);
        std::fs::write(&path, doc).map_err(|e| Error::io(&path, e))?;
    }
    let target = out.join("model.safetensors");
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    Ok(Converted {
        tensors: plan.len(),
        parameters,
        tied_embeddings: tied,
        dtype,
    })
}

/// `tessera-shard convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let c = convert(&args.gguf, &args.out, args.dtype)?;
    println!(
        "wrote {}: {} tensors, {} parameters in {}, tied embeddings: {}",
        args.out.display(),
        c.tensors,
        c.parameters,
        dtype_name(c.dtype),
        c.tied_embeddings
    );
    Ok(())
}
