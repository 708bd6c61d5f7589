//! The Llama decoder (also Mistral and Qwen2): pre-norm blocks of GQA self-attention with RoPE and
//! a SwiGLU MLP, as Hugging Face's `modeling_llama.py`, over a ragged batch and a paged KV cache.
//! Weight names are spelled as in the checkpoint. Tensor-parallel layout as Megatron/TGI:
//! column-parallel q/k/v and gate/up, row-parallel o/down followed by an all-reduce, lm_head split
//! by vocabulary and all-gathered.

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::cpu::{exp_in_place, PackedMatrix};
use crate::comm::{Comm, Shard};
use crate::config::ModelConfig;
use crate::forward::{BatchPlan, ForwardBatch};
use crate::kv_cache::{CacheShape, KvCache, KvCacheDtype, LayerCache};
use crate::layers::attention::{paged_attention, write_kv, Heads};
use crate::layers::embedding::Embedding;
use crate::layers::linear::{Linear, Part, RowPart};
use crate::layers::norm::RmsNorm;
use crate::layers::rope::{Rope, RopeTables};
use crate::layers::ROWS_PER_TASK;
use crate::weights::{DType, WeightSource};
use crate::{Error, Result};

struct Layer {
    input_norm: RmsNorm,
    qkv: Linear,
    o_proj: Linear,
    post_norm: RmsNorm,
    gate_up: Linear,
    down: Linear,
}

pub struct Llama {
    config: ModelConfig,
    /// This rank's head geometry (heads divided by the world size).
    heads: Heads,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    comm: Arc<dyn Comm>,
}

impl Llama {
    pub fn load(
        src: &dyn WeightSource,
        config: &ModelConfig,
        dtype: DType,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        let shard = Shard::of(comm.as_ref());
        shard.check(config.num_kv_heads, "num_key_value_heads")?;
        shard.check(config.intermediate_size, "intermediate_size")?;
        shard.check(config.vocab_size, "vocab_size")?;
        let split = Split::of(config);
        let kv_heads = shard.range(config.num_kv_heads).len();
        let heads = Heads {
            num_heads: kv_heads * split.group,
            num_kv_heads: kv_heads,
            head_dim: config.head_dim,
            sliding_window: config.sliding_window,
        };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed_name = "model.embed_tokens.weight";
        let embed = Embedding::load(src, embed_name, (v, h), shard.range(v), dtype)?;
        let layers = (0..config.num_layers)
            .map(|i| load_layer(src, config, i, dtype, shard))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "model.norm.weight", h, config.rms_eps)?;
        let (embed, lm_head) = tied_or_own_lm_head(src, config, embed, dtype, shard)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, config.rope_scaling);
        Ok(Llama {
            config: config.clone(),
            heads,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            comm,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn weight_bytes(&self) -> usize {
        let layer = |l: &Layer| {
            [&l.qkv, &l.o_proj, &l.gate_up, &l.down]
                .iter()
                .map(|x| x.weight().nbytes())
                .sum::<usize>()
        };
        self.layers.iter().map(layer).sum::<usize>() + self.lm_head.weight().nbytes()
    }

    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        self.check_cache(cache)?;
        let plan = BatchPlan::new(
            batch,
            self.config.vocab_size,
            cache.num_blocks(),
            cache.block_size(),
        )
        .map_err(Error::InvalidBatch)?;
        let n = plan.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut x = self.embed.forward(&plan.tokens);
        self.comm.all_reduce_sum(&mut x)?;
        let rope = self.rope.tables(&plan.positions);
        for (i, layer) in self.layers.iter().enumerate() {
            self.layer_forward(layer, &mut x, &plan, &rope, cache.layer_mut(i))?;
        }
        self.logits(&x, &plan)
    }

    /// What this rank's KV cache holds per token, stored as `dtype`.
    pub fn cache_shape(&self, dtype: KvCacheDtype) -> CacheShape {
        CacheShape {
            layers: self.layers.len(),
            kv_dim: self.heads.num_kv_heads * self.heads.head_dim,
            dtype,
        }
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
        l: &Layer,
        x: &mut [f32],
        plan: &BatchPlan,
        rope: &RopeTables,
        cache: &mut LayerCache,
    ) -> Result<()> {
        let n = plan.len();
        let hd = self.heads.head_dim;
        let (qd, kvd) = (self.heads.num_heads * hd, self.heads.num_kv_heads * hd);
        let qkv = l.qkv.forward(&l.input_norm.forward(x), n);
        let (mut q, mut k, v) = split_qkv(&qkv, n, qd, kvd);
        rope.apply(&mut q, n);
        rope.apply(&mut k, n);
        write_kv(cache, &k, &v, &plan.slots, kvd);
        let attn = paged_attention(&q, cache, plan, self.heads);
        let mut o = l.o_proj.forward(&attn, n);
        self.comm.all_reduce_sum(&mut o)?;
        add_into(x, &o, self.config.hidden_size);

        let gu = l.gate_up.forward(&l.post_norm.forward(x), n);
        let act = swiglu(&gu, n);
        let mut d = l.down.forward(&act, n);
        self.comm.all_reduce_sum(&mut d)?;
        add_into(x, &d, self.config.hidden_size);
        Ok(())
    }

    /// Final norm and lm_head on the requested rows only, split back per sequence.
    fn logits(&self, x: &[f32], plan: &BatchPlan) -> Result<Vec<Vec<f32>>> {
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let rows = plan.logit_rows.len();
        let mut picked = Vec::with_capacity(rows * h);
        for &r in &plan.logit_rows {
            picked.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let local = self.lm_head.forward(&self.norm.forward(&picked), rows);
        let all = self.comm.all_gather_columns(&local, rows)?;
        let mut out = Vec::with_capacity(plan.logit_counts.len());
        let mut at = 0;
        for &c in &plan.logit_counts {
            out.push(all[at * v..(at + c) * v].to_vec());
            at += c;
        }
        Ok(out)
    }
}

/// The lm_head split by vocabulary: the tied embedding's rows packed (the embedding then reads
/// from them, so the rows are stored once) or `lm_head.weight`'s rows.
fn tied_or_own_lm_head(
    src: &dyn WeightSource,
    c: &ModelConfig,
    embed: Embedding,
    dtype: DType,
    shard: Shard,
) -> Result<(Embedding, Linear)> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    match embed.rows() {
        Some(table) if c.tie_word_embeddings && !src.contains("lm_head.weight") => {
            let rows = shard.range(v).len();
            let quantized = table.quantized_at_load(h, dtype);
            let packed = PackedMatrix::pack(rows, h, quantized.as_ref().unwrap_or(table))
                .map_err(|m| Error::tensor(src.file_of("lm_head.weight"), "lm_head.weight", m))?;
            let lm_head = Linear::new(packed, None);
            let embed = embed.share(lm_head.weight().clone());
            Ok((embed, lm_head))
        }
        _ => {
            let part = Part {
                prefix: "lm_head",
                rows: v,
                unit: 1,
            };
            let lm_head = Linear::column(src, &[part], h, false, dtype, shard)?;
            Ok((embed, lm_head))
        }
    }
}

