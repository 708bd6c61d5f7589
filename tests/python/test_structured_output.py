"""Structured output and tool calls through real clients: the openai SDK's `chat.completions.parse`
with a pydantic model, a tools round trip (call → result → answer), streamed tool calls reassembled
by the SDK, huggingface_hub's `text_generation(grammar=…)`; every constrained output is validated
against its schema with `jsonschema`. Also `logit_bias`, `min_p` and stop trimming."""
import json

import huggingface_hub
import jsonschema
import openai
import pydantic
import pytest
import requests

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    country: str = pydantic.Field(max_length=24)
    population: int = pydantic.Field(ge=0, le=100_000_000)


def test_parse_with_a_pydantic_model(oai):
    out = oai.chat.completions.parse(model="tgi", messages=[{"role": "user", "content": "Describe Paris."}],
                                     response_format=City, temperature=0, max_tokens=120)
    message = out.choices[0].message
    assert isinstance(message.parsed, City)
    jsonschema.validate(json.loads(message.content), City.model_json_schema())
    assert out.choices[0].finish_reason == "stop"


def test_json_object_and_schema_response_formats(oai):
    out = oai.chat.completions.create(model="tgi", messages=ASK, temperature=0, max_tokens=200,
                                      response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    stream = oai.chat.completions.create(model="tgi", messages=ASK, temperature=0, max_tokens=30, stream=True,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "yn", "schema": schema, "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def _call_of(oai, **kw):
    out = oai.chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                      max_tokens=60, **kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    return choice.message, call


def test_tools_round_trip(oai, base_url):
    message, call = _call_of(oai, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert call.function.name == "get_weather" and len(call.id) == 9
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees"}]
    # The call and its result reach the template on the next turn.
    prompt = requests.post(base_url + "/chat_tokenize", json={"messages": history, "tools": [WEATHER]}).json()
    assert "Sunny, 24 degrees" in prompt["templated_text"] and "get_weather" in prompt["templated_text"]
    answer = oai.chat.completions.create(model="tgi", messages=history, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=40)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # `required` picks among all tools.
    _call_of(oai, tool_choice="required")


def test_streamed_tool_calls_reassemble_in_the_sdk(oai):
    _, call = _call_of(oai, tool_choice="required")
    raw = list(oai.chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=0, max_tokens=60, stream=True))
    pieces = [c.choices[0].delta.tool_calls[0] for c in raw if c.choices and c.choices[0].delta.tool_calls]
    assert pieces[0].id and pieces[0].function.name == call.function.name
    assert len(pieces) > 2, "the arguments stream in pieces"
    assert raw[-1].choices[0].finish_reason == "tool_calls"
    chat = oai.chat.completions if hasattr(oai.chat.completions, "stream") else oai.beta.chat.completions
    with chat.stream(model="tgi", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
                     max_tokens=60) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert streamed.function.name == call.function.name
    # Streamed arguments are the model's own JSON text, piece by piece; the same value as the non-streamed call.
    assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)


def test_hub_text_generation_with_grammars(hub):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"]}
    text = hub.text_generation("A person as JSON:", max_new_tokens=60, grammar={"type": "json", "value": schema})
    jsonschema.validate(json.loads(text), schema)
    out = hub.text_generation("Is Paris in France? Answer:", max_new_tokens=8, details=True,
                              grammar={"type": "regex", "value": " ?(yes|no)"})
    assert out.generated_text.strip() in ("yes", "no")
    assert out.details.finish_reason == "eos_token"
    streamed = "".join(t.token.text for t in hub.text_generation("A person as JSON:", max_new_tokens=60, stream=True,
                                                                 details=True, grammar={"type": "json", "value": schema})
                       if not t.token.special)
    assert streamed == text


def test_bad_grammars_are_422_before_generation(oai, hub):
    with pytest.raises(huggingface_hub.errors.ValidationError) as e:
        hub.text_generation("a", max_new_tokens=4, grammar={"type": "regex", "value": "(unclosed"})
    assert "grammar is not valid" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tgi", messages=ASK, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tgi", messages=ASK, max_tokens=4, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "not_a_tool"}})


def test_logit_bias_and_min_p(oai):
    # Token 28 is "," (SmolLM2): a +100 bias makes it every greedy choice.
    out = oai.completions.create(model="tgi", prompt="Once upon a time", max_tokens=3, temperature=0,
                                 logit_bias={"28": 100})
    assert out.choices[0].text == ",,,"
    out = oai.completions.create(model="tgi", prompt="Once upon a time", max_tokens=4, seed=3, temperature=1.0,
                                 extra_body={"min_p": 1.0})
    assert out.choices[0].text == ", the city of", "min_p = 1 keeps only the most likely token"


def test_stop_inside_a_token_never_leaks(oai):
    # " Paris" is one token: the stop "Par" ends inside it, with "is" after.
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = oai.chat.completions.create(model="tgi", messages=question, temperature=0, max_tokens=48, stop=["Par"])
    assert out.choices[0].message.content == "The capital of France is "
    stream = oai.chat.completions.create(model="tgi", messages=question, temperature=0, max_tokens=48, stop=["Par"],
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The capital of France is "
