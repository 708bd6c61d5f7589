//! Portable micro-kernel over the same packed layouts as the AVX-512 ones; the compiler vectorizes
//! the 32-lane inner loop for whatever the target offers.

use half::{bf16, f16};

use super::{Packed, MR, NR};

/// Fills `acc[..mr]` with `xs[i] · panel p` for `mr` tokens of `k` features.
pub fn kernel(xs: &[f32], mr: usize, k: usize, data: &Packed, p: usize, acc: &mut [[f32; NR]; MR]) {
    for row in acc.iter_mut().take(mr) {
        *row = [0.0; NR];
    }
    let mut w = [0f32; NR];
    let pairs = k.div_ceil(2);
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
                // k-pairs: row r's value of column kk at 2r + kk % 2 within pair kk / 2.
                let at = ((p * pairs + kk / 2) * NR) * 2 + kk % 2;
                for (r, o) in w.iter_mut().enumerate() {
                    *o = bf16::from_bits(v[at + 2 * r]).to_f32();
                }
            }
            Packed::Quant(_) => unreachable!("quantized panels go to quant::matmul"),
        }
        for (i, row) in acc.iter_mut().take(mr).enumerate() {
            let xv = xs[i * k + kk];
            for (a, &wv) in row.iter_mut().zip(&w) {
                *a += xv * wv;
            }
        }
    }
}
