//! TGI's HTTP request and response types (`/generate`, `/generate_stream`, `/`, `/tokenize`, `/info`),
//! field for field as TGI's `router/src/lib.rs` spells them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Sampling and stopping parameters of a TGI request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct GenerateParameters {
    /// Generate `best_of` sequences and return the one with the highest mean token logprob.
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty (a Tessera extension on this route).
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub typical_p: Option<f32>,
    /// Sample instead of greedy decoding. Any of temperature/top_k/top_p/typical_p also turns it on.
    #[serde(default)]
    pub do_sample: bool,
    /// Default: everything the context leaves (`max_total_tokens - input tokens`).
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub truncate: Option<u32>,
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub top_n_tokens: Option<u32>,
    /// Admission priority under `--scheduling-policy priority`: lower runs first (vLLM's convention;
    /// a Tessera extension on this route). Ignored under `fcfs`.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Min-p sampling in [0, 1] (a Tessera extension, as vLLM's `min_p`); 0 is off.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Token id → bias in [-100, 100] added to its logit (OpenAI's `logit_bias`; a Tessera extension
    /// on this route).
    #[serde(default)]
    pub logit_bias: Option<std::collections::HashMap<u32, f32>>,
    /// `{"type": "json"|"json_object", "value": schema}`, `{"type": "regex", "value": "…"}` or
    /// `{"type": "json_schema", "value": {"name", "schema"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<GrammarParam>,
    #[serde(default)]
    pub adapter_id: Option<String>,
}

/// TGI's `grammar` parameter: a JSON schema (object, or a string holding one), a regex, or an
/// OpenAI-style `json_schema` wrapper.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum GrammarParam {
    #[serde(rename = "json", alias = "json_object")]
    Json(serde_json::Value),
    #[serde(rename = "regex")]
    Regex(String),
    #[serde(rename = "json_schema")]
    JsonSchema(JsonSchemaConfig),
}

/// `{"name"?, "description"?, "strict"?, "schema"}` as OpenAI's `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct JsonSchemaConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub strict: Option<bool>,
    pub schema: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
}

/// The `/` route's body: `/generate` or `/generate_stream` depending on `stream`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompatGenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    pub fn from_proto(value: i32) -> Self {
        match tessera_proto::v3::FinishReason::try_from(value) {
            Ok(tessera_proto::v3::FinishReason::EosToken) => FinishReason::EosToken,
            Ok(tessera_proto::v3::FinishReason::StopSequence) => FinishReason::StopSequence,
            _ => FinishReason::Length,
        }
    }

    /// OpenAI's vocabulary: only `stop` and `length`.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken | FinishReason::StopSequence => "stop",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    /// 1-based position of the token in the generation.
    pub index: u32,
    pub token: Token,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

/// One token of `/tokenize`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenizeResponse {
    pub tokenize_response: Vec<SimpleToken>,
    pub templated_text: String,
}

/// `/info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub validation_workers: usize,
    pub max_client_batch_size: usize,
    pub router: &'static str,
    pub version: &'static str,
    pub sha: Option<String>,
    pub docker_label: Option<String>,
    /// Tessera additions: what the shards reported.
    pub max_batch_total_tokens: u32,
    pub block_size: u32,
    pub support_chunking: bool,
    pub prefix_caching: bool,
    pub world_size: usize,
}
