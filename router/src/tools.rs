//! OpenAI tool calling: what `tools` and `tool_choice` ask of a generation (the prompt's tools, a
//! grammar for `required` or a named function) and the calls read back out of the model's text.
//!
//! With `auto` the model is free and its own call format is parsed: Hermes/Qwen
//! `<tool_call>{…}</tool_call>`, Mistral `[TOOL_CALLS][…]` or `[TOOL_CALLS]name[ARGS]{…}`, Llama 3.x
//! `<|python_tag|>{…}` or a bare `{"name", "parameters"}` object, and TGI's own
//! `{"function": {"_name", …}}`. With `required` or a named function the output is a JSON call
//! (`{"name", "arguments"}`, or a list of them when `parallel_tool_calls` is true) under a grammar,
//! as TGI's tool grammar does, so a call always comes back. (TGI forces its grammar even for
//! `auto`, which makes models call tools after every tool result.)

use crate::error::{Result, RouterError};
use serde_json::{json, Map, Value};

/// Where a call written in a model's own format starts (for `auto`).
pub const CALL_MARKERS: [&str; 3] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];

/// TGI's default instruction for a template that does not render `tools` itself.
pub const DEFAULT_TOOL_PROMPT: &str = "Given the functions available, please respond with a JSON \
for a function call with its proper arguments that best answers the given prompt.\n\nRespond in the \
format {\"name\": function name, \"arguments\": dictionary of argument name and its value}. Do not \
use variables.";

/// What the request's `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// The model decides between text and calls in its own format.
    Auto,
    /// At least one call, among all tools.
    Required,
    /// One call of this function.
    Named(String),
}

/// The tools of a chat request, validated, and how they must be used.
#[derive(Debug, Clone)]
pub struct ToolUse {
    /// The request's `tools` as sent (for the template).
    pub tools: Value,
    pub mode: ToolMode,
    functions: Vec<(String, Value)>,
    parallel: bool,
}

fn tool_error(msg: impl Into<String>) -> RouterError {
    RouterError::Tool(msg.into())
}

impl ToolUse {
    /// `None` when no tool may be called (no tools, or `tool_choice: "none"`).
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<ToolUse>> {
        let tools = match tools {
            None | Some(Value::Null) => {
                return match tool_choice {
                    None | Some(Value::Null) => Ok(None),
                    Some(c) if c == "none" || c == "auto" => Ok(None),
                    Some(_) => Err(tool_error("`tool_choice` needs `tools`")),
                }
            }
            Some(t) => t,
        };
        let list = tools
            .as_array()
            .ok_or_else(|| tool_error("`tools` must be a list"))?;
        let mut functions = Vec::with_capacity(list.len());
        for tool in list {
            if tool
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function")
                != "function"
            {
                return Err(tool_error("only `function` tools are supported"));
            }
            let f = tool
                .get("function")
                .ok_or_else(|| tool_error("a tool needs a `function`"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| tool_error("a function needs a non-empty `name`"))?;
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(p) if p.is_object() => p.clone(),
                Some(_) => {
                    return Err(tool_error(format!("`{name}.parameters` must be an object")))
                }
            };
            functions.push((name.to_string(), parameters));
        }
        let mode = match tool_choice {
            None | Some(Value::Null) => ToolMode::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => ToolMode::Auto,
                "required" => ToolMode::Required,
                other => return Err(tool_error(format!("unknown `tool_choice` \"{other}\""))),
            },
            Some(named) => {
                let name = named
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| tool_error("`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}"))?;
                if !functions.iter().any(|(n, _)| n == name) {
                    return Err(tool_error(format!(
                        "`tool_choice` names \"{name}\", which is not in `tools`"
                    )));
                }
                ToolMode::Named(name.to_string())
            }
        };
        if functions.is_empty() && mode != ToolMode::Auto {
            return Err(tool_error("`tools` is empty"));
        }
        if functions.is_empty() {
            return Ok(None);
        }
        Ok(Some(ToolUse {
            tools: tools.clone(),
            mode,
            functions,
            parallel: parallel == Some(true),
        }))
    }

    /// The JSON schema a `required` or named choice constrains the output to; none for `auto`.
    /// A function takes only the arguments it declares: its schema gets `additionalProperties:
    /// false` unless it says otherwise (left open, small models invent arguments without end).
    pub fn grammar(&self) -> Option<Value> {
        let call = |(name, parameters): &(String, Value)| {
            let mut parameters = parameters.clone();
            if let Some(p) = parameters.as_object_mut() {
                p.entry("additionalProperties").or_insert(json!(false));
            }
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        };
        let one = match &self.mode {
            ToolMode::Auto => return None,
            ToolMode::Named(name) => call(self.functions.iter().find(|(n, _)| n == name)?),
            ToolMode::Required if self.functions.len() == 1 => call(&self.functions[0]),
            ToolMode::Required => {
                json!({"anyOf": self.functions.iter().map(call).collect::<Vec<_>>()})
            }
        };
        Some(match (&self.mode, self.parallel) {
            (ToolMode::Required, true) => {
                json!({"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]})
            }
            _ => one,
        })
    }

    /// Whether `name` is one of the request's functions.
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.iter().any(|(n, _)| n == name)
    }

    /// Reads the calls out of a finished output: `(content, calls)`. Text that holds no call in a
    /// known format stays content.
    pub fn parse(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let calls = match self.mode {
            ToolMode::Auto => parse_native(text),
            _ => parse_json_calls(text.trim()).map(|calls| (String::new(), calls)),
        };
        // A call to a function the request did not declare is no call: the text stays content.
        let calls = calls.filter(|(_, calls)| calls.iter().all(|c| self.has_function(&c.name)));
        match calls {
            Some((content, calls)) if !calls.is_empty() => {
                let content = Some(content.trim().to_string()).filter(|c| !c.is_empty());
                (content, calls)
            }
            _ => (Some(text.to_string()), Vec::new()),
        }
    }
}

