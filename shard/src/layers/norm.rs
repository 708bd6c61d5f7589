//! RMSNorm (Zhang & Sennrich 2019) as Llama uses it: `x / sqrt(mean(x²) + eps) · w`, in f32.

use rayon::prelude::*;

use crate::layers::linear::load_vector;
use crate::layers::ROWS_PER_TASK;
use crate::weights::WeightSource;
use crate::Result;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn load(src: &dyn WeightSource, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm::new(load_vector(src, name, dim)?, eps))
    }

    /// Normalizes each row of `x` (`[n, dim]`) into a new buffer.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let dim = self.weight.len();
        let mut out = vec![0.0; x.len()];
        let rows = out.par_chunks_exact_mut(dim).zip(x.par_chunks_exact(dim));
        rows.with_min_len(ROWS_PER_TASK).for_each(|(o, row)| {
            let ss = crate::backend::cpu::dot(row, row);
            let inv = 1.0 / (ss / dim as f32 + self.eps).sqrt();
            for ((oi, xi), wi) in o.iter_mut().zip(row).zip(&self.weight) {
                *oi = wi * (xi * inv);
            }
        });
        out
    }
}
