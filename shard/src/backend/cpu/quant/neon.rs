//! NEON dot-product integer kernel (Armv8.2's `sdot`: Graviton 2 and later, Ampere Altra, Apple
//! M1 and later, Cortex-A76 and later). A 64-byte line is four 16-byte registers of 4 rows × one
//! quad, which is exactly `sdot`'s by-element form: one `sdot` of such a register against quad `j`
//! of a token's activations (lane `j % 4` of a 16-byte load) adds 4 rows' quad dot products into
//! 4 i32 lanes, so a line feeds 16 row sums with no horizontal adds, as `vpdpbusd` does on x86.
//!
//! `sdot` multiplies signed bytes: values of at most 7 bits are already non-negative i8; 8-bit
//! values are flipped to `v − 128` and the sum starts at `(128 − zero)·Σ qx`, so it is
//! `Σ (v − zero)·qx` exactly, as elsewhere (`QuantPanels::sum_start`). The f32 steps are the VNNI
//! kernel's (`d·dx`, then a fused multiply-add per group and one more for offsets), so both
//! produce the same bits.
//!
//! Stable Rust does not expose `sdot` as an intrinsic yet (`stdarch_neon_dotprod`), so it and the
//! f16 → f32 widening are one-instruction `asm!` blocks.

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;

#[cfg(target_arch = "aarch64")]
use super::plane_bit;
use super::{QuantActs, QuantPanels, ROWS, TOKENS};

/// Whether the running CPU has the dot-product extension (FEAT_DotProd).
pub fn available() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// Tokens per tile: their 4·STEP i32 sums stay in registers beside a quad-register's 16 weight
/// registers (NEON has 32).
pub(super) const STEP: usize = 2;

/// Fills `acc[..mr]` with tokens `t0..t0 + mr` against panel `p`. Only called after `available()`.
pub fn kernel(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    #[cfg(target_arch = "aarch64")]
    {
        assert!(
            available(),
            "the NEON kernel needs the dot-product extension"
        );
        macro_rules! run {
            ($g:literal, $nib:literal, $hb:literal, $flip:literal) => {
                for at in (0..mr).step_by(STEP) {
                    let (t, acc) = (t0 + at, &mut acc[at..]);
                    // SAFETY: `available()` holds; the tile reads only inside `w` and `acts`.
                    unsafe {
                        match mr - at {
                            1 => tile::<$g, $nib, $hb, $flip, 1>(acts, t, w, p, acc),
                            _ => tile::<$g, $nib, $hb, $flip, STEP>(acts, t, w, p, acc),
                        }
                    }
                }
            };
        }
        // Only 8-bit values need flipping to fit a signed byte.
        macro_rules! go {
            ($g:literal, $nib:literal, $hb:literal) => {
                if w.bits == 8 {
                    run!($g, $nib, $hb, true)
                } else {
                    run!($g, $nib, $hb, false)
                }
            };
        }
        by_layout!(w, go)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = (acts, t0, mr, w, p, acc);
        unreachable!("the NEON kernel exists only on aarch64");
    }
}

/// Tokens `t0..t0 + MR` against panel `p` whose groups hold `G` inputs, in nibbles (`NIB`) with
/// `HB` bits above them, or in bytes, flipped to signed (`FLIP`, 8-bit values) or not.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile<
    const G: usize,
    const NIB: bool,
    const HB: usize,
    const FLIP: bool,
    const MR: usize,
