//! AVX-512 micro-kernels: R ≤ 6 tokens × one 64-row panel, four zmm accumulators per token, weights
//! widened to f32 in registers (bf16 by shift/mask, f16 by `vcvtph2ps`) so each weight byte is
//! read from memory exactly once per call; with AVX512-BF16, bf16 k-pairs go straight into
//! `vdpbf16ps` against bf16 activation pairs (two multiply-adds per lane and instruction).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Packed, MR, NR};

/// Whether the running CPU has AVX-512F (cached by std after the first query).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the running CPU also has AVX512-BF16 (`vdpbf16ps`).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i] = bf16(x[i])`, rounding to nearest even (`out` may be one longer than `x`).
pub fn round_to_bf16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        // SAFETY: AVX512-BF16 is present; `round_bf16_avx512` stays inside both slices.
        return unsafe { round_bf16_avx512(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = half::bf16::from_f32(v).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_bf16_avx512(x: &[f32], out: &mut [u16]) {
    let full = x.len() / 16 * 16;
    assert!(out.len() >= x.len());
    for i in (0..full).step_by(16) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_si256(
            out.as_mut_ptr().add(i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
    }
    for i in full..x.len() {
        out[i] = half::bf16::from_f32(x[i]).to_bits();
    }
}

/// `x[i] = eˣ⁽ⁱ⁾` in place: 2ⁿ·p(r) with r = x − n·ln 2, |r| ≤ ln 2 / 2, and p the degree-6
/// Taylor polynomial (relative error ≈ 2·10⁻⁷); NaN stays NaN, large negatives go to 0.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX-512F is present; `exp_avx512` stays inside the slice.
        return unsafe { exp_avx512(x) };
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: &mut [f32]) {
    let full = x.len() / 16 * 16;
    for i in (0..full).step_by(16) {
        let p = x.as_mut_ptr().add(i);
        _mm512_storeu_ps(p, exp16(_mm512_loadu_ps(p)));
    }
    for v in &mut x[full..] {
        *v = v.exp();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(v: __m512) -> __m512 {
    let c = _mm512_set1_ps;
    // `min`/`max` return their second operand for NaN, so NaN passes through.
    let x = _mm512_max_ps(c(super::EXP_MIN), _mm512_min_ps(c(super::EXP_MAX), v));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, c(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, c(super::LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, c(super::LN2_LO), r);
    let mut p = c(1.0 / 720.0);
    for k in super::EXP_HORNER {
        p = _mm512_fmadd_ps(p, r, c(1.0 / k));
    }
    _mm512_scalef_ps(p, n)
}

/// `Σ a[i]·b[i]` over the shorter slice, 16 lanes per FMA and one horizontal sum.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let (x, y) = (
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
        );
        acc = _mm512_fmadd_ps(x, y, acc);
    }
    let tail: f32 = a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x * y).sum();
    _mm512_reduce_add_ps(acc) + tail
}

/// Defines a tile function whose weight row `kk` (64 values) is loaded into four f32 vectors
/// by `$load`.
macro_rules! tile {
    ($name:ident, $t:ty, |$w:ident, $kk:ident| $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn $name<const R: usize>(
            x: *const f32,
            k: usize,
            $w: *const $t,
            acc: &mut [[f32; NR]; MR],
        ) {
            let mut a = [[_mm512_setzero_ps(); 4]; R];
            for $kk in 0..k {
                let w: [__m512; 4] = $load;
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(i * k + $kk));
                    for (av, wv) in ai.iter_mut().zip(w) {
                        *av = _mm512_fmadd_ps(xv, wv, *av);
                    }
                }
            }
            store(&a, acc);
        }
    };
}

tile!(f32_tile, f32, |w, kk| {
    let p = w.add(kk * NR);
    [
        _mm512_loadu_ps(p),
        _mm512_loadu_ps(p.add(16)),
        _mm512_loadu_ps(p.add(32)),
        _mm512_loadu_ps(p.add(48)),
    ]
});

/// Widens 32 bf16 k-pairs (16 rows × columns 2j, 2j+1) into the even and the odd column's f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_pairs(p: *const u16) -> (__m512, __m512) {
    let v = _mm512_loadu_si512(p as *const __m512i);
    let even = _mm512_slli_epi32::<16>(v);
    let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
}

