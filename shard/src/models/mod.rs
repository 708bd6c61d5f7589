//! Model families. Llama, Mistral and Qwen2 share one decoder (`llama.rs`); what differs between
//! them (q/k/v biases, sliding window) is resolved in `ModelConfig`.

pub mod llama;

use std::sync::Arc;

use crate::comm::Comm;
use crate::config::ModelConfig;
use crate::forward::ForwardBatch;
use crate::kv_cache::{CacheShape, KvCache, KvCacheDtype};
use crate::weights::{DType, WeightSource};
use crate::Result;

/// A loaded model, ready to run forwards on the CPU backend.
pub struct Model {
    inner: llama::Llama,
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
            inner: llama::Llama::load(src, config, dtype, comm)?,
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
        // Run the whole forward on a pool worker: the per-op parallel loops then start from a
        // worker's own deque instead of each injecting a job and parking the calling thread.
        rayon::join(|| self.inner.forward(batch, cache), || ()).0
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
