//! Corrupt GGUF files, written by code into a temp dir: each must give an Error naming the file
//! and the problem, never a panic.

use std::path::{Path, PathBuf};

use tessera_formats::gguf::{GgmlType, Gguf};
use tessera_formats::Error;

mod fuzz_support;
mod gguf_writer;
use fuzz_support::within_allocation_cap;
use gguf_writer::{f32_bytes, Builder};

#[global_allocator]
static ALLOC: fuzz_support::CappedAlloc = fuzz_support::CappedAlloc;

/// A valid file: one string key and a 2x3 f32 tensor.
fn valid() -> Builder {
    Builder::default()
        .kv_str("general.architecture", "llama")
        .tensor("w", &[3, 2], 0, 0)
        .data(&f32_bytes(&[1., 2., 3., 4., 5., 6.]))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens the file expecting an error that names the file and contains `needle`.
fn expect_err(path: &Path, needle: &str) -> Error {
    let e = Gguf::open(path).expect_err("corrupt file must not open");
    let msg = e.to_string();
    assert!(
        msg.contains(&*path.to_string_lossy()),
        "error does not name the file: {msg}"
    );
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
    e
}

#[test]
fn valid_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.gguf", &valid().kv_u32("n", 7).bytes());
    let g = Gguf::open(&p).unwrap();
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u64("n"), Some(7));
    assert_eq!(g.tensors()[0].ggml_type, GgmlType::F32);
    let (shape, v) = g.tensor_f32("w").unwrap();
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(v, vec![1., 2., 3., 4., 5., 6.]);
}

#[test]
fn truncated_anywhere_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = valid().kv_u32("n", 7).bytes();
    for len in 0..full.len() {
        let p = write(dir.path(), "cut.gguf", &full[..len]);
        let e = Gguf::open(&p).expect_err("truncated file must not open");
        assert!(e.to_string().contains("cut.gguf"), "{e}");
    }
    expect_err(&write(dir.path(), "t.gguf", &full[..20]), "truncated");
}

#[test]
fn bad_magic_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid().bytes();
    b[..4].copy_from_slice(b"GGML");
    expect_err(&write(dir.path(), "magic.gguf", &b), "bad magic");
    let mut b = valid().bytes();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    expect_err(&write(dir.path(), "ver.gguf", &b), "unsupported version 9");
}

#[test]
fn tensor_offset_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let b = Builder::default()
        .tensor("w", &[3, 2], 0, 1 << 20)
        .data(&[0; 24])
        .bytes();
    expect_err(&write(dir.path(), "off.gguf", &b), "runs past the end");
    let b = Builder::default()
        .tensor("w", &[3, 2], 0, u64::MAX - 31)
        .data(&[0; 24])
        .bytes();
    expect_err(&write(dir.path(), "wrap.gguf", &b), "runs past the end");
    let b = Builder::default()
        .tensor("w", &[3, 2], 0, 8)
        .data(&[0; 64])
        .bytes();
    expect_err(
        &write(dir.path(), "misaligned.gguf", &b),
        "not a multiple of the alignment",
    );
    let b = Builder::default().tensor("w", &[u64::MAX, 2], 0, 0).bytes();
    expect_err(&write(dir.path(), "huge.gguf", &b), "overflow");
}

#[test]
fn string_length_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = (1u64 << 40).to_le_bytes().to_vec();
    raw.extend(b"abc");
    let b = Builder::default().kv_raw("k", 8, &raw).bytes();
    expect_err(&write(dir.path(), "str.gguf", &b), "runs past the end");
}

#[test]
fn absurd_counts_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = valid().bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&write(dir.path(), "nt.gguf", &b), "tensor count");
    let mut b = valid().bytes();
    b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    expect_err(
        &write(dir.path(), "nkv.gguf", &b),
        "metadata key/value count",
    );
    // An array of 2^60 u32 claimed in a tiny file.
    let mut raw = 4u32.to_le_bytes().to_vec();
    raw.extend((1u64 << 60).to_le_bytes());
    let b = Builder::default().kv_raw("arr", 9, &raw).bytes();
    expect_err(&write(dir.path(), "arr.gguf", &b), "array length");
}

#[test]
fn unknown_types() {
    let dir = tempfile::tempdir().unwrap();
    let b = Builder::default()
        .tensor("w", &[32], 99, 0)
        .data(&[0; 64])
        .bytes();
    expect_err(&write(dir.path(), "ty.gguf", &b), "unknown ggml type 99");
    let b = Builder::default().kv_raw("k", 42, &[0; 8]).bytes();
    expect_err(&write(dir.path(), "vt.gguf", &b), "unknown value type 42");
}

