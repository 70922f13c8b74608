"""Every field of vLLM's CompletionRequest and ChatCompletionRequest is either honoured (its effect is checked
where a tiny model can show it) or refused with a 400 that names it; a field nobody defined is a 400 too.
Nothing is dropped behind a 200."""
from __future__ import annotations

import json
import re

import pytest
import requests

from api.server_process import ENGINE_FLAGS, ServerProcess

# The fields of vllm/entrypoints/openai/protocol.py (CompletionRequest, ChatCompletionRequest), as recorded.
VLLM_COMMON = {
    "model", "frequency_penalty", "logit_bias", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "user", "best_of", "use_beam_search", "top_k", "min_p", "repetition_penalty",
    "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "echo", "add_special_tokens", "response_format", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "priority", "request_id", "logits_processors", "return_tokens_as_token_ids", "return_token_ids", "cache_salt",
    "kv_transfer_params", "vllm_xargs", "logprobs", "max_tokens"}
VLLM_COMPLETION = VLLM_COMMON | {"prompt", "suffix", "prompt_embeds"}
VLLM_CHAT = VLLM_COMMON | {
    "messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "reasoning_effort",
    "include_reasoning", "parallel_tool_calls", "bad_words", "continue_final_message", "add_generation_prompt",
    "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs", "structural_tag"}
# Ours: vLLM's bad_words on completions too.
OURS_COMPLETION_EXTRA = {"bad_words"}

REFUSED = "400"
EOS = 2  # SmolLM2's <|im_end|>
SCHEMA = {"type": "string", "enum": ["alpha", "beta"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    proc = ServerProcess(["--model", str(tiny_chat_model_dir), "--served-model-name", "tiny", *ENGINE_FLAGS,
                          "--disable-log-requests", "--disable-log-stats", "--scheduling-policy", "priority",
                          "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
                         tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    proc.stop()


def _choice(r):
    return r.json()["choices"][0]


def _text(r):
    c = _choice(r)
    return c["text"] if "text" in c else c["message"]["content"]


def _ids(r):
    return _choice(r)["token_ids"]


def _stream_events(r):
    return [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]


COMPLETION_CASES = {
    "model": ({"model": "tiny"}, lambda r: r.json()["model"] == "tiny"),
    "prompt": ({}, lambda r: r.json()["usage"]["prompt_tokens"] > 0),
    "best_of": ({"best_of": 2}, lambda r: len(r.json()["choices"]) == 1),
    "echo": ({"echo": True}, lambda r: _text(r).startswith("Hello there")),
    "frequency_penalty": ({"frequency_penalty": 0.5}, None),
    "presence_penalty": ({"presence_penalty": 0.5}, None),
    "repetition_penalty": ({"repetition_penalty": 1.2}, None),
    "logit_bias": ({"logit_bias": {"42": 100}}, lambda r: set(_ids(r)) == {42}),
    "logprobs": ({"logprobs": 2}, lambda r: len(_choice(r)["logprobs"]["top_logprobs"][0]) >= 2),
    "max_tokens": ({"max_tokens": 2}, lambda r: len(_ids(r)) <= 2),
    "n": ({"n": 2, "temperature": 1.0}, lambda r: len(r.json()["choices"]) == 2),
    "seed": ({"seed": 7, "temperature": 1.0}, None),
    "stop": ({"stop": ["zzzz"]}, None),
    "stop_token_ids": ({"stop_token_ids": [42], "logit_bias": {"42": 100}},
                       lambda r: _choice(r)["stop_reason"] == 42),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True}, None),
    "ignore_eos": ({"ignore_eos": True, "logit_bias": {str(EOS): 100}}, lambda r: len(_ids(r)) == 4),
    "min_tokens": ({"min_tokens": 3, "logit_bias": {str(EOS): 100}},
                   lambda r: EOS not in _ids(r)[:3] and len(_ids(r)) >= 3),
    "stream": ({"stream": True}, lambda r: _stream_events(r)[-1] == "[DONE]"),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}},
                       lambda r: json.loads(_stream_events(r)[-2])["usage"]["completion_tokens"] > 0),
    "suffix": ({"suffix": "x"}, REFUSED),
    "temperature": ({"temperature": 0.5}, None),
    "top_p": ({"top_p": 0.5, "temperature": 1.0}, None),
    "top_k": ({"top_k": 1, "temperature": 1.0}, None),
    "min_p": ({"min_p": 0.5, "temperature": 1.0}, None),
    "user": ({"user": "someone"}, None),
    "use_beam_search": ({"use_beam_search": True}, REFUSED),
    "length_penalty": ({"length_penalty": 2.0}, REFUSED),
    "skip_special_tokens": ({"skip_special_tokens": False, "logit_bias": {"42": 100}}, None),
    "spaces_between_special_tokens": ({"spaces_between_special_tokens": False}, REFUSED),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 2}, lambda r: r.json()["usage"]["prompt_tokens"] == 2),
    "allowed_token_ids": ({"allowed_token_ids": [42, 43], "temperature": 1.0}, lambda r: set(_ids(r)) <= {42, 43}),
    "bad_words": ({"bad_words": ["hello"], "logit_bias": {"28120": 100}}, lambda r: 28120 not in _ids(r)),
    "prompt_logprobs": ({"prompt_logprobs": 1}, lambda r: _choice(r)["prompt_logprobs"][1] is not None),
    "prompt_embeds": ({"prompt_embeds": "AAAA"}, REFUSED),
    "add_special_tokens": ({"add_special_tokens": False}, None),
    "response_format": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                         "max_tokens": 8}, lambda r: json.loads(_text(r)) in SCHEMA["enum"]),
    "structured_outputs": ({"structured_outputs": {"regex": "[0-9]{3}"}, "temperature": 1.0},
                           lambda r: re.fullmatch("[0-9]{3}", _text(r))),
    "guided_json": ({"guided_json": SCHEMA, "max_tokens": 8}, lambda r: json.loads(_text(r)) in SCHEMA["enum"]),
    "guided_regex": ({"guided_regex": "[a-c]{2}x", "temperature": 1.0}, lambda r: re.fullmatch("[a-c]{2}x", _text(r))),
    "guided_choice": ({"guided_choice": ["yes", "no"], "temperature": 1.0}, lambda r: _text(r) in ("yes", "no")),
    "guided_grammar": ({"guided_grammar": 'root ::= "ab" | "cd"', "temperature": 1.0},
                       lambda r: _text(r) in ("ab", "cd")),
    "guided_decoding_backend": ({"guided_choice": ["yes", "no"], "guided_decoding_backend": "guidance"},
                                lambda r: _text(r) in ("yes", "no")),
    "guided_whitespace_pattern": ({"guided_json": SCHEMA, "guided_whitespace_pattern": " *"}, REFUSED),
    "priority": ({"priority": -1}, None),
    "request_id": ({"request_id": "abc"}, lambda r: r.json()["id"].endswith("-abc")
                   and r.headers["X-Request-Id"] == r.json()["id"]),
    "logits_processors": ({"logits_processors": ["mod.Proc"]}, REFUSED),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": 1},
                                   lambda r: all(t.startswith("token_id:") for t in _choice(r)["logprobs"]["tokens"])),
    "return_token_ids": ({"return_token_ids": True}, lambda r: len(_ids(r)) > 0),
    "cache_salt": ({"cache_salt": "s"}, REFUSED),
    "kv_transfer_params": ({"kv_transfer_params": {"a": 1}}, REFUSED),
    "vllm_xargs": ({"vllm_xargs": {"a": 1}}, REFUSED),
}

