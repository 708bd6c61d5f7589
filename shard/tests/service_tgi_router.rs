//! Replays, over gRPC against a served shard, the messages TGI's own v3 router sends (as built by
//! its `backends/v3/src/client`): a warmup batch without blocks or slots whose requests are all
//! id 0, the `u64::MAX` health prefill into block 0, and requests carrying an `adapter_id` (an
//! OpenAI `model` other than "tgi"). Also: a request the shard refuses is logged and left out
//! without failing the rest of its batch.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use tessera_proto::v3::{self as pb, input_chunk::Chunk};
use tonic::Code;

/// Everything the shard logs in this test binary (the engine logs from its own thread, so the
/// subscriber is the global one).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .init();
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines containing every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// A SmolLM2 shard (a real BPE tokenizer for TGI's warmup text) whose log lines this binary
/// captures.
async fn shard(extra: &[&str]) -> Shard {
    logs();
    Shard::start(smollm2_hf(), extra).await
}

/// Stands in for TGI's `WARMUP_IMAGE_BASE64` (a tiny JPEG): to a text-only shard it is prompt text.
const IMAGE_BASE64: &str = "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////";

/// TGI's `Client::warmup`: prompts of `max_input_tokens` "_test " words (the first with a
/// markdown image) truncated so that their sum is `max_prefill_tokens`, all id 0, no blocks or
/// slots, every sampling processor on, prompt logprobs and 20 top tokens.
fn tgi_warmup(
    max_input_tokens: u32,
    max_prefill_tokens: u32,
    max_total_tokens: u32,
) -> pb::WarmupRequest {
    let mut requests = Vec::new();
    let mut n_tokens = 0;
    while n_tokens < max_prefill_tokens {
        let truncate = max_input_tokens.min(max_prefill_tokens - n_tokens);
        let words = "_test ".repeat(max_input_tokens as usize);
        let mut chunks = vec![pb::InputChunk {
            chunk: Some(Chunk::Text(words.clone())),
        }];
        let mut inputs = words;
        if n_tokens == 0 {
            chunks.push(pb::InputChunk {
                chunk: Some(Chunk::Image(pb::Image {
                    data: vec![0xff, 0xd8, 0xff, 0xe0],
                    mimetype: "image/jpeg;base64".into(),
                })),
            });
            inputs.push_str(&format!("![](data:image/jpeg;base64,{IMAGE_BASE64})"));
        }
        requests.push(pb::Request {
            id: 0,
            inputs,
            input_chunks: Some(pb::Input { chunks }),
            add_special_tokens: true,
            truncate,
            blocks: vec![],
            slots: vec![],
            cache_len: 0,
            chunk_len: None,
            generated_ids: Vec::new(),
            parameters: Some(pb::NextTokenChooserParameters {
                temperature: 0.9,
                top_k: 10,
                top_p: 0.9,
                typical_p: 0.9,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.2,
                frequency_penalty: 0.1,
                watermark: true,
                ..Default::default()
            }),
            stopping_parameters: Some(pb::StoppingCriteriaParameters {
                max_new_tokens: max_total_tokens - truncate,
                stop_sequences: vec![],
                ignore_eos_token: true,
            }),
            prefill_logprobs: true,
            top_n_tokens: 20,
            adapter_id: None,
        });
        n_tokens += truncate;
    }
    pb::WarmupRequest {
        batch: Some(pb::Batch {
            id: 0,
            size: requests.len() as u32,
            requests,
            max_tokens: max_input_tokens,
            max_blocks: 0,
        }),
        max_input_tokens: Some(max_input_tokens),
        max_prefill_tokens,
        max_total_tokens: Some(max_total_tokens),
    }
}

/// TGI's `model_health`: one "liveness" token generated into block 0, which its block
/// allocators never hand out.
fn tgi_health() -> pb::PrefillRequest {
    let request = pb::Request {
        id: u64::MAX,
        inputs: "liveness".into(),
        input_chunks: Some(pb::Input {
            chunks: vec![pb::InputChunk {
                chunk: Some(Chunk::Text("liveness".into())),
            }],
        }),
        truncate: 10,
        prefill_logprobs: false,
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: 1.0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: 1,
            stop_sequences: vec![],
            ignore_eos_token: false,
        }),
        top_n_tokens: 0,
        blocks: vec![0],
        slots: (0..16).collect(),
        add_special_tokens: true,
        ..Default::default()
    };
    pb::PrefillRequest {
        batch: Some(pb::Batch {
            id: u64::MAX,
            requests: vec![request],
            size: 1,
            max_tokens: 2,
            max_blocks: 1,
        }),
        cached_batch: None,
    }
}

