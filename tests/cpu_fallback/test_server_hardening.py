"""A careless or hostile client against a real server whose KV cache is small enough to preempt: one bad request
never hurts the others, /health keeps answering while templates and huge prompts are worked on, bounds answer
413 / 429 / 400 with OpenAI's error JSON, and prompt logprobs survive preemption."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jinja2
import openai
import pytest
import requests

from api.server_process import ServerProcess, SharedServer, long_context_copy

MAX_LEN = 512
MAX_CONCURRENT = 12
BODY_LIMIT = 2_000_000
FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--num-gpu-blocks-override", "40",
         "--max-num-batched-tokens", "256", "--max-num-seqs", "16", "--disable-log-stats", "--disable-log-requests",
         "--max-concurrent-requests", str(MAX_CONCURRENT), "--max-request-body-bytes", str(BODY_LIMIT),
         "--max-sequences-per-request", "16", "--trust-request-chat-template", "--chat-template-timeout", "2",
         "--disable-fastapi-docs"]
BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # silent: hits the time limit


@pytest.fixture(scope="module")
def servers(tiny_chat_model_dir, tmp_path_factory):
    model_dir = long_context_copy(tiny_chat_model_dir, tmp_path_factory.mktemp("tiny-chat-hard"), MAX_LEN)
    shared = SharedServer(lambda: ServerProcess(["--model", str(model_dir), "--served-model-name", "tiny", *FLAGS],
                                                tmp_path_factory.mktemp("server") / "server.log"))
    yield shared
    shared.stop()


@pytest.fixture
def server(servers):
    return servers.get()


@pytest.fixture
def server_to_stop(servers):
    server = servers.take()
    yield server
    server.stop()


def post(server, path: str, body: dict, timeout: float = 300) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=timeout)


def assert_error(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for word in words:
        assert word in body["error"]["message"], body["error"]["message"]
    return body["error"]


class HealthPoller:
    """Polls /health every 0.5 s on its own thread; records each answer's status and latency."""

    def __init__(self, server):
        self.server, self.answers, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status = requests.get(self.server.url + "/health", timeout=5).status_code
            except requests.RequestException as exc:
                status = repr(exc)
            self.answers.append((status, time.monotonic() - start))
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_the_issues_top_k_is_400_while_eight_others_complete(server):
    good = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    bad = {"prompt": "hi", "temperature": 1, "top_k": 100000000000000000000}
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(post, server, "/v1/completions", good) for _ in range(8)]
        bad_future = pool.submit(post, server, "/v1/completions", bad)
        results = [f.result() for f in futures]
    assert_error(bad_future.result(), 400, "top_k")
    assert [r.status_code for r in results] == [200] * 8
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in results)
    assert len({r.json()["choices"][0]["text"] for r in results}) == 1  # greedy: the same text each time


