//! Portable integer kernel: per group, the panel's quads are unpacked once to 64-byte lines (16 rows
//! × 4 inputs, the packed order), then each token multiplies every line by its quad in four i32
//! lanes per row, element by element, which the compiler vectorizes for the build target (NEON on
//! aarch64 cores without the dot-product extension, SSE2 on baseline x86); a row's four lanes are
//! summed once per group.

use half::f16;

use super::{unpack_group, Line, QuantActs, QuantPanels, ROWS, TOKENS};

/// Fills `acc[..mr]` with tokens `t0..t0 + mr` against panel `p`.
pub fn kernel(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    macro_rules! go {
        ($g:literal, $nib:literal, $hb:literal) => {
            tile::<$g, $nib, $hb>(acts, t0, mr, w, p, acc)
        };
    }
    by_layout!(w, go)
}

/// `kernel` for groups of `G` inputs in nibbles (`NIB`) with `HB` bits above them, or in bytes.
#[inline(always)]
fn tile<const G: usize, const NIB: bool, const HB: usize>(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    for row in acc.iter_mut().take(mr) {
        *row = [0.0; ROWS];
    }
    for g in 0..w.cols / G {
        let (block, params) = w.block(p, g);
        let mut quads = [Line([0; 64]); 8];
        unpack_group::<G, NIB, HB>(block, &mut quads);
        let d: [f32; ROWS] = std::array::from_fn(|r| f16::from_bits(params[r]).to_f32());
        let off: [f32; ROWS] = std::array::from_fn(|r| {
            let stored = w.has_offsets().then(|| params[ROWS + r]);
            stored.map_or(0.0, |o| f16::from_bits(o).to_f32())
        });
        for (i, out) in acc.iter_mut().take(mr).enumerate() {
            let (xq, dx, sx) = acts.group(t0 + i, g);
            let start = w.sum_start(acts, t0 + i, g, 0);
            let mut lanes = [[0i32; 4]; ROWS];
            for (quad, x) in quads.iter().take(G / 4).zip(xq.chunks_exact(4)) {
                let quad = &quad.0;
                let x: [i32; 4] = std::array::from_fn(|t| x[t] as i32);
                for (lane, wq) in lanes.iter_mut().zip(quad.chunks_exact(4)) {
                    for t in 0..4 {
                        lane[t] += wq[t] as i32 * x[t];
                    }
                }
            }
            for (r, (o, lane)) in out.iter_mut().zip(&lanes).enumerate() {
                let s: i32 = start + lane.iter().sum::<i32>();
                *o += s as f32 * (d[r] * dx) + off[r] * sx;
            }
        }
    }
}
