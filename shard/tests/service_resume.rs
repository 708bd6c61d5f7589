//! KV on demand and resumption over gRPC on SmolLM2: a request that starts with blocks for its
//! prompt only and is granted more as it grows, then is dropped mid-generation and resumed from its
//! prompt plus the tokens it generated (`generated_ids`) on other blocks, gives the ids and text of an
//! undisturbed run with up-front blocks — greedy with penalties, and seeded sampling.

mod common;

use common::*;
use tessera_proto::v3 as pb;

const PROMPT: &str = "Once upon a time, in a village by the sea, there lived";
const NEW: u32 = 40;
/// Tokens generated before the request is dropped and resumed.
const BEFORE: usize = 13;

fn penalized(id: u64, blocks: &mut Blocks) -> pb::Request {
    let mut r = request(id, PROMPT, NEW, blocks);
    let p = r.parameters.as_mut().unwrap();
    p.repetition_penalty = 1.2;
    p.frequency_penalty = 0.3;
    r
}

fn sampled(id: u64, blocks: &mut Blocks) -> pb::Request {
    let mut r = request(id, PROMPT, NEW, blocks);
    let p = r.parameters.as_mut().unwrap();
    p.do_sample = true;
    p.temperature = 0.9;
    p.top_k = 50;
    p.seed = 1234;
    r
}

/// Blocks for the prompt only (at most one token per byte, plus BOS): the rest is granted.
fn on_demand(mut r: pb::Request, blocks: &mut Blocks) -> pb::Request {
    r.blocks = blocks.take(PROMPT.len() + 1);
    r.slots = Vec::new();
    r
}