/// bf16 k-pair panels widened to f32 exactly (CPUs without AVX512-BF16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bf16_tile<const R: usize>(
    x: *const f32,
    k: usize,
    w: *const u16,
    acc: &mut [[f32; NR]; MR],
) {
    let mut a = [[_mm512_setzero_ps(); 4]; R];
    for j in 0..k.div_ceil(2) {
        let p = w.add(j * NR * 2);
        let (mut even, mut odd) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
        for q in 0..4 {
            (even[q], odd[q]) = widen_pairs(p.add(32 * q));
        }
        let c = 2 * j;
        for (i, ai) in a.iter_mut().enumerate() {
            let xe = _mm512_set1_ps(*x.add(i * k + c));
            for (av, wv) in ai.iter_mut().zip(even) {
                *av = _mm512_fmadd_ps(xe, wv, *av);
            }
            if c + 1 < k {
                let xo = _mm512_set1_ps(*x.add(i * k + c + 1));
                for (av, wv) in ai.iter_mut().zip(odd) {
                    *av = _mm512_fmadd_ps(xo, wv, *av);
                }
            }
        }
    }
    store(&a, acc);
}

/// `vdpbf16ps` tile: `x` holds R rows of `pairs` bf16 activation pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn dpbf16_tile<const R: usize>(
    x: *const u32,
    pairs: usize,
    w: *const u16,
    acc: &mut [[f32; NR]; MR],
) {
    let mut a = [[_mm512_setzero_ps(); 4]; R];
    for j in 0..pairs {
        let p = w.add(j * NR * 2);
        let load = |q: usize| -> __m512bh {
            // SAFETY: 32 bf16 of the panel; `__m512bh` is 64 bytes like `__m512i`.
            unsafe { std::mem::transmute(_mm512_loadu_si512(p.add(32 * q) as *const __m512i)) }
        };
        let wv = [load(0), load(1), load(2), load(3)];
        for (i, ai) in a.iter_mut().enumerate() {
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(i * pairs + j) as i32));
            for (av, wq) in ai.iter_mut().zip(wv) {
                *av = _mm512_dpbf16_ps(*av, xv, wq);
            }
        }
    }
    store(&a, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store<const R: usize>(a: &[[__m512; 4]; R], acc: &mut [[f32; NR]; MR]) {
    for (i, ai) in a.iter().enumerate() {
        for (j, av) in ai.iter().enumerate() {
            _mm512_storeu_ps(acc[i].as_mut_ptr().add(16 * j), *av);
        }
    }
}

tile!(f16_tile, u16, |w, kk| {
    let p = w.add(kk * NR);
    let half = |o: usize| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(o) as *const __m256i));
    [half(0), half(16), half(32), half(48)]
});

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `k` features.
///
/// # Safety
/// The CPU must support AVX-512F; `xs` holds `mr * k` values and `data` holds panel `p` of width `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn kernel(
    xs: &[f32],
    mr: usize,
    k: usize,
    data: &Packed,
    p: usize,
    acc: &mut [[f32; NR]; MR],
) {
    debug_assert!(xs.len() >= mr * k);
    let x = xs.as_ptr();
    match data {
        Packed::F32(v) => {
            assert!(v.len() >= (p + 1) * k * NR);
            let w = v.as_ptr().add(p * k * NR);
            dispatch!(f32_tile, mr, x, k, w, acc)
        }
        Packed::Bf16(v) => {
            let panel = k.div_ceil(2) * NR * 2;
            assert!(v.len() >= (p + 1) * panel);
            let w = v.as_ptr().add(p * panel);
            dispatch!(bf16_tile, mr, x, k, w, acc)
        }
        Packed::F16(v) => {
            assert!(v.len() >= (p + 1) * k * NR);
            let w = v.as_ptr().add(p * k * NR);
            dispatch!(f16_tile, mr, x, k, w, acc)
        }
        Packed::Quant(_) => unreachable!("quantized panels go to quant::matmul"),
    }
}

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `pairs` bf16 activation pairs
/// against a bf16 k-pair panel.
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16; `data` is bf16 and holds panel `p` of
/// `2·pairs` (padded) columns; `xs` holds `mr * pairs` lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_bf16(
    xs: &[u32],
    mr: usize,
    pairs: usize,
    data: &Packed,
    p: usize,
    acc: &mut [[f32; NR]; MR],
) {
    let Packed::Bf16(v) = data else {
        unreachable!("kernel_bf16 needs bf16 weights")
    };
    assert!(xs.len() >= mr * pairs && v.len() >= (p + 1) * pairs * NR * 2);
    let w = v.as_ptr().add(p * pairs * NR * 2);
    dispatch!(dpbf16_tile, mr, xs.as_ptr(), pairs, w, acc)
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn kernel_bf16(
    _: &[u32],
    _: usize,
    _: usize,
    _: &Packed,
    _: usize,
    _: &mut [[f32; NR]; MR],
) {
    unreachable!("avx512::kernel_bf16 called without AVX512-BF16 support")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn kernel(_: &[f32], _: usize, _: usize, _: &Packed, _: usize, _: &mut [[f32; NR]; MR]) {
    unreachable!("avx512::kernel called without AVX-512 support")
}
