//! Tool-choice rules, the constraining schema, and calls parsed from each model family's format.

use super::*;

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time"}}
    ])
}

fn tool_use(choice: Value) -> ToolUse {
    ToolUse::from_request(Some(&weather_tools()), Some(&choice), None)
        .unwrap()
        .unwrap()
}

fn call(name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        name: name.into(),
        arguments: arguments.to_string(),
    }
}

#[test]
fn tool_choice_modes_and_their_errors() {
    assert_eq!(tool_use(json!("auto")).mode, ToolMode::Auto);
    assert_eq!(tool_use(json!("required")).mode, ToolMode::Required);
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    assert_eq!(tool_use(named).mode, ToolMode::Named("get_time".into()));
    let tools = weather_tools();
    assert!(
        ToolUse::from_request(Some(&tools), Some(&json!("none")), None)
            .unwrap()
            .is_none()
    );
    assert!(ToolUse::from_request(None, None, None).unwrap().is_none());
    for (tools, choice) in [
        (
            Some(weather_tools()),
            json!({"type": "function", "function": {"name": "nope"}}),
        ),
        (Some(weather_tools()), json!("sometimes")),
        (None, json!("required")),
        (
            Some(json!([{"type": "function", "function": {}}])),
            json!("auto"),
        ),
        (Some(json!({"not": "a list"})), json!("auto")),
    ] {
        let e = ToolUse::from_request(tools.as_ref(), Some(&choice), None).unwrap_err();
        assert!(matches!(e, RouterError::Tool(_)), "{choice}: {e:?}");
    }
}

#[test]
fn required_and_named_choices_constrain_to_a_call() {
    assert!(tool_use(json!("auto")).grammar().is_none());
    let named = tool_use(json!({"type": "function", "function": {"name": "get_weather"}}));
    let schema = named.grammar().unwrap();
    assert_eq!(schema["properties"]["name"]["const"], "get_weather");
    assert_eq!(
        schema["properties"]["arguments"]["required"],
        json!(["city"])
    );
    assert_eq!(
        schema["properties"]["arguments"]["additionalProperties"],
        json!(false)
    );
    let required = tool_use(json!("required")).grammar().unwrap();
    assert_eq!(required["anyOf"].as_array().unwrap().len(), 2);
    let parallel =
        ToolUse::from_request(Some(&weather_tools()), Some(&json!("required")), Some(true))
            .unwrap()
            .unwrap();
    assert_eq!(parallel.grammar().unwrap()["anyOf"][1]["type"], "array");
}

#[test]
fn constrained_output_parses_as_one_or_many_calls() {
    let t = tool_use(json!("required"));
    let (content, calls) = t.parse(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#);
    assert_eq!(content, None);
    assert_eq!(calls, vec![call("get_weather", json!({"city": "Paris"}))]);
    let (_, calls) = t.parse(r#"[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]"#);
    assert_eq!(calls.len(), 2);
    // Cut short by max_tokens: not a call, the text stays content.
    let (content, calls) = t.parse(r#"{"name": "get_weather", "argu"#);
    assert!(calls.is_empty());
    assert_eq!(content.as_deref(), Some(r#"{"name": "get_weather", "argu"#));
}

#[test]
fn each_family_format_parses() {
    let t = tool_use(json!("auto"));
    let paris = call("get_weather", json!({"city": "Paris"}));
    let cases = [
        // Hermes / Qwen 2.5 / Qwen 3, with text before.
        ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", Some("Let me check.")),
        // Mistral v3.
        ("[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]", None),
        // Mistral v11+.
        ("[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}", None),
        // Llama 3.1 with its tag, and Llama 3.2's bare JSON with "parameters".
        ("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", None),
        ("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", None),
        // Arguments as a JSON string.
        ("{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}", None),
        // TGI's own tool grammar.
        ("{\"function\": {\"_name\": \"get_weather\", \"city\": \"Paris\"}}", None),
    ];
    for (text, content) in cases {
        let (got_content, calls) = t.parse(text);
        assert_eq!(calls, vec![paris.clone()], "{text}");
        assert_eq!(got_content.as_deref(), content, "{text}");
    }
    let (_, calls) = t.parse("<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>");
    assert_eq!(calls.len(), 2);
    let (_, calls) = t.parse("<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}");
    assert_eq!(calls.len(), 2);
}

#[test]
fn plain_text_and_json_that_is_no_call_stay_content() {
    let t = tool_use(json!("auto"));
    for text in [
        "The weather in Paris is sunny.",
        "Here is JSON: {\"name\": \"x\", \"arguments\": {}}",
        "{\"city\": \"Paris\"}",
        "<tool_call>not json</tool_call>",
    ] {
        let (content, calls) = t.parse(text);
        assert!(calls.is_empty(), "{text}");
        assert_eq!(content.as_deref(), Some(text));
    }
}

#[test]
fn history_arguments_become_objects_and_calls_can_become_content() {
    let messages = vec![
        json!({"role": "user", "content": "Weather?"}),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
        json!({"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"}),
    ];
    let mut messages = template_messages(messages);
    assert_eq!(
        messages[1]["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Paris"})
    );
    calls_as_content(&mut messages);
    assert_eq!(
        messages[1]["content"],
        json!("{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}")
    );
    let mut fresh = vec![json!({"role": "user", "content": "Weather?"})];
    inject_tool_prompt(&mut fresh, &weather_tools(), None);
    let content = fresh[0]["content"].as_str().unwrap();
    assert!(content.starts_with("Weather?\n\nGiven the functions available"));
    assert!(content.contains("get_weather"));
}

#[test]
fn partial_calls_follow_text_being_written() {
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa";
    let calls = partial_calls(text);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name.as_deref(), Some("get_weather"));
    let args = calls[0].arguments.clone().unwrap();
    assert_eq!(&text[args], "{\"city\": \"Pa");
    // Braces and quotes inside strings do not end anything; the value ends with its own brace.
    let text = r#"[{"name": "a", "arguments": {"s": "}\"{"}}, {"arguments": {"x": [1, {"y": 2}]}, "name": "b"}]"#;
    let calls = partial_calls(text);
    let spans: Vec<(Option<&str>, &str)> = calls
        .iter()
        .map(|c| (c.name.as_deref(), &text[c.arguments.clone().unwrap()]))
        .collect();
    assert_eq!(
        spans,
        vec![
            (Some("a"), r#"{"s": "}\"{"}"#),
            (Some("b"), r#"{"x": [1, {"y": 2}]}"#)
        ]
    );
    // Keys and names nested inside arguments are not the call's.
    let calls = partial_calls(r#"{"arguments": {"name": "inner"}, "name": "outer"}"#);
    assert_eq!(calls[0].name.as_deref(), Some("outer"));
}
