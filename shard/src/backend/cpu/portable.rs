//! Portable micro-kernel with the same packed layout as the AVX-512 one; the compiler vectorizes
//! the 32-lane inner loop for whatever the target offers.

use half::{bf16, f16};

use super::{Packed, MR, NR};

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `k` features.
pub fn kernel(xs: &[f32], mr: usize, k: usize, data: &Packed, p: usize, acc: &mut [[f32; NR]; MR]) {
    for row in acc.iter_mut().take(mr) {
        *row = [0.0; NR];
    }
    let mut w = [0f32; NR];
    for kk in 0..k {
        let at = p * k * NR + kk * NR;
        match data {
            Packed::F32(v) => w.copy_from_slice(&v[at..at + NR]),
            Packed::F16(v) => {
                for (o, &b) in w.iter_mut().zip(&v[at..at + NR]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
            Packed::Bf16(v) => {
                // Interleaved per 32-row half: even positions are its rows 0..16, odd ones 16..32.
                for (i, pair) in v[at..at + NR].chunks_exact(2).enumerate() {
                    let base = i / 16 * 32 + i % 16;
                    w[base] = bf16::from_bits(pair[0]).to_f32();
                    w[base + 16] = bf16::from_bits(pair[1]).to_f32();
                }
            }
        }
        for (i, row) in acc.iter_mut().take(mr).enumerate() {
            let xv = xs[i * k + kk];
            for (a, &wv) in row.iter_mut().zip(&w) {
                *a += xv * wv;
            }
        }
    }
}
