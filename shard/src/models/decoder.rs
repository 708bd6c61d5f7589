//! The decoder every family runs: pre-norm blocks of GQA self-attention with a rotary embedding
//! and a gated MLP (dense or mixture of experts), over a ragged batch and a paged KV cache, as
//! transformers' `modeling_{llama,mistral,mixtral,qwen2,qwen3,qwen3_moe,gemma2,gemma3,phi3}.py`.
//! What the families change is resolved in `ModelConfig` and read here as options: q/k biases,
//! q/k norms, Gemma's scaled embedding, `(1 + w)` norms, norms after attention and MLP and
//! soft-capping, per-layer sliding windows and rotary bases, fused q/k/v (Phi-3).
//!
//! Tensor-parallel layout as Megatron/TGI: column-parallel q/k/v and gate/up, row-parallel o/down
//! followed by an all-reduce, lm_head split by vocabulary and all-gathered. Weight names are
//! spelled as in the checkpoint. Everything runs through the [`Backend`] the model is loaded on.

use std::sync::Arc;

use crate::backend::{AttentionSpec, Backend};
use crate::comm::{Comm, Shard};
use crate::config::{Architecture, ModelConfig};
use crate::forward::{BatchPlan, ForwardBatch};
use crate::kv_cache::{CacheShape, KvCache, KvCacheDtype, LayerCache};
use crate::layers::embedding::Embedding;
use crate::layers::linear::{Linear, Part, RowPart};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::{Rope, RopeTables};
use crate::models::mlp::{Loading, Mlp};
use crate::weights::{DType, WeightSource};
use crate::{Error, Result};

struct Layer<B: Backend> {
    input_norm: RmsNorm<B>,
    qkv: Linear<B>,
    /// Per-head norms of q and k (Qwen 3, Gemma 3).
    qk_norm: Option<(RmsNorm<B>, RmsNorm<B>)>,
    o_proj: Linear<B>,
    /// Gemma: the norm of the attention output, before the residual add.
    post_attn_norm: Option<RmsNorm<B>>,
    pre_mlp_norm: RmsNorm<B>,
    /// Gemma: the norm of the MLP output, before the residual add.
    post_mlp_norm: Option<RmsNorm<B>>,
    mlp: Mlp<B>,
    attention: AttentionSpec,
    /// Uses the sliding-window layers' rotary embedding (Gemma 3).
    local_rope: bool,
}

pub struct Decoder<B: Backend> {
    b: B,
    config: ModelConfig,
    embed: Embedding<B>,
    layers: Vec<Layer<B>>,
    norm: RmsNorm<B>,
    lm_head: Linear<B>,
    rope: Rope,
    local_rope: Option<Rope>,
    comm: Arc<dyn Comm>,
}

