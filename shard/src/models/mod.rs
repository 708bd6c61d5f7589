//! Model families. One decoder (`decoder.rs`) runs all of them — Llama, Mistral, Mixtral, Qwen 2,
//! Qwen 3, Qwen3-MoE, Gemma 2, Gemma 3 and Phi-3 — with what differs resolved in `ModelConfig`;
//! the MLP (dense or mixture of experts) lives in `mlp.rs`. Models are generic over the
//! [`Backend`](crate::backend::Backend); [`Model`] is the decoder on the CPU backend.

pub mod decoder;
pub mod mlp;

use std::sync::Arc;

use crate::backend::cpu::Cpu;
use crate::comm::Comm;
use crate::config::ModelConfig;
use crate::forward::ForwardBatch;
use crate::kv_cache::{CacheShape, KvCache, KvCacheDtype};
use crate::weights::{DType, WeightSource};
use crate::Result;

/// A loaded model, ready to run forwards on the CPU backend.
pub struct Model {
    inner: decoder::Decoder<Cpu>,
    kv_cache_dtype: KvCacheDtype,
}

impl Model {
    /// Builds the model from `src`, keeping weights in `dtype` (math is always f32).
    pub fn load(
        src: &dyn WeightSource,
        config: &ModelConfig,
        dtype: DType,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        Ok(Model {
            inner: decoder::Decoder::load(Cpu, src, config, dtype, comm)?,
            kv_cache_dtype: KvCacheDtype::default(),
        })
    }

    /// The same model, with KV caches made from [`Model::cache_shape`] storing `dtype`.
    pub fn with_kv_cache_dtype(self, dtype: KvCacheDtype) -> Self {
        Model {
            kv_cache_dtype: dtype,
            ..self
        }
    }

    /// Runs one ragged forward. Returns, per sequence, its requested logits rows concatenated
    /// (`vocab_size` values per row).
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        self.inner.forward(batch, cache)
    }

    pub fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    /// What this rank's KV cache holds per token (in the dtype chosen at load; any cache dtype
    /// is accepted by `forward`).
    pub fn cache_shape(&self) -> CacheShape {
        self.inner.cache_shape(self.kv_cache_dtype)
    }

    /// Bytes of weights a decode step streams (for bandwidth figures).
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }
}
