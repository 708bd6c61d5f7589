//! The router's one error type and the one place it becomes an HTTP status + `{error, error_type}` body
//! or an SSE error event (TGI's `InferError` + `ValidationError` messages, one enum, no strings to parse).
//! A shard's gRPC failure keeps its `tonic::Code` up to here, where the code picks the status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RouterError {
    // --- validation (422 `validation`), messages as TGI's §3 ---
    #[error("Input validation error: you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("Input validation error: `temperature` must be strictly positive")]
    Temperature,
    #[error("Input validation error: `repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("Input validation error: `frequency_penalty` must be >= -2.0 and <= 2.0")]
    FrequencyPenalty,
    #[error("Input validation error: `presence_penalty` must be >= -2.0 and <= 2.0")]
    PresencePenalty,
    #[error("Input validation error: `top_p` must be > 0.0 and <= 1.0")]
    TopP,
    #[error("Input validation error: `typical_p` must be > 0.0 and < 1.0")]
    TypicalP,
    #[error("Input validation error: `top_k` must be strictly positive")]
    TopK,
    #[error("Input validation error: `max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    #[error("Input validation error: `stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    /// Not a TGI check (TGI's shard never matches an empty stop); this shard refuses one.
    #[error("Input validation error: `stop` sequences cannot be empty strings")]
    EmptyStopSequence,
    #[error("Input validation error: `seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("Input validation error: `top_n_tokens` must be >= 0 and <= {0}. Given: {1}")]
    TopNTokens(u32, u32),
    #[error("Input validation error: `inputs` cannot be empty")]
    EmptyInput,
    /// Non-empty text that tokenizes to nothing: the shard has no token to start from.
    #[error("Input validation error: `inputs` must contain at least one token")]
    NoInputTokens,
    #[error("Input validation error: `truncate` must be strictly positive and less than {0}. Given: {1}")]
    Truncate(u32, u32),
    #[error("Input validation error: `inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(u32, u32, u32),
    #[error("Input validation error: `inputs` must have less than {0} tokens. Given: {1}")]
    InputLength(u32, u32),
    #[error("Input validation error: grammar is not supported")]
    GrammarDisabled,
    #[error("Input validation error: grammar is not valid: {0}")]
    InvalidGrammar(String),
    #[error("Input validation error: `min_p` must be >= 0.0 and <= 1.0")]
    MinP,
    #[error("Input validation error: `logit_bias` values must be >= -100 and <= 100")]
    LogitBias,
    #[error(
        "Input validation error: `logit_bias` key {0} is not a token id (the vocabulary has {1})"
    )]
    LogitBiasToken(u32, usize),
    #[error("Tool error: {0}")]
    Tool(String),
    #[error("Input validation error: `best_of` != 1 is not allowed for this endpoint")]
    BestOfDisabled,
    #[error("Input validation error: `best_of` must be > 0 and <= {0}. Given: {1}")]
    BestOf(usize, usize),
    #[error("Input validation error: `best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("Input validation error: `decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("Input validation error: `n` must be > 0 and <= {0}. Given: {1}")]
    N(usize, usize),
    #[error("Input validation error: `top_logprobs` requires `logprobs` to be true")]
    TopLogprobsWithoutLogprobs,
    #[error("Input validation error: tokenizer error {0}")]
    Tokenizer(String),
    #[error("Input validation error: {0}")]
    InvalidRequest(String),
    #[error("Suffix is not supported and can be achieved by preprocessing the prompt.")]
    Suffix,
    #[error("Number of prompts exceeds the maximum allowed batch size of {0}")]
    BatchSizeExceeded(usize),
    #[error("Template error: {0}")]
    Template(String),
    // --- admission ---
    #[error("Model is overloaded")]
    Overloaded,
    #[error("Unauthorized: a valid `Authorization: Bearer <api key>` header is required")]
    Unauthorized,
    #[error("Request body exceeds the payload limit")]
    PayloadTooLarge,
    #[error("Not found")]
    NotFound,
    // --- generation ---
    /// A shard RPC failed; its code decides the HTTP status (see `status_and_type`).
    #[error("{0}")]
    Shard(ShardStatus),
    /// The router gave up on a request the shards did not account for.
    #[error("Request failed during generation: {0}")]
    Generation(String),
    #[error("Incomplete generation")]
    IncompleteGeneration,
    #[error("unhealthy")]
    Unhealthy,
    // --- startup ---
    #[error("cannot connect to the shards: {0}")]
    Connect(String),
    #[error("Not enough memory to handle `max_total_tokens={0}` (the shards hold {1} tokens of KV cache)")]
    NotEnoughMemory(u32, u32),
    #[error("invalid arguments: {0}")]
    Config(String),
}

