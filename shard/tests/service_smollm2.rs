//! SmolLM2-135M-Instruct through the gRPC service: the greedy references of reference.json (ids
//! exactly, logprobs closely), the chat case ending on EOS, all three cases batched together.

mod common;

use common::*;
use serde_json::Value;
use tessera_proto::v3 as pb;

struct Case {
    name: String,
    text: String,
    prompt_ids: Vec<u32>,
    new_tokens: u32,
    stop_at_eos: bool,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    generated_text: String,
}

fn cases() -> Vec<Case> {
    let json = smollm2_reference();
    let u32s = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            text: c["templated_text"]
                .as_str()
                .or(c["input"].as_str())
                .unwrap()
                .into(),
            prompt_ids: u32s(&c["prompt_ids"]),
            new_tokens: c["new_tokens"].as_u64().unwrap() as u32,
            stop_at_eos: c["stop_at_eos"].as_bool().unwrap(),
            ids: u32s(&c["generated_ids"]),
            logprobs: c["generated_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
            generated_text: c["generated_text"].as_str().unwrap().into(),
        })
        .collect()
}

fn case_request(id: u64, case: &Case, blocks: &mut Blocks) -> pb::Request {
    let mut r = request(id, &case.text, case.new_tokens, blocks);
    // The references tokenized the raw text without added special tokens (the chat template
    // already holds them).
    r.add_special_tokens = false;
    r.prefill_logprobs = true;
    r.stopping_parameters.as_mut().unwrap().ignore_eos_token = !case.stop_at_eos;
    r
}

fn check(case: &Case, gens: &[pb::Generation]) {
    let name = &case.name;
    assert_eq!(
        gens[0].prefill_tokens.as_ref().unwrap().ids,
        case.prompt_ids,
        "{name}: prompt"
    );
    assert_eq!(ids(gens), case.ids, "{name}: ids");
    let logprobs: Vec<f32> = gens
        .iter()
        .map(|g| g.tokens.as_ref().unwrap().logprobs[0])
        .collect();
    for (i, (got, want)) in logprobs.iter().zip(&case.logprobs).enumerate() {
        assert!(
            (got - want).abs() < 2e-3,
            "{name}: logprob {i}: {got} vs {want}"
        );
    }
    let done = finished(gens);
    if case.stop_at_eos {
        assert_eq!(
            done.finish_reason,
            pb::FinishReason::EosToken as i32,
            "{name}"
        );
        // The reference decodes specials; generated_text skips them.
        assert_eq!(
            done.text,
            case.generated_text.replace("<|im_end|>", ""),
            "{name}"
        );
        assert!(gens.last().unwrap().tokens.as_ref().unwrap().is_special[0]);
    } else {
        assert_eq!(
            done.finish_reason,
            pb::FinishReason::Length as i32,
            "{name}"
        );
        assert_eq!(done.text, case.generated_text, "{name}");
        assert_eq!(streamed(gens), case.generated_text, "{name}");
    }
}

#[tokio::test]
async fn reference_cases_alone_and_batched() {
    // transformers' reference is f32 throughout: so is the KV cache here.
    let mut shard = Shard::start(smollm2_hf(), &["--kv-cache-dtype", "f32"]).await;
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        let b = batch(
            i as u64,
            vec![case_request(i as u64, case, &mut Blocks::new())],
        );
        let out = generate(&mut shard.client, b).await;
        check(case, &out[&(i as u64)]);
    }
    let mut blocks = Blocks::new();
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| case_request(i as u64, c, &mut blocks))
        .collect();
    let out = generate(&mut shard.client, batch(10, reqs)).await;
    for (i, case) in cases.iter().enumerate() {
        check(case, &out[&(i as u64)]);
    }
}
