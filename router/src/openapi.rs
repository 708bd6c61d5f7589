//! The OpenAPI document (utoipa), served at `/api-doc/openapi.json` and printed by `print-schema`.

use crate::api::*;
use crate::error::ErrorResponse;
use crate::openai_types::*;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera", description = "TGI- and OpenAI-compatible text generation server"),
    paths(
        crate::server::compat_generate,
        crate::server::generate,
        crate::server::generate_stream,
        crate::server::tokenize,
        crate::server::health,
        crate::server::info,
        crate::server::metrics,
        crate::openai::chat_completions,
        crate::openai::completions,
        crate::openai::models,
        crate::openai::chat_tokenize,
        crate::openai::invocations,
    ),
    components(schemas(
        GenerateParameters, GenerateRequest, CompatGenerateRequest, FinishReason, PrefillToken, Token,
        BestOfSequence, Details, GenerateResponse, StreamDetails, StreamResponse, SimpleToken,
        ChatTokenizeResponse, Info, ErrorResponse, ChatRequest, CompletionRequest, Sampling, StopSequences,
        Prompt, StreamOptions, Usage, ChatMessage, TopLogprob, ChatTokenLogprob, ChatLogprobs, ChatChoice,
        ChatCompletion, CompletionLogprobs, CompletionChoice, Completion, Model, ModelList,
    )),
    tags((name = "Tessera", description = "Text generation"))
)]
struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
