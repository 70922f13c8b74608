"""Every bad request gets its status and OpenAI's error JSON (never a 500), an API key guards the API but not
/health or /metrics, a client that goes away (streaming or not) aborts its request and frees its blocks, and
SIGINT with a request in flight ends the server with exit code 0."""
from __future__ import annotations

import json
import signal
import socket
import time

import openai
import pytest
import requests

from api.server_process import ENGINE_FLAGS, ServerProcess, long_context_copy

KEY = "test-secret"
MAX_LEN = 2048  # long enough that a request aborted mid-way is surely still running


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    model_dir = long_context_copy(tiny_chat_model_dir, tmp_path_factory.mktemp("tiny-chat-2k"), MAX_LEN)
    proc = ServerProcess(["--model", str(model_dir), "--served-model-name", "tiny", "tiny-alias",
                          "--max-model-len", str(MAX_LEN), *ENGINE_FLAGS,
                          "--disable-log-requests", "--log-stats-interval", "0.5"],
                         tmp_path_factory.mktemp("server") / "server.log", env={"NPU_INFER_API_KEY": KEY})
    yield proc
    proc.stop()


def post(server, path: str, body, key: str | None = KEY, raw: bool = False) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        headers["Content-Type"] = "application/json"
        return requests.post(server.url + path, data=body, headers=headers, timeout=60)
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


def assert_error(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# ---- auth ---------------------------------------------------------------------------------------------------
def test_missing_or_wrong_key_is_401(server):
    assert_error(post(server, "/v1/completions", {"prompt": "hi"}, key=None), 401, "API key")
    assert_error(post(server, "/v1/completions", {"prompt": "hi"}, key="wrong"), 401)
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=None), 401)
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, "/tokenize", {"prompt": "hi"}, key=None).status_code == 401


def test_health_metrics_version_and_docs_stay_open(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert "vllm:num_requests_running" in requests.get(server.url + "/metrics", timeout=10).text
    for path in ("/version", "/docs", "/openapi.json"):  # documented in docs/server.md
        assert requests.get(server.url + path, timeout=10).status_code == 200, path


def test_a_request_chat_template_is_refused_unless_trusted(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages[0].content }}"}
    error = assert_error(post(server, "/v1/chat/completions", body), 400, "--trust-request-chat-template")
    assert error["param"] == "chat_template"


def test_openai_client_with_key(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    out = client.completions.create(model="tiny-alias", prompt="hi", max_tokens=3)
    assert out.model == "tiny-alias" and out.usage.completion_tokens == 3
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=MAX_LEN)


# ---- 404 and 400 --------------------------------------------------------------------------------------------
def test_unknown_model_is_404(server):
    error = assert_error(post(server, "/v1/completions", {"model": "nope", "prompt": "hi"}), 404, "nope")
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert_error(post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                 404)


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/completions", b'{"prompt": "hi", "max_tokens', raw=True), 400, "JSON")
    assert_error(post(server, "/v1/completions", b"[1, 2]", raw=True), 400)
    assert_error(post(server, "/v1/chat/completions", b"not json", raw=True), 400, "JSON")
    assert_error(post(server, "/v1/completions", b"", raw=True), 400, "JSON object")
    form = requests.post(server.url + "/v1/completions", data={"prompt": "hi"}, timeout=10,
                         headers={"Authorization": f"Bearer {KEY}"})  # curl -d without the JSON header
    assert_error(form, 400, "Content-Type: application/json")


def test_too_long_is_400_with_both_numbers(server):
    prompt_len = len(post(server, "/tokenize", {"prompt": "hello there"}).json()["tokens"])
    error = assert_error(post(server, "/v1/completions", {"prompt": "hello there", "max_tokens": MAX_LEN - 1}), 400,
                         str(MAX_LEN), f"{prompt_len} prompt tokens", str(MAX_LEN - 1), str(MAX_LEN - 1 + prompt_len))
    assert error["type"] == "invalid_request_error"
    assert_error(post(server, "/v1/completions", {"prompt": list(range(1, MAX_LEN + 44)), "max_tokens": 1}), 400,
                 str(MAX_LEN + 43), str(MAX_LEN))
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": MAX_LEN + 44}), 400, str(MAX_LEN), str(MAX_LEN + 44))


