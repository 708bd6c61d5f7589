//! ggml quantized blocks rewritten as small unsigned integers with one f32 scale and offset per
//! group, the common form integer dot-product kernels repack from. Scales and offsets are
//! computed with ggml's `dequantize_row_*` arithmetic, so `scale * q + offset` is ggml's value up
//! to the rounding of that one multiply-add (exact for most types: the products fit in 24 bits).

use rayon::prelude::*;

use super::blocks::{
    half_at, iq4_xs_scale, nibbles32, q2_k_quants, q3_k_quants, q3_k_scales, q4_k_quants, q5_32,
    q5_k_quants, q6_k_quants, scale_min_k4, KVALUES_IQ4NL,
};
use super::types::GgmlType;

/// A quantized tensor as unsigned integers with an affine map per group of consecutive elements
/// (along a row): element i is `scale[i / group] * q[i] as f32 + offset[i / group]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    /// Elements sharing one (scale, offset): 16 or 32. Rows are whole groups.
    pub group: usize,
    /// Every q is < 2^bits (2..=8).
    pub bits: u32,
    /// One value per element, in the tensor's element order.
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

impl Affine {
    /// The f32 values the map describes (multiply, then add: no fused multiply-add).
    pub fn to_f32(&self) -> Vec<f32> {
        self.q
            .chunks(self.group)
            .zip(self.scale.iter().zip(&self.offset))
            .flat_map(|(q, (&s, &o))| q.iter().map(move |&q| s * q as f32 + o))
            .collect()
    }
}

/// Writes one block: its quants into `q` and one scale/offset per group.
type BlockFn = fn(b: &[u8], q: &mut [u8], scale: &mut [f32], offset: &mut [f32]);

/// Blocks handed to one rayon task (as in `dequantize`).
const BLOCKS_PER_TASK: usize = 1024;

/// The (group, bits) `to_affine` produces for `ty`, or None if `ty` has no affine form (F32, F16,
/// BF16, and the IQ types other than IQ4_NL/IQ4_XS, etc.).
pub fn affine_layout(ty: GgmlType) -> Option<(usize, u32)> {
    spec(ty).map(|(group, bits, _)| (group, bits))
}

/// Rewrites `n` elements of whole `ty` blocks; an error message for an unsupported type or a
/// size mismatch.
pub fn to_affine(ty: GgmlType, data: &[u8], n: usize) -> Result<Affine, String> {
    let (group, bits, f) =
        spec(ty).ok_or_else(|| format!("ggml type {ty} has no integer-affine form"))?;
    let l = ty.layout();
    if !n.is_multiple_of(l.block_elems) || data.len() != n / l.block_elems * l.block_bytes {
        return Err(format!(
            "{} bytes of {ty} do not hold {n} elements",
            data.len()
        ));
    }
    let (elems, groups_per_block) = (l.block_elems, l.block_elems / group);
    // Each block is decoded into a local copy and written once, so the outputs' pages are first
    // touched by these parallel tasks (an allocator's zeroing would touch them all on one
    // thread first).
    let (mut q, mut scale, mut offset) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n / group),
        Vec::with_capacity(n / group),
    );
    data.par_chunks(l.block_bytes * BLOCKS_PER_TASK)
        .zip(q.spare_capacity_mut()[..n].par_chunks_mut(elems * BLOCKS_PER_TASK))
        .zip(
            scale.spare_capacity_mut()[..n / group]
                .par_chunks_mut(groups_per_block * BLOCKS_PER_TASK),
        )
        .zip(
            offset.spare_capacity_mut()[..n / group]
                .par_chunks_mut(groups_per_block * BLOCKS_PER_TASK),
        )
        .for_each(|(((src, q), s), o)| {
            let blocks = src
                .chunks_exact(l.block_bytes)
                .zip(q.chunks_exact_mut(elems))
                .zip(s.chunks_exact_mut(groups_per_block))
                .zip(o.chunks_exact_mut(groups_per_block));
            // No affine type has blocks of more than 256 elements or 16 groups.
            let (mut qb, mut sb, mut ob) = ([0u8; 256], [0f32; 16], [0f32; 16]);
            for (((b, q), s), o) in blocks {
                let (qb, sb, ob) = (
                    &mut qb[..elems],
                    &mut sb[..groups_per_block],
                    &mut ob[..groups_per_block],
                );
                f(b, qb, sb, ob);
                write_all(q, qb);
                write_all(s, sb);
                write_all(o, ob);
            }
        });
    // SAFETY: the blocks cover all `n` elements (checked above), so every task wrote its whole
    // share of `q`, `scale` and `offset`.
    unsafe {
        q.set_len(n);
        scale.set_len(n / group);
        offset.set_len(n / group);
    }
    Ok(Affine {
        group,
        bits,
        q,
        scale,
        offset,
    })
}

/// Initializes `dst` with `src` (same length).
fn write_all<T: Copy>(dst: &mut [std::mem::MaybeUninit<T>], src: &[T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(v);
    }
}

fn spec(ty: GgmlType) -> Option<(usize, u32, BlockFn)> {
    Some(match ty {
        GgmlType::Q4_0 => (32, 4, q4_0),
        GgmlType::Q4_1 => (32, 4, q4_1),
        GgmlType::Q5_0 => (32, 5, q5_0),
        GgmlType::Q5_1 => (32, 5, q5_1),
        GgmlType::Q8_0 => (32, 8, q8_0),
        GgmlType::Q2_K => (16, 2, q2_k),
        GgmlType::Q3_K => (16, 3, q3_k),
        GgmlType::Q4_K => (32, 4, q4_k),
        GgmlType::Q5_K => (32, 5, q5_k),
        GgmlType::Q6_K => (16, 6, q6_k),
        GgmlType::IQ4_NL => (32, 8, iq4_nl),
        GgmlType::IQ4_XS => (32, 8, iq4_xs),
        _ => return None,
    })
}

