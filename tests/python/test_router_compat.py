"""Client compatibility: the official `openai` SDK (strict response validation) and
`huggingface_hub.InferenceClient` against the real router, streaming and not, and their errors."""
import huggingface_hub
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


def test_openai_chat(oai):
    out = oai.chat.completions.create(model="tgi", messages=QUESTION, temperature=0, max_tokens=48, top_p=1.0)
    assert out.choices[0].message.content == ANSWER
    assert out.choices[0].finish_reason == "stop"
    assert out.id.startswith("chatcmpl-")
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == 37


def test_openai_chat_stream_with_usage_and_logprobs(oai):
    stream = oai.chat.completions.create(model="tgi", messages=QUESTION, temperature=0, max_tokens=48, stream=True,
                                         stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.total_tokens == 45
    first = next(c for c in chunks if c.choices and c.choices[0].logprobs)
    assert len(first.choices[0].logprobs.content[0].top_logprobs) == 2


def test_openai_n_seed_and_length(oai):
    out = oai.chat.completions.create(model="tgi", messages=QUESTION, n=2, max_tokens=3, seed=1, presence_penalty=0.5)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)


def test_openai_completions(oai, base_url):
    out = oai.completions.create(model="tgi", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert out.choices[0].text == ", the city of"
    assert out.choices[0].finish_reason == "length"
    # The SDK types `CompletionChoice.finish_reason` as non-null, so strict validation rejects every
    # streamed legacy-completions chunk (OpenAI's own API sends null there too): stream without it.
    lenient = openai.OpenAI(base_url=base_url + "/v1", api_key="-")
    stream = lenient.completions.create(model="tgi", prompt="Once upon a time", max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ", the city of"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_errors(oai):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="tgi", messages=QUESTION, temperature=-1.0)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tgi", messages=QUESTION, stream=True, top_p=2.0)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="tgi", prompt="a", suffix="b")


def test_openai_models(oai):
    assert [m.id for m in oai.models.list()] == ["smollm2"]


def test_hub_chat(hub):
    out = hub.chat_completion(messages=QUESTION, temperature=0, max_tokens=48)
    assert out.choices[0].message.content == ANSWER
    assert out.choices[0].finish_reason == "stop"
    stream = hub.chat_completion(messages=QUESTION, temperature=0, max_tokens=48, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER


def test_hub_text_generation(hub):
    assert hub.text_generation("Once upon a time", max_new_tokens=4) == ", the city of"
    details = hub.text_generation("Once upon a time", max_new_tokens=4, details=True)
    assert details.details.finish_reason == "length"
    assert [t.id for t in details.details.tokens] == [28, 260, 2240, 282]
    tokens = list(hub.text_generation("Once upon a time", max_new_tokens=4, stream=True, details=True))
    assert "".join(t.token.text for t in tokens) == ", the city of"
    assert tokens[-1].generated_text == ", the city of"


def test_hub_errors(hub):
    with pytest.raises(huggingface_hub.errors.ValidationError):
        hub.text_generation("Hello", max_new_tokens=4, top_k=-1)
    with pytest.raises(huggingface_hub.errors.ValidationError):
        hub.text_generation("Hello", max_new_tokens=4, top_k=-1, stream=True)
