//! AVX2 integer kernels: each 64-byte line is two halves of 8 rows. `vpmaddubsw` multiplies u8
//! weights by i8 activations into i16 pairs and saturates past 32,767, so how many products may
//! share an i16 sum depends on the weights' width, and each width has its own tile:
//! - nibbles (≤ 4 bits): a whole group's products fit (8 quads · 2 · 15 · 127 = 30,480);
//! - nibbles with plane bits (5–6 bits): two quads' products fit (2 · 2 · 63 · 127 = 32,004), so
//!   each nibble line's pair of quads is widened to i32 at once; the same goes for 5–6-bit values
//!   one per byte (panels expanded for prefill, `QuantPanels::expand_panel`);
//! - bytes (7–8 bits): weights are made signed (`v − 128`) and enter as magnitudes, their signs
//!   moved onto the activations (`|w| · sign(x, w)`: one quad's pair is at most 2 · 128 · 127),
//!   and the sum starts at `(128 − zero)·Σ qx` so it is `Σ (v − zero)·qx` exactly as the other
//!   kernels compute it (`QuantPanels::sum_start`).
//!
//! A tile walks a group's quads once and multiplies each loaded line by every token's broadcast
//! quad, so broadcasts serve both halves and weights are loaded once per tile.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use super::plane_bit;
use super::{Line, QuantActs, QuantPanels, ROWS, TOKENS};

pub use super::super::avx2::available;

/// Tokens per tile of 5–6-bit values (nibbles with plane bits, or one per byte): what keeps the
/// tile's sums, weights and broadcasts in AVX2's 16 registers (measured: 4 is slower).
pub(super) const PLANE_STEP: usize = 2;

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
        // `$step` tokens per tile: what keeps the tile's sums, weights and broadcasts in AVX2's
        // 16 registers (measured: 4 for nibbles and bytes, PLANE_STEP for 5–6 bits).
        macro_rules! tiles {
            ($tile:ident::<$($c:literal),*>, $step:expr) => {
                for at in (0..mr).step_by($step) {
                    let (t, acc) = (t0 + at, &mut acc[at..]);
                    // SAFETY: `available()` holds; the tile reads only inside `w` and `acts`.
                    unsafe {
                        match (mr - at).min($step) {
                            1 => $tile::<$($c,)* 1>(acts, t, w, p, acc),
                            2 => $tile::<$($c,)* 2>(acts, t, w, p, acc),
                            3 => $tile::<$($c,)* 3>(acts, t, w, p, acc),
                            _ => $tile::<$($c,)* 4>(acts, t, w, p, acc),
                        }
                    }
                }
            };
        }
        match (w.group, w.nibbles, w.high, w.bits <= 6) {
            (32, true, 0, _) => tiles!(nibble_tile::<32, 0>, 4),
            (32, true, 1, _) => tiles!(nibble_tile::<32, 1>, PLANE_STEP),
            (32, true, _, _) => tiles!(nibble_tile::<32, 2>, PLANE_STEP),
            (16, true, 0, _) => tiles!(nibble_tile::<16, 0>, 4),
            (16, true, 1, _) => tiles!(nibble_tile::<16, 1>, PLANE_STEP),
            (16, true, _, _) => tiles!(nibble_tile::<16, 2>, PLANE_STEP),
            (32, false, _, true) => tiles!(small_tile::<32>, PLANE_STEP),
            (16, false, _, true) => tiles!(small_tile::<16>, PLANE_STEP),
            (32, false, _, false) => tiles!(byte_tile::<32>, 4),
            _ => tiles!(byte_tile::<16>, 4),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (acts, t0, mr, w, p, acc);
        unreachable!("the AVX2 kernel exists only on x86_64");
    }
}

