//! CPU kernels: `y = x · Wᵀ` over weights packed into column panels, plus the small vector helpers
//! attention and norms use. Work is split over rayon's pool (no threads spawned per op); the inner
//! kernel is AVX-512 or AVX2 when the CPU has it (detected at run time, `Isa`) and portable Rust
//! otherwise.
//!
//! Packing follows the BLIS/GotoBLAS idea: NR = 64 output rows form a panel stored k-major, so the
//! micro-kernel streams one contiguous panel, broadcasts activations and needs no horizontal sums.
//! A panel is read once for up to MR = 6 tokens, so batched decode reads each weight once per step.
//!
//! bf16 weights are packed in k-pairs (llama.cpp's and oneDNN's VNNI-style layout) so that on CPUs
//! with AVX512-BF16 one `vdpbf16ps` does two multiply-adds per lane: activations are then rounded
//! to bf16 once per matmul (as llama.cpp's BF16 path and GPU bf16 GEMMs do) with f32 accumulation.
//! Without that extension the same layout is widened to f32 exactly.
//!
//! Quantized weights take their own panels and integer kernels (`quant`); `matmul` dispatches.

/// Monomorphizes a float tile function for the token count (1..=MR) so accumulators live in
/// registers (the AVX-512 and AVX2 kernels).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch {
    ($f:ident, $mr:expr, $x:expr, $k:expr, $w:expr, $acc:expr) => {
        match $mr {
            1 => $f::<1>($x, $k, $w, $acc),
            2 => $f::<2>($x, $k, $w, $acc),
            3 => $f::<3>($x, $k, $w, $acc),
            4 => $f::<4>($x, $k, $w, $acc),
            5 => $f::<5>($x, $k, $w, $acc),
            _ => $f::<6>($x, $k, $w, $acc),
        }
    };
}

mod attention;
mod avx2;
pub(crate) mod avx512;
mod ops;
mod portable;
pub mod quant;

pub use ops::{Activations, Cpu, ROWS_PER_TASK};

use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::weights::{DType, TensorData};

/// Output rows per panel (four 16-lane vectors).
pub const NR: usize = 64;
/// Tokens per micro-kernel call: MR × 4 accumulators leave registers for weights and broadcasts.
pub const MR: usize = 6;
/// Tokens per cache block: a block of activations stays in L2 while panels stream past.
const TOKEN_BLOCK: usize = 64;

/// Panel storage. f32 and f16 panels hold value `(r, c)` of panel `p` at `(p·cols + c)·NR + r`.
/// bf16 panels pair consecutive columns: `(r, c)` at `((p·⌈cols/2⌉ + c/2)·NR + r)·2 + c%2`, the
/// odd column of an odd `cols` zero, so one 32-bit lane holds one row's two products.
#[derive(Debug, Clone)]
pub(crate) enum Packed {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
    /// Row blocks, top to bottom (`TensorData::Quant`).
    Quant(Vec<quant::QuantPanels>),
}

/// A `[rows, cols]` weight matrix (PyTorch `[out, in]`) packed for `matmul`.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    pub(crate) data: Packed,
}

fn pack_generic<T: Copy + Default>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let panels = rows.div_ceil(NR);
    let mut out = vec![T::default(); panels * cols * NR];
    for r in 0..rows {
        let base = (r / NR) * cols * NR + r % NR;
        for (kk, &v) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            out[base + kk * NR] = v;
        }
    }
    out
}

/// bf16 bits in the k-pair layout (see `Packed`).
fn pack_pairs(src: &[u16], rows: usize, cols: usize) -> Vec<u16> {
    let (panels, pairs) = (rows.div_ceil(NR), cols.div_ceil(2));
    let mut out = vec![0; panels * pairs * NR * 2];
    for r in 0..rows {
        let base = (r / NR) * pairs * NR * 2 + (r % NR) * 2;
        for (c, &v) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            out[base + (c / 2) * NR * 2 + c % 2] = v;
        }
    }
    out
}

/// Activations rounded to bf16 in k-pairs: `[n, ⌈k/2⌉]` lanes, column `2j` in the low half
/// (each row is its bf16 values in order, padded to even length).
fn bf16_pairs(x: &[f32], n: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; n * pairs];
    for (row, dst) in x[..n * k]
        .chunks_exact(k.max(1))
        .zip(out.chunks_exact_mut(pairs))
    {
        avx512::round_to_bf16(row, bytemuck::cast_slice_mut(dst));
    }
    out
}

