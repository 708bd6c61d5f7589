//! AVX2 + FMA float micro-kernels for CPUs without AVX-512, over the same panels: a 64-row panel
//! is walked as four strips of 16 rows, each R ≤ 6 tokens × two 8-lane accumulators (12 of the
//! 16 registers), or for one token as a single strip of 64 rows (eight accumulators), so a decode
//! step streams the panel in order; weights are widened to f32 in registers (bf16 by shift/mask,
//! f16 by `vcvtph2ps`). Plus the vectorised exp the AVX-512 module has.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Packed, MR, NR};

/// Rows per strip of the bf16 tile: two 8-lane vectors.
#[cfg(target_arch = "x86_64")]
const STRIP: usize = 16;

/// Whether the running CPU has AVX2, FMA and F16C (cached by std after the first query).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dispatch!` for tiles over strips of V vectors: `$v` for many tokens, all eight for one.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_strips {
    ($f:ident, $v:literal, $mr:expr, $x:expr, $k:expr, $w:expr, $acc:expr) => {
        match $mr {
            1 => $f::<1, 8>($x, $k, $w, $acc),
            2 => $f::<2, $v>($x, $k, $w, $acc),
            3 => $f::<3, $v>($x, $k, $w, $acc),
            4 => $f::<4, $v>($x, $k, $w, $acc),
            5 => $f::<5, $v>($x, $k, $w, $acc),
            _ => $f::<6, $v>($x, $k, $w, $acc),
        }
    };
}

/// Defines a tile function over strips of V vectors (8·V rows) whose 8 weights of row `kk` at
/// panel offset `$at` (rows `r..r + 8` of that row: `kk·NR + r`) are loaded as f32 by `$load`.
macro_rules! tile {
    ($name:ident, $t:ty, |$w:ident, $at:ident| $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const R: usize, const V: usize>(
            x: *const f32,
            k: usize,
            $w: *const $t,
            acc: &mut [[f32; NR]; MR],
        ) {
            for s in 0..NR / (8 * V) {
                let mut a = [[_mm256_setzero_ps(); V]; R];
                for kk in 0..k {
                    let mut w = [_mm256_setzero_ps(); V];
                    for (v, wv) in w.iter_mut().enumerate() {
                        let $at = kk * NR + (s * V + v) * 8;
                        *wv = $load;
                    }
                    for (i, ai) in a.iter_mut().enumerate() {
                        let xv = _mm256_set1_ps(*x.add(i * k + kk));
                        for (av, wv) in ai.iter_mut().zip(w) {
                            *av = _mm256_fmadd_ps(xv, wv, *av);
                        }
                    }
                }
                store(&a, s * V * 8, acc);
            }
        }
    };
}

tile!(f32_tile, f32, |w, at| _mm256_loadu_ps(w.add(at)));

tile!(f16_tile, u16, |w, at| _mm256_cvtph_ps(_mm_loadu_si128(
    w.add(at) as *const __m128i
)));

/// bf16 k-pair panels widened to f32 exactly: pair `j` of strip `s` is 16 rows × columns 2j, 2j+1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_tile<const R: usize>(
    x: *const f32,
    k: usize,
    w: *const u16,
    acc: &mut [[f32; NR]; MR],
) {
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    for s in 0..NR / STRIP {
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        for j in 0..k.div_ceil(2) {
            let p = w.add(j * NR * 2 + s * STRIP * 2) as *const __m256i;
            let v = [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))];
            let c = 2 * j;
            let even = [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v[0])),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v[1])),
            ];
            for (i, ai) in a.iter_mut().enumerate() {
                let xe = _mm256_set1_ps(*x.add(i * k + c));
                ai[0] = _mm256_fmadd_ps(xe, even[0], ai[0]);
                ai[1] = _mm256_fmadd_ps(xe, even[1], ai[1]);
            }
            if c + 1 < k {
                let odd = [
                    _mm256_castsi256_ps(_mm256_and_si256(v[0], high)),
                    _mm256_castsi256_ps(_mm256_and_si256(v[1], high)),
                ];
                for (i, ai) in a.iter_mut().enumerate() {
                    let xo = _mm256_set1_ps(*x.add(i * k + c + 1));
                    ai[0] = _mm256_fmadd_ps(xo, odd[0], ai[0]);
                    ai[1] = _mm256_fmadd_ps(xo, odd[1], ai[1]);
                }
            }
        }
        store(&a, s * STRIP, acc);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store<const R: usize, const V: usize>(
    a: &[[__m256; V]; R],
    row: usize,
    acc: &mut [[f32; NR]; MR],
) {
    for (i, ai) in a.iter().enumerate() {
        for (v, av) in ai.iter().enumerate() {
            _mm256_storeu_ps(acc[i].as_mut_ptr().add(row + 8 * v), *av);
        }
    }
}

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `k` features.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `xs` holds `mr * k` values and `data` holds panel
/// `p` of width `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn kernel(
    xs: &[f32],
    mr: usize,
    k: usize,
    data: &Packed,
    p: usize,
    acc: &mut [[f32; NR]; MR],
) {
    assert!(xs.len() >= mr * k);
    let x = xs.as_ptr();
    match data {
        Packed::F32(v) => {
            assert!(v.len() >= (p + 1) * k * NR);
            let w = v.as_ptr().add(p * k * NR);
            dispatch_strips!(f32_tile, 2, mr, x, k, w, acc)
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
            dispatch_strips!(f16_tile, 2, mr, x, k, w, acc)
        }
        Packed::Quant(_) => unreachable!("quantized panels go to quant::matmul"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn kernel(_: &[f32], _: usize, _: usize, _: &Packed, _: usize, _: &mut [[f32; NR]; MR]) {
    unreachable!("avx2::kernel called without AVX2 support")
}

/// `Σ a[i]·b[i]` over the shorter slice: two 8-lane FMA chains, one horizontal sum.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..full).step_by(16) {
        let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
    }
    let s = _mm256_add_ps(s0, s1);
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    let tail: f32 = a[full..n].iter().zip(&b[full..n]).map(|(x, y)| x * y).sum();
    _mm_cvtss_f32(h) + tail
}

/// `x[i] = eˣ⁽ⁱ⁾` in place, the AVX-512 module's method on 8 lanes; 2ⁿ is applied as
/// 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋) so both factors stay normal floats down to e⁻¹⁰⁴.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_in_place(x: &mut [f32]) {
    let full = x.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        let p = x.as_mut_ptr().add(i);
        _mm256_storeu_ps(p, exp8(_mm256_loadu_ps(p)));
    }
    for v in &mut x[full..] {
        *v = v.exp();
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn exp_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.exp());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(v: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    // `min`/`max` return their second operand for NaN, so NaN passes through.
    let x = _mm256_max_ps(c(super::EXP_MIN), _mm256_min_ps(c(super::EXP_MAX), v));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        c(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, c(super::LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, c(super::LN2_LO), r);
    let mut p = c(1.0 / 720.0);
    for k in super::EXP_HORNER {
        p = _mm256_fmadd_ps(p, r, c(1.0 / k));
    }
    let n = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(n);
    _mm256_mul_ps(
        _mm256_mul_ps(p, pow2(half)),
        pow2(_mm256_sub_epi32(n, half)),
    )
}

/// 2ᵉ for integer lanes `e` in [−126, 127].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pow2(e: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        e,
        _mm256_set1_epi32(127),
    )))
}
