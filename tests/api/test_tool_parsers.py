"""The tool-call parsers on what real models write (recorded outputs of Qwen2.5-7B-Instruct for hermes and
Llama-3.1-8B-Instruct for llama3_json, as in vLLM's parser tests; the grammar-forced array of tool_choice
"required"), read whole: the non-streamed message. Streaming is in test_tool_call_streaming.py."""
from __future__ import annotations

import json

import pytest

from npu_infer.api.tool_parsers import get_tool_parser
from npu_infer.api.tool_parsers.required import REQUIRED as REQUIRED_FORMAT

QWEN_ONE = ('<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", '
            '"unit": "fahrenheit"}}\n</tool_call>')
QWEN_TWO = ('Let me check both cities.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Orlando"}}\n'
            '</tool_call>')
QWEN_TEXT = "The weather in Dallas is sunny today, 75°F."
# Strings that a brace / quote counter must not be fooled by; unicode, raw and escaped.
QWEN_TRICKY = ('<tool_call>\n{"name": "write_note", "arguments": {"text": "a {b} \\"c}\\" ]] \\\\", "title": '
               '"héllo ☃ \\u00e9", "tags": [{"k": "}]"}, [1, 2.5e3, true, null]]}}\n</tool_call>')
QWEN_NOT_A_CALL = '<tool_call>\n{"name": get_current_weather, "arguments": {}}\n</tool_call>'  # name not a string
QWEN_TAG_IN_TEXT = "Put calls inside <tool_call> tags, like <tool_call>this</tool_call>."
QWEN_CUT_BEFORE_NAME = '<tool_call>\n{"name": "get_current_wea'  # max_tokens before the name is whole: content
QWEN_CUT = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dal'  # after it: a cut call
QWEN_ORDER = '<tool_call>{"arguments": {"q": "x"}, "name": "search", "id": 7}</tool_call>'
QWEN_NO_ARGS = '<tool_call>{"name": "now"}</tool_call>'
QWEN_STRING_ARGS = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
QWEN_THEN_TEXT = '<tool_call>{"name": "now", "arguments": {}}</tool_call>\nI will wait for the time.'
QWEN_THEN_BROKEN = '<tool_call>{"name": "now", "arguments": {}}</tool_call>\n<tool_call>{"oops": 1}</tool_call>'
LLAMA_ONE = '{"name": "get_current_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
LLAMA_TAG = ('<|python_tag|>{"name": "searcher", "parameters": {"q": "vllm"}}; '
             '{"name": "get_current_weather", "parameters": {"city": "Paris"}}')
LLAMA_TWO = '{"name": "a", "parameters": {"x": "; {\\"name\\": \\"b\\"}"}}; {"name": "b", "parameters": {"y": 1}}'
LLAMA_TEXT = "I can't check the weather, but {curly} braces are fine in text."
LLAMA_JSON_ANSWER = '{"answer": 42, "name_of_city": "Paris"}'
LLAMA_THEN_TEXT = '{"name": "f", "parameters": {}} and then some words'
REQUIRED = ('[{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius"}},'
            '{"name":"get_time","parameters":{"city":"Pa\\"ris}"}}]')
REQUIRED_SPACED = '[ {"name": "get_time", "parameters": {"city": "Zürich"}} ]'
REQUIRED_CUT = '[{"name":"get_weather","parameters":{"city":"Par'

# (format, text, content, [(name, arguments text)]): the arguments are the model's own text of the value.
CASES = [
    ("hermes", QWEN_ONE, None, [("get_current_weather", '{"city": "Dallas", "state": "TX", "unit": "fahrenheit"}')]),
    ("hermes", QWEN_TWO, "Let me check both cities.", [("get_current_weather", '{"city": "Dallas"}'),
                                                       ("get_current_weather", '{"city": "Orlando"}')]),
    ("hermes", QWEN_TEXT, QWEN_TEXT, []),
    ("hermes", QWEN_TRICKY, None, [("write_note", QWEN_TRICKY[QWEN_TRICKY.index('{"text"'):-len("}\n</tool_call>")])]),
    ("hermes", QWEN_NOT_A_CALL, QWEN_NOT_A_CALL, []),
    ("hermes", QWEN_TAG_IN_TEXT, QWEN_TAG_IN_TEXT, []),
    ("hermes", QWEN_CUT_BEFORE_NAME, QWEN_CUT_BEFORE_NAME, []),
    ("hermes", QWEN_CUT, None, [("get_current_weather", '{"city": "Dal')]),
    ("hermes", QWEN_ORDER, None, [("search", '{"q": "x"}')]),
    ("hermes", QWEN_NO_ARGS, None, [("now", "{}")]),
    ("hermes", QWEN_STRING_ARGS, None, [("f", '{"a": 1}')]),
    ("hermes", QWEN_THEN_TEXT, "\nI will wait for the time.", [("now", "{}")]),
    ("hermes", QWEN_THEN_BROKEN, '\n<tool_call>{"oops": 1}</tool_call>', [("now", "{}")]),
    ("llama3_json", LLAMA_ONE, None, [("get_current_weather", '{"city": "San Francisco", "unit": "celsius"}')]),
    ("llama3_json", LLAMA_TAG, None, [("searcher", '{"q": "vllm"}'), ("get_current_weather", '{"city": "Paris"}')]),
    ("llama3_json", LLAMA_TWO, None, [("a", '{"x": "; {\\"name\\": \\"b\\"}"}'), ("b", '{"y": 1}')]),
    ("llama3_json", LLAMA_TEXT, LLAMA_TEXT, []),
    ("llama3_json", LLAMA_JSON_ANSWER, LLAMA_JSON_ANSWER, []),
    ("llama3_json", LLAMA_THEN_TEXT, " and then some words", [("f", "{}")]),
    ("llama3_json", "  ", "  ", []),
    ("required", REQUIRED, None, [("get_weather", '{"city":"Paris","unit":"celsius"}'),
                                  ("get_time", '{"city":"Pa\\"ris}"}')]),
    ("required", REQUIRED_SPACED, None, [("get_time", '{"city": "Zürich"}')]),
    ("required", REQUIRED_CUT, None, [("get_weather", '{"city":"Par')]),
]
CUT = {QWEN_CUT, REQUIRED_CUT}  # cut by max_tokens after the name: the arguments are what was written


def call_format(name: str):
    return REQUIRED_FORMAT if name == "required" else get_tool_parser(name)


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_parser_reads_recorded_output(name, text, content, calls):
    got_content, got_calls = call_format(name).parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for call in got_calls:
        if text not in CUT:
            json.loads(call.arguments)  # whole calls have valid JSON arguments


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")