_MSG = [{"role": "user", "content": "Say hi"}]
CHAT_ONLY = {
    "messages": ({}, lambda r: _choice(r)["message"]["role"] == "assistant"),
    "echo": ({"messages": [*_MSG, {"role": "assistant", "content": "Hi, I am"}], "add_generation_prompt": False,
              "continue_final_message": True, "echo": True}, lambda r: _text(r).startswith("Hi, I am")),
    "best_of": ({"best_of": 2}, REFUSED),
    "logprobs": ({"logprobs": True}, lambda r: len(_choice(r)["logprobs"]["content"]) > 0),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2},
                     lambda r: len(_choice(r)["logprobs"]["content"][0]["top_logprobs"]) == 2),
    "max_completion_tokens": ({"max_completion_tokens": 2}, lambda r: len(_ids(r)) <= 2),
    "prompt_logprobs": ({"prompt_logprobs": 1}, lambda r: r.json()["prompt_logprobs"][1] is not None),
    "return_tokens_as_token_ids": ({"return_tokens_as_token_ids": True, "logprobs": True},
                                   lambda r: _choice(r)["logprobs"]["content"][0]["token"].startswith("token_id:")),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 3}, lambda r: r.json()["usage"]["prompt_tokens"] == 3),
    # tools reach the template (a forced call is checked under tool_choice and parallel_tool_calls)
    "tools": ({"tools": [WEATHER], "tool_choice": "none",
               "chat_template": "{{ tools[0].function.name }}{% for m in messages %}{{ m.content }}{% endfor %}"},
              lambda r: r.json()["usage"]["prompt_tokens"] > 2),
    "tool_choice": ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                     "max_tokens": 30},
                    lambda r: json.loads(_choice(r)["message"]["tool_calls"][0]["function"]["arguments"])["city"]
                    in ("Paris", "Rome")),
    "parallel_tool_calls": ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
                             "max_tokens": 80}, lambda r: len(_choice(r)["message"]["tool_calls"]) == 1),
    "reasoning_effort": ({"reasoning_effort": "low"}, None),
    "include_reasoning": ({"include_reasoning": False}, lambda r: _choice(r)["message"]["reasoning_content"] is None),
    "continue_final_message": ({"messages": [*_MSG, {"role": "assistant", "content": "Hi"}],
                                "add_generation_prompt": False, "continue_final_message": True}, None),
    "add_generation_prompt": ({"add_generation_prompt": False}, None),
    "documents": ({"documents": [{"title": "t", "text": "x"}]}, None),
    "chat_template": ({"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
                      lambda r: r.json()["usage"]["prompt_tokens"] == 2),
    "chat_template_kwargs": ({"chat_template_kwargs": {"enable_thinking": False}}, None),
    "mm_processor_kwargs": ({"mm_processor_kwargs": {"a": 1}}, REFUSED),
    "structural_tag": ({"structural_tag": json.dumps({"structures": [
        {"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f>"]})}, None),
    "stream": ({"stream": True}, lambda r: _stream_events(r)[-1] == "[DONE]"),
    "bad_words": ({"bad_words": ["hello"], "logit_bias": {"28120": 100}}, lambda r: 28120 not in _ids(r)),
}
CHAT_CASES = {**{k: v for k, v in COMPLETION_CASES.items() if k in VLLM_CHAT}, **CHAT_ONLY}


def test_every_vllm_field_has_a_case():
    from npu_infer.api.protocol import ChatCompletionRequest, CompletionRequest
    assert set(COMPLETION_CASES) == VLLM_COMPLETION | OURS_COMPLETION_EXTRA
    assert set(CHAT_CASES) == VLLM_CHAT
    # Each is a declared field (so a typo in a client is an unknown field, never one of these).
    assert VLLM_COMPLETION <= set(CompletionRequest.model_fields)
    assert VLLM_CHAT <= set(ChatCompletionRequest.model_fields)


def _post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=120)


