//! SmolLM2's GGUF vocabulary must tokenize like its Hugging Face tokenizer.json (as written by
//! `tessera-shard convert`, byte-identical to the Python converter's) and give transformers'
//! reference prompt ids.

mod common;

use tessera_formats::tokenizer::load_tokenizer;

const TRICKY: &[&str] = &[
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Café naïve résumé Ångström façade",
    "emoji 🦙🚀 😶‍🌫️ 👩‍👩‍👧 ✅",
    "日本語のテキストと中文",
    "numbers 1234567 3.14159 -42 1e10",
    "<|im_start|>user\nHi<|im_end|>\n",
    "code: fn main() { println!(\"{}\", x); }",
    "   \n   ",
    "It's we'll they've I'M",
];

#[test]
fn gguf_tokenizer_encodes_like_hf() {
    let hf = load_tokenizer(&common::smollm2_hf()).unwrap();
    let gguf = load_tokenizer(&common::smollm2_gguf()).unwrap();
    assert_eq!(hf.get_vocab_size(true), gguf.get_vocab_size(true));
    let reference = common::smollm2_reference();
    let prompts = reference["cases"].as_array().unwrap().iter().map(|c| {
        c["templated_text"]
            .as_str()
            .or(c["input"].as_str())
            .unwrap()
            .to_string()
    });
    for text in prompts.chain(TRICKY.iter().map(|s| s.to_string())) {
        for add_special in [false, true] {
            let want = hf.encode(text.as_str(), add_special).unwrap();
            let got = gguf.encode(text.as_str(), add_special).unwrap();
            assert_eq!(
                got.get_ids(),
                want.get_ids(),
                "{text:?} (add_special_tokens={add_special})"
            );
            let back = gguf.decode(got.get_ids(), false).unwrap();
            assert_eq!(
                back,
                hf.decode(want.get_ids(), false).unwrap(),
                "{text:?} decoded"
            );
        }
    }
}

#[test]
fn reference_prompt_ids() {
    let gguf = load_tokenizer(&common::smollm2_gguf()).unwrap();
    for case in common::smollm2_reference()["cases"].as_array().unwrap() {
        let text = case["templated_text"]
            .as_str()
            .or(case["input"].as_str())
            .unwrap();
        let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(
            gguf.encode(text, true).unwrap().get_ids(),
            want.as_slice(),
            "{text:?}"
        );
    }
}

#[test]
fn special_token_ids() {
    let gguf = load_tokenizer(&common::smollm2_gguf()).unwrap();
    assert_eq!(gguf.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(gguf.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(gguf.decode(&[1, 4093, 2], true).unwrap(), "user");
}

#[test]
fn bad_paths_are_errors_naming_them() {
    let msg = load_tokenizer(std::path::Path::new("/nonexistent/model.gguf"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
    let dir = tempfile::tempdir().unwrap();
    let msg = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}
