//! AVX-512 VNNI integer kernel: per group, the panel's lines are unpacked once (nibbles, plus the
//! bits above them from the planes) into up to eight 64-byte registers (u8 weights, 16 rows × one
//! quad each) and reused by every token, whose
//! activation quads are broadcast into `vpdpbusd` on top of the zero point's term; one f32 FMA
//! per token and group applies `d·dx`, a second the offset term where there are offsets.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::plane_bit;
use super::{QuantActs, QuantPanels, ROWS, TOKENS};

/// How far ahead of the block being multiplied the kernel prefetches, in bytes.
/// 2 KiB measured best on SmolLM2 decode (1 KiB and 4 KiB are slower); without it one core
/// reaches half the bandwidth.
#[cfg(target_arch = "x86_64")]
pub(super) const PREFETCH: usize = 2048;

/// Whether the running CPU has AVX-512 F, BW and VNNI.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
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
        assert!(available(), "the VNNI kernel needs AVX-512 VNNI");
        macro_rules! go {
            ($g:literal, $nib:literal, $hb:literal) => {
                // SAFETY: `available()` holds; the tile reads only inside `w` and `acts`.
                unsafe {
                    match mr {
                        1 => tile::<$g, $nib, $hb, 1>(acts, t0, w, p, acc),
                        2 => tile::<$g, $nib, $hb, 2>(acts, t0, w, p, acc),
                        3 => tile::<$g, $nib, $hb, 3>(acts, t0, w, p, acc),
                        4 => tile::<$g, $nib, $hb, 4>(acts, t0, w, p, acc),
                        5 => tile::<$g, $nib, $hb, 5>(acts, t0, w, p, acc),
                        6 => tile::<$g, $nib, $hb, 6>(acts, t0, w, p, acc),
                        7 => tile::<$g, $nib, $hb, 7>(acts, t0, w, p, acc),
                        _ => tile::<$g, $nib, $hb, 8>(acts, t0, w, p, acc),
                    }
                }
            };
        }
        by_layout!(w, go)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (acts, t0, mr, w, p, acc);
        unreachable!("the VNNI kernel exists only on x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const G: usize, const NIB: bool, const HB: usize, const MR: usize>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    let low = _mm512_set1_epi8(0x0F);
    let field = _mm512_set1_epi8((((1 << HB) - 1) << 4) as i8);
    let mut f = [_mm512_setzero_ps(); MR];
    let mut lines = [_mm512_setzero_si512(); 8];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        let src = block.as_ptr() as *const __m512i;
        // Decode streams the weights once: ask for the lines PREFETCH bytes ahead (the next
        // blocks of this panel, then the next panel's) so several misses are in flight.
        let ahead = block.as_ptr().wrapping_add(PREFETCH) as *const i8;
        for line in 0..block.len() / 64 + 1 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        if NIB {
            for c in 0..G / 8 {
                let v = _mm512_loadu_si512(src.add(c));
                lines[c] = _mm512_and_si512(v, low);
                lines[c + G / 8] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            // The bits above each nibble: the plane shifted so they land at bits 4.. of each
            // byte (16-bit shifts of at most 4 carry no neighbour's bits into that field).
            if HB > 0 {
                for (j, line) in lines.iter_mut().take(G / 4).enumerate() {
                    let (plane, bit) = plane_bit(j, HB);
                    let above = _mm512_loadu_si512(src.add(G / 8 + plane));
                    let placed = if bit <= 4 {
                        _mm512_sll_epi16(above, _mm_cvtsi32_si128(4 - bit as i32))
                    } else {
                        _mm512_srl_epi16(above, _mm_cvtsi32_si128(bit as i32 - 4))
                    };
                    *line = _mm512_or_si512(*line, _mm512_and_si512(placed, field));
                }
            }
        } else {
            for (j, line) in lines.iter_mut().take(G / 4).enumerate() {
                *line = _mm512_loadu_si512(src.add(j));
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(params.as_ptr() as *const __m256i));
        let start: [i32; MR] = std::array::from_fn(|i| w.sum_start(acts, t0 + i, g, 0));
        for (i, fi) in f.iter_mut().enumerate() {
            let (xq, dx, _) = acts.group(t0 + i, g);
            let quads = xq.as_ptr() as *const i32;
            let mut s = _mm512_set1_epi32(start[i]);
            for (j, line) in lines.iter().take(G / 4).enumerate() {
                let x = _mm512_set1_epi32(quads.add(j).read_unaligned());
                s = _mm512_dpbusd_epi32(s, *line, x);
            }
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(dx));
            *fi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *fi);
        }
        if w.has_offsets() {
            let off = _mm512_cvtph_ps(_mm256_loadu_si256(
                params.as_ptr().add(ROWS) as *const __m256i
            ));
            for (i, fi) in f.iter_mut().enumerate() {
                let sx = acts.group(t0 + i, g).2;
                *fi = _mm512_fmadd_ps(off, _mm512_set1_ps(sx), *fi);
            }
        }
    }
    for (a, fi) in acc.iter_mut().zip(f) {
        _mm512_storeu_ps(a.as_mut_ptr(), fi);
    }
}
