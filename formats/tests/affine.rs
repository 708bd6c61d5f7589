//! `gguf::affine::to_affine` against `dequantize` on random blocks of every quantized type, and
//! `Gguf::tensor_affine` on an in-memory file.

mod gguf_writer;

use gguf_writer::Builder;
use half::f16;
use tessera_formats::gguf::affine::{affine_layout, to_affine};
use tessera_formats::gguf::{dequantize, GgmlType, Gguf};

/// Every type with an affine form, with the byte offsets of its f16 scale/min fields.
const TYPES: &[(GgmlType, &[usize])] = &[
    (GgmlType::Q4_0, &[0]),
    (GgmlType::Q4_1, &[0, 2]),
    (GgmlType::Q5_0, &[0]),
    (GgmlType::Q5_1, &[0, 2]),
    (GgmlType::Q8_0, &[0]),
    (GgmlType::Q2_K, &[80, 82]),
    (GgmlType::Q3_K, &[108]),
    (GgmlType::Q4_K, &[0, 2]),
    (GgmlType::Q5_K, &[0, 2]),
    (GgmlType::Q6_K, &[208]),
    (GgmlType::IQ4_NL, &[0]),
    (GgmlType::IQ4_XS, &[0]),
];

/// SplitMix64: a tiny deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A finite f16 of either sign between about 2^-16 (subnormal in f16) and 2.
    fn half(&mut self) -> f16 {
        let r = self.next();
        let mantissa = (r & 0xFFFF) as f32 / 65536.0 + 0.5;
        let exp = ((r >> 16) % 17) as i32 - 16;
        let sign = if r >> 63 == 1 { -1.0 } else { 1.0 };
        f16::from_f32(sign * mantissa * 2f32.powi(exp))
    }
}

/// `blocks` random blocks of `ty`: random bytes, then sane f16 values in the scale fields.
fn random_blocks(ty: GgmlType, halves: &[usize], blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let l = ty.layout();
    let mut b: Vec<u8> = (0..blocks * l.block_bytes)
        .map(|_| rng.next() as u8)
        .collect();
    for blk in b.chunks_exact_mut(l.block_bytes) {
        for &at in halves {
            blk[at..at + 2].copy_from_slice(&rng.half().to_bits().to_le_bytes());
        }
    }
    b
}

#[test]
fn affine_reconstructs_dequantize_for_every_type() {
    let mut rng = Rng(0x7E55_E4A0);
    for &(ty, halves) in TYPES {
        let (group, bits) = affine_layout(ty).unwrap_or_else(|| panic!("{ty} has a layout"));
        for round in 0..8 {
            // 1030 blocks span two rayon tasks; 37 is not a multiple of anything.
            let blocks = if round == 0 { 1030 } else { 37 };
            let n = blocks * ty.layout().block_elems;
            let data = random_blocks(ty, halves, blocks, &mut rng);
            let a = to_affine(ty, &data, n).unwrap();
            let want = dequantize(ty, &data, n).unwrap();
            assert_eq!((a.group, a.bits), (group, bits), "{ty}");
            assert_eq!(a.q.len(), n, "{ty}");
            assert_eq!(
                (a.scale.len(), a.offset.len()),
                (n / group, n / group),
                "{ty}"
            );
            assert!(
                a.q.iter().all(|&q| (q as u32) < 1 << bits),
                "{ty}: q fits {bits} bits"
            );
            for (i, (&q, &w)) in a.q.iter().zip(&want).enumerate() {
                let (s, o) = (a.scale[i / group], a.offset[i / group]);
                let got = s * q as f32 + o;
                // The products of an f16 scale and small integers fit f32's 24-bit significand, so
                // the rewrite is exact except where IQ4_XS's 6-bit scale times an 8-bit code
                // needs 25 bits: there one rounding of `s * q`, relative to the terms.
                let tol = if ty == GgmlType::IQ4_XS {
                    1e-6 * ((s * q as f32).abs() + o.abs()) + 1e-30
                } else {
                    0.0
                };
                assert!(
                    (got - w).abs() <= tol,
                    "{ty}[{i}]: {s} * {q} + {o} = {got}, dequantize gives {w}"
                );
            }
            assert_eq!(a.to_f32().len(), n);
        }
    }
}

#[test]
fn every_value_of_each_bit_width_occurs() {
    // Guards the unpacking: random bytes must reach every code 0..2^bits (for IQ4 the 16 codebook
    // entries), or a bit is being dropped or duplicated.
    let mut rng = Rng(42);
    for &(ty, halves) in TYPES {
        let (_, bits) = affine_layout(ty).unwrap();
        let n = 64 * ty.layout().block_elems;
        let a = to_affine(ty, &random_blocks(ty, halves, 64, &mut rng), n).unwrap();
        let mut seen = vec![false; 256];
        for &q in &a.q {
            seen[q as usize] = true;
        }
        let distinct = seen.iter().filter(|&&s| s).count();
        let want = match ty {
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => 16,
            _ => 1 << bits,
        };
        assert_eq!(distinct, want, "{ty}");
    }
}

#[test]
fn tensor_affine_reads_a_gguf_tensor() {
    let mut rng = Rng(7);
    let q4k = random_blocks(GgmlType::Q4_K, &[0, 2], 6, &mut rng);
    let f32_data = vec![0u8; 4 * 8];
    let b = Builder::default()
        .tensor("w", &[512, 3], GgmlType::Q4_K.id(), 0)
        .data(&q4k)
        .align_data();
    let b = b
        .clone()
        .tensor("norm", &[8], GgmlType::F32.id(), b.next_offset())
        .data(&f32_data);
    let g = Gguf::from_bytes("mem.gguf", b.bytes()).unwrap();

    let (shape, a) = g.tensor_affine("w").unwrap();
    assert_eq!(shape, vec![3, 512]);
    assert_eq!(a, to_affine(GgmlType::Q4_K, &q4k, 3 * 512).unwrap());
    assert_eq!(a.to_f32(), g.tensor_f32("w").unwrap().1);

    let err = g.tensor_affine("norm").unwrap_err().to_string();
    assert!(err.contains("norm") && err.contains("F32"), "{err}");
    assert!(g.tensor_affine("missing").is_err());
}
