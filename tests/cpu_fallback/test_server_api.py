"""The real server (subprocess, CPU) against the real `openai` client and `requests`: completions, chat,
streaming, n, stop strings, logprobs, echo, token-id prompts, seeds, usage, the seed's two requests verbatim,
and 16 concurrent clients sharing engine steps."""
from __future__ import annotations

import json
import threading

import openai
import pytest
import requests

from api.server_process import FAST_FLAGS, ServerProcess, long_context_copy

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model_dir, tmp_path_factory):
    return long_context_copy(tiny_chat_model_dir, tmp_path_factory.mktemp("tiny-chat-2k"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(["--model", str(model_dir), "--max-model-len", "2048", "--enable-prefix-caching",
                          "--enable-log-requests", *FAST_FLAGS],
                         tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(server, **body) -> dict:
    r = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response, checking OpenAI's framing on the way."""
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# ---- the seed's requests ------------------------------------------------------------------------------------
def _check_completion_shape(body: dict, model: str) -> None:
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == model
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 1000
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 1000


def test_seed_curl_request_verbatim(server, model_dir):
    # The bytes and header `curl -X POST ... -H "Content-Type: application/json" -d '{...}'` sends.
    data = ('{"model": "%s", "prompt": "给我讲个英雄联盟的背景故事：", "max_tokens": 1000, "temperature": 0.7, '
            '"top_p": 1}' % model_dir)
    r = requests.post(f"http://localhost:{server.port}/v1/completions", data=data.encode(),
                      headers={"Content-Type": "application/json"}, timeout=300)
    assert r.status_code == 200, r.text
    _check_completion_shape(r.json(), str(model_dir))


def test_seed_python_requests_verbatim(server, model_dir):
    url = server.url + "/v1/completions"
    data = {"model": str(model_dir), "prompt": "给我讲个英雄联盟的背景故事：", "max_tokens": 1000, "temperature": 0.7,
            "top_p": 1}
    result = requests.post(url, json=data).json()
    _check_completion_shape(result, str(model_dir))


# ---- plain endpoints ----------------------------------------------------------------------------------------
def test_models_health_version(server, client, model_dir):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/version", timeout=10).json()["version"]
    models = client.models.list()
    assert [m.id for m in models.data] == [str(model_dir)]
    assert models.data[0].max_model_len == 2048


def test_tokenize_detokenize_round_trip(server, smollm2_tokenizer):
    ids = requests.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=10).json()
    assert ids["tokens"] == smollm2_tokenizer.encode(PROMPT) and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == 2048
    text = requests.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}, timeout=10).json()
    assert text == {"prompt": PROMPT}


# ---- completions --------------------------------------------------------------------------------------------
def test_greedy_completion_equals_offline_llm_generate(server, model_dir):
    from npu_infer import LLM, SamplingParams
    body = complete(server, prompt=PROMPT, max_tokens=24, temperature=0)
    llm = LLM(str(model_dir), device="cpu", max_model_len=2048, kv_cache_memory="16MiB",
              max_num_batched_tokens=1024, max_num_seqs=32)
    try:
        offline = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    finally:
        llm.engine.shutdown()
    assert body["choices"][0]["text"] == offline.text
    assert body["usage"]["completion_tokens"] == len(offline.token_ids)


def test_usage_equals_token_counts(server, client):
    out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=7,
                                    temperature=0, logprobs=0)
    prompt_ids = requests.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=10).json()["tokens"]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(out.choices[0].logprobs.tokens) == 7
    assert out.usage.total_tokens == len(prompt_ids) + 7


def test_streamed_completion_equals_whole_one(server, client):
    model = client.models.list().data[0].id
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # token by token, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)


def test_sse_framing_and_done(server):
    r = requests.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True},
                      timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_n2_returns_two_choices(server, client):
    out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8, n=2,
                                    temperature=1.0, seed=7, logprobs=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices) == 16
    streamed = list(client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8,
                                              n=2, temperature=1.0, seed=7, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in out.choices}


def test_stop_string_cuts_the_text(server):
    full = complete(server, prompt=PROMPT, max_tokens=30, temperature=0)["choices"][0]["text"]
    words = full.split()
    stop = next(w for w in words[2:] if len(w) >= 3 and full.index(w) > 0)  # a word well inside the text
    cut = full[:full.index(stop)]
    out = complete(server, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    choice = out["choices"][0]
    assert choice["text"] == cut and choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    # Streamed, the withheld tail never leaks the stop string's start.
    r = requests.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": stop, "stream": True})
    events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_token_ids(server):
    ids = complete(server, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0)
    tokens = requests.post(server.url + "/tokenize", json={"prompt": PROMPT + ids["choices"][0]["text"]},
                           timeout=10).json()["tokens"]
    prompt_len = ids["usage"]["prompt_tokens"]
    stop_id = tokens[prompt_len + 3]
    out = complete(server, prompt=PROMPT, max_tokens=10, temperature=0, stop_token_ids=[stop_id])
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["stop_reason"] == stop_id
    assert out["usage"]["completion_tokens"] <= 4


def test_completion_logprobs_shape(server):
    out = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and 2 <= len(top) <= 3 and token in top
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the chosen token is the best
    assert lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))


