//! The `generate.v3.TextGenerationService` gRPC layer: converts messages to the engine's domain
//! types and back, and maps [`Error`] to `tonic::Status` in the one `From` below. No model work
//! happens here; every RPC is one command to the engine thread.

use std::collections::HashSet;
use std::sync::Mutex;

use tessera_proto::v3::{self as pb, input_chunk::Chunk};
use tessera_proto::TextGenerationService;
use tonic::{Request, Response, Status};

use crate::engine::{
    BatchInfo, EngineHandle, GenerationOut, KvGrant, NewBatch, NewRequest, Refused, StepOut,
    TokenOut, WarmupIn,
};
use crate::sampling::SamplingParams;
use crate::stopping::StopParams;
use crate::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            // Input tokenization failures arrive as InvalidArgument("inputs"); a Tokenizer error
            // is a decode failure inside the engine.
            Error::InvalidArgument { .. } | Error::InvalidBatch(_) => {
                Status::invalid_argument(message)
            }
            Error::BatchNotFound(_) => Status::not_found(message),
            Error::EngineStopped => Status::unavailable(message),
            _ => Status::internal(message),
        }
    }
}

/// Distinct adapter ids remembered for logging; past this, new ones are no longer logged one by
/// one (the ids come from clients, so the set must not grow without bound).
const ADAPTER_IDS_LOGGED: usize = 64;

/// The gRPC service of one rank.
pub struct ShardService {
    engine: EngineHandle,
    uds_path: String,
    world_size: usize,
    adapter_ids_seen: Mutex<HashSet<String>>,
}

impl ShardService {
    /// `uds_path` is the socket prefix shared by all ranks (each serves `{uds_path}-{rank}`).
    pub fn new(engine: EngineHandle, uds_path: impl Into<String>, world_size: usize) -> Self {
        ShardService {
            engine,
            uds_path: uds_path.into(),
            world_size,
            adapter_ids_seen: Mutex::new(HashSet::new()),
        }
    }

    /// No LoRA adapters are ever loaded here, so every request runs on the base model, as TGI's
    /// server does with an adapter id it has not loaded (TGI's router turns an OpenAI `model`
    /// other than "tgi" into one). Says so once per distinct id.
    fn note_adapters(&self, batch: Option<&pb::Batch>) {
        let ids = batch
            .into_iter()
            .flat_map(|b| &b.requests)
            .filter_map(|r| r.adapter_id.as_deref())
            .filter(|a| !a.is_empty());
        let mut seen = self
            .adapter_ids_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in ids {
            if seen.len() > ADAPTER_IDS_LOGGED || seen.contains(id) {
                continue;
            }
            if seen.len() == ADAPTER_IDS_LOGGED {
                tracing::warn!(
                    "{ADAPTER_IDS_LOGGED} distinct adapter ids seen: further ones are served with the base model without a log line"
                );
                seen.insert(String::new());
                continue;
            }
            tracing::warn!(
                adapter_id = id,
                "no LoRA adapter is loaded: requests naming adapter {id:?} are served with the base model"
            );
            seen.insert(id.to_string());
        }
    }
}

fn invalid(field: String, reason: &str) -> Error {
    Error::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Names a request's field the way the engine does: `batch.requests[i].field`.
fn in_request(e: Error, index: usize) -> Error {
    match e {
        Error::InvalidArgument { field, reason } => Error::InvalidArgument {
            field: format!("batch.requests[{index}].{field}"),
            reason,
        },
        e => e,
    }
}

/// The prompt text: `inputs`, or the text chunks of `input_chunks` when `inputs` is empty.
fn prompt_text(r: &pb::Request) -> Result<String, Error> {
    if !r.inputs.is_empty() {
        return Ok(r.inputs.clone());
    }
    let mut text = String::new();
    for chunk in r.input_chunks.iter().flat_map(|i| &i.chunks) {
        match &chunk.chunk {
            Some(Chunk::Text(t)) => text.push_str(t),
            Some(Chunk::Image(_)) => {
                return Err(invalid("input_chunks".into(), "images are not supported"))
            }
            None => {}
        }
    }
    Ok(text)
}

/// Converts one request; `adapter_id` is ignored (see [`ShardService::note_adapters`]). Numbers
/// are carried unchanged (no arithmetic here); the router's `router/src/validation.rs` is the
/// single source of request validity, and the checks in `SamplingParams::from_proto`,
/// `StopParams::from_proto` and the engine's `Seq::new` only catch what a router let through.
fn new_request(r: pb::Request) -> Result<NewRequest, Error> {
    Ok(NewRequest {
        id: r.id,
        inputs: prompt_text(&r)?,
        truncate: r.truncate,
        add_special_tokens: r.add_special_tokens,
        sampling: SamplingParams::from_proto(r.parameters.as_ref())?,
        stop: StopParams::from_proto(r.stopping_parameters.as_ref())?,
        prefill_logprobs: r.prefill_logprobs,
        top_n_tokens: r.top_n_tokens,
        blocks: r.blocks,
        slots: r.slots,
        cache_len: r.cache_len,
        chunk_len: r.chunk_len,
        generated: r.generated_ids,
    })
}

/// The KV grants the router attached to the batches of a forward.
fn kv_grants<'a>(batches: impl IntoIterator<Item = &'a pb::CachedBatch>) -> Vec<KvGrant> {
    batches
        .into_iter()
        .flat_map(|b| &b.kv_grants)
        .map(|g| KvGrant {
            request_id: g.request_id,
            blocks: g.blocks.clone(),
        })
        .collect()
}

