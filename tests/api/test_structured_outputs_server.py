"""Structured outputs and tool calls through the openai client against the real server on SmolLM2 (the default
GGUF model), prefix caching on: every sampled answer follows its schema, regex or choice; forced tool calls have
arguments valid for the tool's schema, streamed (as they form) or not; a bad schema is a 400 that says what is wrong."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from api.server_process import ENGINE_FLAGS, ServerProcess


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)
    city: str = Field(max_length=24)


WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(smollm2_gguf, tmp_path_factory):
    server = ServerProcess(["--model", str(smollm2_gguf), *ENGINE_FLAGS, "--max-model-len", "1024",
                            "--enable-prefix-caching", "--disable-log-requests", "--disable-log-stats",
                            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                           tmp_path_factory.mktemp("server") / "server.log")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    server.stop()


def test_pydantic_schema_parses_on_every_sampled_answer(client):
    def one(seed):
        return client.chat.completions.parse(
            model="", messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
            response_format=Person, temperature=0.8, max_tokens=300, seed=seed)
    with ThreadPoolExecutor(20) as pool:
        completions = list(pool.map(one, range(20)))
    for c in completions:
        assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
        person = c.choices[0].message.parsed
        assert isinstance(person, Person), c.choices[0].message.content


def test_schema_with_n_and_streaming_and_a_stop_string(client):
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    stream = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}], n=3, temperature=0.9,
        max_tokens=300, seed=3, stream=True, response_format=schema, stop=["never-appears"])
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    people = [Person.model_validate_json(text) for text in texts]  # raises on text that breaks the schema
    assert len(people) == 3 and all(isinstance(p, Person) for p in people)


def test_guided_choice_only_returns_a_choice(client):
    out = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Is the sky green?"}],
                                         n=8, temperature=1.0, max_tokens=5,
                                         extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert {c.message.content for c in out.choices} <= {"yes", "no", "maybe"}


def test_guided_regex_output_matches(client):
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    out = client.completions.create(model="", prompt="My phone number is", n=4, temperature=1.0, max_tokens=20,
                                    extra_body={"guided_regex": pattern})
    for choice in out.choices:
        assert re.fullmatch(pattern, choice.text), choice.text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_arguments_follow_the_schema(client, tool_choice):
    out = client.chat.completions.create(model="", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                         temperature=0.7, max_tokens=80, seed=1)
    message = out.choices[0].message
    assert message.tool_calls, message
    for call in message.tool_calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    if tool_choice == "required":
        assert out.choices[0].finish_reason == "tool_calls"
    else:
        assert message.tool_calls[0].function.name == "get_weather" and out.choices[0].finish_reason == "stop"


def _fold(stream) -> dict[int, dict]:
    """Each choice's content, calls (name, arguments, how many deltas carried arguments) and finish_reason, as a
    client folds the chunks."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            entry = choices.setdefault(choice.index, {"content": "", "calls": {}, "finish": None})
            entry["finish"] = choice.finish_reason or entry["finish"]
            entry["content"] += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = entry["calls"].get(delta.index)
                if call is None:  # the opening: id, type and name
                    assert delta.id.startswith("chatcmpl-tool-") and delta.type == "function" and delta.function.name
                    call = entry["calls"][delta.index] = {"name": delta.function.name, "arguments": "", "pieces": 0}
                else:  # then only arguments
                    assert delta.id is None and delta.function.name is None
                call["arguments"] += delta.function.arguments or ""
                call["pieces"] += bool(delta.function.arguments)
    return choices


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_into_the_non_streamed_call(client, tool_choice):
    kwargs = dict(model="", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=80, n=2)
    whole = client.chat.completions.create(**kwargs).choices[0]
    choices = _fold(client.chat.completions.create(**kwargs, stream=True))
    assert sorted(choices) == [0, 1]  # n=2 at temperature 0: two streams of the same answer
    for streamed in choices.values():
        assert not streamed["content"]
        assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert streamed["finish"] == whole.finish_reason
        assert all(c["pieces"] > 1 for c in streamed["calls"].values())  # the arguments arrive as they form


# A few examples make SmolLM2-135M answer with a hermes call at temperature 0 (its template has no tool format).
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s", "unit": "celsius"}}\n</tool_call>'
FEW_SHOT = [{"role": "system", "content": "You call tools. To call a tool, answer only with "
                                          "<tool_call>{JSON}</tool_call>. Tools: get_weather(city, unit)."},
            *[m for city in ("London", "Tokyo", "Madrid") for m in (
                {"role": "user", "content": f"What is the weather like in {city} today?"},
                {"role": "assistant", "content": CALL % city})],
            *ASK]


def test_auto_tool_call_streams_as_it_is_written(client):
    kwargs = dict(model="", messages=FEW_SHOT, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1, whole.message
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    (streamed,) = _fold(client.chat.completions.create(**kwargs, stream=True)).values()
    assert streamed["content"] == (whole.message.content or "") and streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == \
        [(call.function.name, call.function.arguments)]
    assert streamed["calls"][0]["pieces"] > 1


def test_auto_tool_choice_answers_in_text_when_the_model_calls_nothing(client):
    out = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Say hello."}],
                                         tools=TOOLS, temperature=0, max_tokens=12)
    choice = out.choices[0]
    assert choice.message.content and not choice.message.tool_calls and choice.finish_reason in ("stop", "length")


def test_tool_history_reaches_the_template(client):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    out = client.chat.completions.create(model="", messages=messages, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=8)
    assert out.usage.prompt_tokens > 30 and out.choices[0].message.content


@pytest.mark.parametrize("extra,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}, ["json", "no-such-type"]),
    ({"guided_regex": "([a-z]"}, ["regex"]),
    ({"guided_grammar": 'root ::= "a" rule'}, ["grammar", "rule"]),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, ["guided_json", "guided_regex"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ["nope"]),
])
def test_invalid_constraint_is_400_saying_what(client, extra, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=ASK, max_tokens=5, extra_body=extra)
    message = info.value.body["message"]
    for word in words:
        assert word in message, message
