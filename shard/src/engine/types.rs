//! The engine's domain types: validated requests in, generations and batch handles out. The gRPC
//! layer (`service.rs`) converts `generate.v3` messages to and from these; the engine never sees proto.

use tessera_proto::v3::FinishReason;

use crate::sampling::SamplingParams;
use crate::stopping::StopParams;
use crate::Error;

/// One validated request of a new batch; tokenization happens on the engine thread.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: u64,
    pub inputs: String,
    /// Keep only the last `truncate` prompt tokens (0: no truncation).
    pub truncate: u32,
    pub add_special_tokens: bool,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub prefill_logprobs: bool,
    pub top_n_tokens: u32,
    /// KV blocks of this request, in position order.
    pub blocks: Vec<u32>,
    /// KV slot of every position (empty: derived from `blocks`).
    pub slots: Vec<u32>,
    /// Prompt tokens whose KV the prefix cache already holds.
    pub cache_len: u32,
    /// Tokens to compute in the first forward (chunked prefill); `None`: the whole prompt.
    pub chunk_len: Option<u32>,
    /// Tokens already generated, when the router resumes the request (after a preemption or a
    /// shard restart): computed after the prompt, and replayed through sampler, stop criteria and
    /// detokenizer so the next token is the one an undisturbed run would choose.
    pub generated: Vec<u32>,
}

/// More KV blocks for a held request (KV on demand), appended to its block table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGrant {
    pub request_id: u64,
    pub blocks: Vec<u32>,
}

/// A request of a new batch that the shard will not serve, and why. Within a Prefill the rest of
/// the batch goes on without it (it gets no generation and is absent from the returned batch).
#[derive(Debug)]
pub struct Refused {
    pub id: u64,
    /// Names the field as `batch.requests[i].field`.
    pub error: Error,
}

/// A new batch named by the router, in its order: each request converted, or refused.
#[derive(Debug)]
pub struct NewBatch {
    pub id: u64,
    pub requests: Vec<Result<NewRequest, Refused>>,
}

/// What the router holds of a batch kept by the engine (`CachedBatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub id: u64,
    pub request_ids: Vec<u64>,
    /// KV capacity of the batch: blocks × block size.
    pub max_tokens: u32,
    /// Tokens the next forward of this batch will compute.
    pub current_tokens: u32,
}

/// One token with its logprob, text and special flag.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub text: String,
    pub special: bool,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub text: String,
    pub generated_tokens: u32,
    pub reason: FinishReason,
    pub seed: Option<u64>,
}

/// One generated token of one request (the `Generation` message).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOut {
    pub request_id: u64,
    /// Prompt tokens with their logprobs, on the first token when `prefill_logprobs` was asked.
    pub prefill: Option<Vec<TokenOut>>,
    pub token: TokenOut,
    /// The `top_n_tokens` most likely alternatives.
    pub top: Vec<TokenOut>,
    pub finished: Option<Finished>,
}

/// Nanoseconds spent in one Prefill or Decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub forward_ns: u64,
    pub decode_ns: u64,
    pub total_ns: u64,
    pub concat_ns: Option<u64>,
}

/// Result of one Prefill or Decode; `batch` is `None` once every request finished.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOut {
    pub generations: Vec<GenerationOut>,
    pub batch: Option<BatchInfo>,
    pub timings: Timings,
}

/// The router's warmup: a max-size batch and its limits.
#[derive(Debug)]
pub struct WarmupIn {
    pub batch: NewBatch,
    pub max_input_tokens: Option<u32>,
    pub max_prefill_tokens: u32,
    pub max_total_tokens: Option<u32>,
}

/// Token limits derived from the KV cache sized by warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupOut {
    pub max_supported_total_tokens: u32,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
}

/// Static facts about the loaded model (the `Info` RPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub dtype: String,
    pub device_type: String,
    pub block_size: u32,
    pub window_size: Option<u32>,
}