/// `out` by request id, printed: equal texts mean equal outputs (the first prompt token's logprob
/// is NaN, which `==` would never call equal).
fn printed(out: &Outputs) -> String {
    format!(
        "{:?}",
        out.iter().collect::<std::collections::BTreeMap<_, _>>()
    )
}

async fn prefill(client: &mut Client, request: pb::PrefillRequest) -> pb::PrefillResponse {
    client.prefill(request).await.expect("prefill").into_inner()
}

#[tokio::test]
async fn warmup_without_blocks_and_with_repeated_ids_is_accepted() {
    let mut shard = shard(&["--kv-cache-memory", "100000000"]).await;
    let c = &mut shard.client;
    // --max-input-tokens 100 below --max-batch-prefill-tokens 256: three requests, all id 0.
    let warmup = tgi_warmup(100, 256, 200);
    let requests = &warmup.batch.as_ref().unwrap().requests;
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.id == 0 && r.blocks.is_empty()));
    let w = c.warmup(warmup).await.expect("warmup").into_inner();
    // SmolLM2-135M: 30 layers × K,V × 16 slots × 3 KV heads × 64 dims × 2 bytes (bf16) a block.
    let supported = 100_000_000 / (30 * 2 * 16 * 3 * 64 * 2) * 16;
    assert_eq!(w.max_supported_total_tokens, Some(supported));
    assert_eq!((w.max_input_tokens, w.max_total_tokens), (100, 200));
    // The warmup batch is gone, and the cache it sized serves a request in its last blocks.
    assert_status(
        c.decode(pb::DecodeRequest {
            batches: vec![pb::CachedBatch {
                id: 0,
                ..Default::default()
            }],
        })
        .await,
        Code::NotFound,
        "0",
    );
    let reference = generate(
        c,
        batch(
            1,
            vec![request(1, "Once upon a time", 20, &mut Blocks::new())],
        ),
    )
    .await;
    let mut r = request(1, "Once upon a time", 20, &mut Blocks::new());
    r.blocks = vec![supported / 16 - 2, supported / 16 - 1];
    r.slots = slots(&r.blocks);
    let out = generate(c, batch(2, vec![r])).await;
    assert_eq!(ids(&out[&1]), ids(&reference[&1]));
    assert_eq!(ids(&out[&1]).len(), 20);

    // A warmup that cannot run is still refused, naming the request.
    let mut bad = tgi_warmup(100, 256, 200);
    let second = &mut bad.batch.as_mut().unwrap().requests[1];
    second.inputs.clear();
    second.input_chunks = None;
    assert_status(
        c.warmup(bad).await,
        Code::InvalidArgument,
        "batch.requests[1].inputs",
    );
}

#[tokio::test]
async fn health_prefill_into_block_0_leaves_a_held_batch_alone() {
    let mut shard = shard(&[]).await;
    let c = &mut shard.client;
    c.warmup(tgi_warmup(64, 128, 128)).await.expect("warmup");
    let reference = generate(
        c,
        batch(
            1,
            vec![request(7, "Once upon a time", 12, &mut Blocks::new())],
        ),
    )
    .await;

    let held = prefill(
        c,
        pb::PrefillRequest {
            batch: Some(batch(
                2,
                vec![request(7, "Once upon a time", 12, &mut Blocks::new())],
            )),
            cached_batch: None,
        },
    )
    .await;
    let mut out = Outputs::new();
    collect(&mut out, held.generations);
    // Twice, as two /health calls would: each a finished one-token request, nothing kept.
    for _ in 0..2 {
        let health = prefill(c, tgi_health()).await;
        assert!(health.batch.is_none());
        assert_eq!(health.generations.len(), 1);
        let g = &health.generations[0];
        assert_eq!(g.request_id, u64::MAX);
        assert_eq!(g.tokens.as_ref().unwrap().ids.len(), 1);
        assert_eq!(g.generated_text.as_ref().unwrap().generated_tokens, 1);
    }
    decode_all(c, held.batch, &mut out).await;
    assert_eq!(out[&7], reference[&7]);
}

/// Requests 1..=3 of one batch, with `adapter` on the first two; seeded sampling on the second.
fn adapter_batch(id: u64, adapter: Option<&str>) -> pb::Batch {
    let mut blocks = Blocks::new();
    let mut requests = vec![
        request(1, "Once upon a time", 10, &mut blocks),
        request(2, "Tom and his dog", 10, &mut blocks),
        request(3, "The sun was", 10, &mut blocks),
    ];
    let p = requests[1].parameters.as_mut().unwrap();
    p.do_sample = true;
    p.temperature = 0.8;
    p.seed = 42;
    requests[0].top_n_tokens = 3;
    requests[0].prefill_logprobs = true;
    for r in &mut requests[..2] {
        r.adapter_id = adapter.map(str::to_string);
    }
    batch(id, requests)
}

