//! Dequantization of ggml blocks to f32, following ggml-quants.c `dequantize_row_*` exactly
//! (same operation order, so results are bit-identical to ggml and gguf-py).

use half::bf16;
use rayon::prelude::*;

use super::blocks::{
    half_at, iq4_xs_scale, nibbles32, q2_k_quants, q3_k_quants, q3_k_scales, q4_k_quants, q5_32,
    q5_k_quants, q6_k_quants, scale_min_k4, KVALUES_IQ4NL,
};
use super::types::GgmlType;

/// Blocks handed to one rayon task: big enough to amortize scheduling, small enough to balance.
const BLOCKS_PER_TASK: usize = 1024;

type BlockFn = fn(&[u8], &mut [f32]);

/// Dequantizes `data` (whole blocks of `ty`) into `n` f32 values.
/// Errors (as a message) for a type without a dequantizer or a size mismatch.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let f = block_fn(ty).ok_or_else(|| format!("dequantizing ggml type {ty} is not supported"))?;
    let l = ty.layout();
    if !n.is_multiple_of(l.block_elems) || data.len() != n / l.block_elems * l.block_bytes {
        return Err(format!(
            "{} bytes of {ty} do not hold {n} elements",
            data.len()
        ));
    }
    let mut out = vec![0f32; n];
    data.par_chunks(l.block_bytes * BLOCKS_PER_TASK)
        .zip(out.par_chunks_mut(l.block_elems * BLOCKS_PER_TASK))
        .for_each(|(src, dst)| {
            for (b, o) in src
                .chunks_exact(l.block_bytes)
                .zip(dst.chunks_exact_mut(l.block_elems))
            {
                f(b, o);
            }
        });
    Ok(out)
}

/// Whether [`dequantize`] handles `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    block_fn(ty).is_some()
}

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = half_at(b, 0),
        GgmlType::BF16 => |b, o| o[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::IQ4_NL => iq4_nl,
        GgmlType::IQ4_XS => iq4_xs,
        _ => return None,
    })
}

/// block_q8_0 { f16 d; i8 qs[32]; }
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, &q) in o.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// block_q4_0 { f16 d; u8 qs[16]; }
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, q) in o.iter_mut().zip(nibbles32(&b[2..18])) {
        *y = (q as i32 - 8) as f32 * d;
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16]; }
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (y, q) in o.iter_mut().zip(nibbles32(&b[4..20])) {
        *y = q as f32 * d + m;
    }
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }
fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, q) in o.iter_mut().zip(q5_32(&b[2..6], &b[6..22])) {
        *y = (q as i32 - 16) as f32 * d;
    }
}

/// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }
fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (y, q) in o.iter_mut().zip(q5_32(&b[4..8], &b[8..24])) {
        *y = q as f32 * d + m;
    }
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin; }: per 16 elements a 4-bit scale
/// (low nibble) and 4-bit min (high nibble).
fn q2_k(b: &[u8], o: &mut [f32]) {
    let (d, min) = (half_at(b, 80), half_at(b, 82));
    let q = q2_k_quants(&b[16..80]);
    for ((y, q), &sc) in o.chunks_exact_mut(16).zip(q.chunks_exact(16)).zip(&b[..16]) {
        let dl = d * (sc & 0x0F) as f32;
        let ml = min * (sc >> 4) as f32;
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * q as f32 - ml;
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d; }: per 16 elements a 6-bit scale.
fn q3_k(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 108);
    let q = q3_k_quants(&b[..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    for ((y, q), &sc) in o.chunks_exact_mut(16).zip(q.chunks_exact(16)).zip(&scales) {
        let dl = d * (sc as i32 - 32) as f32;
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * (q as i32 - 4) as f32;
        }
    }
}

/// The shared tail of Q4_K and Q5_K: per 32 elements a 6-bit scale and min.
fn k4_groups(d: f32, min: f32, scales: &[u8], q: &[u8; 256], o: &mut [f32]) {
    for (j, (y, q)) in o.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let (dl, ml) = (d * sc as f32, min * m as f32);
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * q as f32 - ml;
        }
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
fn q4_k(b: &[u8], o: &mut [f32]) {
    let q = q4_k_quants(&b[16..144]);
    k4_groups(half_at(b, 0), half_at(b, 2), &b[4..16], &q, o);
}

/// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
fn q5_k(b: &[u8], o: &mut [f32]) {
    let q = q5_k_quants(&b[16..48], &b[48..176]);
    k4_groups(half_at(b, 0), half_at(b, 2), &b[4..16], &q, o);
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: per 16 elements an 8-bit scale.
fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 208);
    let q = q6_k_quants(&b[..128], &b[128..192]);
    for ((y, q), &sc) in o
        .chunks_exact_mut(16)
        .zip(q.chunks_exact(16))
        .zip(&b[192..208])
    {
        let dl = d * (sc as i8) as f32;
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * (q as i32 - 32) as f32;
        }
    }
}

