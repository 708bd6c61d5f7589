//! Shared harness of the service tests: a shard served in-process on a real unix socket in a
//! temporary directory, a real tonic client, request builders and a block allocator.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use tessera_proto::v3 as pb;
use tessera_proto::TextGenerationServiceClient;
use tessera_shard::serve::{bind, connect, serve_listener, start_engine, ServeArgs};
use tessera_shard::service::ShardService;
use tokio::sync::oneshot;
use tonic::transport::Channel;

#[path = "../../../tests/support/paths.rs"]
mod paths;
pub use paths::*;

pub type Client = TextGenerationServiceClient<Channel>;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// A running shard; dropping it stops the server.
pub struct Shard {
    pub client: Client,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl Shard {
    /// Serves `model` with extra `serve` flags, parsed exactly as the binary parses them.
    pub async fn start(model: PathBuf, extra: &[&str]) -> Shard {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("shard").display().to_string();
        let mut argv = vec!["serve", "--uds-path", &uds, "--model-id"];
        let model = model.display().to_string();
        argv.push(&model);
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).expect("serve args").serve;
        let engine = start_engine(args.clone()).await.expect("engine");
        let socket = args.socket();
        let listener = bind(&socket).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = ShardService::new(engine, uds, args.world_size);
        tokio::spawn(serve_listener(listener, service, async {
            let _ = stopped.await;
        }));
        let client = connect(&socket).await.expect("connect");
        Shard {
            client,
            socket,
            _dir: dir,
            _stop: stop,
        }
    }
}

/// Hands out whole blocks after block 0 (reserved for health checks), like the router.
pub struct Blocks {
    next: u32,
}

impl Blocks {
    pub fn new() -> Self {
        Blocks { next: 1 }
    }

    /// Blocks for `tokens` positions.
    pub fn take(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(16) as u32;
        let blocks = (self.next..self.next + n).collect();
        self.next += n;
        blocks
    }
}

/// The slot of every position of `blocks` (block size 16).
pub fn slots(blocks: &[u32]) -> Vec<u32> {
    blocks.iter().flat_map(|b| b * 16..b * 16 + 16).collect()
}

pub fn greedy() -> pb::NextTokenChooserParameters {
    pb::NextTokenChooserParameters {
        temperature: 1.0,
        top_p: 1.0,
        typical_p: 1.0,
        repetition_penalty: 1.0,
        ..Default::default()
    }
}

/// A greedy request with room for its prompt (at most one token per byte, plus BOS) and output.
pub fn request(id: u64, text: &str, max_new: u32, blocks: &mut Blocks) -> pb::Request {
    let b = blocks.take(text.len() + 1 + max_new as usize);
    pb::Request {
        id,
        inputs: text.into(),
        parameters: Some(greedy()),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: max_new,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        slots: slots(&b),
        blocks: b,
        add_special_tokens: true,
        ..Default::default()
    }
}

pub fn batch(id: u64, requests: Vec<pb::Request>) -> pb::Batch {
    pb::Batch {
        id,
        size: requests.len() as u32,
        requests,
        ..Default::default()
    }
}

/// Generations of a batch, by request id.
pub type Outputs = HashMap<u64, Vec<pb::Generation>>;

pub fn collect(out: &mut Outputs, generations: Vec<pb::Generation>) {
    for g in generations {
        out.entry(g.request_id).or_default().push(g);
    }
}

/// Prefills `b` and decodes until every request is done.
pub async fn generate(client: &mut Client, b: pb::Batch) -> Outputs {
    let mut out = Outputs::new();
    let r = client
        .prefill(pb::PrefillRequest {
            batch: Some(b),
            cached_batch: None,
        })
        .await
        .expect("prefill")
        .into_inner();
    collect(&mut out, r.generations);
    decode_all(client, r.batch, &mut out).await;
    out
}

/// Decodes `cached` until every request is done, adding to `out`.
pub async fn decode_all(
    client: &mut Client,
    mut cached: Option<pb::CachedBatch>,
    out: &mut Outputs,
) {
    while let Some(batch) = cached {
        let r = client
            .decode(pb::DecodeRequest {
                batches: vec![batch],
            })
            .await
            .expect("decode")
            .into_inner();
        collect(out, r.generations);
        cached = r.batch;
    }
}

/// Generated ids of one request.
pub fn ids(gens: &[pb::Generation]) -> Vec<u32> {
    gens.iter()
        .flat_map(|g| g.tokens.as_ref().unwrap().ids.clone())
        .collect()
}

/// Streamed texts of one request, concatenated.
pub fn streamed(gens: &[pb::Generation]) -> String {
    gens.iter()
        .flat_map(|g| g.tokens.as_ref().unwrap().texts.clone())
        .collect()
}

/// The final `generated_text` of one request.
pub fn finished(gens: &[pb::Generation]) -> pb::GeneratedText {
    gens.last()
        .and_then(|g| g.generated_text.clone())
        .expect("request finished")
}

/// Asserts `status` has `code` and mentions `needle`.
pub fn assert_status(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    let status = result.expect_err("an error");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}