/// Units of the tensor-parallel split, in rows: a GQA group's q rows and one head's k/v rows
/// stay together, so every rank's q heads attend to its own kv heads.
struct Split {
    group: usize,
    q_unit: usize,
    kv_unit: usize,
}

impl Split {
    fn of(c: &ModelConfig) -> Self {
        let group = c.num_heads / c.num_kv_heads;
        Split {
            group,
            q_unit: group * c.head_dim,
            kv_unit: c.head_dim,
        }
    }
}

fn load_layer(
    src: &dyn WeightSource,
    c: &ModelConfig,
    i: usize,
    dtype: DType,
    shard: Shard,
) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let (h, ff) = (c.hidden_size, c.intermediate_size);
    let split = Split::of(c);
    let name = |s: &str| format!("{p}.{s}");
    let (q, k, v) = (
        name("self_attn.q_proj"),
        name("self_attn.k_proj"),
        name("self_attn.v_proj"),
    );
    let part = |prefix, rows, unit| Part { prefix, rows, unit };
    let qkv_parts = [
        part(&q, c.q_dim(), split.q_unit),
        part(&k, c.kv_dim(), split.kv_unit),
        part(&v, c.kv_dim(), split.kv_unit),
    ];
    let (gate, up) = (name("mlp.gate_proj"), name("mlp.up_proj"));
    let gate_up_parts = [part(&gate, ff, 1), part(&up, ff, 1)];
    let (o, down) = (name("self_attn.o_proj"), name("mlp.down_proj"));
    let o_part = RowPart {
        prefix: &o,
        rows: h,
        cols: c.q_dim(),
        unit: split.q_unit,
    };
    let down_part = RowPart {
        prefix: &down,
        rows: h,
        cols: ff,
        unit: 1,
    };
    Ok(Layer {
        input_norm: RmsNorm::load(src, &name("input_layernorm.weight"), h, c.rms_eps)?,
        qkv: Linear::column(src, &qkv_parts, h, c.attention_bias, dtype, shard)?,
        o_proj: Linear::row(src, &o_part, dtype, shard)?,
        post_norm: RmsNorm::load(src, &name("post_attention_layernorm.weight"), h, c.rms_eps)?,
        gate_up: Linear::column(src, &gate_up_parts, h, false, dtype, shard)?,
        down: Linear::row(src, &down_part, dtype, shard)?,
    })
}

/// Splits fused `[n, q | k | v]` rows into three row-major buffers.
fn split_qkv(qkv: &[f32], n: usize, qd: usize, kvd: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = qd + 2 * kvd;
    let (mut q, mut k, mut v) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
    let rows = q.par_chunks_exact_mut(qd).zip(k.par_chunks_exact_mut(kvd));
    let rows = rows
        .zip(v.par_chunks_exact_mut(kvd))
        .zip(qkv.par_chunks_exact(w));
    rows.with_min_len(ROWS_PER_TASK)
        .for_each(|(((q, k), v), row)| {
            q.copy_from_slice(&row[..qd]);
            k.copy_from_slice(&row[qd..qd + kvd]);
            v.copy_from_slice(&row[qd + kvd..]);
        });
    (q, k, v)
}

/// `silu(gate) · up` for fused `[n, gate | up]` rows.
fn swiglu(gu: &[f32], n: usize) -> Vec<f32> {
    let ff = gu.len() / n / 2;
    let mut out = vec![0.0; n * ff];
    let rows = out
        .par_chunks_exact_mut(ff)
        .zip(gu.par_chunks_exact(2 * ff));
    rows.with_min_len(ROWS_PER_TASK).for_each(|(o, row)| {
        let (g, u) = row.split_at(ff);
        o.iter_mut().zip(g).for_each(|(o, &g)| *o = -g);
        exp_in_place(o);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + *o) * u;
        }
    });
    out
}

/// `x += y` for `[n, width]` rows.
fn add_into(x: &mut [f32], y: &[f32], width: usize) {
    let rows = x.par_chunks_exact_mut(width).zip(y.par_chunks_exact(width));
    rows.with_min_len(ROWS_PER_TASK).for_each(|(a, b)| {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
    });
}
