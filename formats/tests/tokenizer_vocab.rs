//! llama.cpp's tokenizer suite: each vocab GGUF's tokenizer must encode every `*.inp` string to the
//! ids Hugging Face gave (`*.out`, add_special_tokens=False). The suite (MIT) is read from
//! `../shared/data/tokenizer-vocab`; without it the tests say they are skipped.

mod common;

use std::path::Path;

use tessera_formats::tokenizer::load_tokenizer;

/// Strings of a `.inp` file: each is followed by a line `__ggml_vocab_test__`.
fn read_inputs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut parts: Vec<String> = text
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    assert_eq!(
        parts.pop().as_deref(),
        Some(""),
        "{} must end with a separator",
        path.display()
    );
    parts
}

fn read_outputs(path: &Path) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect()
}

/// Runs one vocab's suite from `dir`, returning a description of each mismatch.
fn check(dir: &Path, name: &str) -> Vec<String> {
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let tok = load_tokenizer(&gguf).unwrap_or_else(|e| panic!("{e}"));
    let inputs = read_inputs(&dir.join(format!("ggml-vocab-{name}.gguf.inp")));
    let outputs = read_outputs(&dir.join(format!("ggml-vocab-{name}.gguf.out")));
    assert!(inputs.len() > 10, "{name}: too few test strings");
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: .inp and .out disagree in length"
    );
    let mut failures = Vec::new();
    for (text, want) in inputs.iter().zip(&outputs) {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        if &got != want {
            failures.push(format!(
                "{name}: {text:?}\n   want {want:?}\n    got {got:?}"
            ));
        }
    }
    failures
}

fn assert_suite(name: &str) {
    let dir = common::or_skip!(common::shared("data/tokenizer-vocab"));
    let failures = check(&dir, name);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm() {
    assert_suite("llama-spm");
}

#[test]
fn phi_3() {
    assert_suite("phi-3");
}

#[test]
fn llama_bpe() {
    assert_suite("llama-bpe");
}

#[test]
fn gpt_2() {
    assert_suite("gpt-2");
}

#[test]
fn qwen2() {
    assert_suite("qwen2");
}

#[test]
fn starcoder() {
    assert_suite("starcoder");
}

#[test]
fn deepseek_coder() {
    assert_suite("deepseek-coder");
}

#[test]
fn every_vocab_in_the_folder_is_covered() {
    let dir = common::or_skip!(common::shared("data/tokenizer-vocab"));
    let known = [
        "llama-spm",
        "phi-3",
        "llama-bpe",
        "gpt-2",
        "qwen2",
        "starcoder",
        "deepseek-coder",
    ];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name
            .strip_prefix("ggml-vocab-")
            .and_then(|n| n.strip_suffix(".gguf"))
        {
            assert!(known.contains(&stem), "{name} has no test here");
        }
    }
}
