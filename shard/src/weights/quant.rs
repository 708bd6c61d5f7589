//! Quantized host tensors (`Affine`: small unsigned integers with a scale and offset per group of
//! a row's elements): the row and column slicing tensor parallelism needs, stacking of fused
//! parts, and quantization of dense checkpoints at load (`--quantize q8_0|q4_k`).

use std::ops::Range;

use rayon::prelude::*;
use tessera_formats::gguf::affine::Affine;

/// How dense matrices are quantized at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheme {
    /// 8-bit values, one scale per 32 (llama.cpp's Q8_0 numbers).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit values with a scale and a minimum per 32 (the layout Q4_K's sub-blocks dequantize to).
    #[value(name = "q4_k")]
    Q4K,
}

/// The elements' values (`scale · q + offset`), in order.
pub fn dequantize(a: &Affine) -> Vec<f32> {
    let mut out = vec![0f32; a.q.len()];
    out.par_chunks_mut(a.group)
        .zip(a.q.par_chunks(a.group))
        .zip(a.scale.par_iter().zip(&a.offset))
        .for_each(|((o, q), (&d, &m))| {
            for (y, &v) in o.iter_mut().zip(q) {
                *y = d * v as f32 + m;
            }
        });
    out
}

/// Rows `rows` of a `[_, cols]` tensor.
pub fn slice_rows(a: &Affine, rows: Range<usize>, cols: usize) -> Affine {
    let per_row = cols / a.group;
    Affine {
        group: a.group,
        bits: a.bits,
        q: a.q[rows.start * cols..rows.end * cols].to_vec(),
        scale: a.scale[rows.start * per_row..rows.end * per_row].to_vec(),
        offset: a.offset[rows.start * per_row..rows.end * per_row].to_vec(),
    }
}

/// Rows of a `[_, cols]` tensor in the order `order` names them (row `i` of the result is row
/// `order[i]` of `a`).
pub fn gather_rows(a: &Affine, order: &[usize], cols: usize) -> Affine {
    let per_row = cols / a.group;
    Affine {
        group: a.group,
        bits: a.bits,
        q: super::gather(&a.q, order, cols),
        scale: super::gather(&a.scale, order, per_row),
        offset: super::gather(&a.offset, order, per_row),
    }
}

/// Columns `range` of a `[_, cols]` tensor, if the range keeps whole groups.
pub fn slice_cols(a: &Affine, range: Range<usize>, cols: usize) -> Option<Affine> {
    let g = a.group;
    if !range.start.is_multiple_of(g) || !range.end.is_multiple_of(g) {
        return None;
    }
    let per_row = cols / g;
    let rows = a.q.len() / cols;
    let (g0, g1) = (range.start / g, range.end / g);
    let mut out = Affine {
        group: g,
        bits: a.bits,
        q: Vec::with_capacity(rows * range.len()),
        scale: Vec::with_capacity(rows * (g1 - g0)),
        offset: Vec::with_capacity(rows * (g1 - g0)),
    };
    for r in 0..rows {
        out.q
            .extend_from_slice(&a.q[r * cols + range.start..r * cols + range.end]);
        out.scale
            .extend_from_slice(&a.scale[r * per_row + g0..r * per_row + g1]);
        out.offset
            .extend_from_slice(&a.offset[r * per_row + g0..r * per_row + g1]);
    }
    Some(out)
}

/// Stacks tensors by rows. Parts of different types (Q4_K_M files mix Q4_K and Q6_K in one
/// fused q/k/v) meet at the smaller group and the wider values, which represents each exactly.
pub fn stack(parts: Vec<Affine>) -> Affine {
    let group = parts.iter().map(|a| a.group).min().unwrap_or(32);
    let bits = parts.iter().map(|a| a.bits).max().unwrap_or(4);
    // The first part's buffers become the result's (a fused gate/up copies only the up half).
    let mut parts = parts.into_iter().map(|a| regroup(a, group));
    let mut out = parts.next().unwrap_or(Affine {
        group,
        bits,
        q: Vec::new(),
        scale: Vec::new(),
        offset: Vec::new(),
    });
    out.bits = bits;
    for a in parts {
        out.q.extend_from_slice(&a.q);
        out.scale.extend_from_slice(&a.scale);
        out.offset.extend_from_slice(&a.offset);
    }
    out
}

