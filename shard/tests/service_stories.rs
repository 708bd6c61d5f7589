//! The gRPC service end to end on stories260K (fast): reference output, batching operations that
//! must not change results (filter, merge, chunked prefill, batch composition), stop sequences,
//! UTF-8 streaming, prompt logprobs, warmup and info.

mod common;

use common::*;
use tessera_proto::v3 as pb;

/// reference.txt: greedy continuation of "Once upon a time".
const REFERENCE_IDS: [u32; 20] = [
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
    292,
];
const REFERENCE_TEXT: &str = ", there was a little girl named Lily. She loved to play outsid";

#[tokio::test]
async fn greedy_matches_reference() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let mut blocks = Blocks::new();
    let out = generate(
        &mut shard.client,
        batch(1, vec![request(7, "Once upon a time", 20, &mut blocks)]),
    )
    .await;
    let gens = &out[&7];
    assert_eq!(ids(gens), REFERENCE_IDS);
    assert_eq!(streamed(gens), REFERENCE_TEXT);
    let done = finished(gens);
    assert_eq!(done.text, REFERENCE_TEXT);
    assert_eq!(done.generated_tokens, 20);
    assert_eq!(done.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(done.seed, None);
    let lp = gens[0].tokens.as_ref().unwrap().logprobs[0];
    assert!(lp < 0.0 && lp > -0.2, "',' is very likely: {lp}");
}

#[tokio::test]
async fn info_health_and_discovery() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let info = shard
        .client
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.device_type, "cpu");
    assert_eq!(info.block_size, 16);
    assert!(info.support_chunking && info.use_prefix_caching && !info.requires_padding);
    assert_eq!(info.attention_impl, "paged");
    shard.client.health(pb::HealthRequest {}).await.unwrap();
    let urls = shard
        .client
        .service_discovery(pb::ServiceDiscoveryRequest {})
        .await
        .unwrap()
        .into_inner()
        .urls;
    assert_eq!(urls, vec![format!("unix://{}", shard.socket.display())]);
}

fn prompts() -> [&'static str; 3] {
    ["Once upon a time", "Tom and his dog", "The sun was"]
}

/// Each prompt generated alone.
async fn solo(client: &mut Client, max_new: u32) -> Vec<Vec<u32>> {
    let mut all = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        let mut blocks = Blocks::new();
        let out = generate(
            client,
            batch(
                100 + i as u64,
                vec![request(i as u64, p, max_new, &mut blocks)],
            ),
        )
        .await;
        all.push(ids(&out[&(i as u64)]));
    }
    all
}

