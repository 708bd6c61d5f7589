//! Isolation over gRPC: every kind of request the router's validation (router/src/validation.rs,
//! the single source of request validity) refuses is also refused by the shard when a router lets
//! it through, and a long greedy and a long seeded-sampling generation that such requests join at
//! every step finish exactly as when run undisturbed. A warmup whose `max_total_tokens` exceeds the
//! model's positions is refused, so the router cannot accept what `Seq::new` would refuse.

mod common;

use common::*;
use tessera_proto::v3 as pb;
use tonic::Code;

const LONG: u32 = 48;

/// Requests 1 (greedy) and 2 (seeded sampling), `LONG` tokens each.
fn long_batch(id: u64, extra: Vec<pb::Request>) -> pb::Batch {
    let mut blocks = Blocks::new();
    let mut sampled = request(2, "Tom and his dog", LONG, &mut blocks);
    let p = sampled.parameters.as_mut().unwrap();
    p.do_sample = true;
    p.temperature = 0.8;
    p.top_k = 40;
    p.seed = 7;
    let mut requests = vec![request(1, "Once upon a time", LONG, &mut blocks), sampled];
    requests.extend(extra);
    batch(id, requests)
}

/// One request per refusal, on blocks past the long requests', with the field the shard names.
fn refused_requests() -> Vec<(pb::Request, &'static str)> {
    let mut blocks = Blocks::new();
    blocks.take(1000);
    let mut next_id = 100;
    let mut make = |edit: &dyn Fn(&mut pb::Request)| {
        next_id += 1;
        let mut r = request(next_id, "The sun was", 8, &mut blocks);
        edit(&mut r);
        r
    };
    vec![
        (
            make(&|r| {
                r.stopping_parameters.as_mut().unwrap().stop_sequences = vec!["x".into(), "".into()]
            }),
            "stopping_parameters.stop_sequences",
        ),
        (
            make(&|r| params(r).temperature = f32::NAN),
            "parameters.temperature",
        ),
        (
            make(&|r| params(r).temperature = -1.0),
            "parameters.temperature",
        ),
        (
            make(&|r| params(r).top_p = f32::INFINITY),
            "parameters.top_p",
        ),
        (make(&|r| params(r).typical_p = 1.5), "parameters.typical_p"),
        (
            make(&|r| params(r).repetition_penalty = -1.0),
            "parameters.repetition_penalty",
        ),
        (
            make(&|r| params(r).frequency_penalty = f32::NAN),
            "parameters.frequency_penalty",
        ),
        (
            make(&|r| params(r).presence_penalty = f32::NEG_INFINITY),
            "parameters.presence_penalty",
        ),
        (
            make(&|r| r.stopping_parameters.as_mut().unwrap().max_new_tokens = 0),
            "stopping_parameters.max_new_tokens",
        ),
        (
            make(&|r| r.stopping_parameters.as_mut().unwrap().max_new_tokens = u32::MAX),
            "stopping_parameters.max_new_tokens",
        ),
        (make(&|r| r.inputs.clear()), "inputs"),
        (
            make(&|r| {
                params(r).grammar = "(unclosed".into();
                params(r).grammar_type = pb::GrammarType::Regex as i32;
            }),
            "parameters.grammar",
        ),
        (
            make(&|r| {
                params(r).grammar = r#"{"type": "no-such-type"}"#.into();
                params(r).grammar_type = pb::GrammarType::Json as i32;
            }),
            "parameters.grammar",
        ),
        (
            make(&|r| {
                params(r).grammar = "a+".into();
                params(r).grammar_type = 9;
            }),
            "parameters.grammar_type",
        ),
        (make(&|r| params(r).min_p = 2.0), "parameters.min_p"),
        (
            make(&|r| {
                params(r).logit_bias.insert(5, f32::NAN);
            }),
            "parameters.logit_bias",
        ),
    ]
}

fn params(r: &mut pb::Request) -> &mut pb::NextTokenChooserParameters {
    r.parameters.as_mut().unwrap()
}

/// `out` by request id, printed: equal texts mean equal outputs (NaN logprobs included).
fn printed(out: &Outputs) -> String {
    format!(
        "{:?}",
        out.iter().collect::<std::collections::BTreeMap<_, _>>()
    )
}

#[tokio::test]
async fn refused_requests_joining_a_long_generation_leave_it_unchanged() {
    let mut shard = Shard::start(smollm2_hf(), &[]).await;
    let c = &mut shard.client;
    let refused = refused_requests();

    // Each is refused on its own, naming its field.
    for (i, (r, field)) in refused.iter().enumerate() {
        assert_status(
            c.prefill(pb::PrefillRequest {
                batch: Some(batch(10 + i as u64, vec![r.clone()])),
                cached_batch: None,
            })
            .await,
            Code::InvalidArgument,
            &format!("batch.requests[0].{field}"),
        );
    }

    let reference = generate(c, long_batch(1, vec![])).await;
    assert_eq!(ids(&reference[&1]).len(), LONG as usize);
    assert_eq!(ids(&reference[&2]).len(), LONG as usize);

    // The first refusal arrives in the long requests' own Prefill, each later one joins the
    // running batch (a chunking Prefill that also advances it); then plain decodes to the end.
    let mut out = Outputs::new();
    let mut joining = refused.into_iter().map(|(r, _)| r);
    let first = c
        .prefill(pb::PrefillRequest {
            batch: Some(long_batch(2, joining.next().into_iter().collect())),
            cached_batch: None,
        })
        .await
        .expect("prefill")
        .into_inner();
    collect(&mut out, first.generations);
    let mut held = first.batch;
    for (step, r) in joining.enumerate() {
        let id = r.id;
        let joined = c
            .prefill(pb::PrefillRequest {
                batch: Some(batch(100 + step as u64, vec![r])),
                cached_batch: held,
            })
            .await
            .unwrap_or_else(|e| panic!("joining request {id} failed the running batch: {e}"))
            .into_inner();
        collect(&mut out, joined.generations);
        held = joined.batch;
        assert_eq!(held.as_ref().unwrap().request_ids, [1, 2], "request {id}");
    }
    while let Some(b) = held {
        let r = c
            .decode(pb::DecodeRequest { batches: vec![b] })
            .await
            .expect("decode")
            .into_inner();
        collect(&mut out, r.generations);
        held = r.batch;
    }
    assert_eq!(
        out.keys().copied().max(),
        Some(2),
        "no refused request generated"
    );
    assert_eq!(printed(&out), printed(&reference));
}

#[tokio::test]
async fn a_warmup_past_the_models_positions_is_refused() {
    let mut shard = Shard::start(smollm2_hf(), &["--kv-cache-memory", "50000000"]).await;
    let warmup = |max_total_tokens| pb::WarmupRequest {
        batch: Some(batch(
            1,
            vec![request(1, "Once upon a time", 1, &mut Blocks::new())],
        )),
        max_input_tokens: Some(100),
        max_prefill_tokens: 256,
        max_total_tokens: Some(max_total_tokens),
    };
    // SmolLM2 has 8192 positions.
    assert_status(
        shard.client.warmup(warmup(8193)).await,
        Code::InvalidArgument,
        "`max_total_tokens`: 8193 exceeds the model's 8192 positions",
    );
    let w = shard.client.warmup(warmup(8192)).await.expect("warmup");
    assert_eq!(w.into_inner().max_total_tokens, 8192);
}
