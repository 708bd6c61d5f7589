//! Portable integer kernel: unpacks one group of a panel to 16 rows of bytes, then plain i32 dot
//! products the compiler vectorizes for the build target (NEON on aarch64, SSE2 on baseline x86).

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
    for row in acc.iter_mut().take(mr) {
        *row = [0.0; ROWS];
    }
    let group = w.group;
    let mut rows = [[0u8; 32]; ROWS];
    for g in 0..w.cols / group {
        let (block, params) = w.block(p, g);
        unpack(block, group, w.nibbles, &mut rows);
        for (i, out) in acc.iter_mut().take(mr).enumerate() {
            let (xq, dx, sx) = acts.group(t0 + i, g);
            for (r, o) in out.iter_mut().enumerate() {
                let s: i32 = rows[r][..group]
                    .iter()
                    .zip(xq)
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                let d = f16::from_bits(params[r]).to_f32();
                let off = f16::from_bits(params[ROWS + r]).to_f32();
                *o += s as f32 * (d * dx) + off * sx;
            }
        }
    }
}

/// One group's values back in row order: `rows[r][i]` is row r's input i of the group.
fn unpack(block: &[u8], group: usize, nibbles: bool, rows: &mut [[u8; 32]; ROWS]) {
    let quads = group / 4;
    for quad in 0..quads {
        let (line, shift) = if nibbles {
            (quad % (quads / 2), 4 * (quad >= quads / 2) as u32)
        } else {
            (quad, 0)
        };
        for (r, row) in rows.iter_mut().enumerate() {
            for t in 0..4 {
                let byte = block[line * 64 + r * 4 + t];
                row[quad * 4 + t] = if nibbles {
                    (byte >> shift) & 0x0F
                } else {
                    byte
                };
            }
        }
    }
}
