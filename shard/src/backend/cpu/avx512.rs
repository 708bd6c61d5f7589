//! AVX-512 micro-kernels: R ≤ 6 tokens × one 64-row panel, four zmm accumulators per token, weights
//! widened to f32 in registers (bf16 by shift/mask, f16 by `vcvtph2ps`) so each weight byte is
//! read from memory exactly once per call.

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

/// Monomorphizes the tile function for the token count so accumulators live in registers.
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
            for (i, ai) in a.iter().enumerate() {
                for (j, av) in ai.iter().enumerate() {
                    _mm512_storeu_ps(acc[i].as_mut_ptr().add(16 * j), *av);
                }
            }
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

/// Widens 32 interleaved bf16 (rows r and r + 16 share a 32-bit lane) into two f32 vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_bf16(p: *const u16) -> (__m512, __m512) {
    let v = _mm512_loadu_si512(p as *const __m512i);
    let lo = _mm512_slli_epi32::<16>(v);
    let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    (_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi))
}

tile!(bf16_tile, u16, |w, kk| {
    let p = w.add(kk * NR);
    let ((a, b), (c, d)) = (widen_bf16(p), widen_bf16(p.add(32)));
    [a, b, c, d]
});

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
            assert!(v.len() >= (p + 1) * k * NR);
            let w = v.as_ptr().add(p * k * NR);
            dispatch!(bf16_tile, mr, x, k, w, acc)
        }
        Packed::F16(v) => {
            assert!(v.len() >= (p + 1) * k * NR);
            let w = v.as_ptr().add(p * k * NR);
            dispatch!(f16_tile, mr, x, k, w, acc)
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn kernel(_: &[f32], _: usize, _: usize, _: &Packed, _: usize, _: &mut [[f32; NR]; MR]) {
    unreachable!("avx512::kernel called without AVX-512 support")
}
