//! AVX-512 micro-kernels: R tokens × one 32-row panel, two zmm accumulators per token, weights
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
            6 => $f::<6>($x, $k, $w, $acc),
            7 => $f::<7>($x, $k, $w, $acc),
            _ => $f::<8>($x, $k, $w, $acc),
        }
    };
}

/// Defines a tile function whose weight row `kk` is loaded into two f32 vectors by `$load`.
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
            let mut a0 = [_mm512_setzero_ps(); R];
            let mut a1 = [_mm512_setzero_ps(); R];
            for $kk in 0..k {
                let (w0, w1): (__m512, __m512) = $load;
                for i in 0..R {
                    let xv = _mm512_set1_ps(*x.add(i * k + $kk));
                    a0[i] = _mm512_fmadd_ps(xv, w0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(xv, w1, a1[i]);
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(acc[i].as_mut_ptr(), a0[i]);
                _mm512_storeu_ps(acc[i].as_mut_ptr().add(16), a1[i]);
            }
        }
    };
}

tile!(f32_tile, f32, |w, kk| {
    let p = w.add(kk * NR);
    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
});

// Interleaved bf16: the low half of each 32-bit lane is row r < 16, the high half row r + 16.
tile!(bf16_tile, u16, |w, kk| {
    let v = _mm512_loadu_si512(w.add(kk * NR) as *const __m512i);
    let lo = _mm512_slli_epi32::<16>(v);
    let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    (_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi))
});

tile!(f16_tile, u16, |w, kk| {
    let p = w.add(kk * NR);
    let lo = _mm256_loadu_si256(p as *const __m256i);
    let hi = _mm256_loadu_si256(p.add(16) as *const __m256i);
    (_mm512_cvtph_ps(lo), _mm512_cvtph_ps(hi))
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
