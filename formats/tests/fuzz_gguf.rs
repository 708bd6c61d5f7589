//! Fuzz targets (bolero) for the GGUF reader and the tokenizer built from GGUF vocabulary
//! metadata. `cargo test` runs each for a few seconds on random edits of valid seed files, under
//! an allocation cap; `cargo bolero test fuzz_gguf_reader` runs one under libFuzzer.
//!
//! The property: any input opens or fails with an `Error` — no panic, no allocation past the cap,
//! and every accessor of a file that opened works on it.

mod fuzz_support;
mod gguf_writer;

use bolero::check;
use fuzz_support::{apply, within_allocation_cap, Edit, Executions, TEST_TIME};
use gguf_writer::*;
use tessera_formats::gguf::{block_layout, GgmlType, Gguf, GgufValue};
use tessera_formats::tokenizer::tokenizer_from_gguf;

#[global_allocator]
static ALLOC: fuzz_support::CappedAlloc = fuzz_support::CappedAlloc;

/// What a fuzz input starts from.
#[derive(Debug, bolero::generator::TypeGenerator)]
enum Seed {
    /// Every metadata type and several tensor types.
    Container,
    /// A SentencePiece (`llama`) vocabulary.
    Spm,
    /// A byte-level BPE (`gpt2`) vocabulary.
    Bpe,
    /// The input's own bytes (what libFuzzer grows a corpus from).
    Raw(Vec<u8>),
}

#[derive(Debug, bolero::generator::TypeGenerator)]
struct Case {
    seed: Seed,
    /// How many of `edits` apply (modulo 5): a few edits keep most of a seed valid.
    n_edits: u8,
    edits: Vec<Edit>,
}

fn bytes_of(case: &Case, container_seed: fn() -> Vec<u8>) -> Vec<u8> {
    let mut bytes = match &case.seed {
        Seed::Container => container_seed(),
        Seed::Spm => spm_vocab(),
        Seed::Bpe => bpe_vocab(),
        Seed::Raw(b) => b.clone(),
    };
    let n = case.n_edits as usize % 5;
    apply(&mut bytes, &case.edits[..n.min(case.edits.len())]);
    bytes
}

/// A file with every metadata value type, a nested array and tensors of every dequantizable type.
fn container() -> Vec<u8> {
    let mut b = Builder::default()
        .kv_str("general.architecture", "llama")
        .kv_u32("general.alignment", 32)
        .kv_raw("u8", 0, &[7])
        .kv_raw("i8", 1, &[0xff])
        .kv_raw("u16", 2, &[1, 2])
        .kv_raw("i16", 3, &[1, 0x80])
        .kv_raw("i32", T_I32, &(-5i32).to_le_bytes())
        .kv_raw("f32", T_F32, &1.5f32.to_le_bytes())
        .kv_bool("b", true)
        .kv_raw("u64", T_U64, &9u64.to_le_bytes())
        .kv_raw("i64", 11, &(-9i64).to_le_bytes())
        .kv_raw("f64", 12, &2.5f64.to_le_bytes())
        .kv_array(
            "u32s",
            T_U32,
            &[1u32, 2, 3].map(|v| v.to_le_bytes().to_vec()),
        );
    let mut nested = T_ARRAY.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    for _ in 0..2 {
        nested.extend(T_U8.to_le_bytes());
        nested.extend(3u64.to_le_bytes());
        nested.extend([1, 2, 3]);
    }
    b = b.kv_raw("nested", T_ARRAY, &nested);
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ]
    .into_iter()
    .enumerate()
    {
        let l = block_layout(ty);
        let offset = b.next_offset();
        // Bytes 1..: small non-zero patterns so scales and quants are exercised.
        let data: Vec<u8> = (0..l.block_bytes).map(|j| (j * 7 + i) as u8).collect();
        b = b
            .align_data()
            .tensor(
                &format!("t{i}"),
                &[l.block_elems as u64, 1],
                ty.id(),
                offset,
            )
            .data(&data);
    }
    b.bytes()
}

const PIECES: [&str; 12] = [
    "<unk>",
    "<s>",
    "</s>",
    "\u{2581}",
    "a",
    "b",
    "ab",
    "\u{2581}a",
    "\u{2581}ab",
    "<0x41>",
    "c",
    "[PAD0]",
];