/// Converts a batch; a request that does not convert is carried as refused, so the engine can
/// serve the others.
fn new_batch(batch: Option<pb::Batch>) -> Result<NewBatch, Error> {
    let batch = batch.ok_or_else(|| invalid("batch".into(), "missing"))?;
    let requests = batch
        .requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let id = r.id;
            new_request(r).map_err(|e| Refused {
                id,
                error: in_request(e, i),
            })
        })
        .collect();
    Ok(NewBatch {
        id: batch.id,
        requests,
    })
}

fn cached_batch(b: BatchInfo) -> pb::CachedBatch {
    pb::CachedBatch {
        id: b.id,
        size: u32::try_from(b.request_ids.len()).unwrap_or(u32::MAX),
        request_ids: b.request_ids,
        max_tokens: b.max_tokens,
        current_tokens: b.current_tokens,
        kv_grants: Vec::new(),
    }
}

fn tokens(list: Vec<TokenOut>) -> pb::Tokens {
    let mut t = pb::Tokens::default();
    for token in list {
        t.ids.push(token.id);
        t.logprobs.push(token.logprob);
        t.texts.push(token.text);
        t.is_special.push(token.special);
    }
    t
}

fn generation(g: GenerationOut) -> pb::Generation {
    pb::Generation {
        request_id: g.request_id,
        prefill_tokens: g.prefill.map(tokens),
        tokens: Some(tokens(vec![g.token])),
        generated_text: g.finished.map(|f| pb::GeneratedText {
            text: f.text,
            generated_tokens: f.generated_tokens,
            finish_reason: f.reason as i32,
            seed: f.seed,
        }),
        // One list per generated token (one token per step: no speculation).
        top_tokens: vec![tokens(g.top)],
    }
}

/// Prefill and Decode answer the same fields.
fn step_parts(out: StepOut) -> (Vec<pb::Generation>, Option<pb::CachedBatch>) {
    let generations = out.generations.into_iter().map(generation).collect();
    (generations, out.batch.map(cached_batch))
}

#[tonic::async_trait]
impl TextGenerationService for ShardService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let info = self.engine.info().await?;
        Ok(Response::new(pb::InfoResponse {
            requires_padding: false,
            dtype: info.dtype,
            device_type: info.device_type,
            window_size: info.window_size,
            speculate: 0,
            support_chunking: true,
            use_prefix_caching: true,
            attention_impl: "paged".into(),
            block_size: info.block_size,
        }))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        let urls = (0..self.world_size)
            .map(|r| tessera_proto::uds::shard_url(&self.uds_path, r))
            .collect();
        Ok(Response::new(pb::ServiceDiscoveryResponse { urls }))
    }

    async fn clear_cache(
        &self,
        request: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.engine.clear_cache(request.into_inner().id).await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        request: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let r = request.into_inner();
        let batch = self.engine.filter(r.batch_id, r.request_ids).await?;
        Ok(Response::new(pb::FilterBatchResponse {
            batch: Some(cached_batch(batch)),
        }))
    }

    async fn warmup(
        &self,
        request: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = request.into_inner();
        self.note_adapters(r.batch.as_ref());
        let out = self
            .engine
            .warmup(WarmupIn {
                batch: new_batch(r.batch)?,
                max_input_tokens: r.max_input_tokens,
                max_prefill_tokens: r.max_prefill_tokens,
                max_total_tokens: r.max_total_tokens,
            })
            .await?;
        Ok(Response::new(pb::WarmupResponse {
            max_supported_total_tokens: Some(out.max_supported_total_tokens),
            max_input_tokens: out.max_input_tokens,
            max_total_tokens: out.max_total_tokens,
        }))
    }

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let r = request.into_inner();
        self.note_adapters(r.batch.as_ref());
        let batch = new_batch(r.batch)?;
        let grants = kv_grants(&r.cached_batch);
        let out = self
            .engine
            .prefill(batch, r.cached_batch.map(|c| c.id), grants)
            .await?;
        let t = out.timings;
        let (generations, batch) = step_parts(out);
        Ok(Response::new(pb::PrefillResponse {
            generations,
            batch,
            forward_ns: t.forward_ns,
            decode_ns: t.decode_ns,
            total_ns: t.total_ns,
            concat_ns: t.concat_ns,
        }))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let batches = request.into_inner().batches;
        let ids = batches.iter().map(|b| b.id).collect();
        let out = self.engine.decode(ids, kv_grants(&batches)).await?;
        let t = out.timings;
        let (generations, batch) = step_parts(out);
        Ok(Response::new(pb::DecodeResponse {
            generations,
            batch,
            forward_ns: t.forward_ns,
            decode_ns: t.decode_ns,
            total_ns: t.total_ns,
            concat_ns: t.concat_ns,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.engine.health().await?;
        Ok(Response::new(pb::HealthResponse {}))
    }
}