def test_echo_returns_prompt_and_its_logprobs(server):
    out = complete(server, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    lp = choice["logprobs"]
    n_prompt = out["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    plain = complete(server, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)["choices"][0]["text"]
    assert plain == choice["text"]


def test_token_id_prompts(server):
    ids = requests.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=10).json()["tokens"]
    text = complete(server, prompt=PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    single = complete(server, prompt=ids, max_tokens=8, temperature=0)
    assert single["choices"][0]["text"] == text
    several = complete(server, prompt=[ids, ids[:3]], max_tokens=8, temperature=0)
    assert [c["index"] for c in several["choices"]] == [0, 1]
    assert several["choices"][0]["text"] == text
    assert several["usage"]["prompt_tokens"] == len(ids) + 3
    texts = complete(server, prompt=[PROMPT, PROMPT], max_tokens=8, temperature=0)
    assert [c["text"] for c in texts["choices"]] == [text, text]


def test_same_seed_same_text(server):
    body = dict(prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95)
    a = complete(server, seed=1234, **body)["choices"][0]["text"]
    b = complete(server, seed=1234, **body)["choices"][0]["text"]
    c = complete(server, seed=4321, **body)["choices"][0]["text"]
    assert a == b and a != c


def test_return_token_ids(server, smollm2_tokenizer):
    whole = complete(server, prompt=PROMPT, max_tokens=8, temperature=0, return_token_ids=True)["choices"][0]
    assert len(whole["token_ids"]) == 8 and smollm2_tokenizer.decode(whole["token_ids"]) == whole["text"]
    r = requests.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True, "stream": True})
    assert [t for e in sse_events(r) for t in e["choices"][0]["token_ids"]] == whole["token_ids"]
    assert complete(server, prompt=PROMPT, max_tokens=2)["choices"][0]["token_ids"] is None  # only when asked


def test_prefix_cache_hits_show_in_metrics(server):
    prompt = list(range(1000, 1100))  # 100 tokens: 6 full blocks of 16
    complete(server, prompt=prompt, max_tokens=2, temperature=0)
    before = server.wait_idle()
    again = complete(server, prompt=prompt, max_tokens=2, temperature=0)
    after = server.wait_idle()
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert queries == 100 and hits == 96, (queries, hits)
    assert again["usage"]["prompt_tokens"] == 100


# ---- chat ---------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat_completion_and_stream(server, client):
    model = client.models.list().data[0].id
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    content = [c for c in chunks[1:] if c.choices]
    assert all(c.choices[0].delta.role is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
    # The prompt is the chat template's rendering of the messages.
    rendered = requests.post(server.url + "/tokenize", json={"messages": MESSAGES}, timeout=10).json()
    assert whole.usage.prompt_tokens == rendered["count"]


def test_chat_logprobs_shape(server, client):
    out = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for item in content:
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token  # greedy
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_chat_with_n_2_returns_two_choices_and_counts_both(server, client):
    out = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=6,
                                         n=2, seed=3, temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12


# ---- concurrency --------------------------------------------------------------------------------------------
def test_sixteen_concurrent_requests_share_engine_steps(server):
    before = server.metrics()
    results: list = [None] * 16

    def one(i: int) -> None:
        results[i] = requests.post(server.url + "/v1/completions", timeout=120, json={
            "prompt": f"{PROMPT} {i}", "max_tokens": 32, "ignore_eos": True, "temperature": 0})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32 for r in results)
    after = server.wait_idle()
    key = "npu_infer:step_batch_size_bucket"

    def big_steps(m):  # steps that ran more than 8 sequences at once
        return m[key + "{le=+Inf}"] - m[key + "{le=8.0}"]
    assert big_steps(after) - big_steps(before) >= 10, (before, after)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 16 * 32
    assert after["npu_infer:kv_cache_blocks_used"] == 0


def test_log_has_one_line_per_request_and_the_startup_lines_but_no_engine_stats(server):
    complete(server, prompt=PROMPT, max_tokens=3)
    log = server.log()
    assert "prompt + 3 output tokens" in log  # one line per request
    assert "KV budget:" in log and f"at http://127.0.0.1:{server.port}" in log  # start-up
    assert "engine: prompt" not in log  # --disable-log-stats
