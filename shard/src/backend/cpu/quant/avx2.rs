//! AVX2 integer kernel: each 64-byte line is two halves of 8 rows. `vpmaddubsw` multiplies u8
//! weights by i8 activations into i16 pairs; it saturates past 32,767, so weights enter as
//! nibbles (≤ 15): the products of a whole group (≤ 8 quads · 2 · 15 · 127 = 30,480) then fit i16.
//! Byte-wide weights are split into low and high nibbles, the high sum shifted by 4 in i32.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{QuantActs, QuantPanels, ROWS, TOKENS};

/// Whether the running CPU has AVX2, FMA and F16C.
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

/// Fills `acc[..mr]` with tokens `t0..t0 + mr` against panel `p`. Only called after `available()`.
pub fn kernel(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "the AVX2 kernel needs AVX2, FMA and F16C");
        macro_rules! go {
            ($g:literal, $nib:literal) => {
                // Four tokens at a time: AVX2's 16 registers hold no more accumulators.
                for at in (0..mr).step_by(4) {
                    let (t, acc) = (t0 + at, &mut acc[at..]);
                    // SAFETY: `available()` holds; the tile reads only inside `w` and `acts`.
                    unsafe {
                        match mr - at {
                            1 => tile::<$g, $nib, 1>(acts, t, w, p, acc),
                            2 => tile::<$g, $nib, 2>(acts, t, w, p, acc),
                            3 => tile::<$g, $nib, 3>(acts, t, w, p, acc),
                            _ => tile::<$g, $nib, 4>(acts, t, w, p, acc),
                        }
                    }
                }
            };
        }
        by_layout!(w, go)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (acts, t0, mr, w, p, acc);
        unreachable!("the AVX2 kernel exists only on x86_64");
    }
}

/// `super::levels` for a group of 32 (the same operations): four vectors, one horizontal max,
/// halves rounded away from zero, packed to bytes in order.
///
/// # Safety
/// AVX2 must be present; `x` and `q` hold 32 values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn levels32(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(x.len() >= 32 && q.len() >= 32);
    let sign = _mm256_set1_ps(-0.0);
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let a = v.map(|vi| _mm256_andnot_ps(sign, vi));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);
    let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    let half = _mm256_set1_ps(0.5);
    let i = v.map(|vi| {
        let y = _mm256_mul_ps(vi, inv);
        let away = _mm256_or_ps(_mm256_and_ps(y, sign), half);
        _mm256_cvttps_epi32(_mm256_add_ps(y, away))
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_hadd_epi32(s, s);
    let total = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
    // packs work within 128-bit lanes; the permutation puts the 32 bytes back in order.
    let lo = _mm256_packs_epi32(i[0], i[1]);
    let hi = _mm256_packs_epi32(i[2], i[3]);
    let bytes = _mm256_packs_epi16(lo, hi);
    let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
    (amax, total)
}

/// `Σ_j maddubs(w[j], x[j])` as i16 pairs, then summed to one i32 per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_rows(w: &[__m256i], quads: *const i32) -> __m256i {
    let mut s = _mm256_setzero_si256();
    for (j, wj) in w.iter().enumerate() {
        let x = _mm256_set1_epi32(quads.add(j).read_unaligned());
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*wj, x));
    }
    _mm256_madd_epi16(s, _mm256_set1_epi16(1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const G: usize, const NIB: bool, const MR: usize>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]],
) {
    let low = _mm256_set1_epi8(0x0F);
    let mut f = [[_mm256_setzero_ps(); 2]; MR];
    // Low nibbles of each quad's line half; high nibbles of byte-wide values.
    let mut lo = [_mm256_setzero_si256(); 8];
    let mut hi = [_mm256_setzero_si256(); 8];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        let ahead = block.as_ptr().wrapping_add(super::vnni::PREFETCH) as *const i8;
        for line in 0..block.len() / 64 + 1 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        for h in 0..2 {
            let src = block.as_ptr().add(32 * h) as *const __m256i;
            if NIB {
                for c in 0..G / 8 {
                    let v = _mm256_loadu_si256(src.add(2 * c));
                    lo[c] = _mm256_and_si256(v, low);
                    lo[c + G / 8] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                }
            } else {
                for j in 0..G / 4 {
                    let v = _mm256_loadu_si256(src.add(2 * j));
                    lo[j] = _mm256_and_si256(v, low);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                }
            }
            let pp = params.as_ptr().add(8 * h) as *const __m128i;
            let d = _mm256_cvtph_ps(_mm_loadu_si128(pp));
            let off = _mm256_cvtph_ps(_mm_loadu_si128(pp.add(2)));
            for (i, fi) in f.iter_mut().enumerate() {
                let (xq, dx, sx) = acts.group(t0 + i, g);
                let quads = xq.as_ptr() as *const i32;
                let mut s = dot_rows(&lo[..G / 4], quads);
                if !NIB {
                    let high = dot_rows(&hi[..G / 4], quads);
                    s = _mm256_add_epi32(s, _mm256_slli_epi32::<4>(high));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                fi[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, fi[h]);
                fi[h] = _mm256_fmadd_ps(off, _mm256_set1_ps(sx), fi[h]);
            }
        }
    }
    for (a, fi) in acc.iter_mut().zip(f) {
        _mm256_storeu_ps(a.as_mut_ptr(), fi[0]);
        _mm256_storeu_ps(a.as_mut_ptr().add(8), fi[1]);
    }
}