fn spm_vocab() -> Vec<u8> {
    let scores: Vec<Vec<u8>> = (0..PIECES.len())
        .map(|i| (-(i as f32)).to_le_bytes().to_vec())
        .collect();
    let types: Vec<Vec<u8>> = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6, 1, 4]
        .map(|t: i32| t.to_le_bytes().to_vec())
        .to_vec();
    Builder::default()
        .kv_str("tokenizer.ggml.model", "llama")
        .kv_strs("tokenizer.ggml.tokens", &PIECES)
        .kv_array("tokenizer.ggml.scores", T_F32, &scores)
        .kv_array("tokenizer.ggml.token_type", T_I32, &types)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv_u32("tokenizer.ggml.unknown_token_id", 0)
        .kv_bool("tokenizer.ggml.add_bos_token", true)
        .kv_bool("tokenizer.ggml.add_eos_token", true)
        .kv_str(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        )
        .bytes()
}

fn bpe_vocab() -> Vec<u8> {
    let tokens = [
        "h", "e", "l", "o", "he", "ll", "hell", "hello", "\u{120}", "<|end|>",
    ];
    let types: Vec<Vec<u8>> = [1, 1, 1, 1, 1, 1, 1, 1, 1, 3]
        .map(|t: i32| t.to_le_bytes().to_vec())
        .to_vec();
    Builder::default()
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", "smollm")
        .kv_strs("tokenizer.ggml.tokens", &tokens)
        .kv_array("tokenizer.ggml.token_type", T_I32, &types)
        .kv_strs("tokenizer.ggml.merges", &["h e", "l l", "he ll", "hell o"])
        .kv_u32("tokenizer.ggml.bos_token_id", 9)
        .kv_u32("tokenizer.ggml.eos_token_id", 9)
        .kv_bool("tokenizer.ggml.add_bos_token", true)
        .bytes()
}

/// Uses everything an opened file offers; each call may fail but must not panic.
fn exercise(g: &Gguf) {
    for (key, value) in g.metadata() {
        let _ = (
            g.get_u64(key),
            g.get_f32(key),
            g.get_bool(key),
            g.get_str(key),
        );
        if let GgufValue::Array(items) = value {
            let _ = items.iter().filter_map(GgufValue::as_i64).count();
        }
    }
    for info in g.tensors() {
        let data = g
            .tensor_data(&info.name)
            .expect("validated tensor has data");
        assert_eq!(data.len(), info.n_bytes());
        if let Ok((shape, values)) = g.tensor_f32(&info.name) {
            assert_eq!(values.len(), shape.iter().product::<usize>());
        }
    }
}

#[test]
fn fuzz_gguf_reader() {
    let runs = Executions::new("gguf_reader");
    check!()
        .with_type::<Case>()
        .with_test_time(TEST_TIME)
        .for_each(|case| {
            runs.tick();
            let bytes = bytes_of(case, container);
            within_allocation_cap(|| {
                if let Ok(g) = Gguf::from_bytes("fuzz.gguf", bytes) {
                    exercise(&g);
                    runs.reached_end();
                }
            })
        });
}

#[test]
fn fuzz_gguf_tokenizer_vocab() {
    let runs = Executions::new("gguf_tokenizer_vocab");
    check!()
        .with_type::<Case>()
        .with_test_time(TEST_TIME)
        .for_each(|case| {
            runs.tick();
            // The container seed has no vocabulary: start from a SentencePiece one instead.
            let bytes = bytes_of(case, spm_vocab);
            within_allocation_cap(|| {
                let Ok(g) = Gguf::from_bytes("fuzz.gguf", bytes) else {
                    return;
                };
                let Ok(tok) = tokenizer_from_gguf(&g) else {
                    return;
                };
                if let Ok(enc) = tok.encode("hello ab c\u{e9} <s>", true) {
                    let _ = tok.decode(enc.get_ids(), false);
                }
                runs.reached_end();
            })
        });
}

/// The seeds themselves are valid: the targets start from files that open and tokenize.
#[test]
fn seeds_are_valid() {
    exercise(&Gguf::from_bytes("container.gguf", container()).unwrap());
    for seed in [spm_vocab(), bpe_vocab()] {
        let g = Gguf::from_bytes("vocab.gguf", seed).unwrap();
        let tok = tokenizer_from_gguf(&g).unwrap();
        assert!(!tok.encode("hello ab", true).unwrap().get_ids().is_empty());
    }
}