def _check(response, field, expect):
    if expect == REFUSED:
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["message"], response.text
        return
    assert response.status_code == 200, f"{field}: {response.text}"
    if expect is not None:
        assert expect(response), f"{field} was not honoured: {response.text[:800]}"


@pytest.mark.parametrize("field", sorted(COMPLETION_CASES))
def test_completion_field_is_honoured_or_refused(server, field):
    extra, expect = COMPLETION_CASES[field]
    body = {"prompt": "Hello there, how are you doing", "max_tokens": 4, "temperature": 0, "return_token_ids": True,
            **extra}
    _check(_post(server, "/v1/completions", body), field, expect)


@pytest.mark.parametrize("field", sorted(CHAT_CASES))
def test_chat_field_is_honoured_or_refused(server, field):
    extra, expect = CHAT_CASES[field]
    body = {"messages": _MSG, "max_tokens": 4, "temperature": 0, "return_token_ids": True, **extra}
    _check(_post(server, "/v1/chat/completions", body), field, expect)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "frobnicate": 1}),
    ("/v1/chat/completions", {"messages": _MSG, "max_tokens": 2, "frobnicate": 1}),
    ("/v1/chat/completions", {"messages": _MSG, "max_tokens": 2, "store": True}),
])
def test_unknown_field_is_400_naming_it(server, path, body):
    field = next(k for k in body if k not in ("prompt", "messages", "max_tokens"))
    r = _post(server, path, body)
    assert r.status_code == 400 and field in r.json()["error"]["message"] and r.json()["error"]["param"] == field


def test_image_part_is_400_text_only(server):
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]


def test_text_parts_are_joined_with_newlines(server):
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    joined = [{"role": "user", "content": "one\ntwo"}]
    a = _post(server, "/tokenize", {"messages": [{"role": "user", "content": parts}]}).json()["tokens"]
    assert a == _post(server, "/tokenize", {"messages": joined}).json()["tokens"]


def test_priority_is_refused_without_the_policy_offline(tiny_chat_model_dir):
    from npu_infer import LLM, SamplingParams
    llm = LLM(str(tiny_chat_model_dir), device="cpu", kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="scheduling-policy"):
        llm.engine.add_request("x", [1, 2], SamplingParams(max_tokens=1), priority=3)


def test_invalid_schema_is_400_saying_what(server):
    body = {"prompt": "hi", "max_tokens": 4, "guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "json" in message and "nope" in message, message
    r = _post(server, "/v1/completions", {"prompt": "hi", "guided_regex": "(((", "max_tokens": 4})
    assert r.status_code == 400 and "regex" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"prompt": "hi", "guided_grammar": "root ::= foo", "max_tokens": 4})
    assert r.status_code == 400 and "foo" in r.json()["error"]["message"]