/// A shard's gRPC failure: which RPC, on which rank, and the status it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub rpc: &'static str,
    pub rank: usize,
    pub code: tonic::Code,
    pub message: String,
}

impl ShardStatus {
    pub fn new(rpc: &'static str, rank: usize, status: &tonic::Status) -> Self {
        ShardStatus {
            rpc,
            rank,
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl std::fmt::Display for ShardStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ShardStatus {
            rpc,
            rank,
            code,
            message,
        } = self;
        write!(f, "shard error: {rpc} on rank {rank}: {code:?}: {message}")
    }
}

/// TGI's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

impl RouterError {
    /// HTTP status and TGI `error_type` of every variant.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        use RouterError::*;
        match self {
            Suffix => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            BatchSizeExceeded(_) => (StatusCode::UNPROCESSABLE_ENTITY, "batch size exceeded"),
            Template(_) => (StatusCode::UNPROCESSABLE_ENTITY, "template_error"),
            Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Shard(status) => match status.code {
                // The shard refused the request itself (TGI's validation class).
                tonic::Code::InvalidArgument => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
                // Out of memory or capacity for now: TGI's overloaded answer, retryable.
                tonic::Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
                _ => (StatusCode::FAILED_DEPENDENCY, "generation"),
            },
            Generation(_) | Connect(_) => (StatusCode::FAILED_DEPENDENCY, "generation"),
            IncompleteGeneration => (StatusCode::INTERNAL_SERVER_ERROR, "incomplete_generation"),
            Unhealthy => (StatusCode::SERVICE_UNAVAILABLE, "healthcheck"),
            NotEnoughMemory(..) | Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "config"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
        }
    }

    /// The `err` label of `tgi_request_failure`.
    pub fn metric_label(&self) -> &'static str {
        match self.status_and_type().1 {
            "validation" | "batch size exceeded" => "validation",
            "template_error" => "template",
            "overloaded" => "overloaded",
            "generation" => "generation",
            "incomplete_generation" => "incomplete",
            _ => "other",
        }
    }

    /// Failures the batcher counts in `tgi_request_failure` itself.
    pub fn counted_by_batcher(&self) -> bool {
        matches!(self, RouterError::Generation(_) | RouterError::Shard(_))
    }

    /// The client-facing message: TGI's wording; a shard failure shows the shard's own message under the
    /// prefix of its class (the RPC and rank stay in the logs).
    pub fn message(&self) -> String {
        let RouterError::Shard(status) = self else {
            return self.to_string();
        };
        let prefix = match status.code {
            tonic::Code::InvalidArgument => "Input validation error",
            tonic::Code::ResourceExhausted => "Model is overloaded",
            _ => "Request failed during generation",
        };
        format!("{prefix}: {}", status.message)
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.message(),
            error_type: self.status_and_type().1.to_string(),
        }
    }

    /// The SSE event ending a TGI stream with this error.
    pub fn to_sse_event(&self) -> Event {
        Event::default().data(json!(self.body()).to_string())
    }

    /// The SSE event ending an OpenAI stream with this error (the shape OpenAI's SDKs read).
    pub fn to_openai_sse_event(&self) -> Event {
        Event::default().data(self.openai_body().to_string())
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_type();
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A `RouterError` answered on an OpenAI route: OpenAI's `{"error": {"message", "type", "code"}}` body
/// (which OpenAI's SDKs read the message from) plus TGI's top-level `error_type`.
#[derive(Debug)]
pub struct OpenAiError(pub RouterError);

impl From<RouterError> for OpenAiError {
    fn from(error: RouterError) -> Self {
        OpenAiError(error)
    }
}

impl From<axum::extract::rejection::JsonRejection> for OpenAiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        OpenAiError(rejection.into())
    }
}

