//! Real chat templates from ../shared/data/chat-templates (skipped without it) render a typical
//! conversation, and SmolLM2's template reproduces the reference's templated text.

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
