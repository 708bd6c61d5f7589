//! Real chat templates from ../shared/data/chat-templates (skipped without it) render a typical
//! conversation, each served family's template renders an OpenAI tool round trip, and SmolLM2's
//! template reproduces the reference's templated text.

mod common;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tessera_formats::chat_template::ChatTemplate;
use tessera_formats::Error;

fn conversation() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You are a terse assistant."}),
        json!({"role": "user", "content": "What is the capital of France?"}),
        json!({"role": "assistant", "content": "Paris."}),
        json!({"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}]}),
    ]
}

/// The collected templates (third-party, not redistributed), or `None`: the test is skipped.
fn templates() -> Option<PathBuf> {
    common::shared("data/chat-templates")
}

fn render_file(
    dir: &Path,
    name: &str,
    messages: &[Value],
    tools: Option<&Value>,
) -> Result<String, Error> {
    let path = dir.join(name);
    let source = std::fs::read_to_string(&path).unwrap();
    let t = ChatTemplate::new(&source, Some("<s>".into()), Some("</s>".into()))?;
    t.render(messages, true, tools)
}

#[test]
fn every_template_renders_a_conversation() {
    let dir = common::or_skip!(templates());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".jinja"))
        // Rejects system messages by design: see the test below.
        .filter(|n| n != "google-gemma-2-2b-it.jinja")
        .collect();
    names.sort();
    assert!(names.len() >= 30);
    let mut failures = Vec::new();
    for name in &names {
        match render_file(&dir, name, &conversation(), None) {
            Ok(out) => {
                for needle in ["capital of France", "Paris.", "And of Italy?"] {
                    if !out.contains(needle) {
                        failures.push(format!("{name}: output lacks {needle:?}:\n{out}"));
                    }
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

#[test]
fn gemma_2_rejects_a_system_message_with_its_own_error() {
    // Gemma 2's template has no system role and says so through raise_exception; transformers
    // gives the same error. Without the system message it renders.
    let dir = common::or_skip!(templates());
    match render_file(&dir, "google-gemma-2-2b-it.jinja", &conversation(), None) {
        Err(Error::TemplateException { message, .. }) => {
            assert_eq!(message, "System role not supported")
        }
        other => panic!("expected the template's exception, got {other:?}"),
    }
    let out = render_file(
        &dir,
        "google-gemma-2-2b-it.jinja",
        &conversation()[1..],
        None,
    )
    .unwrap();
    assert!(
        out.starts_with("<s><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"),
        "{out}"
    );
    assert!(out.ends_with("<start_of_turn>model\n"), "{out}");
}

fn smollm2_reference_chat() -> (Vec<Value>, String) {
    let reference = common::smollm2_reference();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["templated_text"].is_string())
        .expect("a chat case")
        .clone();
    let messages = case["input"].as_array().unwrap().clone();
    (
        messages,
        case["templated_text"].as_str().unwrap().to_string(),
    )
}

#[test]
fn smollm2_hf_folder_template_matches_reference() {
    let (messages, want) = smollm2_reference_chat();
    let t = ChatTemplate::load(&common::smollm2_hf()).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.render(&messages, true, None).unwrap(), want);
}

#[test]
fn smollm2_gguf_template_matches_reference() {
    let (messages, want) = smollm2_reference_chat();
    let t = ChatTemplate::load(&common::smollm2_gguf())
        .unwrap()
        .unwrap();
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.render(&messages, true, None).unwrap(), want);
}

#[test]
fn tools_render_with_python_json() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather <now> in a city, e.g. Zürich",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let messages = vec![
        json!({"role": "user", "content": "Weather in Paris?"}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C"}),
    ];
    let dir = common::or_skip!(templates());
    let out = render_file(
        &dir,
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        &messages,
        Some(&tools),
    )
    .unwrap();
    // Python json.dumps: ", " / ": " separators, key order kept, no HTML or non-ASCII escaping.
    assert!(out.contains(r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> in a city, e.g. Zürich""#), "{out}");
    assert!(
        out.contains(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#),
        "{out}"
    );
    assert!(
        out.contains("<tool_response>\n22 C\n</tool_response>"),
        "{out}"
    );
}

#[test]
fn tojson_indent_and_helpers() {
    let src = r#"{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}|{{ "  x ".strip() }}|{{ "abc".startswith("ab") }}|{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}|{% for i in [1,2,3] %}{% if i == 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}|{{ strftime_now("%Y") | length }}"#;
    let t = ChatTemplate::new(src, None, None).unwrap();
    let out = t
        .render(&[json!({"role": "user", "content": "hé"})], false, None)
        .unwrap();
    assert_eq!(
        out,
        "{\n  \"role\": \"user\",\n  \"content\": \"hé\"\n}|[]|x|True|role=user;content=hé;|13|4"
    );
}

#[test]
fn errors_carry_origin_and_message() {
    let e = ChatTemplate::new("{% if %}", None, None).unwrap_err();
    assert!(
        matches!(e, Error::Template { .. }) && e.to_string().contains("<inline chat template>"),
        "{e}"
    );
    let t = ChatTemplate::new(
        "{{ raise_exception('Only user and assistant roles') }}",
        None,
        None,
    )
    .unwrap();
    match t.render(&[], false, None) {
        Err(Error::TemplateException { message, .. }) => {
            assert_eq!(message, "Only user and assistant roles")
        }
        other => panic!("{other:?}"),
    }
    let t = ChatTemplate::new("{{ strftime_now('%Q%') }}", None, None).unwrap();
    assert!(t.render(&[], false, None).is_err());
}

#[test]
fn hf_folder_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(ChatTemplate::load(d).unwrap().is_none());
    let config = json!({"bos_token": {"content": "<B>"}, "eos_token": "<E>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]});
    std::fs::write(d.join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = ChatTemplate::load(d).unwrap().unwrap();
    assert_eq!(t.render(&[], false, None).unwrap(), "<B>D<E>");
    std::fs::write(
        d.join("chat_template.json"),
        r#"{"chat_template": "J{{ eos_token }}"}"#,
    )
    .unwrap();
    assert_eq!(
        ChatTemplate::load(d)
            .unwrap()
            .unwrap()
            .render(&[], false, None)
            .unwrap(),
        "J<E>"
    );
    std::fs::write(d.join("chat_template.jinja"), "F\n").unwrap();
    assert_eq!(
        ChatTemplate::load(d)
            .unwrap()
            .unwrap()
            .render(&[], false, None)
            .unwrap(),
        "F"
    );
    std::fs::write(d.join("chat_template.json"), "{not json").unwrap();
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    let msg = ChatTemplate::load(d).unwrap_err().to_string();
    assert!(
        msg.contains("chat_template.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
}

/// A template that loops (almost) forever runs out of fuel with an error, in well under a second
/// of work, instead of holding its worker.
#[test]
fn endless_template_runs_out_of_fuel() {
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let msg = t
        .render(
            &[serde_json::json!({"role": "user", "content": "hi"})],
            true,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(msg.contains("fuel"), "{msg}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    let big = "x".repeat(tessera_formats::chat_template::MAX_TEMPLATE_BYTES + 1);
    let msg = ChatTemplate::new(&big, None, None).unwrap_err().to_string();
    assert!(msg.contains("more than the"), "{msg}");
}

/// The one tool of the round trip, in OpenAI's tool schema.
fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"]}}}])
}

/// An OpenAI-shaped tool round trip: [system,] the user asks, the assistant calls `get_weather`
/// (`arguments` a dict, the Hugging Face convention every template below follows), the tool
/// answers. `call_id` is the id the template accepts, `assistant_content` null or "".
fn weather_round_trip(system: bool, call_id: &str, assistant_content: Value) -> Vec<Value> {
    let mut messages = Vec::new();
    if system {
        messages.push(json!({"role": "system", "content": "You are a weather bot."}));
    }
    messages.extend([
        json!({"role": "user", "content": "What is the weather in Paris?"}),
        json!({"role": "assistant", "content": assistant_content, "tool_calls": [{"id": call_id,
            "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        json!({"role": "tool", "tool_call_id": call_id, "name": "get_weather",
            "content": "{\"temperature\": 21}"}),
    ]);
    messages
}

/// What a family's template makes of its messages (always rendered with the weather tool and
/// `add_generation_prompt`).
enum Expect {
    /// It renders, holding every `contains`, none of `lacks`, and ending with `ends_with`.
    Renders {
        contains: &'static [&'static str],
        lacks: &'static [&'static str],
        ends_with: &'static str,
    },
    /// The template refuses through its own `raise_exception` with this message.
    Raises(&'static str),
    /// The template's own code fails (as it does under Python's Jinja2); the error holds this.
    Fails(&'static str),
}

struct ToolCase {
    /// The model families (`model_type`) served with this template.
    families: &'static str,
    template: &'static str,
    messages: Vec<Value>,
    expect: Expect,
}

/// Each family's real template and what it makes of the round trip. Every output (and error)
/// here was also compared byte for byte with Python's Jinja2 set up as transformers'
/// `apply_chat_template` sets it up, on the same date; they agree, except that `render` flattens
/// the list content in Gemma 2's plain chat first, as TGI does.
fn tool_cases() -> Vec<ToolCase> {
    let null = Value::Null;
    vec![
        ToolCase {
            families: "qwen2",
            template: "Qwen-Qwen2.5-7B-Instruct.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<|im_start|>system\nYou are a weather bot.\n\n# Tools",
                    "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city\"",
                    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
                    "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>\n",
                ],
                lacks: &[],
                ends_with: "<|im_start|>assistant\n",
            },
        },
        // The only Qwen3 template in the folder: Qwen3-Coder's XML-style tools and calls.
        ToolCase {
            families: "qwen3, qwen3_moe",
            template: "Qwen3-Coder.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<|im_start|>system\nYou are a weather bot.\n\n# Tools",
                    "<function>\n<name>get_weather</name>\n<description>Get the current weather in a city</description>\n<parameters>\n<parameter>\n<name>city</name>\n<type>string</type>",
                    "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n",
                    "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response>\n<|im_end|>\n",
                ],
                lacks: &[],
                ends_with: "<|im_start|>assistant\n",
            },
        },
        // Tools go into the first user message (tools_in_user_message defaults to true). A string
        // tool result is `iterable` in Jinja, so the template JSON-encodes it once more, as
        // transformers does.
        ToolCase {
            families: "llama",
            template: "meta-llama-Llama-3.2-3B-Instruct.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n",
                    "You are a weather bot.<|eot_id|>",
                    "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions",
                    "\"name\": \"get_weather\",\n        \"description\": \"Get the current weather in a city\"",
                    "What is the weather in Paris?<|eot_id|>",
                    "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>",
                    "<|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"temperature\\\": 21}\"<|eot_id|>",
                ],
                lacks: &[],
                ends_with: "<|start_header_id|>assistant<|end_header_id|>\n\n",
            },
        },
        // Hermes writes each tool's description as a Python-style signature and docstring.
        ToolCase {
            families: "llama",
            template: "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<tools> {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"get_weather(city: str) - Get the current weather in a city\n\n    Args:\n        city(str): The city name\"",
                    "<|im_start|>system\nYou are a weather bot.<|im_end|>\n",
                    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
                    "<|im_start|>tool\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>",
                ],
                lacks: &[],
                ends_with: "<|im_start|>assistant\n",
            },
        },
        // Mistral formats have no generation prompt: the model goes on after the results. Nemo
        // puts the system message only into a user message that ends the chat, so here the
        // model never sees it.
        ToolCase {
            families: "mistral, mixtral",
            template: "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            messages: weather_round_trip(true, "call12345", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<s>[AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city\"",
                    "[/AVAILABLE_TOOLS][INST]What is the weather in Paris?[/INST]",
                    "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"call12345\"}]</s>",
                    "[TOOL_RESULTS]{\"content\": {\"temperature\": 21}, \"call_id\": \"call12345\"}[/TOOL_RESULTS]",
                ],
                lacks: &["weather bot"],
                ends_with: "[/TOOL_RESULTS]",
            },
        },
        // Mistral templates want 9-character call ids and say so.
        ToolCase {
            families: "mistral, mixtral",
            template: "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Raises("Tool call IDs should be alphanumeric strings with length 9!"),
        },
        ToolCase {
            families: "mistral, mixtral",
            template: "Mistral-Small-3.2-24B-Instruct-2506.jinja",
            messages: weather_round_trip(true, "call12345", null.clone()),
            expect: Expect::Renders {
                contains: &[
                    "<s>[SYSTEM_PROMPT]You are a weather bot.[/SYSTEM_PROMPT]",
                    "[AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city\"",
                    "[/AVAILABLE_TOOLS][INST]What is the weather in Paris?[/INST]",
                    "[TOOL_CALLS]get_weather[CALL_ID]call12345[ARGS]{\"city\": \"Paris\"}</s>",
                    "[TOOL_RESULTS]call12345[TOOL_CONTENT]{\"temperature\": 21}[/TOOL_RESULTS]",
                ],
                lacks: &[],
                ends_with: "[/TOOL_RESULTS]",
            },
        },
        ToolCase {
            families: "mistral, mixtral",
            template: "Mistral-Small-3.2-24B-Instruct-2506.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Raises("Tool call IDs should be alphanumeric strings with length 9!"),
        },
        // Phi-3.5 has no tool support: it concatenates the assistant content, so OpenAI's null
        // content fails (Python: "can only concatenate str (not NoneType)")...
        ToolCase {
            families: "phi3",
            template: "microsoft-Phi-3.5-mini-instruct.jinja",
            messages: weather_round_trip(true, "call_1", null.clone()),
            expect: Expect::Fails("+ operator on unsupported types string and none"),
        },
        // ...and with empty content it renders, ignoring the tools, the call and the tool
        // message: the model sees none of them.
        ToolCase {
            families: "phi3",
            template: "microsoft-Phi-3.5-mini-instruct.jinja",
            messages: weather_round_trip(true, "call_1", json!("")),
            expect: Expect::Renders {
                contains: &["<|system|>\nYou are a weather bot.<|end|>\n<|user|>\nWhat is the weather in Paris?<|end|>\n<|assistant|>\n<|end|>\n"],
                lacks: &["get_weather", "21", "Paris\""],
                ends_with: "<|end|>\n<|assistant|>\n",
            },
        },
        // Gemma 2 has neither a system role (see the test above) nor tools: a plain chat renders
        // and the tools are ignored...
        ToolCase {
            families: "gemma2",
            template: "google-gemma-2-2b-it.jinja",
            messages: conversation()[1..].to_vec(),
            expect: Expect::Renders {
                contains: &["<s><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"],
                lacks: &["get_weather"],
                ends_with: "<start_of_turn>model\n",
            },
        },
        // ...and a tool message breaks its strict user/model alternation.
        ToolCase {
            families: "gemma2",
            template: "google-gemma-2-2b-it.jinja",
            messages: weather_round_trip(false, "call_1", null.clone()),
            expect: Expect::Raises("Conversation roles must alternate user/assistant/user/assistant/..."),
        },
        // There is no Gemma 3 template in the folder. Gemma 4's (not a family we serve) has tools:
        // after a tool response it keeps the model's turn open and adds no generation prompt.
        ToolCase {
            families: "gemma3_text (stand-in: Gemma 4)",
            template: "google-gemma-4-31B-it.jinja",
            messages: weather_round_trip(true, "call_1", null),
            expect: Expect::Renders {
                contains: &[
                    "<s><|turn>system\nYou are a weather bot.<|tool>declaration:get_weather{description:<|\"|>Get the current weather in a city<|\"|>",
                    "<|turn>user\nWhat is the weather in Paris?<turn|>\n",
                    "<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>",
                    "<|tool_response>response:get_weather{value:<|\"|>{\"temperature\": 21}<|\"|>}<tool_response|>",
                ],
                lacks: &[],
                ends_with: "<tool_response|>",
            },
        },
    ]
}

#[test]
fn each_family_template_renders_a_tool_round_trip() {
    let dir = common::or_skip!(templates());
    let tools = weather_tool();
    let mut failures = Vec::new();
    for case in tool_cases() {
        let label = format!("{} ({})", case.template, case.families);
        let rendered = render_file(&dir, case.template, &case.messages, Some(&tools));
        match (&case.expect, rendered) {
            (
                Expect::Renders {
                    contains,
                    lacks,
                    ends_with,
                },
                Ok(out),
            ) => {
                for needle in *contains {
                    if !out.contains(needle) {
                        failures.push(format!("{label}: lacks {needle:?} in:\n{out}"));
                    }
                }
                for needle in *lacks {
                    if out.contains(needle) {
                        failures.push(format!("{label}: should not show {needle:?} in:\n{out}"));
                    }
                }
                if !out.ends_with(ends_with) {
                    failures.push(format!("{label}: does not end with {ends_with:?}:\n{out}"));
                }
            }
            (Expect::Raises(want), Err(Error::TemplateException { message, .. }))
                if message == *want => {}
            (Expect::Fails(want), Err(Error::Template { msg, .. })) if msg.contains(want) => {}
            (_, got) => failures.push(format!("{label}: unexpected {got:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
