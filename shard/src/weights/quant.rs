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

/// Elements `range` of row blocks (`TensorData::Quant`) dequantized, in order.
pub fn dequantize_range(blocks: &[Affine], range: Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(range.len());
    let mut first = 0;
    for a in blocks {
        let here = range.start.max(first)..range.end.min(first + a.q.len());
        out.extend(here.map(|i| {
            let (q, g) = (a.q[i - first], (i - first) / a.group);
            a.scale[g] * q as f32 + a.offset[g]
        }));
        first += a.q.len();
    }
    out
}

/// Rows `rows` of row blocks of `cols` columns (an empty slice keeps the first block's format).
pub fn slice_rows(blocks: &[Affine], rows: Range<usize>, cols: usize) -> Vec<Affine> {
    let mut out = Vec::new();
    let mut first = 0;
    for a in blocks {
        let n = a.q.len() / cols;
        let (lo, hi) = (rows.start.max(first), rows.end.min(first + n));
        if lo < hi {
            out.push(block_rows(a, lo - first..hi - first, cols));
        }
        first += n;
    }
    if out.is_empty() {
        out.extend(blocks.first().map(|a| block_rows(a, 0..0, cols)));
    }
    out
}

/// Rows `rows` of one block.
fn block_rows(a: &Affine, rows: Range<usize>, cols: usize) -> Affine {
    let per_row = cols / a.group;
    Affine {
        group: a.group,
        bits: a.bits,
        q: a.q[rows.start * cols..rows.end * cols].to_vec(),
        scale: a.scale[rows.start * per_row..rows.end * per_row].to_vec(),
        offset: a.offset[rows.start * per_row..rows.end * per_row].to_vec(),
    }
}

/// Rows of row blocks of `cols` columns in the order `order` names them (row `i` of the result
/// is row `order[i]`); rows that come from different formats stay in blocks of their own.
pub fn gather_rows(blocks: &[Affine], order: &[usize], cols: usize) -> Vec<Affine> {
    // Each row's block and its row there, then runs of rows from one block gathered at once.
    let mut starts = Vec::with_capacity(blocks.len());
    let mut first = 0;
    for a in blocks {
        starts.push(first);
        first += a.q.len() / cols;
    }
    let block_of = |r: usize| starts.partition_point(|&s| s <= r) - 1;
    let mut out = Vec::new();
    let mut at = 0;
    while at < order.len() {
        let b = block_of(order[at]);
        let run = order[at..]
            .iter()
            .take_while(|&&r| block_of(r) == b)
            .count();
        let local: Vec<usize> = order[at..at + run].iter().map(|r| r - starts[b]).collect();
        out.push(block_gather(&blocks[b], &local, cols));
        at += run;
    }
    if out.is_empty() {
        out.extend(blocks.first().map(|a| block_rows(a, 0..0, cols)));
    }
    stack(out)
}

/// Rows `order` of one block.
fn block_gather(a: &Affine, order: &[usize], cols: usize) -> Affine {
    let per_row = cols / a.group;
    Affine {
        group: a.group,
        bits: a.bits,
        q: super::gather(&a.q, order, cols),
        scale: super::gather(&a.scale, order, per_row),
        offset: super::gather(&a.offset, order, per_row),
    }
}

/// Columns `range` of row blocks of `cols` columns, if the range keeps whole groups of each.
pub fn slice_cols(blocks: &[Affine], range: Range<usize>, cols: usize) -> Option<Vec<Affine>> {
    blocks
        .iter()
        .map(|a| block_cols(a, range.clone(), cols))
        .collect()
}

/// Columns `range` of one block, if the range keeps whole groups.
fn block_cols(a: &Affine, range: Range<usize>, cols: usize) -> Option<Affine> {
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

/// Stacks blocks by rows: neighbours of one format (group and width) join into one block; parts
/// of different formats (Q4_K_M files mix Q4_K with Q6_K or Q8_0 in one fused q/k/v) stay
/// blocks of their own, so none is held wider than its file stores it.
pub fn stack(blocks: Vec<Affine>) -> Vec<Affine> {
    let mut out: Vec<Affine> = Vec::with_capacity(blocks.len());
    for a in blocks {
        match out.last_mut() {
            Some(last) if (last.group, last.bits) == (a.group, a.bits) => {
                last.q.extend_from_slice(&a.q);
                last.scale.extend_from_slice(&a.scale);
                last.offset.extend_from_slice(&a.offset);
            }
            _ => out.push(a),
        }
    }
    out
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
        let a = vec![quantize(&x, 64, Scheme::Q4K).unwrap()];
        let full = dequantize(&a[0]);
        let values = |blocks: &[Affine]| blocks.iter().flat_map(dequantize).collect::<Vec<_>>();
        assert_eq!(values(&slice_rows(&a, 2..5, 64)), full[2 * 64..5 * 64]);
        let cols = values(&slice_cols(&a, 32..64, 64).unwrap());
        let want: Vec<f32> = full.chunks(64).flat_map(|r| r[32..].to_vec()).collect();
        assert_eq!(cols, want);
        assert!(slice_cols(&a, 16..48, 64).is_none());
        let order = [5, 0, 3];
        let gathered = values(&gather_rows(&a, &order, 64));
        let rows_of = |v: &[f32], order: &[usize]| -> Vec<f32> {
            order
                .iter()
                .flat_map(|&r| v[r * 64..(r + 1) * 64].to_vec())
                .collect()
        };
        assert_eq!(gathered, rows_of(&full, &order));
        // A wider part stays a block of its own: slicing and gathering cross the seam.
        let mut fine = quantize(&x[..2 * 64], 64, Scheme::Q8_0).unwrap();
        fine.group = 16;
        fine.scale = fine.scale.iter().flat_map(|&d| [d, d]).collect();
        fine.offset = fine.offset.iter().flat_map(|&m| [m, m]).collect();
        let both = stack(vec![a[0].clone(), fine.clone(), a[0].clone()]);
        let layouts: Vec<_> = both.iter().map(|b| (b.group, b.bits)).collect();
        assert_eq!(layouts, [(32, 4), (16, 8), (32, 4)]);
        let all = [full.clone(), dequantize(&fine), full.clone()].concat();
        assert_eq!(values(&both), all);
        assert_eq!(dequantize_range(&both, 300..500), all[300..500]);
        assert_eq!(values(&slice_rows(&both, 5..9, 64)), all[5 * 64..9 * 64]);
        assert!(values(&slice_rows(&both, 3..3, 64)).is_empty());
        let order = [7, 0, 6, 1, 13, 8];
        let gathered = gather_rows(&both, &order, 64);
        assert_eq!(values(&gathered), rows_of(&all, &order));
        assert_eq!(gathered.len(), 4, "neighbouring rows of one format join");
        assert_eq!(
            values(&slice_cols(&both, 32..64, 64).unwrap()).len(),
            14 * 32
        );
    }
}