impl<B: Backend> Decoder<B> {
    pub fn load(
        b: B,
        src: &dyn WeightSource,
        config: &ModelConfig,
        dtype: DType,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        let shard = Shard::of(comm.as_ref());
        shard.check(config.num_kv_heads, "num_key_value_heads")?;
        shard.check(config.vocab_size, "vocab_size")?;
        let dense = config
            .moe
            .as_ref()
            .is_none_or(|m| m.sparse_layers.contains(&false));
        if dense {
            shard.check(config.intermediate_size, "intermediate_size")?;
        }
        if let Some(moe) = &config.moe {
            shard.check(moe.intermediate_size, "moe_intermediate_size")?;
        }
        let at = Loading {
            b: &b,
            src,
            config,
            dtype,
            shard,
        };
        let layers = (0..config.num_layers)
            .map(|i| load_layer(&at, i))
            .collect::<Result<Vec<_>>>()?;
        let h = config.hidden_size;
        let offset = norm_offset(config);
        let norm = RmsNorm::load(&b, src, "model.norm.weight", h, config.rms_eps, offset)?;
        let (embed, lm_head) = embedding_and_lm_head(&at)?;
        Ok(Decoder {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(&config.rope),
            local_rope: config.local_rope.as_ref().map(Rope::new),
            comm,
            b,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights a decode step streams (the routed share of the experts).
    pub fn weight_bytes(&self) -> usize {
        let b = &self.b;
        let layer =
            |l: &Layer<B>| b.nbytes(l.qkv.weight()) + b.nbytes(l.o_proj.weight()) + l.mlp.nbytes(b);
        self.layers.iter().map(layer).sum::<usize>() + b.nbytes(self.lm_head.weight())
    }

    /// What this rank's KV cache holds per token, stored as `dtype`.
    pub fn cache_shape(&self, dtype: KvCacheDtype) -> CacheShape {
        let a = self.layers[0].attention;
        CacheShape {
            layers: self.layers.len(),
            kv_dim: a.num_kv_heads * a.head_dim,
            dtype,
        }
    }

    /// Runs one ragged forward. Returns, per sequence, its requested logits rows concatenated
    /// (`vocab_size` values per row).
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        self.check_cache(cache)?;
        let plan = BatchPlan::new(
            batch,
            self.config.vocab_size,
            cache.num_blocks(),
            cache.block_size(),
        )
        .map_err(Error::InvalidBatch)?;
        if plan.tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.b.run(|| {
            let b = &self.b;
            let mut x = self.embed.forward(b, &plan.tokens);
            b.all_reduce(self.comm.as_ref(), &mut x)?;
            if self.config.architecture.is_gemma() {
                b.scale(&mut x, (self.config.hidden_size as f64).sqrt() as f32);
            }
            let rope = self.rope.tables(b, &plan);
            let local = self.local_rope.as_ref().map(|r| r.tables(b, &plan));
            for (i, layer) in self.layers.iter().enumerate() {
                let tables = match &local {
                    Some(local) if layer.local_rope => local,
                    _ => &rope,
                };
                self.layer_forward(layer, &mut x, &plan, tables, cache.layer_mut(i))?;
            }
            self.logits(&x, &plan)
        })
    }

    /// Any cache dtype will do: attention widens what it reads.
    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        let kv_dim = self.cache_shape(cache.dtype()).kv_dim;
        if cache.num_layers() != self.layers.len() || cache.kv_dim() != kv_dim {
            return Err(Error::InvalidBatch(format!(
                "KV cache has {} layers of width {}, the model needs {} of width {kv_dim}",
                cache.num_layers(),
                cache.kv_dim(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    fn layer_forward(
        &self,
        l: &Layer<B>,
        x: &mut B::Tensor,
        plan: &BatchPlan,
        rope: &RopeTables<B>,
        cache: &mut LayerCache,
    ) -> Result<()> {
        let (b, comm) = (&self.b, self.comm.as_ref());
        let a = l.attention;
        let (qd, kvd) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let qkv = l.qkv.forward(b, &l.input_norm.forward(b, x));
        let [mut q, mut k, v]: [B::Tensor; 3] = b
            .split_columns(&qkv, &[qd, kvd, kvd])
            .try_into()
            .unwrap_or_else(|_| unreachable!("three widths give three tensors"));
        if let Some((q_norm, k_norm)) = &l.qk_norm {
            q = q_norm.forward(b, &q);
            k = k_norm.forward(b, &k);
        }
        rope.apply(b, &mut q, a.head_dim);
        rope.apply(b, &mut k, a.head_dim);
        b.write_kv(cache, &k, &v, plan);
        let attn = b.attention(&q, cache, plan, a);
        let mut o = l.o_proj.forward(b, &attn);
        b.all_reduce(comm, &mut o)?;
        if let Some(norm) = &l.post_attn_norm {
            o = norm.forward(b, &o);
        }
        b.add(x, &o);

        let h = l.pre_mlp_norm.forward(b, x);
        let mut m = l.mlp.forward(b, &h, self.config.activation);
        b.all_reduce(comm, &mut m)?;
        if let Some(norm) = &l.post_mlp_norm {
            m = norm.forward(b, &m);
        }
        b.add(x, &m);
        Ok(())
    }

    /// Final norm and lm_head on the requested rows only, split back per sequence.
    fn logits(&self, x: &B::Tensor, plan: &BatchPlan) -> Result<Vec<Vec<f32>>> {
        let b = &self.b;
        let picked = b.gather_rows(x, &plan.logit_rows);
        let local = self.lm_head.forward(b, &self.norm.forward(b, &picked));
        let mut logits = b.all_gather_columns(self.comm.as_ref(), &local)?;
        if let Some(cap) = self.config.final_softcap {
            b.softcap(&mut logits, cap);
        }
        let all = b.download(&logits);
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(plan.logit_counts.len());
        let mut at = 0;
        for &c in &plan.logit_counts {
            out.push(all[at * v..(at + c) * v].to_vec());
            at += c;
        }
        Ok(out)
    }
}

/// Gemma stores RMSNorm weights as `w` and applies `1 + w`.
fn norm_offset(c: &ModelConfig) -> f32 {
    if c.architecture.is_gemma() {
        1.0
    } else {
        0.0
    }
}

/// The embedding and the lm_head split by vocabulary. Tied: the embedding's rows are packed
/// once as the lm_head (quantized at load if asked) and the embedding reads from them.
fn embedding_and_lm_head<B: Backend>(at: &Loading<B>) -> Result<(Embedding<B>, Linear<B>)> {
    let (c, src) = (at.config, at.src);
    let (h, v) = (c.hidden_size, c.vocab_size);
    let ids = at.shard.range(v);
    let embed_name = "model.embed_tokens.weight";
    if c.tie_word_embeddings && !src.contains("lm_head.weight") {
        let rows = Embedding::<B>::rows(src, embed_name, (v, h), ids.clone())?.convert(at.dtype);
        let quantized = rows.quantized_at_load(h, at.dtype);
        let packed =
            at.b.pack(ids.len(), h, quantized.as_ref().unwrap_or(&rows))
                .map_err(|m| Error::tensor(src.file_of("lm_head.weight"), "lm_head.weight", m))?;
        let packed = Arc::new(packed);
        return Ok((
            Embedding::shared(packed.clone(), ids),
            Linear::shared(packed),
        ));
    }
    let embed = Embedding::load(at.b, src, embed_name, (v, h), ids, at.dtype)?;
    let part = Part::whole("lm_head", v, 1);
    let lm_head = Linear::column(at.b, src, &[part], h, false, at.dtype, at.shard)?;
    Ok((embed, lm_head))
}

fn load_layer<B: Backend>(at: &Loading<B>, i: usize) -> Result<Layer<B>> {
    let (b, src, c) = (at.b, at.src, at.config);
    let p = format!("model.layers.{i}");
    let name = |s: &str| format!("{p}.{s}");
    let (h, hd) = (c.hidden_size, c.head_dim);
    // A GQA group's q rows and one head's k/v rows stay on one rank, so every rank's q heads
    // attend to its own kv heads.
    let group = c.num_heads / c.num_kv_heads;
    let (q_unit, kv_unit) = (group * hd, hd);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let fused = name("self_attn.qkv_proj");
    let separate = [
        name("self_attn.q_proj"),
        name("self_attn.k_proj"),
        name("self_attn.v_proj"),
    ];
    let qkv_parts: Vec<Part> = if c.architecture == Architecture::Phi3 {
        let total = qd + 2 * kvd;
        let slice = |first, rows, unit| Part {
            prefix: &fused,
            total,
            first,
            rows,
            unit,
        };
        vec![
            slice(0, qd, q_unit),
            slice(qd, kvd, kv_unit),
            slice(qd + kvd, kvd, kv_unit),
        ]
    } else {
        vec![
            Part::whole(&separate[0], qd, q_unit),
            Part::whole(&separate[1], kvd, kv_unit),
            Part::whole(&separate[2], kvd, kv_unit),
        ]
    };
    let o = name("self_attn.o_proj");
    let o_part = RowPart {
        prefix: &o,
        rows: h,
        cols: qd,
        unit: q_unit,
    };
    let (eps, offset) = (c.rms_eps, norm_offset(c));
    let norm = |s: &str, dim| RmsNorm::load(b, src, &name(s), dim, eps, offset);
    let gemma = c.architecture.is_gemma();
    let qk_norm = if c.qk_norm {
        Some((
            norm("self_attn.q_norm.weight", hd)?,
            norm("self_attn.k_norm.weight", hd)?,
        ))
    } else {
        None
    };
    let kv_heads = at.shard.range(c.num_kv_heads).len();
    let attention = AttentionSpec {
        num_heads: kv_heads * group,
        num_kv_heads: kv_heads,
        head_dim: hd,
        window: c.window(i),
        scale: c.attn_scale,
        softcap: c.attn_softcap,
    };
    Ok(Layer {
        input_norm: norm("input_layernorm.weight", h)?,
        qkv: Linear::column(b, src, &qkv_parts, h, c.attention_bias, at.dtype, at.shard)?,
        qk_norm,
        o_proj: Linear::row(b, src, &o_part, at.dtype, at.shard)?,
        post_attn_norm: gemma
            .then(|| norm("post_attention_layernorm.weight", h))
            .transpose()?,
        pre_mlp_norm: if gemma {
            norm("pre_feedforward_layernorm.weight", h)?
        } else {
            norm("post_attention_layernorm.weight", h)?
        },
        post_mlp_norm: gemma
            .then(|| norm("post_feedforward_layernorm.weight", h))
            .transpose()?,
        mlp: Mlp::load(at, &p, i)?,
        attention,
        local_rope: c.local_rope.is_some() && c.sliding_layers[i],
    })
}
