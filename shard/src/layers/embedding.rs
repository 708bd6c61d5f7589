//! Token embedding: rows of the `[vocab, hidden]` table looked up as f32.
//! Vocabulary-parallel (TGI's `TensorParallelEmbedding`): each rank holds a range of rows and
//! answers zeros for ids outside it, so the caller's all-reduce assembles every embedding. With
//! tied embeddings the table is the packed lm_head slice itself, so the rows are stored once.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::Backend;
use crate::weights::{expect_shape, DType, TensorData, WeightSource};
use crate::{Error, Result};

pub struct Embedding<B: Backend> {
    table: Arc<B::Matrix>,
    /// The vocabulary ids this rank holds; row `i` of the table is id `ids.start + i`.
    ids: Range<usize>,
}

impl<B: Backend> Embedding<B> {
    /// Rows `ids` of the `[vocab, hidden]` table `name`, in `dtype` (never quantized at load:
    /// only a stored quantized table stays quantized).
    pub fn load(
        b: &B,
        src: &dyn WeightSource,
        name: &str,
        (vocab, hidden): (usize, usize),
        ids: Range<usize>,
        dtype: DType,
    ) -> Result<Self> {
        let rows = Self::rows(src, name, (vocab, hidden), ids.clone())?.convert(dtype);
        let table = b
            .pack(ids.len(), hidden, &rows)
            .map_err(|m| Error::tensor(src.file_of(name), name, m))?;
        Ok(Embedding::shared(Arc::new(table), ids))
    }

    /// Rows `ids` of the `[vocab, hidden]` tensor `name` as stored.
    pub fn rows(
        src: &dyn WeightSource,
        name: &str,
        (vocab, hidden): (usize, usize),
        ids: Range<usize>,
    ) -> Result<TensorData> {
        let t = expect_shape(src, name, &[vocab, hidden])?;
        Ok(t.data.slice_rows(ids, hidden))
    }

    /// An embedding reading its rows from `table` (a tied lm_head's slice for ids `ids`).
    pub fn shared(table: Arc<B::Matrix>, ids: Range<usize>) -> Self {
        Embedding { table, ids }
    }

    /// `[n, hidden]` embeddings of `tokens` (ids already checked against the vocabulary); rows
    /// of ids another rank holds are zero.
    pub fn forward(&self, b: &B, tokens: &[u32]) -> B::Tensor {
        b.lookup(&self.table, tokens, self.ids.start)
    }
}