/// Decodes `batch` while `keep_going` holds, granting a block to every request before its next
/// position would leave the ones it holds (`capacity` positions each).
async fn decode_granting(
    client: &mut Client,
    mut batch: Option<pb::CachedBatch>,
    out: &mut Outputs,
    blocks: &mut Blocks,
    capacity: &mut std::collections::HashMap<u64, usize>,
    keep_going: impl Fn(&Outputs) -> bool,
) -> Option<pb::CachedBatch> {
    while let Some(mut b) = batch.take() {
        if !keep_going(out) {
            return Some(b);
        }
        for &id in &b.request_ids {
            let held = capacity.get_mut(&id).unwrap();
            // Upper bound of the positions fed so far: prompt bytes + BOS + generated.
            let next = PROMPT.len() + 1 + out.get(&id).map_or(0, Vec::len);
            if next >= *held {
                b.kv_grants.push(pb::KvGrant {
                    request_id: id,
                    blocks: blocks.take(16),
                });
                *held += 16;
            }
        }
        let r = client
            .decode(pb::DecodeRequest { batches: vec![b] })
            .await
            .expect("decode")
            .into_inner();
        collect(out, r.generations);
        batch = r.batch;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn granted_and_resumed_requests_equal_an_undisturbed_run() {
    let mut shard = Shard::start(smollm2_gguf(), &[]).await;
    let client = &mut shard.client;
    let mut blocks = Blocks::new();

    // Undisturbed, with blocks for the whole request up front.
    let reference = generate(
        client,
        batch(0, vec![penalized(1, &mut blocks), sampled(2, &mut blocks)]),
    )
    .await;

    // On demand: blocks for the prompt, grants as the requests grow, until BEFORE tokens.
    let requests = vec![
        on_demand(penalized(1, &mut blocks), &mut blocks),
        on_demand(sampled(2, &mut blocks), &mut blocks),
    ];
    let mut capacity = requests
        .iter()
        .map(|r| (r.id, r.blocks.len() * 16))
        .collect();
    let r = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(1, requests)),
            cached_batch: None,
        })
        .await
        .expect("prefill")
        .into_inner();
    let mut out = Outputs::new();
    collect(&mut out, r.generations);
    let before = |o: &Outputs| o.values().all(|g| g.len() < BEFORE);
    let held = decode_granting(
        client,
        r.batch,
        &mut out,
        &mut blocks,
        &mut capacity,
        before,
    )
    .await
    .expect("still running");

    // Preempted: the shard drops the batch; the requests come back on fresh blocks with the
    // tokens they generated, and go on.
    client
        .clear_cache(pb::ClearCacheRequest { id: Some(held.id) })
        .await
        .unwrap();
    let resumed: Vec<pb::Request> = [penalized(1, &mut blocks), sampled(2, &mut blocks)]
        .into_iter()
        .map(|mut r| {
            r.generated_ids = ids(&out[&r.id]);
            r.blocks = blocks.take(PROMPT.len() + 1 + r.generated_ids.len());
            r.slots = Vec::new();
            capacity.insert(r.id, r.blocks.len() * 16);
            r
        })
        .collect();
    let r = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(2, resumed)),
            cached_batch: None,
        })
        .await
        .expect("resume")
        .into_inner();
    collect(&mut out, r.generations);
    let rest = decode_granting(
        client,
        r.batch,
        &mut out,
        &mut blocks,
        &mut capacity,
        |_| true,
    );
    assert!(rest.await.is_none());

    for id in [1, 2] {
        let (want, got) = (&reference[&id], &out[&id]);
        assert_eq!(ids(got), ids(want), "request {id}: ids");
        assert_eq!(streamed(got), streamed(want), "request {id}: streamed text");
        let (f, w) = (finished(got), finished(want));
        assert_eq!(f.text, w.text, "request {id}: generated_text");
        assert_eq!(f.generated_tokens, NEW);
        assert_eq!(f.seed, w.seed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_grants_and_finished_replays_are_refused_and_the_batch_goes_on() {
    let mut shard = Shard::start(smollm2_gguf(), &[]).await;
    let client = &mut shard.client;
    let mut blocks = Blocks::new();
    let tight = on_demand(request(1, PROMPT, 100, &mut blocks), &mut blocks);
    let held = tight.blocks.len() * 16;
    let r = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(0, vec![tight])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let batch0 = r.batch.unwrap();

    let mut unknown = batch0.clone();
    unknown.kv_grants.push(pb::KvGrant {
        request_id: 99,
        blocks: vec![40],
    });
    let refused = client
        .decode(pb::DecodeRequest {
            batches: vec![unknown],
        })
        .await;
    assert_status(
        refused,
        tonic::Code::InvalidArgument,
        "request 99 is not in",
    );
    let mut past = batch0.clone();
    past.kv_grants.push(pb::KvGrant {
        request_id: 1,
        blocks: vec![u32::MAX],
    });
    let refused = client
        .decode(pb::DecodeRequest {
            batches: vec![past],
        })
        .await;
    assert_status(refused, tonic::Code::InvalidArgument, "past the KV cache");

    // Without grants the request decodes until its blocks are full, then the forward is refused.
    let mut out = Outputs::new();
    let mut cached = Some(batch0);
    let error = loop {
        let b = cached
            .take()
            .expect("the request outgrows its blocks first");
        match client.decode(pb::DecodeRequest { batches: vec![b] }).await {
            Ok(r) => {
                let r = r.into_inner();
                collect(&mut out, r.generations);
                cached = r.batch;
            }
            Err(status) => break status,
        }
    };
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("no KV slot"),
        "{}",
        error.message()
    );
    assert!(ids(&out[&1]).len() < held);

    // A replay that already reached its end (max_new_tokens) is refused alone.
    let mut done = request(2, PROMPT, 3, &mut blocks);
    done.generated_ids = vec![12, 13, 14];
    let fine = request(3, PROMPT, 2, &mut blocks);
    let r = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(5, vec![done, fine])),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let served: Vec<u64> = r.generations.iter().map(|g| g.request_id).collect();
    assert_eq!(served, vec![3]);
}
