//! Token embedding: rows of the `[vocab, hidden]` table looked up and widened to f32. Replicated
//! on every rank for now (vocabulary-parallel with an all-reduce is the tensor-parallel layout).

use crate::weights::{expect_shape, DType, TensorData, WeightSource};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Embedding {
    table: TensorData,
    hidden: usize,
}

impl Embedding {
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        vocab: usize,
        hidden: usize,
        dtype: DType,
    ) -> Result<Self> {
        let t = expect_shape(src, name, &[vocab, hidden])?;
        Ok(Embedding {
            table: t.data.convert(dtype),
            hidden,
        })
    }

    /// The table itself (the tied lm_head packs it).
    pub fn table(&self) -> &TensorData {
        &self.table
    }

    /// `[n, hidden]` embeddings of `tokens` (ids already checked against the vocabulary).
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.hidden;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let start = t as usize * h;
            out.extend(self.table.f32_range(start, start + h));
        }
        out
    }
}
