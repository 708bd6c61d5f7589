//! ggml quantization block layouts (ggml-common.h `block_*` structs): each type's quants unpacked
//! to unsigned integers in element order, and its packed sub-block scales. Shared by the f32
//! dequantizer and the affine rewrite so the bit fiddling exists once.

use half::f16;

/// Non-uniform 4-bit codebook of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`).
pub(super) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The f16 stored little-endian at `b[at..at + 2]`, widened.
pub(super) fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// 32 nibbles from 16 bytes: low nibbles are elements 0..16, high nibbles 16..32
/// (Q4_0, Q4_1, IQ4_NL and each 32-element sub-block of IQ4_XS).
pub(super) fn nibbles32(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for (j, &b) in qs[..16].iter().enumerate() {
        q[j] = b & 0x0F;
        q[j + 16] = b >> 4;
    }
    q
}

/// Q5_0/Q5_1's 5-bit quants: nibbles as in [`nibbles32`], bit 4 of element `j` is bit `j` of the
/// little-endian u32 `qh`.
pub(super) fn q5_32(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = nibbles32(qs);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((high >> j) & 1) as u8) << 4;
    }
    q
}

/// The 6-bit scale and min of sub-block `j` packed in Q4_K/Q5_K's 12 scale bytes.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q2_K's 2-bit quants: each 128-element half reads 32 bytes four times, two bits further each
/// time, so element `128h + 32s + l` is bits `2s..2s+2` of byte `32h + l`.
pub(super) fn q2_k_quants(qs: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    // Whole 32-element runs, so the compiler works on vectors (model loading decodes billions).
    for (i, run) in q.chunks_exact_mut(32).enumerate() {
        let (src, shift) = (&qs[32 * (i / 4)..][..32], 2 * (i % 4));
        for (v, &b) in run.iter_mut().zip(src) {
            *v = (b >> shift) & 3;
        }
    }
    q
}

/// Q3_K's 3-bit quants as unsigned values: the low two bits laid out as in Q2_K, the third bit is
/// bit `4h + s` of `hmask[l]`. ggml's signed value is this minus 4.
pub(super) fn q3_k_quants(hmask: &[u8], qs: &[u8]) -> [u8; 256] {
    let mut q = q2_k_quants(qs);
    for (bit, run) in q.chunks_exact_mut(32).enumerate() {
        for (v, &m) in run.iter_mut().zip(&hmask[..32]) {
            *v |= ((m >> bit) & 1) << 2;
        }
    }
    q
}

/// Q3_K's sixteen 6-bit scales (unsigned; ggml subtracts 32): low nibbles from bytes 0..8 (low
/// nibble first, then high), the top two bits from bytes 8..12.
pub(super) fn q3_k_scales(s: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (j, v) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *v = low | (high << 4);
    }
    out
}

/// Q4_K's 4-bit quants: each 64-element chunk is 32 bytes, low nibbles first.
pub(super) fn q4_k_quants(qs: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (i, run) in q.chunks_exact_mut(32).enumerate() {
        let (src, shift) = (&qs[32 * (i / 2)..][..32], 4 * (i % 2));
        for (v, &b) in run.iter_mut().zip(src) {
            *v = (b >> shift) & 0x0F;
        }
    }
    q
}

/// Q5_K's 5-bit quants: Q4_K's nibbles plus bit 4 of element `32s + l` = bit `s` of `qh[l]`.
pub(super) fn q5_k_quants(qh: &[u8], qs: &[u8]) -> [u8; 256] {
    let mut q = q4_k_quants(qs);
    for (s, run) in q.chunks_exact_mut(32).enumerate() {
        for (v, &h) in run.iter_mut().zip(&qh[..32]) {
            *v |= ((h >> s) & 1) << 4;
        }
    }
    q
}

/// Q6_K's 6-bit quants as unsigned values (ggml subtracts 32). In each 128-element half, element
/// `32k + l` takes a nibble of `ql[l + 32 (k % 2)]` (low for k < 2) and bits `2k..2k+2` of `qh[l]`.
pub(super) fn q6_k_quants(ql: &[u8], qh: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for (i, run) in q.chunks_exact_mut(32).enumerate() {
        let (h, k) = (i / 4, i % 4);
        let (low, high) = (&ql[64 * h + 32 * (k % 2)..][..32], &qh[32 * h..][..32]);
        for ((v, &l), &m) in run.iter_mut().zip(low).zip(high) {
            *v = ((l >> (4 * (k / 2))) & 0x0F) | (((m >> (2 * k)) & 3) << 4);
        }
    }
    q
}

/// IQ4_XS's 6-bit scale of sub-block `ib` (unsigned; ggml subtracts 32): a nibble of
/// `scales_l[ib / 2]` and two bits of the little-endian u16 `scales_h`.
pub(super) fn iq4_xs_scale(scales_h: u16, scales_l: &[u8], ib: usize) -> u8 {
    let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
    let high = ((scales_h >> (2 * ib)) & 3) as u8;
    low | (high << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q3_k_scales_match_ggml_word_shuffle() {
        // ggml unpacks the 12 bytes with u32 masks; the per-byte rule above must agree.
        let s: Vec<u8> = (0..12).map(|i| (i * 53 + 7) as u8).collect();
        let mut aux = [0u32; 4];
        for (k, w) in aux.iter_mut().take(3).enumerate() {
            *w = u32::from_le_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
        }
        let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | ((tmp & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        let want: Vec<u8> = aux.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(q3_k_scales(&s).to_vec(), want);
    }

    #[test]
    fn q5_high_bits_come_from_qh() {
        let q = q5_32(&[0x01, 0, 0x01, 0x80], &[0xFF; 16]);
        assert_eq!((q[0], q[1], q[16], q[31], q[30]), (31, 15, 31, 31, 15));
    }
}
