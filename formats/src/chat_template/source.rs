//! Where a model keeps its chat template and BOS/EOS strings: Hugging Face folder files or GGUF metadata.

use std::path::Path;

use serde_json::Value as Json;

use super::{ChatTemplate, MAX_TEMPLATE_BYTES};
use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// Largest `tokenizer_config.json` / `chat_template.json` read (they may embed the added-tokens
/// table, a few MiB for large vocabularies).
const MAX_CONFIG_BYTES: u64 = 64 << 20;

pub(super) fn load(model: &Path) -> Result<Option<ChatTemplate>> {
    if model.is_dir() {
        return load_hf(model);
    }
    let gguf = Gguf::open(model)?;
    let Some(source) = gguf.get_str("tokenizer.chat_template") else {
        return Ok(None);
    };
    let token = |key: &str| {
        let id = gguf.get_u64(key)?;
        let tokens = gguf.get_array("tokenizer.ggml.tokens")?;
        tokens
            .get(usize::try_from(id).ok()?)?
            .as_str()
            .map(str::to_string)
    };
    let bos = token("tokenizer.ggml.bos_token_id");
    let eos = token("tokenizer.ggml.eos_token_id");
    ChatTemplate::with_origin(source, bos, eos, model.to_path_buf()).map(Some)
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::read_capped(path, MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

fn load_hf(dir: &Path) -> Result<Option<ChatTemplate>> {
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?;
    let special = |key: &str| -> Option<String> {
        let v = config.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content")?.as_str())
            .map(str::to_string)
    };
    let (bos, eos) = (special("bos_token"), special("eos_token"));
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let source = crate::read_capped(&jinja, MAX_TEMPLATE_BYTES as u64)?;
        return ChatTemplate::with_origin(&source, bos, eos, jinja).map(Some);
    }
    let json_path = dir.join("chat_template.json");
    if let Some(doc) = read_json(&json_path)? {
        let source = template_field(&doc, &json_path)?;
        return match source {
            Some(s) => ChatTemplate::with_origin(&s, bos, eos, json_path).map(Some),
            None => Ok(None),
        };
    }
    let Some(config) = &config else {
        return Ok(None);
    };
    match template_field(config, &config_path)? {
        Some(s) => ChatTemplate::with_origin(&s, bos, eos, config_path).map(Some),
        None => Ok(None),
    }
}

/// `chat_template` as a string, or the `default` entry of a list of `{name, template}`.
fn template_field(doc: &Json, path: &Path) -> Result<Option<String>> {
    let bad = |msg: &str| Error::Template {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    match doc.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| bad("chat_template list has no entry named \"default\"")),
        Some(_) => Err(bad(
            "chat_template is neither a string nor a list of {name, template}",
        )),
    }
}