/// A group's nibbles and plane bits joined into one byte per value, `out[j]` holding quad `j`
/// (`super::unpack_group` for nibble blocks, in AVX2). Only called after
/// `available()`.
pub fn join_group(block: &[u8], group: usize, high: usize, out: &mut [Line]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            available() && out.len() >= group / 4,
            "join_group needs AVX2"
        );
        // SAFETY: AVX2 is present; `join` reads the block's nibble and plane lines and writes
        // `out[..G/4]`, both checked by slicing.
        unsafe {
            match (group, high) {
                (32, 0) => join::<32, 0>(block, out),
                (32, 1) => join::<32, 1>(block, out),
                (32, _) => join::<32, 2>(block, out),
                (16, 0) => join::<16, 0>(block, out),
                (16, 1) => join::<16, 1>(block, out),
                _ => join::<16, 2>(block, out),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (block, group, high, out);
        unreachable!("the AVX2 kernels exist only on x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn join<const G: usize, const HB: usize>(block: &[u8], out: &mut [Line]) {
    let out = &mut out[..G / 4];
    prefetch(block);
    for c in 0..G / 8 {
        let [lo, hi] = line_quads::<G, HB>(block, c);
        for (j, q) in [(c, lo), (c + G / 8, hi)] {
            let dst = out[j].0.as_mut_ptr() as *mut __m256i;
            _mm256_storeu_si256(dst, q[0]);
            _mm256_storeu_si256(dst.add(1), q[1]);
        }
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

/// Where tokens `t0..t0 + MR`'s activation quads of group `g` start.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn quads<const MR: usize>(acts: &QuantActs, t0: usize, g: usize) -> [*const i32; MR] {
    let mut x = [std::ptr::null(); MR];
    for (i, xi) in x.iter_mut().enumerate() {
        *xi = acts.group(t0 + i, g).0.as_ptr() as *const i32;
    }
    x
}

/// Quad `j` at `x` in all eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn broadcast(x: *const i32, j: usize) -> __m256i {
    _mm256_set1_epi32(x.add(j).read_unaligned())
}

/// Line `j` of a block as its two halves (rows 0–7, rows 8–15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn halves(block: &[u8], j: usize) -> [__m256i; 2] {
    debug_assert!(block.len() >= 64 * (j + 1));
    let src = block.as_ptr().add(64 * j) as *const __m256i;
    [_mm256_loadu_si256(src), _mm256_loadu_si256(src.add(1))]
}

/// Asks for the lines `PREFETCH` bytes ahead of `block`: decode streams the weights once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn prefetch(block: &[u8]) {
    let ahead = block.as_ptr().wrapping_add(super::vnni::PREFETCH) as *const i8;
    for line in 0..block.len() / 64 + 1 {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
    }
}

/// `f[i][h] += d·dx · s[i][h] (+ o · dx·Σqx where there are offsets)` for each token `t0 + i`
/// and half `h` of group `g` (a macro: as a function LLVM keeps it out of line, a call per group).
#[cfg(target_arch = "x86_64")]
macro_rules! scale_group {
    ($f:ident, $s:ident, $w:expr, $params:expr, $acts:expr, $t0:expr, $g:expr) => {
        let pp = $params.as_ptr() as *const __m128i;
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(pp.add(h)));
            for i in 0..MR {
                let dx = $acts.group($t0 + i, $g).1;
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                $f[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps($s[i][h]), scale, $f[i][h]);
            }
        }
        if $w.has_offsets() {
            for h in 0..2 {
                let off = _mm256_cvtph_ps(_mm_loadu_si128(pp.add(2 + h)));
                for i in 0..MR {
                    let sx = $acts.group($t0 + i, $g).2;
                    $f[i][h] = _mm256_fmadd_ps(off, _mm256_set1_ps(sx), $f[i][h]);
                }
            }
        }
    };
}

/// Each token's i32 sums (both halves) of group `g` at their start, `w.sum_start(.., bias)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn starts<const MR: usize>(
    w: &QuantPanels,
    acts: &QuantActs,
    t0: usize,
    g: usize,
    bias: i32,
) -> [[__m256i; 2]; MR] {
    std::array::from_fn(|i| [_mm256_set1_epi32(w.sum_start(acts, t0 + i, g, bias)); 2])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store<const MR: usize>(f: &[[__m256; 2]; MR], acc: &mut [[f32; ROWS]]) {
    for (a, fi) in acc.iter_mut().zip(f) {
        _mm256_storeu_ps(a.as_mut_ptr(), fi[0]);
        _mm256_storeu_ps(a.as_mut_ptr().add(8), fi[1]);
    }
}

/// Values of at most 6 bits: line `c` holds quad `c` in its low nibbles and quad `c + G/8` in its
/// high ones, and `HB` bits above each nibble lie in the planes. Without plane bits the group's
/// products are summed in i16 and widened once; with them, each line's pair of quads is widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_tile<const G: usize, const HB: usize, const MR: usize>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]],
) {
    let ones = _mm256_set1_epi16(1);
    let mut f = [[_mm256_setzero_ps(); 2]; MR];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        prefetch(block);
        let x = quads::<MR>(acts, t0, g);
        // Without plane bits the sums are i16 until widened: their start is added then.
        let start = starts::<MR>(w, acts, t0, g, 0);
        let mut s = if HB == 0 {
            [[_mm256_setzero_si256(); 2]; MR]
        } else {
            start
        };
        for c in 0..G / 8 {
            let [lo, hi] = line_quads::<G, HB>(block, c);
            for (i, si) in s.iter_mut().enumerate() {
                let (x0, x1) = (broadcast(x[i], c), broadcast(x[i], c + G / 8));
                for h in 0..2 {
                    let pair = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[h], x0),
                        _mm256_maddubs_epi16(hi[h], x1),
                    );
                    si[h] = if HB == 0 {
                        _mm256_add_epi16(si[h], pair)
                    } else {
                        _mm256_add_epi32(si[h], _mm256_madd_epi16(pair, ones))
                    };
                }
            }
        }
        if HB == 0 {
            for (si, start) in s.iter_mut().zip(&start) {
                for (v, start) in si.iter_mut().zip(start) {
                    *v = _mm256_add_epi32(_mm256_madd_epi16(*v, ones), *start);
                }
            }
        }
        scale_group!(f, s, w, params, acts, t0, g);
    }
    store(&f, acc);
}