>(
    acts: &QuantActs,
    t0: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]],
) {
    let mut f = [[vdupq_n_f32(0.0); 4]; MR];
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        let bias = if FLIP { 128 } else { 0 };
        let mut s: [[int32x4_t; 4]; MR] =
            std::array::from_fn(|i| [vdupq_n_s32(w.sum_start(acts, t0 + i, g, bias)); 4]);
        // Four quads at a time: one 16-byte activation load per token serves 16 `sdot`s.
        for u in 0..G / 16 {
            let wq: [[int8x16_t; 4]; 4] =
                std::array::from_fn(|q| quad::<G, NIB, HB, FLIP>(block.as_ptr(), 4 * u + q));
            for (i, si) in s.iter_mut().enumerate() {
                let x = vld1q_s8(acts.group(t0 + i, g).0.as_ptr().add(16 * u));
                for (k, sk) in si.iter_mut().enumerate() {
                    *sk = sdot::<0>(*sk, wq[0][k], x);
                    *sk = sdot::<1>(*sk, wq[1][k], x);
                    *sk = sdot::<2>(*sk, wq[2][k], x);
                    *sk = sdot::<3>(*sk, wq[3][k], x);
                }
            }
        }
        let d: [float32x4_t; 4] = std::array::from_fn(|k| widen(params.as_ptr().add(4 * k)));
        for (i, (fi, si)) in f.iter_mut().zip(&s).enumerate() {
            let dx = acts.group(t0 + i, g).1;
            for k in 0..4 {
                let scale = vmulq_n_f32(d[k], dx);
                fi[k] = vfmaq_f32(fi[k], vcvtq_f32_s32(si[k]), scale);
            }
        }
        // In a loop of its own: a branch inside the one above keeps it from unrolling.
        if w.has_offsets() {
            let o: [float32x4_t; 4] =
                std::array::from_fn(|k| widen(params.as_ptr().add(ROWS + 4 * k)));
            for (i, fi) in f.iter_mut().enumerate() {
                let sx = acts.group(t0 + i, g).2;
                for k in 0..4 {
                    fi[k] = vfmaq_n_f32(fi[k], o[k], sx);
                }
            }
        }
    }
    for (a, fi) in acc.iter_mut().zip(&f) {
        for (k, fk) in fi.iter().enumerate() {
            vst1q_f32(a.as_mut_ptr().add(4 * k), *fk);
        }
    }
}

/// Quad `quad` of a block as signed bytes, rows 4k..4k + 4 in register k: a nibble block keeps
/// quad `c` in the low nibbles of line `c` and quad `c + G/8` in its high ones, and the bits above
/// them in its planes.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn quad<const G: usize, const NIB: bool, const HB: usize, const FLIP: bool>(
    block: *const u8,
    quad: usize,
) -> [int8x16_t; 4] {
    std::array::from_fn(|k| {
        let v = if NIB {
            let v = vld1q_u8(block.add((quad % (G / 8)) * 64 + 16 * k));
            let nibble = if quad >= G / 8 {
                vshrq_n_u8::<4>(v)
            } else {
                vandq_u8(v, vdupq_n_u8(0x0F))
            };
            if HB > 0 {
                // The plane shifted (left by a positive count, right by a negative one) so
                // this quad's bits land at bits 4.. of each byte, then masked.
                let (plane, bit) = plane_bit(quad, HB);
                let above = vld1q_u8(block.add((G / 8 + plane) * 64 + 16 * k));
                let placed = vshlq_u8(above, vdupq_n_s8(4 - bit as i8));
                vorrq_u8(nibble, vandq_u8(placed, vdupq_n_u8(((1 << HB) - 1) << 4)))
            } else {
                nibble
            }
        } else {
            let v = vld1q_u8(block.add(quad * 64 + 16 * k));
            if FLIP {
                veorq_u8(v, vdupq_n_u8(0x80))
            } else {
                v
            }
        };
        vreinterpretq_s8_u8(v)
    })
}

/// `acc[r] += Σ_i w[4r + i]·x[4L + i]` for the four rows r of `w` (`sdot` by element).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn sdot<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    std::arch::asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        x = in(vreg) x,
        lane = const L,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// Four f16 values at `p` widened to f32 (`fcvtl`, base Armv8 NEON).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn widen(p: *const u16) -> float32x4_t {
    let h = vld1_u16(p);
    let out: float32x4_t;
    std::arch::asm!(
        "fcvtl {out:v}.4s, {h:v}.4h",
        out = out(vreg) out,
        h = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags),
    );
    out
}
