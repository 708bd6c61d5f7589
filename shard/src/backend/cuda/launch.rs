//! Launch geometry of every kernel: grid and block sizes, the flash-decoding split of each decode
//! step, and workspace sizes. Pure arithmetic, unit-tested on CPU; the tuning constants here are
//! passed to NVRTC as `-D` defines, so a kernel and its launch never disagree.

use cudarc::driver::LaunchConfig;

use crate::{Error, Result};

/// Largest head_dim the attention kernels hold in registers (LANE_DIMS = this / 32 per lane).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of one decode-split CTA (one query head of one sequence, one chunk of positions).
pub const DECODE_THREADS: u32 = 128;
/// Query rows and K/V rows per prefill tile, and threads of one prefill CTA.
pub const PREFILL_BQ: u32 = 16;
pub const PREFILL_BK: u32 = 16;
pub const PREFILL_THREADS: u32 = 128;
/// Largest top-k the sampling kernel selects on device.
pub const MAX_TOP_K: usize = 256;
/// A decode split covers at least this many positions: shorter chunks cost more in the reduce
/// than they gain in parallelism.
pub const MIN_SPLIT_TOKENS: usize = 256;
/// Decode CTAs wanted per SM before splitting stops paying.
pub const DECODE_CTAS_PER_SM: usize = 4;
/// CUDA's limit on grid dimensions y and z.
const MAX_GRID_YZ: usize = 65_535;

/// The `-D` defines of every kernel compilation.
pub fn kernel_defines() -> [(&'static str, usize); 6] {
    [
        ("TESSERA_MAX_HEAD_DIM", MAX_HEAD_DIM),
        ("TESSERA_DECODE_THREADS", DECODE_THREADS as usize),
        ("TESSERA_PREFILL_BQ", PREFILL_BQ as usize),
        ("TESSERA_PREFILL_BK", PREFILL_BK as usize),
        ("TESSERA_PREFILL_THREADS", PREFILL_THREADS as usize),
        ("TESSERA_MAX_TOP_K", MAX_TOP_K),
    ]
}

/// Static shared memory of the prefill kernel: K and V tiles in f32 plus their row offsets.
pub const PREFILL_SHARED_BYTES: usize =
    2 * PREFILL_BK as usize * MAX_HEAD_DIM * 4 + PREFILL_BK as usize * 8;

// What the kernels assume of these constants, checked at compile time: static shared memory
// within the default 48 KiB, prefill rows split evenly over warps, one thread per staged K/V row,
// head vectors split evenly over a warp's lanes.
const _: () = assert!(PREFILL_SHARED_BYTES <= 48 * 1024);
const _: () = assert!(PREFILL_BQ.is_multiple_of(PREFILL_THREADS / 32));
const _: () = assert!(PREFILL_BK <= PREFILL_THREADS);
const _: () = assert!(MAX_HEAD_DIM.is_multiple_of(32));

/// Grid and block of one launch (the kernels use static shared memory only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Dims {
    pub fn config(self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: 0,
        }
    }
}

