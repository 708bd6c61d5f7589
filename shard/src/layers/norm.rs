//! RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x²) + eps) · w` in f32, as Llama uses it, or
//! `· (1 + w)` as Gemma stores its weights. Over whole rows, or per head (Qwen 3's and Gemma 3's
//! q/k norms) when the weight is one head wide.

use crate::backend::Backend;
use crate::layers::linear::load_vector;
use crate::weights::WeightSource;
use crate::Result;

pub struct RmsNorm<B: Backend> {
    weight: B::Tensor,
    eps: f32,
    /// Added to every weight: 0, or 1 for Gemma's `(1 + w)`.
    offset: f32,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(
        b: &B,
        src: &dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f32,
        offset: f32,
    ) -> Result<Self> {
        let weight = b.upload(load_vector(src, name, dim)?, dim);
        Ok(RmsNorm {
            weight,
            eps,
            offset,
        })
    }

    /// Normalizes each row of `x` (or each weight-wide chunk of it) into a new tensor.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.rms_norm(x, &self.weight, self.eps, self.offset)
    }
}