@pytest.mark.parametrize("body, words", [
    ({}, ["prompt"]),
    ({"prompt": 5}, ["prompt"]),
    ({"prompt": ""}, ["empty"]),
    ({"prompt": []}, ["empty"]),
    ({"prompt": [[]]}, ["empty"]),
    ({"prompt": [1, 10**9]}, ["token"]),
    ({"prompt": [-1]}, ["token"]),
    ({"prompt": [True, 2]}, ["prompt"]),
    ({"prompt": "hi", "seed": 2**70}, ["seed"]),
    ({"prompt": "hi", "max_tokens": 0}, ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": "many"}, ["max_tokens"]),
    ({"prompt": "hi", "temperature": -1}, ["temperature"]),
    ({"prompt": "hi", "top_p": 0}, ["top_p"]),
    ({"prompt": "hi", "top_k": -5}, ["top_k"]),
    ({"prompt": "hi", "min_p": 2}, ["min_p"]),
    ({"prompt": "hi", "n": 0}, ["n"]),
    ({"prompt": "hi", "n": 2, "best_of": 1}, ["best_of"]),
    ({"prompt": "hi", "logprobs": 50}, ["logprobs"]),
    ({"prompt": "hi", "presence_penalty": 3}, ["presence_penalty"]),
    ({"prompt": "hi", "frequency_penalty": -3}, ["frequency_penalty"]),
    ({"prompt": "hi", "repetition_penalty": 0}, ["repetition_penalty"]),
    ({"prompt": "hi", "stop": [""]}, ["stop"]),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, ["min_tokens"]),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, ["stream"]),
    ({"prompt": "hi", "logit_bias": {"1": 500}}, ["logit_bias"]),
    ({"prompt": "hi", "logit_bias": {"x": 5}}, ["logit_bias"]),
    ({"prompt": "hi", "suffix": "x"}, ["suffix"]),
    ({"prompt": "hi", "temperature": 1, "top_k": 100000000000000000000}, ["top_k"]),  # the request
    ({"prompt": "hi", "top_k": 10**6}, ["top_k", "vocabulary size"]),
    ({"prompt": "hi", "seed": 2**64}, ["seed"]),
    ({"prompt": "hi", "n": 129}, ["n"]),
    ({"prompt": "hi", "best_of": 10**9}, ["best_of"]),
    ({"prompt": "hi", "stop_token_ids": [10**9]}, ["stop_token_ids"]),
    ({"prompt": "hi", "stop": ["x"] * 65}, ["stop"]),
    ({"prompt": "hi", "stop_token_ids": list(range(1025))}, ["stop_token_ids"]),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, ["logit_bias"]),
    ({"prompt": "hi", "max_tokens": 2**70}, ["max_tokens"]),
    ({"prompt": "\ud800"}, ["prompt", "surrogate"]),
    ({"prompt": ["ok", "x\udfff"]}, ["prompt[1]", "surrogate"]),
    ({"prompt": "hi", "stop": "\ud800"}, ["stop", "surrogate"]),
])
def test_invalid_completion_values_are_400(server, body, words):
    assert_error(post(server, "/v1/completions", body), 400, *words)


@pytest.mark.parametrize("body, words", [
    ({}, ["messages"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"content": "hi"}]}, ["role"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, ["logprobs"]),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}, ["top_logprobs"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, ["text"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, ["max_completion_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, ["tools"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, ["role", "wizard"]),
    ({"messages": [{"role": "user"}]}, ["content"]),
    ({"messages": [{"role": "user", "content": None}]}, ["content"]),
    ({"messages": [{"role": "assistant"}]}, ["content"]),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, ["messages[0].content", "surrogate"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, ["surrogate"]),
])
def test_invalid_chat_values_are_400(server, body, words):
    assert_error(post(server, "/v1/chat/completions", body), 400, *words)


def test_lone_surrogates_and_invalid_utf8_are_400(server):
    """Sent as raw JSON escapes (what a client writes for a str holding a lone surrogate)."""
    assert_error(post(server, "/v1/completions", b'{"prompt": "\\ud800"}', raw=True), 400, "surrogate")
    assert_error(post(server, "/tokenize", b'{"prompt": "\\ud800"}', raw=True), 400, "surrogate")
    assert_error(post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}', raw=True), 400)
    assert_error(post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3"}]}',
                      raw=True), 400)


def test_invalid_tokenize_values_are_400(server):
    assert_error(post(server, "/tokenize", {}), 400, "prompt")
    assert_error(post(server, "/detokenize", {"tokens": [10**9]}), 400, "token")


def test_no_request_left_running_after_the_errors(server):
    m = server.wait_idle()
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["npu_infer:kv_cache_blocks_used"] == 0
    assert "Traceback" not in server.log()


# ---- disconnects --------------------------------------------------------------------------------------------
def _aborts(server) -> float:
    return server.metrics()["vllm:request_success_total{finished_reason=abort}"]


def _wait_running(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()["vllm:num_requests_running"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


def test_stream_disconnect_aborts_and_frees_blocks(server):
    aborts = _aborts(server)
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "hello", "max_tokens": MAX_LEN - 48, "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    got = [next(lines) for _ in range(6)]  # a few events (and their blank separators)
    assert any(line.startswith(b"data: {") for line in got)
    m = server.metrics()
    assert m["vllm:num_requests_running"] == 1 and m["npu_infer:kv_cache_blocks_used"] > 0
    r.close()
    m = server.wait_idle(timeout=30)
    assert m["vllm:num_requests_running"] == 0 and m["npu_infer:kv_cache_blocks_used"] == 0
    assert _aborts(server) == aborts + 1


def test_non_stream_disconnect_aborts_and_frees_blocks(server):
    aborts = _aborts(server)
    body = json.dumps({"prompt": "hello", "max_tokens": MAX_LEN - 48, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_running(server)
    m = server.wait_idle(timeout=30)
    assert m["vllm:num_requests_running"] == 0 and m["npu_infer:kv_cache_blocks_used"] == 0
    assert _aborts(server) == aborts + 1


# ---- logs and shutdown (last: stops the module's server) ----------------------------------------------------
def test_logs_stats_not_requests(server):
    deadline = time.monotonic() + 30
    while "engine: prompt" not in server.log():  # the periodic stats line, every 0.5 s while there is work
        assert time.monotonic() < deadline, server.log()[-2000:]
        post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 4})
    line = next(line for line in server.log().splitlines() if "engine: prompt" in line)
    for word in ("tok/s", "running", "waiting", "KV cache", "prefix cache hit rate"):
        assert word in line, line
    assert "request cmpl-" not in server.log()  # --disable-log-requests


def test_sigint_with_a_request_in_flight_exits_0(server):
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "hello", "max_tokens": MAX_LEN - 48, "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: {"))
    server.proc.send_signal(signal.SIGINT)
    rest = [line for line in lines if line]
    # SIGINT drains: the stream ends cleanly, finished (within --shutdown-timeout) or aborted with the reason.
    assert rest[-1] == b"data: [DONE]"
    assert b"shutting down" in rest[-2] or b'"finish_reason":"length"' in rest[-2], rest[-2]
    assert server.proc.wait(60) == 0
    assert "Traceback" not in server.log()