/// Nibble line `c` of a block as its two quads `c` and `c + G/8` (each as two halves), with the
/// `HB` bits above each nibble from the planes: a plane is shifted so a quad's bits land at bits
/// 4.. of each byte (16-bit shifts of at most 4 cannot carry a neighbour's bits into that field),
/// then masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn line_quads<const G: usize, const HB: usize>(block: &[u8], c: usize) -> [[__m256i; 2]; 2] {
    let (low, field) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8((((1 << HB) - 1) << 4) as i8),
    );
    let v = halves(block, c);
    let mut quads = [
        [_mm256_and_si256(v[0], low), _mm256_and_si256(v[1], low)],
        [
            _mm256_and_si256(_mm256_srli_epi16::<4>(v[0]), low),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v[1]), low),
        ],
    ];
    if HB > 0 {
        for (j, quad) in [c, c + G / 8].into_iter().zip(&mut quads) {
            let (plane, bit) = plane_bit(j, HB);
            for (q, above) in quad.iter_mut().zip(halves(block, G / 8 + plane)) {
                let placed = if bit <= 4 {
                    _mm256_sll_epi16(above, _mm_cvtsi32_si128(4 - bit as i32))
                } else {
                    _mm256_srl_epi16(above, _mm_cvtsi32_si128(bit as i32 - 4))
                };
                *q = _mm256_or_si256(*q, _mm256_and_si256(placed, field));
            }
        }
    }
    quads
}

/// Values of 5–6 bits, one byte each (panels expanded for prefill): quads two by two summed in
/// i16, then widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small_tile<const G: usize, const MR: usize>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]],
) {
    let ones = _mm256_set1_epi16(1);
    let mut f = [[_mm256_setzero_ps(); 2]; MR];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        prefetch(block);
        let (x, mut s) = (quads::<MR>(acts, t0, g), starts::<MR>(w, acts, t0, g, 0));
        for j in (0..G / 4).step_by(2) {
            let (w0, w1) = (halves(block, j), halves(block, j + 1));
            for (i, si) in s.iter_mut().enumerate() {
                let (x0, x1) = (broadcast(x[i], j), broadcast(x[i], j + 1));
                for h in 0..2 {
                    let pair = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w0[h], x0),
                        _mm256_maddubs_epi16(w1[h], x1),
                    );
                    si[h] = _mm256_add_epi32(si[h], _mm256_madd_epi16(pair, ones));
                }
            }
        }
        scale_group!(f, s, w, params, acts, t0, g);
    }
    store(&f, acc);
}

/// Values of 7–8 bits: signed (`v − 128`) magnitudes against sign-moved activations, widened
/// per quad, on top of `128·Σ qx`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn byte_tile<const G: usize, const MR: usize>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]],
) {
    let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(i8::MIN));
    let mut f = [[_mm256_setzero_ps(); 2]; MR];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        prefetch(block);
        let (x, mut s) = (quads::<MR>(acts, t0, g), starts::<MR>(w, acts, t0, g, 128));
        for j in 0..G / 4 {
            let v = halves(block, j);
            let signed = [_mm256_xor_si256(v[0], flip), _mm256_xor_si256(v[1], flip)];
            let size = [
                _mm256_sign_epi8(signed[0], signed[0]),
                _mm256_sign_epi8(signed[1], signed[1]),
            ];
            for (i, si) in s.iter_mut().enumerate() {
                let xj = broadcast(x[i], j);
                for h in 0..2 {
                    let pair = _mm256_maddubs_epi16(size[h], _mm256_sign_epi8(xj, signed[h]));
                    si[h] = _mm256_add_epi32(si[h], _mm256_madd_epi16(pair, ones));
                }
            }
        }
        scale_group!(f, s, w, params, acts, t0, g);
    }
    store(&f, acc);
}