/// One function call: its name and its arguments as JSON text (OpenAI's `function.arguments`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's `tool_calls` entry, with a fresh 9-character id (Mistral's templates demand that length).
    pub fn to_openai(&self, index: Option<usize>) -> Value {
        let mut v = json!({
            "id": call_id(),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

pub fn call_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..9)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A call object in any of the JSON shapes models write: `{"name", "arguments"|"parameters"}`
/// (arguments as an object or as a JSON string), or TGI's `{"function": {"_name", …arguments}}`.
fn call_from_json(v: &Value) -> Option<ToolCall> {
    let obj = v.as_object()?;
    if let Some(f) = obj.get("function").and_then(Value::as_object) {
        if let Some(name) = f.get("_name").and_then(Value::as_str) {
            let args: Map<String, Value> = f
                .iter()
                .filter(|(k, _)| *k != "_name")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            return Some(ToolCall {
                name: name.to_string(),
                arguments: Value::Object(args).to_string(),
            });
        }
        return call_from_json(&Value::Object(f.clone()));
    }
    let name = obj.get("name")?.as_str()?;
    let args = obj
        .get("arguments")
        .or_else(|| obj.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s)
            .ok()
            .filter(Value::is_object)?,
        Value::Object(_) => args,
        _ => return None,
    };
    Some(ToolCall {
        name: name.to_string(),
        arguments: args.to_string(),
    })
}

/// A JSON call or list of calls filling all of `text`.
fn parse_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) => items.iter().map(call_from_json).collect(),
        one => call_from_json(&one).map(|c| vec![c]),
    }
}

/// Consecutive JSON values at the start of `text`, separated by whitespace, `,` or `;` (Llama 3.1
/// separates parallel calls with `;`); with the rest of the text.
fn leading_json_values(text: &str) -> (Vec<Value>, &str) {
    let mut values = Vec::new();
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';' || c == ',');
        let mut stream = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                values.push(v);
                rest = &trimmed[stream.byte_offset()..];
            }
            _ => return (values, rest),
        }
    }
}

/// Calls in a model's own format, with the text around them.
fn parse_native(text: &str) -> Option<(String, Vec<ToolCall>)> {
    if text.contains("<tool_call>") {
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("<tool_call>") {
            content.push_str(&rest[..at]);
            let body = &rest[at + "<tool_call>".len()..];
            let (inner, after) = body.split_once("</tool_call>").unwrap_or((body, ""));
            calls.extend(parse_json_calls(inner.trim())?);
            rest = after;
        }
        content.push_str(rest);
        return Some((content, calls));
    }
    if let Some((before, after)) = text.split_once("[TOOL_CALLS]") {
        return Some((before.to_string(), mistral_calls(after)?));
    }
    if let Some((before, after)) = text.split_once("<|python_tag|>") {
        let (values, rest) = leading_json_values(after);
        let calls = values
            .iter()
            .map(call_from_json)
            .collect::<Option<Vec<_>>>()?;
        return Some((format!("{before}{rest}"), calls));
    }
    // A bare JSON call (Llama 3.x without the tag, TGI's format, Hermes without tags): the whole
    // output, so that text which merely contains JSON stays text.
    parse_json_calls(text.trim()).map(|calls| (String::new(), calls))
}

/// Mistral: `[{"name", "arguments"}, …]` (v3) or `name[ARGS]{…}` repeated after each marker (v11+).
fn mistral_calls(after: &str) -> Option<Vec<ToolCall>> {
    let trimmed = after.trim();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let (values, _) = leading_json_values(trimmed);
        let mut calls = Vec::new();
        for v in values {
            match v {
                Value::Array(items) => calls.extend(
                    items
                        .iter()
                        .map(call_from_json)
                        .collect::<Option<Vec<_>>>()?,
                ),
                one => calls.push(call_from_json(&one)?),
            }
        }
        return Some(calls);
    }
    after
        .split("[TOOL_CALLS]")
        .map(|part| {
            let (name, args) = part.split_once("[ARGS]")?;
            let (values, _) = leading_json_values(args);
            let args = values.into_iter().next().filter(Value::is_object)?;
            Some(ToolCall {
                name: name.trim().to_string(),
                arguments: args.to_string(),
            })
        })
        .collect()
}

