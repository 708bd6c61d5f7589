//! Hugging Face chat templates (Jinja) rendered with minijinja, configured to behave like
//! transformers' `apply_chat_template`: trim_blocks + lstrip_blocks, loop controls, Python string
//! and dict methods, `raise_exception`, `strftime_now` and a Python-compatible `tojson`.

mod functions;
mod source;

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Name under which the template is registered in its environment.
const NAME: &str = "chat_template";

/// Longest template source compiled: real chat templates are a few KiB (the largest, with tool
/// calling, tens of KiB).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Instructions one render may execute. A long chat with tools takes about a hundred per message,
/// so this leaves room for tens of thousands of messages while a template that loops without end
/// (it comes from a model file) fails in well under a second instead of holding a worker forever.
pub const RENDER_FUEL: u64 = 5_000_000;

/// A compiled chat template plus the BOS/EOS strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template came from (or `<inline chat template>`), for error messages.
    origin: PathBuf,
    bos: Option<String>,
    eos: Option<String>,
    /// The source reads `tools` (it lists the functions itself).
    renders_tools: bool,
    /// The source reads `tool_calls` (it writes an assistant's calls itself).
    renders_tool_calls: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an [`Error::Template`].
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<ChatTemplate> {
        Self::with_origin(source, bos, eos, PathBuf::from("<inline chat template>"))
    }

    pub(crate) fn with_origin(
        source: &str,
        bos: Option<String>,
        eos: Option<String>,
        origin: PathBuf,
    ) -> Result<ChatTemplate> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::Template {
                path: origin,
                msg: format!(
                    "template is {} bytes, more than the {MAX_TEMPLATE_BYTES} accepted",
                    source.len()
                ),
            });
        }
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", functions::raise_exception);
        env.add_function("strftime_now", functions::strftime_now);
        env.add_filter("tojson", functions::tojson);
        env.add_test("iterable", functions::is_iterable);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| template_error(&origin, e))?;
        Ok(ChatTemplate {
            env,
            origin,
            bos,
            eos,
            renders_tools: source.contains("tools"),
            renders_tool_calls: source.contains("tool_calls"),
        })
    }

    /// The template of a model: a Hugging Face folder (`chat_template.jinja`, `chat_template.json`
    /// or `tokenizer_config.json`) or a `.gguf` file (`tokenizer.chat_template`). `None` if it has none.
    pub fn load(model: &Path) -> Result<Option<ChatTemplate>> {
        source::load(model)
    }

    /// Whether the template lists `tools` itself (if not, the router adds them to the prompt).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// Whether the template writes an assistant message's `tool_calls` itself.
    pub fn renders_tool_calls(&self) -> bool {
        self.renders_tool_calls
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Renders OpenAI-style `messages`; at most [`RENDER_FUEL`] instructions run, and callers on
    /// an async runtime should call this from a blocking worker. Content given as a list of parts is flattened to one string
    /// (text parts concatenated, images as `![](url)`), as TGI does, since most templates only
    /// handle string content.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&Json>,
    ) -> Result<String> {
        let messages: Vec<Json> = messages.iter().map(flatten_content).collect();
        let ctx = context! {
            messages => Value::from_serialize(&messages),
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(Value::from_serialize),
        };
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, e))?;
        tmpl.render(ctx)
            .map_err(|e| template_error(&self.origin, e))
    }
}

/// transformers' `AssistantTracker` extension adds `{% generation %}…{% endgeneration %}` markers
/// that only track spans; rendering ignores them, so they are removed before compiling.
fn strip_generation_tags(source: &str) -> String {
    let mut out = source.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), "");
        }
    }
    out
}

/// A message with list content turned into a string; other messages are returned unchanged.
fn flatten_content(message: &Json) -> Json {
    let Some(parts) = message.get("content").and_then(Json::as_array) else {
        return message.clone();
    };
    let text: String = parts
        .iter()
        .map(|p| match p.get("type").and_then(Json::as_str) {
            Some("image_url") => {
                let url = p
                    .pointer("/image_url/url")
                    .and_then(Json::as_str)
                    .unwrap_or("");
                format!("![]({url})")
            }
            _ => p
                .get("text")
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string(),
        })
        .collect();
    let mut m = message.clone();
    m["content"] = Json::String(text);
    m
}

/// Maps a minijinja error to ours; a template's own `raise_exception` keeps its message.
fn template_error(origin: &Path, e: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<functions::Raised>() {
            return Error::TemplateException {
                path: origin.to_path_buf(),
                message: raised.0.clone(),
            };
        }
        source = s.source();
    }
    Error::Template {
        path: origin.to_path_buf(),
        msg: e.to_string(),
    }
}
