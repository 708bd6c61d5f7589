//! Collectives between the ranks of one tensor-parallel group. Layers call them at the points
//! Megatron-style parallelism needs (after row-parallel o_proj/down_proj, to gather lm_head
//! logits); `Local` is the world-size-1 group, where every collective is the identity.

use crate::{Error, Result};

/// A tensor-parallel communicator. All ranks call the same collectives in the same order.
pub trait Comm: Send + Sync + std::panic::RefUnwindSafe {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, result in every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank holds `rows × c` values (its column block); returns `rows × (c · world)` with
    /// rank r's block at columns `r·c..(r+1)·c`, identical on every rank.
    fn all_gather_columns(&self, local: &[f32], rows: usize) -> Result<Vec<f32>>;
}

/// The single-process group.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Comm for Local {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_gather_columns(&self, local: &[f32], rows: usize) -> Result<Vec<f32>> {
        if rows > 0 && !local.len().is_multiple_of(rows) {
            return Err(Error::InvalidBatch(format!(
                "all_gather: {} values do not form {rows} rows",
                local.len()
            )));
        }
        Ok(local.to_vec())
    }
}

/// This rank's part of the model: which slice of heads, FFN columns and vocabulary it holds.
/// Head counts are divided by the world size here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub fn of(comm: &dyn Comm) -> Self {
        Shard {
            rank: comm.rank(),
            world: comm.world_size().max(1),
        }
    }

    /// `total / world`, or an error naming `what` when it does not divide.
    pub fn split(&self, total: usize, what: &str) -> Result<usize> {
        if !total.is_multiple_of(self.world) {
            return Err(Error::Device(format!(
                "`{what}` ({total}) must be divisible by the number of shards ({})",
                self.world
            )));
        }
        Ok(total / self.world)
    }

    /// The range this rank owns when `total` items are split evenly.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        let part = total / self.world;
        self.rank * part..(self.rank + 1) * part
    }
}
