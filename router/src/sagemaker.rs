//! SageMaker's single route, `/invocations`: a chat, completions or TGI body, told apart by its fields.

use crate::api::CompatGenerateRequest;
use crate::common::AppStateRef;
use crate::error::{Result, RouterError};
use crate::{openai, tgi};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde_json::Value;

#[utoipa::path(post, path = "/invocations", request_body = Object,
    responses((status = 200), (status = 413, body = Object), (status = 422, body = Object),
              (status = 424, body = Object), (status = 429, body = Object)))]
pub async fn invocations(
    State(state): State<AppStateRef>,
    payload: std::result::Result<Json<Value>, JsonRejection>,
) -> Result<Response> {
    let Json(body) = payload?;
    let parse = |e: serde_json::Error| RouterError::InvalidRequest(e.to_string());
    if body.get("messages").is_some() {
        openai::chat_inner(state, serde_json::from_value(body).map_err(parse)?).await
    } else if body.get("prompt").is_some() {
        openai::completions_inner(state, serde_json::from_value(body).map_err(parse)?).await
    } else {
        let request: CompatGenerateRequest = serde_json::from_value(body).map_err(parse)?;
        tgi::compat_inner(state, request).await
    }
}
