//! `tessera-shard random-model`: writes a Llama- or Mixtral-shaped model folder (config.json,
//! model.safetensors, tokenizer.json) with seeded random weights, so benchmarks can run a
//! Llama-3-8B-sized model, or a mixture of experts beside a dense model of the same active size,
//! without downloading one. Weights follow Hugging Face's init (uniform with std 0.02, norms 1.0)
//! and are generated and written tensor by tensor in parallel chunks, never held whole in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::loader::WeightDtype;
use crate::weights::DType;
use crate::{Error, Result};

/// Model shapes the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Llama-3.1-8B: 32 layers, 4096 hidden, 32 heads / 8 KV heads, 128256 vocabulary.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// A two-layer model of the same structure, for tests.
    Tiny,
    /// A small Mixtral: 8 layers, 1024 hidden, 8 experts of 1024 FFN columns, 2 per token.
    #[value(name = "moe-small")]
    MoeSmall,
    /// `moe-small`'s dense twin: one 2048-column MLP per layer, the routed experts' active size.
    #[value(name = "dense-small")]
    DenseSmall,
}

/// Arguments of `tessera-shard random-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct RandomModelArgs {
    #[arg(long, value_enum, default_value_t = Shape::Tiny)]
    pub shape: Shape,
    /// Storage dtype of the weights (`auto` is bfloat16).
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    pub dtype: WeightDtype,
    /// Folder to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The numbers that make a shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// Experts per layer (0: a dense MLP); each has `intermediate` FFN columns.
    pub experts: usize,
    pub experts_per_token: usize,
}

impl Shape {
    pub fn dims(self) -> Dims {
        match self {
            Shape::Llama3_8b => Dims {
                hidden: 4096,
                intermediate: 14336,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                vocab: 128_256,
                max_positions: 131_072,
                experts: 0,
                experts_per_token: 0,
            },
            Shape::Tiny => Dims {
                hidden: 64,
                intermediate: 160,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 256,
                max_positions: 2048,
                experts: 0,
                experts_per_token: 0,
            },
            Shape::MoeSmall | Shape::DenseSmall => {
                let moe = self == Shape::MoeSmall;
                Dims {
                    hidden: 1024,
                    intermediate: if moe { 1024 } else { 2048 },
                    layers: 8,
                    heads: 16,
                    kv_heads: 4,
                    vocab: 32_000,
                    max_positions: 4096,
                    experts: if moe { 8 } else { 0 },
                    experts_per_token: if moe { 2 } else { 0 },
                }
            }
        }
    }
}

/// `config.json` of a shape: Llama 3.1's rope (theta 5e5 with llama3 scaling), untied lm_head;
/// Mixtral's when the shape has experts.
pub fn config_json(d: &Dims, dtype: DType) -> Value {
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.hidden / d.heads,
        "vocab_size": d.vocab,
        "max_position_embeddings": d.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        },
        "tie_word_embeddings": false,
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": crate::loader::dtype_name(dtype),
    });
    if d.experts > 0 {
        config["architectures"] = json!(["MixtralForCausalLM"]);
        config["model_type"] = json!("mixtral");
        config["num_local_experts"] = json!(d.experts);
        config["num_experts_per_tok"] = json!(d.experts_per_token);
    }
    config
}

/// One tensor to write: checkpoint name, shape, and whether it is a norm (all ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ones: bool,
}

/// Every tensor of a shape, named as in a Hugging Face Llama checkpoint.
pub fn tensors(d: &Dims) -> Vec<TensorSpec> {
    let hd = d.hidden / d.heads;
    let t = |name: String, shape: Vec<usize>, ones| TensorSpec { name, shape, ones };
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        vec![d.vocab, d.hidden],
        false,
    )];
    for l in 0..d.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.extend([
            t(p("input_layernorm.weight"), vec![d.hidden], true),
            t(
                p("self_attn.q_proj.weight"),
                vec![d.heads * hd, d.hidden],
                false,
            ),
            t(
                p("self_attn.k_proj.weight"),
                vec![d.kv_heads * hd, d.hidden],
                false,
            ),
            t(
                p("self_attn.v_proj.weight"),
                vec![d.kv_heads * hd, d.hidden],
                false,
            ),
            t(
                p("self_attn.o_proj.weight"),
                vec![d.hidden, d.heads * hd],
                false,
            ),
            t(p("post_attention_layernorm.weight"), vec![d.hidden], true),
        ]);
        let ff = d.intermediate;
        let mlp = |prefix: String, [gate, up, down]: [&str; 3]| {
            [
                t(format!("{prefix}.{gate}.weight"), vec![ff, d.hidden], false),
                t(format!("{prefix}.{up}.weight"), vec![ff, d.hidden], false),
                t(format!("{prefix}.{down}.weight"), vec![d.hidden, ff], false),
            ]
        };
        if d.experts == 0 {
            out.extend(mlp(p("mlp"), ["gate_proj", "up_proj", "down_proj"]));
        } else {
            let gate = p("block_sparse_moe.gate.weight");
            out.push(t(gate, vec![d.experts, d.hidden], false));
            for e in 0..d.experts {
                let expert = p(&format!("block_sparse_moe.experts.{e}"));
                out.extend(mlp(expert, ["w1", "w3", "w2"]));
            }
        }
    }
    out.push(t("model.norm.weight".into(), vec![d.hidden], true));
    out.push(t("lm_head.weight".into(), vec![d.vocab, d.hidden], false));
    out
}