#[tokio::test]
async fn filter_mid_generation_leaves_the_others_unchanged() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let alone = solo(&mut shard.client, 12).await;
    let mut blocks = Blocks::new();
    let reqs = prompts()
        .iter()
        .enumerate()
        .map(|(i, p)| request(i as u64, p, 12, &mut blocks))
        .collect();
    let c = &mut shard.client;
    let r = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch(1, reqs)),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Outputs::new();
    collect(&mut out, r.generations);
    let mut cached = r.batch.unwrap();
    for step in 0..11 {
        if step == 4 {
            let f = pb::FilterBatchRequest {
                batch_id: cached.id,
                request_ids: vec![0, 2],
            };
            cached = c.filter_batch(f).await.unwrap().into_inner().batch.unwrap();
            assert_eq!(cached.request_ids, vec![0, 2]);
        }
        let r = c
            .decode(pb::DecodeRequest {
                batches: vec![cached.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        collect(&mut out, r.generations);
        match r.batch {
            Some(b) => cached = b,
            None => break,
        }
    }
    assert_eq!(ids(&out[&0]), alone[0]);
    assert_eq!(ids(&out[&2]), alone[2]);
    assert_eq!(
        ids(&out[&1]),
        alone[1][..5],
        "request 1 stopped at the filter"
    );
}

#[tokio::test]
async fn merged_batches_and_chunked_prefill_change_nothing() {
    let mut shard = Shard::start(or_skip!(stories()), &["--max-batch-prefill-tokens", "3"]).await;
    let alone = solo(&mut shard.client, 10).await;
    let c = &mut shard.client;
    let mut blocks = Blocks::new();
    // Batch 1: request 0 alone, two steps ahead.
    let r = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch(1, vec![request(0, prompts()[0], 10, &mut blocks)])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Outputs::new();
    collect(&mut out, r.generations);
    let r = c
        .decode(pb::DecodeRequest {
            batches: vec![r.batch.unwrap()],
        })
        .await
        .unwrap()
        .into_inner();
    collect(&mut out, r.generations);
    // Request 1 joins with a chunked prefill (2 tokens now, the rest 3 per forward), in the same
    // forward as request 0's decode.
    let mut joining = request(1, prompts()[1], 10, &mut blocks);
    joining.chunk_len = Some(2);
    let r = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch(2, vec![joining])),
            cached_batch: r.batch,
        })
        .await
        .unwrap()
        .into_inner();
    collect(&mut out, r.generations);
    let merged = r.batch.unwrap();
    assert_eq!(merged.id, 1, "the merged batch keeps the cached batch's id");
    assert_eq!(merged.request_ids, vec![0, 1]);
    assert_eq!(
        merged.current_tokens,
        1 + 3,
        "one decode token and a 3-token chunk"
    );
    // Request 2 in its own batch, then both batches decoded together.
    let r2 = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch(3, vec![request(2, prompts()[2], 10, &mut blocks)])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    collect(&mut out, r2.generations);
    let mut batches = vec![merged, r2.batch.unwrap()];
    while !batches.is_empty() {
        let r = c
            .decode(pb::DecodeRequest { batches })
            .await
            .unwrap()
            .into_inner();
        collect(&mut out, r.generations);
        batches = r.batch.into_iter().collect();
    }
    for i in 0..3 {
        assert_eq!(ids(&out[&(i as u64)]), alone[i], "request {i}");
    }
}

fn sampled(id: u64, text: &str, blocks: &mut Blocks) -> pb::Request {
    let mut r = request(id, text, 16, blocks);
    let p = r.parameters.as_mut().unwrap();
    p.do_sample = true;
    p.temperature = 1.3;
    p.top_k = 40;
    p.seed = 1234 + id;
    r
}

#[tokio::test]
async fn seeded_sampling_is_independent_of_the_batch() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let mut blocks = Blocks::new();
    let alone = generate(
        &mut shard.client,
        batch(1, vec![sampled(5, "The cat", &mut blocks)]),
    )
    .await;
    let mut blocks = Blocks::new();
    let crowd = vec![
        request(1, "Once upon a time", 16, &mut blocks),
        sampled(9, "A big dog", &mut blocks),
        sampled(5, "The cat", &mut blocks),
    ];
    let together = generate(&mut shard.client, batch(2, crowd)).await;
    assert_eq!(ids(&alone[&5]), ids(&together[&5]));
    assert_eq!(finished(&alone[&5]).seed, Some(1239));
    let greedy_ids = ids(&together[&1]);
    assert_ne!(ids(&together[&9]), ids(&together[&5]));
    assert_eq!(greedy_ids, REFERENCE_IDS[..16]);
}

#[tokio::test]
async fn stop_sequence_straddling_tokens() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let mut blocks = Blocks::new();
    let mut r = request(1, "Once upon a time", 20, &mut blocks);
    // "tle gi" spans the tokens of " little" and " girl".
    r.stopping_parameters.as_mut().unwrap().stop_sequences = vec!["tle gi".into()];
    let out = generate(&mut shard.client, batch(1, vec![r])).await;
    let done = finished(&out[&1]);
    assert_eq!(done.finish_reason, pb::FinishReason::StopSequence as i32);
    assert_eq!(
        done.text, ", there was a little gir",
        "the stop ends inside \" gir\""
    );
    assert_eq!(done.generated_tokens as usize, out[&1].len());
}