/// Request 9 prefilled alone, then request 10 (with `adapter`) prefilled into its batch, decoded
/// to the end.
async fn joined(c: &mut Client, adapter: Option<&str>) -> Outputs {
    let mut out = Outputs::new();
    let held = prefill(
        c,
        pb::PrefillRequest {
            batch: Some(batch(
                3,
                vec![request(9, "Once upon a time", 10, &mut Blocks::new())],
            )),
            cached_batch: None,
        },
    )
    .await;
    collect(&mut out, held.generations);
    let mut joining = request(10, "Tom and his dog", 10, &mut Blocks::new());
    joining.blocks = joining.blocks.iter().map(|b| b + 20).collect();
    joining.slots = slots(&joining.blocks);
    joining.adapter_id = adapter.map(str::to_string);
    let merged = prefill(
        c,
        pb::PrefillRequest {
            batch: Some(batch(4, vec![joining])),
            cached_batch: held.batch,
        },
    )
    .await;
    assert_eq!(merged.batch.as_ref().unwrap().request_ids, [9, 10]);
    collect(&mut out, merged.generations);
    decode_all(c, merged.batch, &mut out).await;
    assert_eq!((ids(&out[&9]).len(), ids(&out[&10]).len()), (10, 10));
    out
}

#[tokio::test]
async fn adapter_ids_are_served_with_the_base_model() {
    let mut shard = shard(&[]).await;
    let c = &mut shard.client;
    let base = generate(c, adapter_batch(1, None)).await;
    assert_eq!(base.len(), 3);
    for adapter in ["some-model", "", "some-model"] {
        let out = generate(c, adapter_batch(2, Some(adapter))).await;
        assert_eq!(printed(&out), printed(&base), "adapter_id {adapter:?}");
    }
    // A request joining a running batch (TGI's chunking Prefill) with an adapter id.
    let with = joined(c, Some("some-model")).await;
    assert_eq!(printed(&with), printed(&joined(c, None).await));
    // Logged once for the id, however many requests named it.
    let lines = log_lines(&["some-model", "base model"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
}

#[tokio::test]
async fn a_refused_request_is_logged_and_its_batch_goes_on() {
    let mut shard = shard(&[]).await;
    let c = &mut shard.client;
    let mut blocks = Blocks::new();
    let good = vec![
        request(101, "Once upon a time", 8, &mut blocks),
        request(103, "The sun was", 8, &mut blocks),
    ];
    let reference = generate(c, batch(1, good.clone())).await;

    // A grammar that does not compile between the two.
    let mut grammar = request(102, "Tom and his dog", 8, &mut blocks);
    grammar.parameters.as_mut().unwrap().grammar = "[a-z+".into();
    grammar.parameters.as_mut().unwrap().grammar_type = pb::GrammarType::Regex as i32;
    let mixed = vec![good[0].clone(), grammar.clone(), good[1].clone()];
    let first = prefill(
        c,
        pb::PrefillRequest {
            batch: Some(batch(2, mixed)),
            cached_batch: None,
        },
    )
    .await;
    let held = first.batch.clone().unwrap();
    assert_eq!(held.request_ids, [101, 103]);
    assert!(first.generations.iter().all(|g| g.request_id != 102));
    let mut out = Outputs::new();
    collect(&mut out, first.generations);

    // Refused while joining the held batch: the held requests go on.
    let mut too_long = request(104, "Once upon a time", 8, &mut blocks);
    too_long.slots.truncate(3);
    let joined = prefill(
        c,
        pb::PrefillRequest {
            batch: Some(batch(3, vec![too_long])),
            cached_batch: Some(held),
        },
    )
    .await;
    assert_eq!(joined.batch.as_ref().unwrap().request_ids, [101, 103]);
    collect(&mut out, joined.generations);
    decode_all(c, joined.batch, &mut out).await;
    assert_eq!(out, reference);

    // With nothing left to run, the Prefill fails with the refusal.
    assert_status(
        c.prefill(pb::PrefillRequest {
            batch: Some(batch(4, vec![grammar])),
            cached_batch: None,
        })
        .await,
        Code::InvalidArgument,
        "batch.requests[0].parameters.grammar",
    );
    for (id, field) in [
        (102, "parameters.grammar"),
        (104, "batch.requests[0].slots"),
    ] {
        let lines = log_lines(&["request refused", &format!("request_id={id}"), field]);
        assert!(!lines.is_empty(), "no refusal logged for request {id}");
        assert!(lines.iter().all(|l| l.contains("WARN")), "{lines:?}");
    }
}