/// A WordLevel tokenizer of exactly `vocab` tokens: `<unk>`, `<s>` (added in front of every
/// encoding), `</s>`, then `w3`, `w4`, ... split on whitespace.
pub fn tokenizer_json(vocab: usize) -> Value {
    let specials = ["<unk>", "<s>", "</s>"];
    let name = |i: usize| specials.get(i).map_or(format!("w{i}"), |s| s.to_string());
    let words: serde_json::Map<String, Value> = (0..vocab).map(|i| (name(i), json!(i))).collect();
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}
    })
}

/// Values per independently seeded chunk: the bytes are the same whatever the thread count.
const CHUNK: usize = 1 << 16;
/// Chunks generated in parallel before one write.
const CHUNKS_PER_WRITE: usize = 256;
/// Hugging Face's `initializer_range`: std of every weight matrix; uniform(-a, a) has std a/√3.
const INIT_STD: f32 = 0.02;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (elements of `dtype`) with chunk `chunk` of tensor `tensor`.
fn fill_chunk(out: &mut [u8], dtype: DType, seed: u64, tensor: usize, chunk: usize, ones: bool) {
    let width = dtype.size();
    let a = INIT_STD * 3f32.sqrt();
    let mut state = splitmix64(seed ^ splitmix64(((tensor as u64) << 40) ^ chunk as u64));
    for el in out.chunks_exact_mut(width) {
        let v = if ones {
            1.0
        } else {
            state = splitmix64(state);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        };
        match dtype {
            DType::F32 => el.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => el.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::Bf16 => el.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            DType::Quantized { .. } => unreachable!("random models are written dense"),
        }
    }
}

/// Writes `dir/model.safetensors`; returns the parameter count.
fn write_safetensors(dir: &Path, specs: &[TensorSpec], dtype: DType, seed: u64) -> Result<usize> {
    let path = dir.join("model.safetensors");
    let width = dtype.size();
    let tag = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::Bf16 => "BF16",
        DType::Quantized { .. } => unreachable!("random models are written dense"),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        let bytes = s.shape.iter().product::<usize>() * width;
        header.insert(
            s.name.clone(),
            json!({"dtype": tag, "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let io = |e| Error::io(&path, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
    f.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&text).map_err(io)?;
    let mut buf = vec![0u8; CHUNK * CHUNKS_PER_WRITE * width];
    for (ti, s) in specs.iter().enumerate() {
        let n: usize = s.shape.iter().product();
        for first in (0..n.div_ceil(CHUNK)).step_by(CHUNKS_PER_WRITE) {
            let len = (n - first * CHUNK).min(CHUNK * CHUNKS_PER_WRITE) * width;
            buf[..len]
                .par_chunks_mut(CHUNK * width)
                .enumerate()
                .for_each(|(i, out)| fill_chunk(out, dtype, seed, ti, first + i, s.ones));
            f.write_all(&buf[..len]).map_err(io)?;
        }
    }
    f.flush().map_err(io)?;
    Ok(offset / width)
}

/// Writes the model folder; returns the parameter count.
pub fn write_model(dir: &Path, shape: Shape, dtype: DType, seed: u64) -> Result<usize> {
    let d = shape.dims();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write_json = |name: &str, v: &Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v).unwrap_or_default())
            .map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &config_json(&d, dtype))?;
    write_json("tokenizer.json", &tokenizer_json(d.vocab))?;
    write_safetensors(dir, &tensors(&d), dtype, seed)
}

/// `tessera-shard random-model`.
pub fn run(args: &RandomModelArgs) -> Result<()> {
    let dtype = match args.dtype {
        WeightDtype::Auto | WeightDtype::Bf16 => DType::Bf16,
        WeightDtype::F16 => DType::F16,
        WeightDtype::F32 => DType::F32,
    };
    let params = write_model(&args.out, args.shape, dtype, args.seed)?;
    println!(
        "wrote {}: {params} parameters, {:.2} GiB of {} weights (seed {})",
        args.out.display(),
        (params * dtype.size()) as f64 / (1u64 << 30) as f64,
        crate::loader::dtype_name(dtype),
        args.seed
    );
    Ok(())
}
