//! CPU kernels: `y = x · Wᵀ` over weights packed into column panels, plus the small vector helpers
//! attention and norms use. Work is split over rayon's pool (no threads spawned per op); the inner
//! kernel is AVX-512 when the CPU has it (detected at run time) and portable Rust otherwise.
//!
//! Packing follows the BLIS/GotoBLAS idea: NR = 64 output rows form a panel stored k-major, so the
//! micro-kernel streams one contiguous panel, broadcasts activations and needs no horizontal sums.
//! A panel is read once for up to MR = 6 tokens, so batched decode reads each weight once per step.

pub(crate) mod avx512;
mod portable;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::weights::{DType, TensorData};

/// Output rows per panel (four 16-lane vectors).
pub const NR: usize = 64;
/// Tokens per micro-kernel call: MR × 4 accumulators leave registers for weights and broadcasts.
pub const MR: usize = 6;
/// Tokens per cache block: a block of activations stays in L2 while panels stream past.
const TOKEN_BLOCK: usize = 64;

/// Panel storage. bf16 panels interleave each 32-row half of a panel row (within a half, lane
/// r < 16 at 2r, lane r ≥ 16 at 2(r-16)+1) so that a 32-bit shift and a mask turn 64 bytes into
/// two f32 vectors.
#[derive(Debug, Clone)]
pub(crate) enum Packed {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

/// A `[rows, cols]` weight matrix (PyTorch `[out, in]`) packed for `matmul`.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    pub(crate) data: Packed,
}

/// Position of lane `r` inside a panel row for the given storage.
fn lane_pos(bf16_layout: bool, r: usize) -> usize {
    let (half, within) = (r / 32 * 32, r % 32);
    match (bf16_layout, within < 16) {
        (false, _) => r,
        (true, true) => half + 2 * within,
        (true, false) => half + 2 * (within - 16) + 1,
    }
}

fn pack_generic<T: Copy + Default>(
    src: &[T],
    rows: usize,
    cols: usize,
    bf16_layout: bool,
) -> Vec<T> {
    let panels = rows.div_ceil(NR);
    let mut out = vec![T::default(); panels * cols * NR];
    for r in 0..rows {
        let (p, lane) = (r / NR, lane_pos(bf16_layout, r % NR));
        let base = p * cols * NR + lane;
        for (kk, &v) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            out[base + kk * NR] = v;
        }
    }
    out
}

impl PackedMatrix {
    /// Packs a row-major `[rows, cols]` matrix, keeping its dtype.
    pub fn pack(rows: usize, cols: usize, data: &TensorData) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "pack: data length must equal rows * cols"
        );
        let data = match data {
            TensorData::F32(v) => Packed::F32(pack_generic(v, rows, cols, false)),
            TensorData::Bf16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Packed::Bf16(pack_generic(&bits, rows, cols, true))
            }
            TensorData::F16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Packed::F16(pack_generic(&bits, rows, cols, false))
            }
        };
        PackedMatrix { rows, cols, data }
    }

    /// Wraps f32 data already in panel layout (`rows.div_ceil(NR) · cols · NR` values: value
    /// `(r, c)` at `(r / NR) · cols · NR + c · NR + r % NR`), e.g. K or Vᵀ gathered by attention.
    pub fn from_f32_panels(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows.div_ceil(NR) * cols * NR,
            "from_f32_panels: wrong length"
        );
        PackedMatrix {
            rows,
            cols,
            data: Packed::F32(data),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Packed::F32(_) => DType::F32,
            Packed::Bf16(_) => DType::Bf16,
            Packed::F16(_) => DType::F16,
        }
    }

    /// Bytes of weight storage (what one decode step streams).
    pub fn nbytes(&self) -> usize {
        match &self.data {
            Packed::F32(v) => v.len() * 4,
            Packed::Bf16(v) | Packed::F16(v) => v.len() * 2,
        }
    }

    /// Element `(r, c)` as f32 (tests and embedding-style lookups).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let bf = matches!(self.data, Packed::Bf16(_));
        let i = (r / NR) * self.cols * NR + c * NR + lane_pos(bf, r % NR);
        match &self.data {
            Packed::F32(v) => v[i],
            Packed::Bf16(v) => bf16::from_bits(v[i]).to_f32(),
            Packed::F16(v) => f16::from_bits(v[i]).to_f32(),
        }
    }
}