#[test]
fn unsupported_dequantization_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    // One IQ2_XXS block (id 16, 256 elements in 66 bytes): readable raw, not dequantizable here.
    let b = Builder::default()
        .tensor("iq2", &[256], 16, 0)
        .data(&[0; 66])
        .bytes();
    let p = write(dir.path(), "iq2.gguf", &b);
    let g = Gguf::open(&p).unwrap();
    assert_eq!(g.tensor_data("iq2").unwrap().len(), 66);
    let msg = g.tensor_f32("iq2").unwrap_err().to_string();
    assert!(
        msg.contains("iq2.gguf") && msg.contains("'iq2'") && msg.contains("IQ2_XXS"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_and_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.gguf", &valid().bytes());
    let g = Gguf::open(&p).unwrap();
    let msg = g.tensor_data("absent").unwrap_err().to_string();
    assert!(msg.contains("ok.gguf") && msg.contains("absent"), "{msg}");
    // Q8_0 rows must be whole 32-element blocks.
    let b = Builder::default()
        .tensor("w", &[30], 8, 0)
        .data(&[0; 64])
        .bytes();
    expect_err(&write(dir.path(), "blk.gguf", &b), "block size");
    let b = Builder::default()
        .tensor("w", &[1, 1, 1, 1, 1], 0, 0)
        .data(&[0; 4])
        .bytes();
    expect_err(&write(dir.path(), "dims.gguf", &b), "5 dimensions");
    let b = valid().kv_u32("general.alignment", 3).bytes();
    expect_err(&write(dir.path(), "align.gguf", &b), "general.alignment");
}

#[test]
fn missing_file_names_the_path() {
    let msg = Gguf::open(Path::new("/nonexistent/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("/nonexistent/x.gguf"), "{msg}");
}

#[test]
fn gguf_without_or_with_bad_vocab_is_a_tokenizer_error() {
    use tessera_formats::tokenizer::load_tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "novocab.gguf", &valid().bytes());
    let msg = load_tokenizer(&p).unwrap_err().to_string();
    assert!(
        msg.contains("novocab.gguf") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );
    let b = valid().kv_str("tokenizer.ggml.model", "rwkv").bytes();
    let p = write(dir.path(), "rwkv.gguf", &b);
    let msg = load_tokenizer(&p).unwrap_err().to_string();
    assert!(
        msg.contains("unsupported tokenizer.ggml.model 'rwkv'"),
        "{msg}"
    );
}

/// Declared counts and lengths far past the file: each is refused before anything is allocated
/// from it (the allocation cap of `fuzz_support` fails the test otherwise).
#[test]
fn huge_declared_sizes_are_refused_before_allocating() {
    let open = |b: Vec<u8>| {
        within_allocation_cap(|| Gguf::from_bytes("huge.gguf", b))
            .expect_err("must not open")
            .to_string()
    };
    let array = |elem_ty: u32, n: u64| {
        let mut raw = elem_ty.to_le_bytes().to_vec();
        raw.extend(n.to_le_bytes());
        Builder::default().kv_raw("arr", 9, &raw).bytes()
    };
    assert!(open(array(0, 1 << 62)).contains("array length"));
    assert!(open(array(8, u64::MAX)).contains("array length"));
    // An array of arrays, the inner one claiming 2^62 elements.
    let mut raw = 9u32.to_le_bytes().to_vec();
    raw.extend(1u64.to_le_bytes());
    raw.extend(0u32.to_le_bytes());
    raw.extend((1u64 << 62).to_le_bytes());
    let msg = open(Builder::default().kv_raw("nest", 9, &raw).bytes());
    assert!(msg.contains("array length"), "{msg}");
    let mut raw = (1u64 << 60).to_le_bytes().to_vec();
    raw.extend(b"abc");
    assert!(open(Builder::default().kv_raw("s", 8, &raw).bytes()).contains("string length"));
    let mut b = valid().bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open(b).contains("tensor count"));
    let msg = open(
        Builder::default()
            .tensor("w", &[1 << 32, 1 << 32], 0, 0)
            .bytes(),
    );
    assert!(msg.contains("overflow"), "{msg}");
}

/// Counts the file could hold but no real model has: more metadata values than the reader's cap
/// (each would cost 32 bytes of memory for one in the file) and more tensor infos than its cap.
#[test]
fn counts_past_the_sane_caps_are_refused() {
    let n = (1u64 << 23) + 1;
    let mut raw = 0u32.to_le_bytes().to_vec();
    raw.extend(n.to_le_bytes());
    raw.resize(raw.len() + n as usize, 0);
    let b = Builder::default().kv_raw("bytes", 9, &raw).bytes();
    let msg = within_allocation_cap(|| Gguf::from_bytes("many.gguf", b))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("metadata values"), "{msg}");

    let mut b = Builder::default().bytes();
    b[8..16].copy_from_slice(&((1u64 << 20) + 1).to_le_bytes());
    b.resize(26 << 20, 0);
    let msg = within_allocation_cap(|| Gguf::from_bytes("tensors.gguf", b))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tensor count") && msg.contains("accepts"),
        "{msg}"
    );
}

/// A SentencePiece vocabulary with one megabyte-long piece would make merge derivation (which
/// tries every split of every piece) run for hours; it is refused instead.
#[test]
fn a_huge_vocabulary_piece_is_refused() {
    use tessera_formats::tokenizer::tokenizer_from_gguf;
    let long = "a".repeat(1 << 20);
    let scores = vec![0f32.to_le_bytes().to_vec(); 2];
    let b = Builder::default()
        .kv_str("tokenizer.ggml.model", "llama")
        .kv_strs("tokenizer.ggml.tokens", &["<unk>", &long])
        .kv_array("tokenizer.ggml.scores", 6, &scores)
        .bytes();
    let g = Gguf::from_bytes("long.gguf", b).unwrap();
    let start = std::time::Instant::now();
    let msg = tokenizer_from_gguf(&g).unwrap_err().to_string();
    assert!(
        msg.contains("too long") && msg.contains("long.gguf"),
        "{msg}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}
