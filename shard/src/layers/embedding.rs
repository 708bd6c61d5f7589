//! Token embedding: rows of the `[vocab, hidden]` table looked up and widened to f32. Replicated
//! on every rank for now (vocabulary-parallel with an all-reduce is the tensor-parallel layout).
//! With tied embeddings on one rank the table is read from the packed lm_head, so it is stored once.

use std::sync::Arc;

use crate::backend::cpu::PackedMatrix;
use crate::weights::{expect_shape, DType, TensorData, WeightSource};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    hidden: usize,
}

#[derive(Debug, Clone)]
enum Table {
    Rows(TensorData),
    /// The tied lm_head's weights, `[vocab, hidden]` packed.
    Packed(Arc<PackedMatrix>),
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
            table: Table::Rows(t.data.convert(dtype)),
            hidden,
        })
    }

    /// The table's rows, unless it is already shared with the lm_head.
    pub fn rows(&self) -> Option<&TensorData> {
        match &self.table {
            Table::Rows(t) => Some(t),
            Table::Packed(_) => None,
        }
    }

    /// Reads rows from `packed` (the tied lm_head, same `[vocab, hidden]` values) and frees the
    /// table's own copy.
    pub fn share(self, packed: Arc<PackedMatrix>) -> Self {
        Embedding {
            table: Table::Packed(packed),
            hidden: self.hidden,
        }
    }

    /// `[n, hidden]` embeddings of `tokens` (ids already checked against the vocabulary).
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.hidden;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            match &self.table {
                Table::Rows(rows) => {
                    let start = t as usize * h;
                    out.extend(rows.f32_range(start, start + h));
                }
                Table::Packed(p) => out.extend((0..h).map(|c| p.get(t as usize, c))),
            }
        }
        out
    }
}