/// The vector instruction set of the float kernels (matmul, attention, exp): the widest this
/// CPU has, under the cap `TESSERA_CPU_KERNELS` puts on the integer kernels too
/// (`quant::Kernels::cap`); decided once per process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub(crate) fn chosen() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| match quant::Kernels::cap() {
            Some(quant::Kernels::Portable) => Isa::Portable,
            None | Some(quant::Kernels::Vnni) if avx512::available() => Isa::Avx512,
            _ if avx2::available() => Isa::Avx2,
            _ => Isa::Portable,
        })
    }
}

/// Which micro-kernel a matmul runs, decided once per call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Portable,
    Avx2,
    Avx512,
    /// bf16 weights against bf16-rounded activations (`vdpbf16ps`).
    Avx512Bf16,
}

impl Path {
    fn for_weights(data: &Packed) -> Path {
        match (Isa::chosen(), data) {
            (Isa::Avx512, Packed::Bf16(_)) if avx512::bf16_available() => Path::Avx512Bf16,
            (Isa::Avx512, _) => Path::Avx512,
            (Isa::Avx2, _) => Path::Avx2,
            (Isa::Portable, _) => Path::Portable,
        }
    }
}

/// A matmul's activations in the form its kernel reads.
enum Acts<'a> {
    F32(&'a [f32]),
    Bf16Pairs(Vec<u32>),
}

impl<'a> Acts<'a> {
    fn new(x: &'a [f32], n: usize, k: usize, path: Path) -> Self {
        match path {
            Path::Avx512Bf16 => Acts::Bf16Pairs(bf16_pairs(x, n, k)),
            _ => Acts::F32(x),
        }
    }
}