/// ggml's `(q - 8) * d` as `d * q - 8d`.
fn q4_0(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 0);
    q.copy_from_slice(&nibbles32(&b[2..18]));
    (s[0], o[0]) = (d, -8.0 * d);
}

fn q4_1(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    q.copy_from_slice(&nibbles32(&b[4..20]));
    (s[0], o[0]) = (half_at(b, 0), half_at(b, 2));
}

fn q5_0(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 0);
    q.copy_from_slice(&q5_32(&b[2..6], &b[6..22]));
    (s[0], o[0]) = (d, -16.0 * d);
}

fn q5_1(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    q.copy_from_slice(&q5_32(&b[4..8], &b[8..24]));
    (s[0], o[0]) = (half_at(b, 0), half_at(b, 2));
}

/// Signed bytes shifted by 128 (flipping the sign bit) to become unsigned.
fn q8_0(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (q, &x) in q.iter_mut().zip(&b[2..34]) {
        *q = x ^ 0x80;
    }
    (s[0], o[0]) = (d, -128.0 * d);
}

fn q2_k(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let (d, min) = (half_at(b, 80), half_at(b, 82));
    q.copy_from_slice(&q2_k_quants(&b[16..80]));
    for ((s, o), &sc) in s.iter_mut().zip(o).zip(&b[..16]) {
        *s = d * (sc & 0x0F) as f32;
        *o = -(min * (sc >> 4) as f32);
    }
}

/// ggml's `dl * (q - 4)` with the unsigned 3-bit q.
fn q3_k(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 108);
    q.copy_from_slice(&q3_k_quants(&b[..32], &b[32..96]));
    for ((s, o), sc) in s.iter_mut().zip(o).zip(q3_k_scales(&b[96..108])) {
        let dl = d * (sc as i32 - 32) as f32;
        (*s, *o) = (dl, -4.0 * dl);
    }
}

/// Q4_K and Q5_K: per 32 elements `d * sc` and `-(dmin * m)`.
fn k4_groups(b: &[u8], s: &mut [f32], o: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    for (j, (s, o)) in s.iter_mut().zip(o).enumerate() {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        (*s, *o) = (d * sc as f32, -(min * m as f32));
    }
}

fn q4_k(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    q.copy_from_slice(&q4_k_quants(&b[16..144]));
    k4_groups(b, s, o);
}

fn q5_k(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    q.copy_from_slice(&q5_k_quants(&b[16..48], &b[48..176]));
    k4_groups(b, s, o);
}

/// ggml's `d * sc * (q - 32)` with the unsigned 6-bit q.
fn q6_k(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 208);
    q.copy_from_slice(&q6_k_quants(&b[..128], &b[128..192]));
    for ((s, o), &sc) in s.iter_mut().zip(o).zip(&b[192..208]) {
        let dl = d * (sc as i8) as f32;
        (*s, *o) = (dl, -32.0 * dl);
    }
}

/// Codebook entries (-127..=113) shifted by 128 into a byte.
fn iq4_codes(qs: &[u8], q: &mut [u8]) {
    for (q, n) in q.iter_mut().zip(nibbles32(qs)) {
        *q = (KVALUES_IQ4NL[n as usize] as i16 + 128) as u8;
    }
}

fn iq4_nl(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 0);
    iq4_codes(&b[2..18], q);
    (s[0], o[0]) = (d, -128.0 * d);
}

fn iq4_xs(b: &[u8], q: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    let d = half_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let groups = q.chunks_exact_mut(32).zip(b[8..136].chunks_exact(16));
    for (ib, ((q, qs), (s, o))) in groups.zip(s.iter_mut().zip(o)).enumerate() {
        iq4_codes(qs, q);
        let dl = d * (iq4_xs_scale(scales_h, &b[4..8], ib) as i32 - 32) as f32;
        (*s, *o) = (dl, -128.0 * dl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_shifts_signed_bytes() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = (-128i8) as u8;
        b[3] = 127;
        b[4] = (-1i8) as u8;
        let a = to_affine(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!((a.q[0], a.q[1], a.q[2], a.q[3]), (0, 255, 127, 128));
        assert_eq!((&a.scale[..], &a.offset[..]), (&[0.5][..], &[-64.0][..]));
        assert_eq!(&a.to_f32()[..4], &[-64.0, 63.5, -0.5, 0.0]);
    }

    #[test]
    fn unsupported_types_and_sizes_are_errors() {
        for ty in [
            GgmlType::F32,
            GgmlType::BF16,
            GgmlType::IQ2_XXS,
            GgmlType::Q8_K,
        ] {
            assert_eq!(affine_layout(ty), None, "{ty}");
            assert!(to_affine(ty, &[], 0).unwrap_err().contains(&ty.to_string()));
        }
        assert!(to_affine(GgmlType::Q4_K, &[0u8; 143], 256).is_err());
        assert!(to_affine(GgmlType::Q4_0, &[0u8; 18], 16).is_err());
        assert_eq!(affine_layout(GgmlType::Q3_K), Some((16, 3)));
    }
}
