"""The tool-call parsers on what real models write (recorded outputs of Qwen2.5-7B-Instruct for hermes and
Llama-3.1-8B-Instruct for llama3_json, as in vLLM's parser tests), whole and streamed piece by piece."""
from __future__ import annotations

import json

import pytest

from npu_infer.api.chat_output import ChoiceStream, ToolPlan, final_message
from npu_infer.api.tool_parsers import get_tool_parser

QWEN_ONE = ('<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", '
            '"unit": "fahrenheit"}}\n</tool_call>')
QWEN_TWO = ('Let me check both cities.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Orlando"}}\n'
            '</tool_call>')
QWEN_TEXT = "The weather in Dallas is sunny today, 75°F."
QWEN_BROKEN = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dal'  # cut by max_tokens
LLAMA_ONE = '{"name": "get_current_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
LLAMA_TAG = ('<|python_tag|>{"name": "searcher", "parameters": {"q": "vllm"}}; '
             '{"name": "get_current_weather", "parameters": {"city": "Paris"}}')
LLAMA_TEXT = "I can't check the weather, but {curly} braces are fine in text."


@pytest.mark.parametrize("name,text,content,calls", [
    ("hermes", QWEN_ONE, None, [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})]),
    ("hermes", QWEN_TWO, "Let me check both cities.", [("get_current_weather", {"city": "Dallas"}),
                                                       ("get_current_weather", {"city": "Orlando"})]),
    ("hermes", QWEN_TEXT, QWEN_TEXT, []),
    ("hermes", QWEN_BROKEN, QWEN_BROKEN, []),
    ("llama3_json", LLAMA_ONE, None, [("get_current_weather", {"city": "San Francisco", "unit": "celsius"})]),
    ("llama3_json", LLAMA_TAG, None, [("searcher", {"q": "vllm"}), ("get_current_weather", {"city": "Paris"})]),
    ("llama3_json", LLAMA_TEXT, LLAMA_TEXT, []),
    ("llama3_json", '{"name": "f", "parameters": {}} and then some words', '{"name": "f", "parameters": {}} and '
                                                                           'then some words', []),
])
def test_parser_reads_recorded_output(name, text, content, calls):
    got_content, got_calls = get_tool_parser(name).parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


def _stream(plan: ToolPlan, text: str, piece: int = 3):
    state = ChoiceStream(plan, None)
    deltas = []
    for i in range(0, len(text), piece):
        last = i + piece >= len(text)
        delta = state.update(text[i:i + piece], last)
        if delta is not None:
            deltas.append(delta.model_dump())
    return deltas, state


REQUIRED = '[{"name": "get_current_weather", "parameters": {"city": "Dallas"}}, {"name": "f", "parameters": {}}]'


@pytest.mark.parametrize("name,text", [("hermes", QWEN_TWO), ("hermes", QWEN_TEXT), ("llama3_json", LLAMA_TAG),
                                       ("llama3_json", LLAMA_TEXT), ("required", REQUIRED)])
def test_streamed_calls_reassemble_into_the_whole_message(name, text):
    plan = ToolPlan("required") if name == "required" else ToolPlan("auto", parser=get_tool_parser(name))
    deltas, state = _stream(plan, text)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call["function"].get("name", "")
            entry["arguments"] += call["function"].get("arguments", "")
    whole, finish = final_message(text, "stop", plan, None)
    assert content.strip() == (whole.content or "").strip()
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls]
    assert state.finish_reason("stop") == finish == ("tool_calls" if whole.tool_calls else "stop")
    # A tool call's text is never sent as content.
    assert "<tool_call>" not in content and "python_tag" not in content


def test_named_call_streams_its_arguments_under_one_opening():
    plan = ToolPlan("named", name="get_current_weather")
    deltas, state = _stream(plan, '{"city": "Dallas"}', piece=4)
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("chatcmpl-tool-")
    assert first["function"]["name"] == "get_current_weather"
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:])
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Dallas"}'
    assert state.finish_reason("stop") == "stop"  # OpenAI keeps "stop" for a forced named function
