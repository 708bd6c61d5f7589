//! Portable micro-kernel over the same packed layouts as the AVX-512 ones, and exp; the compiler
//! vectorizes both for whatever the target offers (NEON with FMA on aarch64).

use half::{bf16, f16};

use super::{mul_add, Packed, FUSED, MR, NR};

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
                *a = mul_add(xv, wv, *a);
            }
        }
    }
}

/// `x[i] = eˣ⁽ⁱ⁾` in place. Where the target fuses multiply-adds, by the AVX-512 and AVX2
/// kernels' method (see `avx512::exp_in_place`) in plain arithmetic that vectorizes, with their
/// results; elsewhere `f32::exp` (unfused, the polynomial follows llama.cpp's greedy ids less far:
/// 42 against 52 of 112 in `shard/tests/llama_cpp_greedy.rs`).
pub fn exp_in_place(x: &mut [f32]) {
    if FUSED {
        x.iter_mut().for_each(|v| *v = exp(*v));
    } else {
        x.iter_mut().for_each(|v| *v = v.exp());
    }
}

#[inline(always)]
fn exp(v: f32) -> f32 {
    // 1.5·2²³: adding and subtracting it rounds |y| < 2²² to the nearest integer, ties to even,
    // as the vector kernels' rounding does (and unlike `round`, it vectorizes on every target).
    const ROUND: f32 = 12_582_912.0;
    // `clamp` keeps NaN, which then passes through.
    let x = v.clamp(-104.0, 88.7);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = mul_add(-n, 0.693_145_75, x);
    let r = mul_add(-n, 1.428_606_8e-6, r);
    let mut p = 1.0 / 720.0;
    for k in [120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = mul_add(p, r, 1.0 / k);
    }
    let n = n as i32;
    let half = n >> 1;
    p * pow2(half) * pow2(n - half)
}

/// 2ᵉ for `e` in [−126, 127].
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}