impl PackedMatrix {
    /// Packs a row-major `[rows, cols]` matrix, keeping its dtype; an error says why a
    /// quantized tensor does not fit the quantized panels.
    pub fn pack(rows: usize, cols: usize, data: &TensorData) -> Result<Self, String> {
        if data.len() != rows * cols {
            return Err(format!(
                "{} elements do not make a [{rows}, {cols}] matrix",
                data.len()
            ));
        }
        let data = match data {
            TensorData::F32(v) => Packed::F32(pack_generic(v, rows, cols)),
            TensorData::Bf16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Packed::Bf16(pack_pairs(&bits, rows, cols))
            }
            TensorData::F16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                Packed::F16(pack_generic(&bits, rows, cols))
            }
            TensorData::Quant(blocks) => {
                let packed = blocks
                    .iter()
                    .map(|a| quant::QuantPanels::pack(a.q.len() / cols.max(1), cols, a))
                    .collect::<Result<Vec<_>, _>>()?;
                let held: usize = packed.iter().map(|b| b.rows()).sum();
                if held != rows {
                    return Err(format!(
                        "{held} quantized rows for a [{rows}, {cols}] matrix"
                    ));
                }
                Packed::Quant(packed)
            }
        };
        Ok(PackedMatrix { rows, cols, data })
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
            Packed::Quant(_) => DType::Quantized { at_load: None },
        }
    }

    /// Bytes of weight storage (what one decode step streams).
    pub fn nbytes(&self) -> usize {
        match &self.data {
            Packed::F32(v) => v.len() * 4,
            Packed::Bf16(v) | Packed::F16(v) => v.len() * 2,
            Packed::Quant(blocks) => blocks.iter().map(|b| b.nbytes()).sum(),
        }
    }

    /// Row `r` as f32 into `out` (`cols` values): an embedding lookup in a tied lm_head.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            Packed::F32(v) => {
                let base = (r / NR) * self.cols * NR + r % NR;
                for (c, o) in out.iter_mut().enumerate() {
                    *o = v[base + c * NR];
                }
            }
            _ => out
                .iter_mut()
                .enumerate()
                .for_each(|(c, o)| *o = self.get(r, c)),
        }
    }

    /// Element `(r, c)` as f32 (tests and embedding-style lookups).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let (p, lane) = (r / NR, r % NR);
        let plain = (p * self.cols + c) * NR + lane;
        match &self.data {
            Packed::F32(v) => v[plain],
            Packed::F16(v) => f16::from_bits(v[plain]).to_f32(),
            Packed::Bf16(v) => {
                let pairs = self.cols.div_ceil(2);
                bf16::from_bits(v[((p * pairs + c / 2) * NR + lane) * 2 + c % 2]).to_f32()
            }
            Packed::Quant(blocks) => quant::get(blocks, r, c),
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
    if let Packed::Quant(blocks) = &w.data {
        return quant::matmul(x, n, blocks, out);
    }
    let panels = m.div_ceil(NR);
    let tblocks = n.div_ceil(TOKEN_BLOCK);
    let threads = rayon::current_num_threads().max(1);
    let want = threads * 4;
    let groups = want.div_ceil(tblocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let ptr = OutPtr(out.as_mut_ptr());
    let path = Path::for_weights(&w.data);
    let acts = Acts::new(x, n, k, path);
    (0..tblocks * groups).into_par_iter().for_each(|task| {
        let (tb, g) = (task / groups, task % groups);
        let tokens = tb * TOKEN_BLOCK..((tb + 1) * TOKEN_BLOCK).min(n);
        let panel_range = g * per_group..((g + 1) * per_group).min(panels);
        for p in panel_range {
            run_panel(&acts, tokens.clone(), w, p, path, ptr);
        }
    });
}

/// `matmul` on the calling thread only, for callers already running inside a parallel task.
pub fn matmul_serial(x: &[f32], n: usize, w: &PackedMatrix, out: &mut [f32]) {
    assert!(
        x.len() >= n * w.cols && out.len() >= n * w.rows,
        "matmul_serial: buffers too small"
    );
    if let Packed::Quant(blocks) = &w.data {
        return quant::matmul(x, n, blocks, out);
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let path = Path::for_weights(&w.data);
    let acts = Acts::new(x, n, w.cols, path);
    for p in 0..w.rows.div_ceil(NR) {
        run_panel(&acts, 0..n, w, p, path, ptr);
    }
}

/// One panel against a block of tokens, MR tokens at a time.
fn run_panel(
    acts: &Acts,
    tokens: std::ops::Range<usize>,
    w: &PackedMatrix,
    p: usize,
    path: Path,
    out: OutPtr,
) {
    let (k, m) = (w.cols, w.rows);
    let width = NR.min(m - p * NR);
    let mut acc = [[0f32; NR]; MR];
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let mr = MR.min(tokens.end - t0);
        match (acts, path) {
            (Acts::Bf16Pairs(x), Path::Avx512Bf16) => {
                let pairs = k.div_ceil(2);
                let xs = &x[t0 * pairs..(t0 + mr) * pairs];
                // SAFETY: `Path::for_weights` confirmed AVX512-BF16 and bf16 weights.
                unsafe { avx512::kernel_bf16(xs, mr, pairs, &w.data, p, &mut acc) };
            }
            (Acts::F32(x), Path::Avx512) => {
                let xs = &x[t0 * k..(t0 + mr) * k];
                // SAFETY: `available()` confirmed AVX-512F; slices are bounds-checked above.
                unsafe { avx512::kernel(xs, mr, k, &w.data, p, &mut acc) };
            }
            (Acts::F32(x), Path::Avx2) => {
                let xs = &x[t0 * k..(t0 + mr) * k];
                // SAFETY: `available()` confirmed AVX2, FMA and F16C; slices are bounds-checked.
                unsafe { avx2::kernel(xs, mr, k, &w.data, p, &mut acc) };
            }
            (Acts::F32(x), _) => {
                portable::kernel(&x[t0 * k..(t0 + mr) * k], mr, k, &w.data, p, &mut acc)
            }
            (Acts::Bf16Pairs(_), _) => unreachable!("bf16 activations only on the BF16 path"),
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

/// `x[i] = eˣ⁽ⁱ⁾` in place: 2ⁿ·p(r), relative error ≈ 2·10⁻⁷, wherever multiply-adds fuse;
/// `f32::exp` on the portable path of targets without FMA.
pub fn exp_in_place(x: &mut [f32]) {
    match Isa::chosen() {
        Isa::Avx512 => avx512::exp_in_place(x),
        // SAFETY: `Isa::Avx2` is chosen only where `avx2::available()`.
        Isa::Avx2 => unsafe { avx2::exp_in_place(x) },
        Isa::Portable => portable::exp_in_place(x),
    }
}

/// The exp every path but baseline x86's computes (`avx512`, `avx2`, `portable`): x clamped to
/// [EXP_MIN, EXP_MAX], n = round(x·log₂e), r = x − n·ln 2 with ln 2 in two parts (LN2_HI has few
/// bits, so n·LN2_HI is exact), p(r) the degree-6 Taylor polynomial by Horner from 1/720 through
/// the divisors EXP_HORNER, and 2ⁿ applied as two halves so both factors stay normal.
pub(crate) const EXP_MIN: f32 = -104.0;
pub(crate) const EXP_MAX: f32 = 88.7;
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;
pub(crate) const EXP_HORNER: [f32; 6] = [120.0, 24.0, 6.0, 2.0, 1.0, 1.0];

/// Whether every CPU of the build target fuses multiply-adds (aarch64, or x86 built with `fma`).
const FUSED: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// `a·b + c`, fused where the target always has FMA (`FUSED`), as the vector kernels compute it;
/// as written elsewhere, where a fused multiply-add would be a slow library call.
#[inline(always)]
pub(crate) fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with 16 independent lanes so the compiler vectorizes it without reassociation.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        // Fixed-size views: no bounds checks, so the 16 lanes become one vector.
        let (x, y): (&[f32; 16], &[f32; 16]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..16 {
            acc[i] = mul_add(x[i], y[i], acc[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    // Pairwise, not lane after lane: four dependent vector adds instead of fifteen scalar ones.
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `y += a · x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = mul_add(a, *xi, *yi);
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
        let packed = PackedMatrix::pack(m, k, &data).unwrap();
        assert_eq!(packed.get(m - 1, k - 1), wf[m * k - 1]);
        let want = reference(&x, n, &wf, m, k);
        // The BF16 path multiplies bf16-rounded activations exactly and sums in f32.
        let rounded: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let want_rounded = reference(&rounded, n, &wf, m, k);
        let fastest = Path::for_weights(&packed.data);
        for path in [Path::Portable, Path::Avx2, Path::Avx512, Path::Avx512Bf16] {
            let supported = match path {
                Path::Portable => true,
                Path::Avx2 => avx2::available(),
                Path::Avx512 => avx512::available(),
                Path::Avx512Bf16 => fastest == Path::Avx512Bf16,
            };
            if !supported {
                continue;
            }
            let mut out = vec![0.0; n * m];
            let ptr = OutPtr(out.as_mut_ptr());
            let acts = Acts::new(&x, n, k, path);
            for p in 0..m.div_ceil(NR) {
                run_panel(&acts, 0..n, &packed, p, path, ptr);
            }
            let want = if path == Path::Avx512Bf16 {
                &want_rounded
            } else {
                &want
            };
            for (a, b) in out.iter().zip(want) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "{dtype:?} {path:?} n={n} m={m} k={k}: {a} vs {b}"
                );
            }
        }
        let mut out = vec![0.0; n * m];
        matmul(&x, n, &packed, &mut out);
        let want = if fastest == Path::Avx512Bf16 {
            &want_rounded
        } else {
            &want
        };
        assert!(out
            .iter()
            .zip(want)
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
    fn exp_matches_std_within_a_few_ulps() {
        let mut x: Vec<f32> = (-2000..2000).map(|i| i as f32 / 20.0).collect();
        x.extend([f32::NEG_INFINITY, -200.0, 0.0, f32::NAN]);
        // The chosen path, and the AVX2 one where the CPU has it (AVX-512 CPUs choose theirs).
        let mut ys = vec![x.clone()];
        exp_in_place(&mut ys[0]);
        let mut y = x.clone();
        portable::exp_in_place(&mut y);
        ys.push(y);
        if avx2::available() {
            let mut y = x.clone();
            // SAFETY: AVX2 and FMA are present.
            unsafe { avx2::exp_in_place(&mut y) };
            ys.push(y);
        }
        for (a, b) in ys.iter().flat_map(|y| x.iter().zip(y)) {
            let want = a.exp();
            if a.is_nan() {
                assert!(b.is_nan());
            } else {
                // Past 88.7 the kernels clamp (finite) where `f32::exp` overflows.
                assert!(
                    *b == want || (b - want).abs() <= 4e-7 * want,
                    "exp({a}) = {b}, want {want}"
                );
            }
        }
    }

    #[test]
    fn dot_and_axpy() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let squares = (0..37).map(|i| (i * i) as f32).sum::<f32>();
        assert_eq!(dot(&a, &a), squares);
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: AVX2 and FMA are present.
            assert_eq!(unsafe { avx2::dot(&a, &a) }, squares);
        }
        let mut y = vec![1.0; 3];
        axpy(&mut y, 2.0, &[1.0, 2.0, 3.0]);
        assert_eq!(y, vec![3.0, 5.0, 7.0]);
    }
}
