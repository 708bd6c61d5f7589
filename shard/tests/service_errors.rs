//! Every malformed RPC is answered with the right gRPC code, naming the field, while the shard
//! keeps serving: a held batch goes on decoding to the same result afterwards.

mod common;

use common::*;
use tessera_proto::v3 as pb;
use tonic::Code;

fn prefill(b: pb::Request) -> pb::PrefillRequest {
    pb::PrefillRequest {
        batch: Some(batch(50, vec![b])),
        cached_batch: None,
    }
}

#[tokio::test]
async fn errors_are_answered_and_the_shard_keeps_serving() {
    let mut shard = Shard::start(or_skip!(stories()), &["--initial-kv-blocks", "64"]).await;
    let c = &mut shard.client;
    let mut blocks = Blocks::new();
    // A batch in flight across all the errors below.
    let held = c
        .prefill(pb::PrefillRequest {
            batch: Some(batch(
                1,
                vec![request(1, "Once upon a time", 20, &mut blocks)],
            )),
            cached_batch: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Outputs::new();
    collect(&mut out, held.generations);
    let held = held.batch.unwrap();

    let unknown = pb::CachedBatch {
        id: 999,
        ..Default::default()
    };
    assert_status(
        c.decode(pb::DecodeRequest {
            batches: vec![unknown.clone()],
        })
        .await,
        Code::NotFound,
        "999",
    );
    assert_status(
        c.decode(pb::DecodeRequest {
            batches: vec![held.clone(), unknown.clone()],
        })
        .await,
        Code::NotFound,
        "999",
    );
    assert_status(
        c.filter_batch(pb::FilterBatchRequest {
            batch_id: 999,
            request_ids: vec![1],
        })
        .await,
        Code::NotFound,
        "999",
    );
    assert_status(
        c.prefill(pb::PrefillRequest {
            batch: Some(batch(51, vec![request(5, "Hi", 3, &mut blocks)])),
            cached_batch: Some(unknown),
        })
        .await,
        Code::NotFound,
        "999",
    );

    let base = || request(2, "Once upon a time", 8, &mut Blocks::new());
    let cases: Vec<(&str, pb::Request)> = vec![
        ("slots", {
            let mut r = base();
            r.slots.truncate(4);
            r
        }),
        ("blocks", {
            let mut r = base();
            r.blocks = vec![64];
            r.slots = vec![];
            r
        }),
        ("slots", {
            let mut r = base();
            r.slots.swap(0, 20);
            r
        }),
        ("inputs", {
            let mut r = base();
            r.inputs.clear();
            r
        }),
        ("parameters.temperature", {
            let mut r = base();
            r.parameters.as_mut().unwrap().temperature = -1.0;
            r
        }),
        ("parameters.top_p", {
            let mut r = base();
            r.parameters.as_mut().unwrap().top_p = 2.0;
            r
        }),
        ("stopping_parameters.max_new_tokens", {
            let mut r = base();
            r.stopping_parameters.as_mut().unwrap().max_new_tokens = 0;
            r
        }),
        ("stopping_parameters.max_new_tokens", {
            // 5 prompt tokens + 600 new ones overflow the 512 positions of stories260K.
            let mut r = request(2, "Once upon a time", 600, &mut Blocks::new());
            r.blocks = (1..40).collect();
            r.slots = vec![];
            r
        }),
        ("cache_len", {
            let mut r = base();
            r.cache_len = 5;
            r
        }),
        ("chunk_len", {
            let mut r = base();
            r.chunk_len = Some(0);
            r
        }),
    ];
    for (field, r) in cases {
        let answer = c.prefill(prefill(r)).await;
        assert_status(
            answer,
            Code::InvalidArgument,
            &format!("batch.requests[0].{field}"),
        );
    }
    assert_status(
        c.prefill(pb::PrefillRequest {
            batch: None,
            cached_batch: None,
        })
        .await,
        Code::InvalidArgument,
        "batch",
    );
    assert_status(
        c.prefill(pb::PrefillRequest {
            batch: Some(batch(1, vec![base()])),
            cached_batch: None,
        })
        .await,
        Code::InvalidArgument,
        "batch.id",
    );
    let twice = batch(52, vec![base(), base()]);
    assert_status(
        c.prefill(pb::PrefillRequest {
            batch: Some(twice),
            cached_batch: None,
        })
        .await,
        Code::InvalidArgument,
        "appears twice",
    );
    assert_status(
        c.filter_batch(pb::FilterBatchRequest {
            batch_id: held.id,
            request_ids: vec![],
        })
        .await,
        Code::InvalidArgument,
        "request_ids",
    );
    assert_status(
        c.decode(pb::DecodeRequest { batches: vec![] }).await,
        Code::InvalidArgument,
        "batches",
    );

    // Still healthy, and the held batch finishes exactly as the reference.
    c.health(pb::HealthRequest {}).await.unwrap();
    let mut cached = Some(held);
    while let Some(b) = cached {
        let r = c
            .decode(pb::DecodeRequest { batches: vec![b] })
            .await
            .unwrap()
            .into_inner();
        collect(&mut out, r.generations);
        cached = r.batch;
    }
    assert_eq!(
        ids(&out[&1]),
        [
            432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410,
            408, 419, 292
        ]
    );
    // A decoded batch that finished is gone.
    assert_status(
        c.decode(pb::DecodeRequest {
            batches: vec![pb::CachedBatch {
                id: 1,
                ..Default::default()
            }],
        })
        .await,
        Code::NotFound,
        "1",
    );
}

#[tokio::test]
async fn clear_cache_drops_one_or_all_batches() {
    let mut shard = Shard::start(or_skip!(stories()), &[]).await;
    let c = &mut shard.client;
    let mut blocks = Blocks::new();
    for id in [1, 2, 3] {
        let r = request(id, "Once upon a time", 5, &mut blocks);
        c.prefill(pb::PrefillRequest {
            batch: Some(batch(id, vec![r])),
            cached_batch: None,
        })
        .await
        .unwrap();
    }
    let cached = |id| pb::DecodeRequest {
        batches: vec![pb::CachedBatch {
            id,
            ..Default::default()
        }],
    };
    c.clear_cache(pb::ClearCacheRequest { id: Some(2) })
        .await
        .unwrap();
    assert_status(c.decode(cached(2)).await, Code::NotFound, "2");
    c.decode(cached(1)).await.unwrap();
    c.clear_cache(pb::ClearCacheRequest { id: None })
        .await
        .unwrap();
    assert_status(c.decode(cached(1)).await, Code::NotFound, "1");
    assert_status(c.decode(cached(3)).await, Code::NotFound, "3");
}