impl RouterError {
    fn openai_body(&self) -> serde_json::Value {
        let (status, error_type) = self.status_and_type();
        json!({"error": {"message": self.message(), "type": error_type, "code": status.as_u16()}, "error_type": error_type})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = Json(self.0.openai_body());
        let mut response = self.0.into_response();
        let headers = response.headers().clone();
        response = (response.status(), body).into_response();
        for name in [header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
            if let Some(value) = headers.get(&name) {
                response.headers_mut().insert(name, value.clone());
            }
        }
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for RouterError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return RouterError::PayloadTooLarge;
        }
        RouterError::InvalidRequest(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(code: tonic::Code, message: &str) -> RouterError {
        RouterError::Shard(ShardStatus::new(
            "Prefill",
            1,
            &tonic::Status::new(code, message),
        ))
    }

    fn answer(error: RouterError) -> (StatusCode, serde_json::Value, Option<HeaderValue>) {
        let response = error.into_response();
        let status = response.status();
        let retry = response.headers().get(header::RETRY_AFTER).cloned();
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
            .expect("body");
        (status, serde_json::from_slice(&body).expect("json"), retry)
    }

    #[test]
    fn a_refused_request_is_a_validation_error() {
        let (status, body, _) = answer(shard(tonic::Code::InvalidArgument, "prompt too long"));
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body,
            json!({"error": "Input validation error: prompt too long", "error_type": "validation"})
        );
        assert_eq!(
            shard(tonic::Code::InvalidArgument, "x").metric_label(),
            "validation"
        );
    }

    #[test]
    fn exhausted_shards_answer_overloaded_with_retry_after() {
        let (status, body, retry) = answer(shard(tonic::Code::ResourceExhausted, "no KV blocks"));
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            body,
            json!({"error": "Model is overloaded: no KV blocks", "error_type": "overloaded"})
        );
        assert_eq!(retry, Some(HeaderValue::from_static("1")));
    }

    #[test]
    fn other_shard_failures_are_generation_errors() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::DeadlineExceeded,
        ] {
            let (status, body, _) = answer(shard(code, "engine died"));
            assert_eq!(status, StatusCode::FAILED_DEPENDENCY, "{code:?}");
            assert_eq!(
                body,
                json!({"error": "Request failed during generation: engine died", "error_type": "generation"})
            );
            assert_eq!(shard(code, "x").metric_label(), "generation");
        }
    }

    #[test]
    fn the_log_line_keeps_rpc_rank_and_code() {
        assert_eq!(
            shard(tonic::Code::Unavailable, "socket closed").to_string(),
            "shard error: Prefill on rank 1: Unavailable: socket closed"
        );
        assert!(shard(tonic::Code::Internal, "x").counted_by_batcher());
        assert!(!RouterError::Overloaded.counted_by_batcher());
    }

    #[test]
    fn openai_routes_get_the_same_status_and_message() {
        let response =
            OpenAiError(shard(tonic::Code::InvalidArgument, "bad adapter")).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            body["error"]["message"],
            "Input validation error: bad adapter"
        );
        assert_eq!(body["error"]["code"], 422);
        assert_eq!(body["error_type"], "validation");
    }
}
