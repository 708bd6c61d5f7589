//! Constrained decoding over gRPC on SmolLM2, as a TGI router sends it (v3 `grammar` and
//! `grammar_type`): a JSON-schema request, a regex request and an unconstrained one share a batch;
//! each constrained output follows its grammar and ends on EOS, and the unconstrained neighbour's
//! tokens equal its alone run.

mod common;

use common::*;
use serde_json::Value;
use tessera_proto::v3 as pb;

const EOS: u32 = 2;

fn constrained(
    id: u64,
    text: &str,
    kind: pb::GrammarType,
    grammar: &str,
    blocks: &mut Blocks,
) -> pb::Request {
    let mut r = request(id, text, 64, blocks);
    r.stopping_parameters.as_mut().unwrap().ignore_eos_token = false;
    let p = r.parameters.as_mut().unwrap();
    p.grammar = grammar.into();
    p.grammar_type = kind as i32;
    r
}

#[tokio::test]
async fn grammars_shape_their_requests_and_leave_neighbours_alone() {
    let mut shard = Shard::start(smollm2_hf(), &[]).await;
    let c = &mut shard.client;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false
    });
    let mut blocks = Blocks::new();
    let free = request(3, "Once upon a time", 24, &mut blocks);
    let alone = generate(c, batch(1, vec![free.clone()])).await;

    let mut blocks = Blocks::new();
    let requests = vec![
        constrained(
            1,
            "A person, as JSON:",
            pb::GrammarType::Json,
            &schema.to_string(),
            &mut blocks,
        ),
        constrained(
            2,
            "The year Paris was founded:",
            pb::GrammarType::Regex,
            "[0-9]{1,4}( BC| AD)?",
            &mut blocks,
        ),
        {
            let mut free = free.clone();
            let b = blocks.take(64);
            free.slots = slots(&b);
            free.blocks = b;
            free
        },
    ];
    let out = generate(c, batch(2, requests)).await;

    let person = finished(&out[&1]);
    assert_eq!(
        person.finish_reason,
        pb::FinishReason::EosToken as i32,
        "{person:?}"
    );
    let text = person.text.trim_end_matches("<|endoftext|>");
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(
        value["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 16),
        "{value}"
    );
    assert!(value["age"].as_u64().is_some_and(|a| a <= 120), "{value}");
    assert!(value["pets"]
        .as_array()
        .is_some_and(|p| p.iter().all(|x| x == "cat" || x == "dog")));
    assert_eq!(value.as_object().unwrap().len(), 3);
    assert_eq!(*ids(&out[&1]).last().unwrap(), EOS);

    let year = finished(&out[&2]);
    assert_eq!(year.finish_reason, pb::FinishReason::EosToken as i32);
    let year = year.text.trim_end_matches("<|endoftext|>").to_string();
    let digits: String = year.chars().take_while(char::is_ascii_digit).collect();
    assert!((1..=4).contains(&digits.len()), "{year:?}");
    assert!(
        ["", " BC", " AD"].contains(&&year[digits.len()..]),
        "{year:?}"
    );

    assert_eq!(
        ids(&out[&3]),
        ids(&alone[&3]),
        "the unconstrained neighbour is unchanged"
    );
}