/// What a stream has shown of one call so far: its name once the string is closed, and the byte
/// range of its arguments' raw JSON (up to the end of the text while it is still being written).
#[derive(Debug, Clone, PartialEq)]
pub struct PartialCall {
    pub name: Option<String>,
    pub arguments: Option<std::ops::Range<usize>>,
}

/// The `{"name": …, "arguments"|"parameters": {…}}` objects being written in `text`, read as far as
/// it goes: objects outside any JSON value or directly in a top-level list (Hermes blocks, a JSON
/// call, Mistral's and Llama's lists); other text between them is skipped. Arguments written as a
/// JSON string are not followed (the finished call carries them).
pub fn partial_calls(text: &str) -> Vec<PartialCall> {
    let mut calls: Vec<PartialCall> = Vec::new();
    // Open containers, `true` for an object; the depth of the call object being read, if any.
    let mut stack: Vec<bool> = Vec::new();
    let mut call_depth: Option<usize> = None;
    let (mut in_string, mut escaped, mut string_start) = (false, false, 0);
    // At the call's own level: the last key read, and whether its value comes next.
    let (mut key, mut in_value) = (String::new(), false);
    let mut arguments_from: Option<usize> = None;
    for (i, c) in text.char_indices() {
        let at_call = call_depth == Some(stack.len());
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    let raw = &text[string_start..=i];
                    match (at_call, in_value) {
                        (true, false) => key = serde_json::from_str(raw).unwrap_or_default(),
                        (true, true) if key == "name" => {
                            if let Some(call) = calls.last_mut() {
                                call.name = serde_json::from_str(raw).ok();
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => (in_string, string_start) = (true, i),
            ':' if at_call => in_value = true,
            ',' if at_call => in_value = false,
            '{' | '[' => {
                if c == '{' && call_depth.is_none() && (stack.is_empty() || stack == [false]) {
                    calls.push(PartialCall {
                        name: None,
                        arguments: None,
                    });
                    call_depth = Some(stack.len() + 1);
                    (key, in_value) = (String::new(), false);
                } else if at_call
                    && in_value
                    && c == '{'
                    && (key == "arguments" || key == "parameters")
                {
                    arguments_from = Some(i);
                }
                stack.push(c == '{');
            }
            '}' | ']' => {
                stack.pop();
                if let (Some(from), true) = (arguments_from, call_depth == Some(stack.len())) {
                    if let Some(call) = calls.last_mut() {
                        call.arguments = Some(from..i + 1);
                    }
                    arguments_from = None;
                }
                if call_depth.is_some_and(|d| stack.len() < d) {
                    call_depth = None;
                }
            }
            _ => {}
        }
    }
    // Arguments still being written run to the end of the text.
    if let (Some(from), Some(call)) = (arguments_from, calls.last_mut()) {
        call.arguments = Some(from..text.len());
    }
    calls
}

/// Messages as templates want them: an assistant's `tool_calls[].function.arguments` as an object
/// (OpenAI sends a JSON string; templates write it with `tojson`, which would encode it twice).
pub fn template_messages(messages: Vec<Value>) -> Vec<Value> {
    messages
        .into_iter()
        .map(|mut m| {
            if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                for call in calls {
                    if let Some(args) = call.pointer_mut("/function/arguments") {
                        if let Some(parsed) = args
                            .as_str()
                            .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        {
                            *args = parsed;
                        }
                    }
                }
            }
            m
        })
        .collect()
}

/// For a template that does not render `tools`: the tools and the instruction appended to the
/// last user message, as TGI's `tool_prompt`.
pub fn inject_tool_prompt(messages: &mut [Value], tools: &Value, prompt: Option<&str>) {
    let instruction = format!(
        "\n\n{}\n{}",
        prompt.unwrap_or(DEFAULT_TOOL_PROMPT),
        serde_json::to_string_pretty(tools).unwrap_or_default()
    );
    let last_user = messages
        .iter_mut()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    if let Some(m) = last_user {
        let content = m.get("content").and_then(Value::as_str).unwrap_or_default();
        m["content"] = Value::String(format!("{content}{instruction}"));
    }
}

/// For a template that does not render `tool_calls`: an assistant turn's calls as its content, in
/// the JSON the tool prompt asks for, so the model sees what it called.
pub fn calls_as_content(messages: &mut [Value]) {
    for m in messages {
        let Some(calls) = m.get("tool_calls").and_then(Value::as_array) else {
            continue;
        };
        let written: Vec<Value> = calls
            .iter()
            .map(|c| json!({"name": c.pointer("/function/name"), "arguments": c.pointer("/function/arguments")}))
            .collect();
        let text = match written.as_slice() {
            [one] => one.to_string(),
            many => Value::Array(many.to_vec()).to_string(),
        };
        m["content"] = Value::String(text);
    }
}

#[cfg(test)]
mod tests;
