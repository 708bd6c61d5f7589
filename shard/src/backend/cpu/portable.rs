//! Portable micro-kernel over the same packed layouts as the AVX-512 ones, and exp; the compiler
//! vectorizes both for whatever the target offers (NEON with FMA on aarch64).

use half::{bf16, f16};

use super::{mul_add, Packed, EXP_HORNER, EXP_MAX, EXP_MIN, FUSED, LN2_HI, LN2_LO, MR, NR};

/// Panel rows per strip when several tokens share it: each token's strip of sums (four NEON or SSE
/// vectors) stays in registers while the strip walks the whole `k`. One token takes the whole
/// panel row per input instead, so a decode step streams the panel once, in order.
const STRIP: usize = 16;

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `k` features.
pub fn kernel(xs: &[f32], mr: usize, k: usize, data: &Packed, p: usize, acc: &mut [[f32; NR]; MR]) {
    match data {
        Packed::F32(v) => by_tokens(xs, mr, k, acc, &F32Panel(&v[p * k * NR..(p + 1) * k * NR])),
        Packed::F16(v) => by_tokens(xs, mr, k, acc, &F16Panel(&v[p * k * NR..(p + 1) * k * NR])),
        Packed::Bf16(v) => {
            let len = k.div_ceil(2) * NR * 2;
            by_tokens(xs, mr, k, acc, &Bf16Panel(&v[p * len..(p + 1) * len]))
        }
        Packed::Quant(_) => unreachable!("quantized panels go to quant::matmul"),
    }
}

/// One panel's weights, read as f32 `S` rows at a time.
trait Panel {
    /// Input `kk` of rows `s..s + S`.
    fn strip<const S: usize>(&self, kk: usize, s: usize) -> [f32; S];
}

struct F32Panel<'a>(&'a [f32]);
struct F16Panel<'a>(&'a [u16]);
/// k-pairs: row r's value of input kk at `2r + kk % 2` within pair `kk / 2`.
struct Bf16Panel<'a>(&'a [u16]);

impl Panel for F32Panel<'_> {
    #[inline(always)]
    fn strip<const S: usize>(&self, kk: usize, s: usize) -> [f32; S] {
        let at = kk * NR + s;
        self.0[at..at + S].try_into().unwrap()
    }
}

impl Panel for F16Panel<'_> {
    #[inline(always)]
    fn strip<const S: usize>(&self, kk: usize, s: usize) -> [f32; S] {
        let at = kk * NR + s;
        let bits = &self.0[at..at + S];
        std::array::from_fn(|j| f16::from_bits(bits[j]).to_f32())
    }
}

impl Panel for Bf16Panel<'_> {
    #[inline(always)]
    fn strip<const S: usize>(&self, kk: usize, s: usize) -> [f32; S] {
        // Every other value from the pair's first or second one (a fixed stride vectorizes).
        let at = (kk / 2) * NR * 2 + 2 * s + kk % 2;
        let values = &self.0[at..at + 2 * S - 1];
        std::array::from_fn(|j| bf16::from_bits(values[2 * j]).to_f32())
    }
}

/// `tile` monomorphized for the token count, so the sums have a fixed shape.
#[inline(always)]
fn by_tokens<P: Panel>(xs: &[f32], mr: usize, k: usize, acc: &mut [[f32; NR]; MR], panel: &P) {
    match mr {
        1 => tile::<1, NR, P>(xs, k, acc, panel),
        2 => tile::<2, STRIP, P>(xs, k, acc, panel),
        3 => tile::<3, STRIP, P>(xs, k, acc, panel),
        4 => tile::<4, STRIP, P>(xs, k, acc, panel),
        5 => tile::<5, STRIP, P>(xs, k, acc, panel),
        _ => tile::<6, STRIP, P>(xs, k, acc, panel),
    }
}

/// `M` tokens against a panel, `S` rows at a time. Each sum runs over the inputs in order, one
/// multiply-add at a time, whatever `S` is.
#[inline(always)]
fn tile<const M: usize, const S: usize, P: Panel>(
    xs: &[f32],
    k: usize,
    acc: &mut [[f32; NR]; MR],
    panel: &P,
) {
    let rows: [&[f32]; M] = std::array::from_fn(|i| &xs[i * k..(i + 1) * k]);
    for s in (0..NR).step_by(S) {
        let mut sums = [[0f32; S]; M];
        for kk in 0..k {
            let w = panel.strip::<S>(kk, s);
            for (sum, row) in sums.iter_mut().zip(&rows) {
                let xv = row[kk];
                for (a, &wv) in sum.iter_mut().zip(&w) {
                    *a = mul_add(xv, wv, *a);
                }
            }
        }
        for (a, sum) in acc.iter_mut().zip(&sums) {
            a[s..s + S].copy_from_slice(sum);
        }
    }
}

/// `x[i] = eˣ⁽ⁱ⁾` in place. Where the target fuses multiply-adds, by the AVX-512 and AVX2
/// kernels' method (see `avx512::exp_in_place`) in plain arithmetic that vectorizes, with their
/// results; elsewhere `f32::exp` (unfused, the polynomial follows llama.cpp's greedy ids less far:
/// 42 against 52 of 112 in `shard/tests/llama_cpp_greedy.rs`).
pub fn exp_in_place(x: &mut [f32]) {
    if FUSED {
        x.iter_mut().for_each(|v| *v = exp(*v));
    } else {
        x.iter_mut().for_each(|v| *v = v.exp());
    }
}

#[inline(always)]
fn exp(v: f32) -> f32 {
    // 1.5·2²³: adding and subtracting it rounds |y| < 2²² to the nearest integer, ties to even,
    // as the vector kernels' rounding does (and unlike `round`, it vectorizes on every target).
    const ROUND: f32 = 12_582_912.0;
    // `clamp` keeps NaN, which then passes through.
    let x = v.clamp(EXP_MIN, EXP_MAX);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = mul_add(-n, LN2_HI, x);
    let r = mul_add(-n, LN2_LO, r);
    let mut p = 1.0 / 720.0;
    for k in EXP_HORNER {
        p = mul_add(p, r, 1.0 / k);
    }
    let n = n as i32;
    let half = n >> 1;
    p * pow2(half) * pow2(n - half)
}

/// 2ᵉ for `e` in [−126, 127].
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}
