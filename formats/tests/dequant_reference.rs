//! Dequantization of every quantized type checked bit for bit against gguf-py's independent numpy
//! implementation, on the seeded random blocks in `fixtures/dequant_reference.json`
//! (made by `fixtures/gen_dequant_fixture.py`).

use serde_json::Value;
use tessera_formats::gguf::{dequantize, GgmlType};

const FIXTURE: &str = include_str!("fixtures/dequant_reference.json");

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// (type, its blocks, element count, gguf-py's f32 values).
fn cases() -> Vec<(GgmlType, Vec<u8>, usize, Vec<f32>)> {
    let doc: Value = serde_json::from_str(FIXTURE).expect("fixture is JSON");
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let ty = GgmlType::from_id(c["id"].as_u64().unwrap() as u32).expect("known type id");
            assert_eq!(
                ty.to_string(),
                c["type"].as_str().unwrap(),
                "id and name agree"
            );
            let values = unhex(c["values_f32le"].as_str().unwrap())
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let n = c["elements"].as_u64().unwrap() as usize;
            (ty, unhex(c["blocks"].as_str().unwrap()), n, values)
        })
        .collect()
}

#[test]
fn fixture_covers_every_quantized_type() {
    let mut got: Vec<String> = cases().iter().map(|c| c.0.to_string()).collect();
    got.sort();
    let mut want = [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
        "IQ4_XS",
    ];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn dequantize_equals_gguf_py_bit_for_bit() {
    for (ty, blocks, n, want) in cases() {
        assert_eq!(want.len(), n, "{ty}: fixture value count");
        let got = dequantize(ty, &blocks, n).unwrap_or_else(|e| panic!("{ty}: {e}"));
        let mismatches: Vec<(usize, f32, f32)> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
            .map(|(i, (&g, &w))| (i, g, w))
            .take(5)
            .collect();
        assert!(
            mismatches.is_empty(),
            "{ty}: (index, ours, gguf-py) {mismatches:?}"
        );
        // Random blocks must not dequantize to a constant: a guard against a fixture of zeros.
        assert!(
            want.iter().any(|&v| v != want[0]),
            "{ty}: degenerate fixture"
        );
    }
}
