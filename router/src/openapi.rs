//! The OpenAPI document (utoipa), served at `/api-doc/openapi.json` and printed by `print-schema`: it only
//! lists the handlers and types; nothing here is used by them.

use crate::api::*;
use crate::error::ErrorResponse;
use crate::openai_types::*;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera", description = "TGI- and OpenAI-compatible text generation server"),
    paths(
        crate::tgi::compat_generate,
        crate::tgi::generate,
        crate::tgi::generate_stream,
        crate::tgi::tokenize,
        crate::tgi::health,
        crate::tgi::ping,
        crate::tgi::info,
        crate::tgi::metrics,
        crate::openai::chat_completions,
        crate::openai::completions,
        crate::openai::models,
        crate::openai::chat_tokenize,
        crate::sagemaker::invocations,
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