/// `a` with groups of `group` (a divisor of its own): each scale and offset repeated.
fn regroup(a: Affine, group: usize) -> Affine {
    let repeat = a.group / group;
    if repeat == 1 {
        return a;
    }
    let spread = |v: &[f32]| {
        v.iter()
            .flat_map(|&x| std::iter::repeat_n(x, repeat))
            .collect()
    };
    Affine {
        group,
        scale: spread(&a.scale),
        offset: spread(&a.offset),
        ..a
    }
}

/// Quantizes a dense row-major `[_, cols]` tensor with groups of 32, or `None` when rows are not
/// whole groups (the caller keeps such a matrix dense).
pub fn quantize(x: &[f32], cols: usize, scheme: Scheme) -> Option<Affine> {
    const GROUP: usize = 32;
    if cols == 0 || !cols.is_multiple_of(GROUP) || !x.len().is_multiple_of(cols) {
        return None;
    }
    let groups = x.len() / GROUP;
    let mut q = vec![0u8; x.len()];
    let mut scale = vec![0f32; groups];
    let mut offset = vec![0f32; groups];
    x.par_chunks(GROUP)
        .zip(q.par_chunks_mut(GROUP))
        .zip(scale.par_iter_mut().zip(offset.par_iter_mut()))
        .for_each(|((xs, qs), (d, m))| (*d, *m) = quantize_group(xs, qs, scheme));
    Some(Affine {
        group: GROUP,
        bits: match scheme {
            Scheme::Q8_0 => 8,
            Scheme::Q4K => 4,
        },
        q,
        scale,
        offset,
    })
}

/// One group's values into `q`; returns its (scale, offset), both rounded to f16 as stored.
fn quantize_group(xs: &[f32], q: &mut [u8], scheme: Scheme) -> (f32, f32) {
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    match scheme {
        Scheme::Q8_0 => {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16(amax / 127.0);
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (o, &v) in q.iter_mut().zip(xs) {
                *o = ((v * inv).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
            (d, f16(-128.0 * d))
        }
        Scheme::Q4K => {
            let lo = xs.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
            let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let m = f16(lo);
            let d = f16((hi - m) / 15.0);
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (o, &v) in q.iter_mut().zip(xs) {
                *o = ((v - m) * inv).round().clamp(0.0, 15.0) as u8;
            }
            (d, m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect()
    }

    #[test]
    fn quantized_values_stay_within_half_a_step() {
        let x = ramp(4 * 64);
        for (scheme, steps) in [(Scheme::Q8_0, 254.0), (Scheme::Q4K, 15.0)] {
            let a = quantize(&x, 64, scheme).unwrap();
            let y = dequantize(&a);
            for (g, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let range = xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                for (a, b) in xs.iter().zip(ys) {
                    assert!(
                        (a - b).abs() <= range / steps * 0.51 + 1e-3,
                        "{scheme:?} group {g}: {a} vs {b}"
                    );
                }
            }
        }
        assert!(quantize(&x, 48, Scheme::Q8_0).is_none());
    }

    #[test]
    fn slicing_and_stacking_keep_values() {
        let x = ramp(6 * 64);
        let a = quantize(&x, 64, Scheme::Q4K).unwrap();
        let full = dequantize(&a);
        let rows = dequantize(&slice_rows(&a, 2..5, 64));
        assert_eq!(rows, full[2 * 64..5 * 64]);
        let cols = dequantize(&slice_cols(&a, 32..64, 64).unwrap());
        let want: Vec<f32> = full.chunks(64).flat_map(|r| r[32..].to_vec()).collect();
        assert_eq!(cols, want);
        assert!(slice_cols(&a, 16..48, 64).is_none());
        let order = [5, 0, 3];
        let gathered = dequantize(&gather_rows(&a, &order, 64));
        let want: Vec<f32> = order
            .iter()
            .flat_map(|&r| full[r * 64..(r + 1) * 64].to_vec())
            .collect();
        assert_eq!(gathered, want);
        let mut fine = quantize(&x[..64], 64, Scheme::Q8_0).unwrap();
        fine.group = 16;
        fine.scale = fine.scale.iter().flat_map(|&d| [d, d]).collect();
        fine.offset = fine.offset.iter().flat_map(|&m| [m, m]).collect();
        let both = stack(vec![a.clone(), fine.clone()]);
        assert_eq!((both.group, both.bits), (16, 8));
        assert_eq!(dequantize(&both), [full, dequantize(&fine)].concat());
    }
}
