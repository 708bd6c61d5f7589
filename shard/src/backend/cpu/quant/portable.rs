//! Portable integer kernel: per group, the panel's quads are unpacked once to 64-byte lines (16 rows
//! × 4 inputs, the packed order), then each token multiplies every line by its quad in four i32
//! lanes per row, element by element, which the compiler vectorizes for the build target (NEON on
//! aarch64 cores without the dot-product extension, SSE2 on baseline x86); a row's four lanes are
//! summed once per group.

use half::f16;

use super::{QuantActs, QuantPanels, ROWS, TOKENS};

/// Fills `acc[..mr]` with tokens `t0..t0 + mr` against panel `p`.
pub fn kernel(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    match (w.group, w.nibbles) {
        (32, true) => tile::<32, true>(acts, t0, mr, w, p, acc),
        (32, false) => tile::<32, false>(acts, t0, mr, w, p, acc),
        (16, true) => tile::<16, true>(acts, t0, mr, w, p, acc),
        _ => tile::<16, false>(acts, t0, mr, w, p, acc),
    }
}

/// `kernel` for groups of `G` inputs packed two per byte (`NIB`) or one.
#[inline(always)]
fn tile<const G: usize, const NIB: bool>(
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
        let quads = unpack::<G, NIB>(block);
        let d: [f32; ROWS] = std::array::from_fn(|r| f16::from_bits(params[r]).to_f32());
        let off: [f32; ROWS] = std::array::from_fn(|r| f16::from_bits(params[ROWS + r]).to_f32());
        for (i, out) in acc.iter_mut().take(mr).enumerate() {
            let (xq, dx, sx) = acts.group(t0 + i, g);
            let mut lanes = [[0i32; 4]; ROWS];
            for (quad, x) in quads.iter().take(G / 4).zip(xq.chunks_exact(4)) {
                let x: [i32; 4] = std::array::from_fn(|t| x[t] as i32);
                for (lane, wq) in lanes.iter_mut().zip(quad.chunks_exact(4)) {
                    for t in 0..4 {
                        lane[t] += wq[t] as i32 * x[t];
                    }
                }
            }
            for (r, (o, lane)) in out.iter_mut().zip(&lanes).enumerate() {
                let s: i32 = lane.iter().sum();
                *o += s as f32 * (d[r] * dx) + off[r] * sx;
            }
        }
    }
}

/// A group's quads as whole bytes, in the packed order (`quads[j][r·4 + t]` is row r's input
/// `4j + t`): a nibble block keeps quad `c` in the low nibbles of line `c` and quad `c + G/8` in
/// its high ones.
#[inline(always)]
fn unpack<const G: usize, const NIB: bool>(block: &[u8]) -> [[u8; 64]; 8] {
    let lines = if NIB { G / 8 } else { G / 4 };
    let mut quads = [[0u8; 64]; 8];
    for (j, quad) in quads.iter_mut().take(G / 4).enumerate() {
        let line: &[u8; 64] = block[(j % lines) * 64..][..64].try_into().unwrap();
        *quad = match (NIB, j < lines) {
            (false, _) => *line,
            (true, true) => line.map(|b| b & 0x0F),
            (true, false) => line.map(|b| b >> 4),
        };
    }
    quads
}
