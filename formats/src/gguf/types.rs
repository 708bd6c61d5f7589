//! ggml tensor types and their quantization block layouts (as in ggml's `type_traits` table).

use std::fmt;

/// A ggml tensor element type, identified in GGUF files by its numeric id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
}

/// How a type packs elements: `block_elems` consecutive values (along `dims[0]`) take `block_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub block_elems: usize,
    pub block_bytes: usize,
}

/// (id, type, block elements, block bytes) — ids are fixed by the GGUF format; 4, 5 and 31..33 are retired.
const TABLE: &[(u32, GgmlType, usize, usize)] = &[
    (0, GgmlType::F32, 1, 4),
    (1, GgmlType::F16, 1, 2),
    (2, GgmlType::Q4_0, 32, 18),
    (3, GgmlType::Q4_1, 32, 20),
    (6, GgmlType::Q5_0, 32, 22),
    (7, GgmlType::Q5_1, 32, 24),
    (8, GgmlType::Q8_0, 32, 34),
    (9, GgmlType::Q8_1, 32, 36),
    (10, GgmlType::Q2_K, 256, 84),
    (11, GgmlType::Q3_K, 256, 110),
    (12, GgmlType::Q4_K, 256, 144),
    (13, GgmlType::Q5_K, 256, 176),
    (14, GgmlType::Q6_K, 256, 210),
    (15, GgmlType::Q8_K, 256, 292),
    (16, GgmlType::IQ2_XXS, 256, 66),
    (17, GgmlType::IQ2_XS, 256, 74),
    (18, GgmlType::IQ3_XXS, 256, 98),
    (19, GgmlType::IQ1_S, 256, 50),
    (20, GgmlType::IQ4_NL, 32, 18),
    (21, GgmlType::IQ3_S, 256, 110),
    (22, GgmlType::IQ2_S, 256, 82),
    (23, GgmlType::IQ4_XS, 256, 136),
    (24, GgmlType::I8, 1, 1),
    (25, GgmlType::I16, 1, 2),
    (26, GgmlType::I32, 1, 4),
    (27, GgmlType::I64, 1, 8),
    (28, GgmlType::F64, 1, 8),
    (29, GgmlType::IQ1_M, 256, 56),
    (30, GgmlType::BF16, 1, 2),
    (34, GgmlType::TQ1_0, 256, 54),
    (35, GgmlType::TQ2_0, 256, 66),
];

impl GgmlType {
    /// The type with GGUF id `id`, or `None` for an id this reader does not know.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|e| e.0 == id).map(|e| e.1)
    }

    /// The numeric id stored in GGUF files.
    pub fn id(self) -> u32 {
        self.entry().0
    }

    /// Elements per block and bytes per block.
    pub fn layout(self) -> BlockLayout {
        let e = self.entry();
        BlockLayout {
            block_elems: e.2,
            block_bytes: e.3,
        }
    }

    fn entry(self) -> &'static (u32, GgmlType, usize, usize) {
        // Every variant has exactly one table row (checked by a unit test).
        TABLE
            .iter()
            .find(|e| e.1 == self)
            .expect("every GgmlType is in TABLE")
    }
}

/// The raw block layout of `ty`, for code that keeps weights quantized.
pub fn block_layout(ty: GgmlType) -> BlockLayout {
    ty.layout()
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for &(id, ty, elems, bytes) in TABLE {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.id(), id);
            assert_eq!(
                ty.layout(),
                BlockLayout {
                    block_elems: elems,
                    block_bytes: bytes
                }
            );
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(1000), None);
    }
}