/// block_iq4_nl { f16 d; u8 qs[16]; }: nibbles index the non-uniform codebook.
fn iq4_nl(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, q) in o.iter_mut().zip(nibbles32(&b[2..18])) {
        *y = d * KVALUES_IQ4NL[q as usize] as f32;
    }
}

/// block_iq4_xs { f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }: per 32 elements a 6-bit
/// scale and IQ4_NL's codebook.
fn iq4_xs(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    for (ib, (y, qs)) in o
        .chunks_exact_mut(32)
        .zip(b[8..136].chunks_exact(16))
        .enumerate()
    {
        let dl = d * (iq4_xs_scale(scales_h, &b[4..8], ib) as i32 - 32) as f32;
        for (y, q) in y.iter_mut().zip(nibbles32(qs)) {
            *y = dl * KVALUES_IQ4NL[q as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn q8_0_block() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        for i in 0..32 {
            b[2 + i] = (i as i8 - 16) as u8;
        }
        let v = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
    }

    #[test]
    fn q4_1_block_nibble_order() {
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        b[4] = 0x3A; // element 0 = 0xA, element 16 = 0x3
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!((v[0], v[16], v[1]), (21.0, 7.0, 1.0));
    }

    /// Two blocks of a fixed byte pattern with the f16 scale fields set to `scales` (times the
    /// block number), the same bytes a gguf-py script built for the expected values below.
    fn pattern_blocks(block_bytes: usize, scales: &[(usize, f32)]) -> Vec<u8> {
        let mut b: Vec<u8> = (0..2 * block_bytes)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .collect();
        for blk in 0..2 {
            for &(at, v) in scales {
                let bits = f16::from_f32(v * (blk + 1) as f32).to_bits().to_le_bytes();
                b[blk * block_bytes + at..blk * block_bytes + at + 2].copy_from_slice(&bits);
            }
        }
        b
    }

    /// Position-weighted sum, sensitive to both values and their order.
    fn checksum(v: &[f32]) -> f64 {
        v.iter()
            .enumerate()
            .map(|(i, &x)| x as f64 * (i + 1) as f64)
            .sum()
    }

    /// (type, f16 scale fields, expected checksum, expected values at indices).
    type Case = (
        GgmlType,
        &'static [(usize, f32)],
        f64,
        &'static [(usize, f32)],
    );

    #[test]
    fn matches_gguf_py_on_pattern_blocks() {
        // Expected checksums and values from gguf-py's `gguf.quants.dequantize` on the same bytes.
        let cases: &[Case] = &[
            (
                GgmlType::Q4_K,
                &[(0, 0.5), (2, 0.25)],
                31186556.0,
                &[(0, 157.75), (1, -12.75), (32, 4.0), (511, 424.0)],
            ),
            (
                GgmlType::Q6_K,
                &[(208, 0.125)],
                354154.5,
                &[(0, -178.875), (64, -380.0), (100, 315.375), (511, -400.0)],
            ),
            (
                GgmlType::Q4_0,
                &[(0, 0.5)],
                -812.0,
                &[(0, -1.5), (1, 1.0), (32, 7.0), (63, -7.0)],
            ),
            (GgmlType::Q8_0, &[(0, 0.5)], -9656.0, &[]),
            (GgmlType::Q4_1, &[(0, 0.5), (2, -1.5)], 8740.5, &[]),
        ];
        for &(ty, scales, sum, values) in cases {
            let l = ty.layout();
            let v = dequantize(
                ty,
                &pattern_blocks(l.block_bytes, scales),
                2 * l.block_elems,
            )
            .unwrap();
            assert_eq!(checksum(&v), sum, "{ty}");
            for &(i, want) in values {
                assert_eq!(v[i], want, "{ty}[{i}]");
            }
        }
    }

    #[test]
    fn half_floats() {
        let f16s = [f16::from_f32(1.5).to_bits(), f16::from_f32(-2.0).to_bits()];
        let bytes: Vec<u8> = f16s.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(
            dequantize(GgmlType::F16, &bytes, 2).unwrap(),
            vec![1.5, -2.0]
        );
        let bf16s: Vec<u8> = [0x3FC0u16, 0xC000]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(GgmlType::BF16, &bf16s, 2).unwrap(),
            vec![1.5, -2.0]
        );
    }

    #[test]
    fn unsupported_and_mismatched_sizes_are_errors() {
        assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256)
            .unwrap_err()
            .contains("IQ2_XXS"));
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(!can_dequantize(GgmlType::IQ2_XXS));
    }
}