#[tokio::test]
async fn emoji_and_accented_prompt_stream_intact() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let mut blocks = Blocks::new();
    let text = "Zoë ate a crème brûlée 🍮 and said: «très bien» 🦀";
    let mut r = request(1, text, 12, &mut blocks);
    r.prefill_logprobs = true;
    r.top_n_tokens = 3;
    let out = generate(&mut shard.client, batch(1, vec![r])).await;
    let gens = &out[&1];
    let prefill = gens[0].prefill_tokens.as_ref().expect("prefill tokens");
    let tok = tokenizers::Tokenizer::from_file(or_skip!(stories()).join("tokenizer.json")).unwrap();
    let prompt = tok.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(prefill.ids, prompt);
    assert_eq!(tok.decode(&prefill.ids, true).unwrap(), text);
    assert!(prefill.logprobs[0].is_nan());
    assert!(prefill.logprobs[1..]
        .iter()
        .all(|l| l.is_finite() && *l <= 0.0));
    for g in gens {
        assert!(!streamed(std::slice::from_ref(g)).contains('\u{FFFD}'));
        let top = &g.top_tokens[0];
        assert_eq!(top.ids.len(), 3);
        assert!(top.logprobs.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(
            top.logprobs[0],
            g.tokens.as_ref().unwrap().logprobs[0],
            "greedy picks the top token"
        );
    }
    assert_eq!(streamed(gens), finished(gens).text);
}

#[tokio::test]
async fn warmup_sizes_the_cache() {
    let mut shard = Shard::start(or_skip!(stories()), &["--kv-cache-memory", "10000000"]).await;
    let mut blocks = Blocks::new();
    let reqs = (0..4)
        .map(|i| request(i, &"_test ".repeat(30), 5, &mut blocks))
        .collect();
    let w = pb::WarmupRequest {
        batch: Some(batch(0, reqs)),
        max_input_tokens: None,
        max_prefill_tokens: 256,
        max_total_tokens: None,
    };
    let w = shard.client.warmup(w).await.unwrap().into_inner();
    // stories260K: 5 layers × K,V × 16 slots × 4 KV heads × 8 dims × 2 bytes (the default bf16
    // cache) = 10240 bytes a block: twice the tokens an f32 cache holds in the same memory.
    let supported = 10_000_000 / 10240 * 16;
    assert_eq!(w.max_supported_total_tokens, Some(supported));
    assert_eq!(w.max_total_tokens, 512, "capped by max_position_embeddings");
    assert_eq!(w.max_input_tokens, 511);
    // The resized cache serves requests in its new blocks.
    let mut r = request(1, "Once upon a time", 20, &mut Blocks::new());
    r.blocks = vec![supported / 16 - 2, supported / 16 - 1];
    r.slots = slots(&r.blocks);
    let out = generate(&mut shard.client, batch(1, vec![r])).await;
    assert_eq!(ids(&out[&1]), REFERENCE_IDS);
}

#[tokio::test]
async fn prefix_cache_hit_skips_cached_tokens_and_changes_nothing() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let mut blocks = Blocks::new();
    let first = request(1, "Once upon a time", 20, &mut blocks);
    let shared_block = first.blocks[0];
    let out = generate(&mut shard.client, batch(1, vec![first])).await;
    assert_eq!(ids(&out[&1]), REFERENCE_IDS);
    // The router found the first 4 prompt tokens in block `shared_block`: only the 5th is computed.
    let mut second = request(2, "Once upon a time", 20, &mut blocks);
    second.blocks[0] = shared_block;
    second.slots = slots(&second.blocks);
    second.cache_len = 4;
    let r = shard
        .client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(2, vec![second])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Outputs::new();
    collect(&mut out, r.generations);
    let mut cached = r.batch;
    while let Some(b) = cached {
        let d = pb::DecodeRequest { batches: vec![b] };
        let r = shard.client.decode(d).await.unwrap().into_inner();
        collect(&mut out, r.generations);
        cached = r.batch;
    }
    assert_eq!(ids(&out[&2]), REFERENCE_IDS);
}