def test_echo_with_logprobs_under_preemption(server):
    """The issue's 500: echo + logprobs + prompt_logprobs on requests that get preempted and recomputed."""
    prompt = list(range(1000, 1060))
    body = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True, "temperature": 0, "echo": True,
            "logprobs": 1, "prompt_logprobs": 1}
    alone = post(server, "/v1/completions", body).json()["choices"][0]
    before = server.metrics()["vllm:num_preemptions_total"]
    with ThreadPoolExecutor(8) as pool:  # 8 x 100 tokens in a 640-token cache
        results = list(pool.map(lambda _: post(server, "/v1/completions", body), range(8)))
    assert server.metrics()["vllm:num_preemptions_total"] > before, "the test needs preemption"
    for r in results:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert len(choice["prompt_logprobs"]) == len(prompt) and choice["prompt_logprobs"][0] is None
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 40
        assert logprobs["token_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:] == pytest.approx(alone["logprobs"]["token_logprobs"][1:], abs=1e-3)
    assert server.wait_idle()["npu_infer:kv_cache_blocks_used"] == 0


def test_past_max_concurrent_requests_is_429_with_retry_after(server):
    streams = [requests.post(server.url + "/v1/completions", stream=True, timeout=120, json={
        "prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}) for _ in range(MAX_CONCURRENT)]
    try:
        assert all(s.status_code == 200 for s in streams)
        refused = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert_error(refused, 429, "--max-concurrent-requests")
        assert refused.headers["retry-after"] == "1"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert requests.get(server.url + "/health", timeout=5).status_code == 200  # never counted
    finally:
        for s in streams:
            s.close()
    server.wait_idle()
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_body_past_the_limit_is_413(server):
    big = {"prompt": "x" * (BODY_LIMIT + 10), "max_tokens": 2}
    assert_error(post(server, "/v1/completions", big), 413, "--max-request-body-bytes")
    assert_error(post(server, "/tokenize", big), 413)


def test_sequences_per_request_are_capped(server):
    assert_error(post(server, "/v1/completions", {"prompt": "hi", "n": 17, "max_tokens": 2}), 400,
                 "17 sequences", "--max-sequences-per-request")
    assert_error(post(server, "/v1/completions", {"prompt": ["a", "b", "c", "d"], "n": 5, "max_tokens": 2}), 400,
                 "20 sequences")
    assert_error(post(server, "/v1/completions", {"prompt": "hi", "best_of": 20, "max_tokens": 2}), 400)
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}),
                 400, "--max-sequences-per-request")


def test_a_trusted_request_template_renders_as_jinja_does(server, tiny_chat_model_dir):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}{{ bos_token }}"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    tokenized = post(server, "/v1/chat/completions", {"messages": messages, "chat_template": template,
                                                        "max_tokens": 1, "temperature": 0}).json()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_model_dir))
    text = jinja2.Template(template).render(messages=messages, bos_token=tokenizer.bos_token)
    assert tokenized["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))


def test_health_answers_within_a_second_during_a_template_bomb_and_a_huge_prompt(server):
    with HealthPoller(server) as poller:
        start = time.monotonic()
        bomb = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "chat_template": BOMB})
        bomb_seconds = time.monotonic() - start
        huge = post(server, "/v1/completions", {"prompt": "hello " * 100_000, "max_tokens": 2})
        time.sleep(1.0)
    assert_error(bomb, 400, "longer than 2 s")
    assert bomb_seconds < 30
    assert_error(huge, 400, "max_model_len")
    assert len(poller.answers) >= 4
    assert all(status == 200 and seconds < 1.0 for status, seconds in poller.answers), poller.answers
    # The renderer was killed and replaced: the next request template renders.
    ok = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                               "chat_template": "{{ messages[0].content }}"})
    assert ok.status_code == 200, ok.text


def test_a_template_that_renders_too_much_or_fails_is_400(server):
    flood = "{% for i in range(1000) %}{% for j in range(1000) %}xx{% endfor %}{% endfor %}"  # 2M characters
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "chat_template": flood}), 400, "characters")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "chat_template": "{{ raise_exception('no') }}"}), 400, "no")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "chat_template": "{{ ''.__class__.__mro__ }}"}), 400)


def test_docs_can_be_switched_off(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(server.url + path, timeout=10).status_code == 404


def test_nothing_left_behind(server):
    m = server.wait_idle()
    assert m["npu_infer:kv_cache_blocks_used"] == 0 and m["vllm:num_requests_running"] == 0
    assert "Traceback" not in server.log()


def test_a_second_sigterm_exits_at_once(server_to_stop):
    """Six long streams in a 640-token cache keep the 30 s drain busy; a second SIGTERM aborts them and exits at
    once, exit code 0."""
    import signal
    streams = [requests.post(server_to_stop.url + "/v1/completions", stream=True, timeout=120, json={
        "prompt": "hi", "max_tokens": 500, "ignore_eos": True, "stream": True}) for _ in range(6)]
    assert all(s.status_code == 200 for s in streams)
    server_to_stop.proc.send_signal(signal.SIGTERM)
    time.sleep(2.0)
    assert server_to_stop.proc.poll() is None  # draining
    start = time.monotonic()
    server_to_stop.proc.send_signal(signal.SIGTERM)
    assert server_to_stop.proc.wait(20) == 0
    assert time.monotonic() - start < 10
    assert "Traceback" not in server_to_stop.log()  # the aborted streams ended, none was cancelled mid-send
    for s in streams:
        s.close()
