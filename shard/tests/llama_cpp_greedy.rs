//! SmolLM2-135M-Instruct Q4_1 served as a user serves it (default load options) produces
//! llama.cpp's own greedy ids on the reference prompts (`llama_cpp_greedy.json`, made by
//! `bench/compare-llama-cpp.sh greedy`; tests/fixtures/smollm2/SOURCE.md says how).

mod engine_common;

use engine_common::*;
use serde_json::Value;
use tessera_shard::loader::{load, LoadOptions};
use tessera_shard::tools::generate::greedy;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn llama_cpp_fixture() -> Value {
    let path = repo_root().join("tests/fixtures/smollm2/llama_cpp_greedy.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How many leading ids two sequences share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[test]
#[ignore = "fails today: the quantized engine matches 49 of llama.cpp's 112 greedy ids (story 29/32, chat_capital 7/48, code 13/32; 51 with an f16 KV cache; the f32 reference path 45), each divergence at a near-tie (llama.cpp's top two within 0.06-0.37 in log-probability)"]
fn q4_1_greedy_ids_equal_llama_cpp() {
    let fixture = llama_cpp_fixture();
    let loaded = load(&smollm2_gguf(), &LoadOptions::default()).expect("load the Q4_1 GGUF");
    let mut report = Vec::new();
    let (mut matched, mut total) = (0, 0);
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("a case name");
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["generated_ids"]);
        let eos = if case["stop_at_eos"].as_bool().unwrap_or(false) {
            loaded.config.eos_token_ids.clone()
        } else {
            vec![]
        };
        let got = greedy(&loaded.model, &prompt, want.len(), &eos)
            .expect("greedy generation")
            .generated_ids;
        let same = common_prefix(&got, &want);
        matched += same;
        total += want.len();
        report.push(format!(
            "{name}: {same}/{} leading ids equal (got {got:?}, llama.cpp {want:?})",
            want.len()
        ));
    }
    eprintln!(
        "{matched}/{total} ids equal llama.cpp's\n{}",
        report.join("\n")
    );
    assert_eq!(matched, total, "{}", report.join("\n"));
}
