//! Collectives between the ranks of one tensor-parallel group. Layers call them at the points
//! Megatron-style parallelism needs (after the vocabulary-parallel embedding and row-parallel
//! o_proj/down_proj, to gather lm_head logits); `Local` is the world-size-1 group, where every
//! collective is the identity, and `CpuComm` joins shard processes on one host.

mod cpu;

pub use cpu::{CpuComm, Rendezvous, SECRET_ENV};

use crate::{Error, Result};

/// A tensor-parallel communicator. All ranks call the same collectives in the same order.
pub trait Comm: Send + Sync + std::panic::RefUnwindSafe {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, result in every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank holds `rows × c_r` values (its column block, widths may differ by rank, and
    /// may be 0); returns `rows × Σ c_r` with the blocks in rank order, identical on every rank.
    /// `rows` may be 0 (a forward that wants no logits): every block is then empty.
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
        let whole = if rows == 0 {
            local.is_empty()
        } else {
            local.len().is_multiple_of(rows)
        };
        if !whole {
            return Err(Error::InvalidBatch(format!(
                "all_gather: {} values do not form {rows} rows",
                local.len()
            )));
        }
        Ok(local.to_vec())
    }
}

/// This rank's part of the model: which slice of heads, FFN columns and vocabulary it holds.
/// Work is split as evenly as possible, in whole units (a GQA group of heads, one FFN column,
/// one vocabulary row): ranks hold `⌈u/world⌉` or `⌊u/world⌋` units, the larger shares first.
/// Unlike TGI this serves head counts the world size does not divide (SmolLM2's 9 heads on 2
/// shards), and every split of the model goes through `units` so the layers agree.
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

    /// Checks that `count` units of `what` give every rank at least one.
    pub fn check(&self, count: usize, what: &str) -> Result<()> {
        if count < self.world {
            return Err(Error::Device(format!(
                "`{what}` ({count}) is smaller than the number of shards ({}): serve it on at \
                 most {count} shards",
                self.world
            )));
        }
        Ok(())
    }

    /// This rank's element range of `total` elements split in whole units of `unit` elements.
    pub fn units(&self, total: usize, unit: usize) -> std::ops::Range<usize> {
        let count = total / unit.max(1);
        let (base, extra) = (count / self.world, count % self.world);
        let start = self.rank * base + self.rank.min(extra);
        let len = base + usize::from(self.rank < extra);
        start * unit..(start + len) * unit
    }

    /// This rank's range of `total` single elements.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        self.units(total, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once_larger_first() {
        for world in 1..5 {
            let mut next = 0;
            for rank in 0..world {
                let r = Shard { rank, world }.units(9 * 64, 3 * 64);
                assert_eq!(r.start, next);
                assert_eq!(r.len() % (3 * 64), 0);
                next = r.end;
            }
            assert_eq!(next, 9 * 64);
        }
        let two = |rank| Shard { rank, world: 2 }.units(3, 1);
        assert_eq!((two(0), two(1)), (0..2, 2..3));
    }

    #[test]
    fn fewer_units_than_shards_is_an_error_naming_them() {
        let err = Shard { rank: 0, world: 4 }
            .check(3, "num_key_value_heads")
            .unwrap_err();
        assert!(
            err.to_string().contains("`num_key_value_heads` (3)"),
            "{err}"
        );
    }
}