/// Threads for a CTA that strides over `work` items: whole warps, 32..=1024.
fn threads_for(work: usize) -> u32 {
    (work.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// One CTA per row of `width` items (embedding, RMSNorm, RoPE, KV write, argmax, top-k).
pub fn per_row(rows: usize, width: usize) -> Dims {
    Dims {
        grid: (rows.max(1) as u32, 1, 1),
        block: (threads_for(width), 1, 1),
    }
}

/// A grid-stride elementwise kernel over `total` items (SiLU×up).
pub fn elementwise(total: usize) -> Dims {
    Dims {
        grid: (total.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block: (256, 1, 1),
    }
}

/// Checks the head geometry against what the attention kernels support.
pub fn check_heads(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(Error::Device(format!(
            "head_dim {head_dim} is not supported by the CUDA kernels (even, at most {MAX_HEAD_DIM})"
        )));
    }
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(Error::Device(format!(
            "{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        )));
    }
    Ok(())
}

/// How a decode step's positions are cut into flash-decoding chunks: every sequence's chunks are
/// `blocks_per_split` cache blocks long; the grid has `max_splits` chunks per (sequence, head),
/// and chunks past a sequence's end return at once with weight zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSplit {
    pub blocks_per_split: usize,
    pub max_splits: usize,
}

impl DecodeSplit {
    /// Chunks that hold positions of a sequence of `context_len` tokens.
    pub fn splits_of(&self, context_len: usize, block_size: usize) -> usize {
        context_len
            .div_ceil(block_size)
            .div_ceil(self.blocks_per_split)
    }
}

/// Splits only when the (sequence, head) CTAs alone would leave SMs idle, into chunks of at least
/// [`MIN_SPLIT_TOKENS`] positions.
pub fn decode_split(
    context_lens: &[usize],
    block_size: usize,
    num_heads: usize,
    sm_count: usize,
) -> DecodeSplit {
    let max_blocks = context_lens
        .iter()
        .map(|&c| c.div_ceil(block_size))
        .max()
        .unwrap_or(0)
        .max(1);
    let base = (context_lens.len() * num_heads).max(1);
    let target = sm_count.max(1) * DECODE_CTAS_PER_SM;
    let want = target.div_ceil(base).max(1);
    let min_blocks = MIN_SPLIT_TOKENS.div_ceil(block_size).max(1);
    let blocks_per_split = max_blocks.div_ceil(want).max(min_blocks).min(max_blocks);
    DecodeSplit {
        blocks_per_split,
        max_splits: max_blocks.div_ceil(blocks_per_split),
    }
}

/// Launches of a decode step: the split kernel and the reduce kernel.
pub fn decode_dims(num_seqs: usize, num_heads: usize, split: DecodeSplit) -> Result<(Dims, Dims)> {
    check_grid("decode", num_seqs, split.max_splits)?;
    let (h, s) = (num_heads as u32, num_seqs as u32);
    Ok((
        Dims {
            grid: (h, s, split.max_splits as u32),
            block: (DECODE_THREADS, 1, 1),
        },
        Dims {
            grid: (h, s, 1),
            block: (threads_for(MAX_HEAD_DIM.min(128)), 1, 1),
        },
    ))
}

/// Bytes of the decode workspace: partial outputs `[seqs, heads, splits, head_dim]` and their
/// log-sum-exps `[seqs, heads, splits]`, f32.
pub fn decode_workspace_bytes(
    num_seqs: usize,
    num_heads: usize,
    head_dim: usize,
    split: DecodeSplit,
) -> usize {
    let parts = num_seqs * num_heads * split.max_splits;
    parts * (head_dim + 1) * size_of::<f32>()
}

/// Launch of the prefill kernel over a ragged batch whose longest chunk is `max_q_len` tokens.
pub fn prefill_dims(num_seqs: usize, max_q_len: usize, num_heads: usize) -> Result<Dims> {
    check_grid("prefill", num_seqs, num_heads)?;
    Ok(Dims {
        grid: (
            max_q_len.div_ceil(PREFILL_BQ as usize).max(1) as u32,
            num_heads as u32,
            num_seqs as u32,
        ),
        block: (PREFILL_THREADS, 1, 1),
    })
}

fn check_grid(kernel: &str, y: usize, z: usize) -> Result<()> {
    if y > MAX_GRID_YZ || z > MAX_GRID_YZ {
        return Err(Error::Device(format!(
            "{kernel} attention grid ({y}, {z}) exceeds CUDA's {MAX_GRID_YZ} per dimension"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_and_elementwise_launches() {
        assert_eq!(per_row(7, 4096).block.0, 1024);
        assert_eq!(
            per_row(7, 576),
            Dims {
                grid: (7, 1, 1),
                block: (576, 1, 1)
            }
        );
        assert_eq!(per_row(1, 5).block.0, 32);
        assert_eq!(elementwise(1000).grid.0, 4);
        assert_eq!(elementwise(usize::MAX / 2).grid.0, 65_535);
    }

    #[test]
    fn decode_split_fills_the_gpu_only_when_needed() {
        // Batch 1, 32 heads, 8k context on 132 SMs: 528 CTAs wanted, 32 from heads alone, so
        // 17 chunks of 31 blocks.
        let s = decode_split(&[8192], 16, 32, 132);
        assert_eq!((s.blocks_per_split, s.max_splits), (31, 17));
        assert_eq!(s.splits_of(8192, 16), 17);
        assert_eq!(s.splits_of(100, 16), 1);
        // Short contexts never split below MIN_SPLIT_TOKENS.
        let s = decode_split(&[300], 16, 32, 132);
        assert_eq!((s.blocks_per_split, s.max_splits), (16, 2));
        // A big batch fills the GPU by itself: one chunk per sequence.
        let s = decode_split(&[8192, 17, 4000], 16, 32, 4);
        assert_eq!((s.blocks_per_split, s.max_splits), (512, 1));
        // The longest sequence sets the grid; shorter ones use fewer chunks.
        let s = decode_split(&[4096, 1], 16, 8, 132);
        assert_eq!(s.max_splits, 16);
        assert_eq!(s.splits_of(1, 16), 1);
        let s = decode_split(&[], 16, 8, 132);
        assert_eq!(s.max_splits, 1);
    }

    #[test]
    fn decode_and_prefill_grids_and_workspace() {
        let split = DecodeSplit {
            blocks_per_split: 32,
            max_splits: 16,
        };
        let (a, b) = decode_dims(3, 32, split).unwrap();
        assert_eq!(a.grid, (32, 3, 16));
        assert_eq!(a.block.0, DECODE_THREADS);
        assert_eq!(b.grid, (32, 3, 1));
        assert_eq!(
            decode_workspace_bytes(3, 32, 128, split),
            3 * 32 * 16 * 129 * 4
        );
        let p = prefill_dims(2, 33, 32).unwrap();
        assert_eq!(p.grid, (3, 32, 2));
        assert!(prefill_dims(70_000, 1, 32).is_err());
    }

    #[test]
    fn head_geometry_is_checked() {
        assert!(check_heads(32, 8, 128).is_ok());
        assert!(check_heads(32, 8, 512).is_err());
        assert!(check_heads(32, 6, 64).is_err());
        assert!(check_heads(9, 3, 63).is_err());
    }
}