/// Raw output pointer shared by tasks that write disjoint `[token, column]` tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (token block, panel) tiles of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[t, j] = Σ_c x[t, c] · W[j, c]` for `n` tokens: `x` is `[n, cols]`, `out` is `[n, rows]`.
pub fn matmul(x: &[f32], n: usize, w: &PackedMatrix, out: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    assert!(
        x.len() >= n * k && out.len() >= n * m,
        "matmul: buffers too small"
    );
    if n == 0 || m == 0 {
        return;
    }
    let panels = m.div_ceil(NR);
    let tblocks = n.div_ceil(TOKEN_BLOCK);
    let threads = rayon::current_num_threads().max(1);
    let want = threads * 4;
    let groups = want.div_ceil(tblocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let ptr = OutPtr(out.as_mut_ptr());
    let use_avx512 = avx512::available();
    (0..tblocks * groups).into_par_iter().for_each(|task| {
        let (tb, g) = (task / groups, task % groups);
        let tokens = tb * TOKEN_BLOCK..((tb + 1) * TOKEN_BLOCK).min(n);
        let panel_range = g * per_group..((g + 1) * per_group).min(panels);
        for p in panel_range {
            run_panel(x, tokens.clone(), w, p, use_avx512, ptr);
        }
    });
}

/// `matmul` on the calling thread only, for callers already running inside a parallel task.
pub fn matmul_serial(x: &[f32], n: usize, w: &PackedMatrix, out: &mut [f32]) {
    assert!(
        x.len() >= n * w.cols && out.len() >= n * w.rows,
        "matmul_serial: buffers too small"
    );
    let ptr = OutPtr(out.as_mut_ptr());
    let use_avx512 = avx512::available();
    for p in 0..w.rows.div_ceil(NR) {
        run_panel(x, 0..n, w, p, use_avx512, ptr);
    }
}

/// One panel against a block of tokens, MR tokens at a time.
fn run_panel(
    x: &[f32],
    tokens: std::ops::Range<usize>,
    w: &PackedMatrix,
    p: usize,
    avx: bool,
    out: OutPtr,
) {
    let (k, m) = (w.cols, w.rows);
    let width = NR.min(m - p * NR);
    let mut acc = [[0f32; NR]; MR];
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let mr = MR.min(tokens.end - t0);
        let xs = &x[t0 * k..(t0 + mr) * k];
        if avx {
            // SAFETY: `available()` confirmed AVX-512F; slices are bounds-checked above.
            unsafe { avx512::kernel(xs, mr, k, &w.data, p, &mut acc) };
        } else {
            portable::kernel(xs, mr, k, &w.data, p, &mut acc);
        }
        for (i, row) in acc.iter().take(mr).enumerate() {
            // SAFETY: token t0+i < n and columns p*NR..p*NR+width < m lie inside `out`, and no
            // other task writes this (token, panel) tile.
            unsafe {
                let dst = out.0.add((t0 + i) * m + p * NR);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
            }
        }
        t0 += mr;
    }
}

/// Dot product with 16 independent lanes so the compiler vectorizes it without reassociation.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * m];
        for t in 0..n {
            for j in 0..m {
                out[t * m + j] = (0..k)
                    .map(|c| x[t * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn check(n: usize, m: usize, k: usize, dtype: DType) {
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 64.0)
            .collect();
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104_729 % 97) as f32 - 48.0) / 32.0)
            .collect();
        let data = TensorData::F32(w).convert(dtype);
        let wf = data.to_f32();
        let packed = PackedMatrix::pack(m, k, &data);
        assert_eq!(packed.get(m - 1, k - 1), wf[m * k - 1]);
        let want = reference(&x, n, &wf, m, k);
        for avx in [false, true] {
            if avx && !avx512::available() {
                continue;
            }
            let mut out = vec![0.0; n * m];
            let ptr = OutPtr(out.as_mut_ptr());
            for p in 0..m.div_ceil(NR) {
                run_panel(&x, 0..n, &packed, p, avx, ptr);
            }
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "{dtype:?} avx={avx} n={n} m={m} k={k}: {a} vs {b}"
                );
            }
        }
        let mut out = vec![0.0; n * m];
        matmul(&x, n, &packed, &mut out);
        assert!(out
            .iter()
            .zip(&want)
            .all(|(a, b)| (a - b).abs() < 1e-3 * (1.0 + b.abs())));
    }

    #[test]
    fn matmul_matches_reference_for_all_dtypes_and_ragged_sizes() {
        for dtype in [DType::F32, DType::Bf16, DType::F16] {
            for (n, m, k) in [
                (1, 1, 1),
                (3, 33, 17),
                (9, 64, 40),
                (70, 100, 8),
                (8, 172, 64),
            ] {
                check(n, m, k, dtype);
            }
        }
    }

    #[test]
    fn dot_and_axpy() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..37).map(|i| (i * i) as f32).sum::<f32>());
        let mut y = vec![1.0; 3];
        axpy(&mut y, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(y, vec![3.0, 5.0, 7.0]);
    }
}
