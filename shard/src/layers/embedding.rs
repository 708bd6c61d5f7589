//! Token embedding: rows of the `[vocab, hidden]` table looked up and widened to f32.
//! Vocabulary-parallel (TGI's `TensorParallelEmbedding`): each rank holds a range of rows and
//! answers zeros for ids outside it, so the caller's all-reduce assembles every embedding. With
//! tied embeddings the rows are read from the packed lm_head slice, so they are stored once.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::cpu::PackedMatrix;
use crate::weights::{expect_shape, DType, TensorData, WeightSource};
use crate::Result;

#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    hidden: usize,
    /// The vocabulary ids this rank holds; row `i` of the table is id `ids.start + i`.
    ids: Range<usize>,
}

#[derive(Debug, Clone)]
enum Table {
    Rows(TensorData),
    /// The tied lm_head's weights, `[vocab, hidden]` packed.
    Packed(Arc<PackedMatrix>),
}

impl Embedding {
    /// Loads rows `ids` of the `[vocab, hidden]` table `name`.
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        (vocab, hidden): (usize, usize),
        ids: Range<usize>,
        dtype: DType,
    ) -> Result<Self> {
        let t = expect_shape(src, name, &[vocab, hidden])?;
        let rows = if ids.len() == vocab {
            t.data
        } else {
            t.data.slice_rows(ids.clone(), hidden)
        };
        Ok(Embedding {
            table: Table::Rows(rows.convert(dtype)),
            hidden,
            ids,
        })
    }

    /// The table's rows, unless it is already shared with the lm_head.
    pub fn rows(&self) -> Option<&TensorData> {
        match &self.table {
            Table::Rows(t) => Some(t),
            Table::Packed(_) => None,
        }
    }

    /// Reads rows from `packed` (the tied lm_head slice, the same rows' values) and frees the
    /// table's own copy.
    pub fn share(self, packed: Arc<PackedMatrix>) -> Self {
        Embedding {
            table: Table::Packed(packed),
            ..self
        }
    }

    /// `[n, hidden]` embeddings of `tokens` (ids already checked against the vocabulary); rows
    /// of ids another rank holds are zero.
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.hidden;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let local = (t as usize).checked_sub(self.ids.start);
            match (local.filter(|&r| r < self.ids.len()), &self.table) {
                (None, _) => out.resize(out.len() + h, 0.0),
                (Some(r), Table::Rows(rows)) => out.extend(rows.f32_range(r * h, (r + 1) * h)),
                (Some(r), Table::Packed(p)) => out.extend((0..h).map(|c| p.get(r, c))),
            }
        }
        out
    }
}
