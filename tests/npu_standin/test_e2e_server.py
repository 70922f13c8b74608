"""The real server started with `--device npu` on the torch_npu stand-in answers the seed's request.

The server runs as a subprocess (`python -m npu_infer.api.server`, the seed's flags).  A real NPU machine has
torch_npu installed; here the stand-in takes its place through a `sitecustomize.py` shim put first on the
subprocess's PYTHONPATH (written by this test, never part of the package; _shim.py): Python imports it at
start-up, it installs the device-strict stand-in as `torch_npu` / `torch.npu` (a host tensor mixed into device
work fails the server), sets the device memory the stand-in reports, counts the kernel calls and writes the
counts, and the unpinned non_blocking copies it saw, to a file when the server exits.

References: the prompt's token count from the tokenizer itself, and for a greedy request the offline engine
(`LLM(device="npu")` in this process, a second code path over the same stand-in kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
import torch

from api.server_process import REPO, ServerProcess, SharedServer, long_context_copy
from npu_infer import LLM, SamplingParams

from . import install, uninstall
from ._shim import write_sitecustomize

GiB = 1 << 30
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_fused_infer_attention_score",
           "_npu_reshape_and_cache", "_npu_paged_attention", "_npu_rotary_embedding")
SEED_PROMPT = "给我讲个英雄联盟的背景故事："

SERVER_FLAGS = ["--device", "npu", "-tp", "1", "--disable-log-stats", "--disable-log-requests",
                "--enable-prefix-caching", "--max-model-len", "2048", "--kv-cache-memory", "64MiB",
                "--gpu-memory-utilization", "0.5", "--max-num-batched-tokens", "256", "--max-num-seqs", "8"]
LLM_FLAGS = dict(max_model_len=2048, kv_cache_memory="64MiB", gpu_memory_utilization=0.5,
                 enable_prefix_caching=True, max_num_batched_tokens=256, max_num_seqs=8)  # small: a fast profile_run


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model_dir, tmp_path_factory):
    """The tiny chat model with room for the seed's max_tokens=1000."""
    return long_context_copy(tiny_chat_model_dir, tmp_path_factory.mktemp("tiny-chat-npu-2k"))


def start_server(model_dir, tmp) -> ServerProcess:
    """The server on the stand-in; it writes the kernel calls it counted to `calls_file` when it exits."""
    env = {"PYTHONPATH": write_sitecustomize(tmp / "shim"),
           "NPU_STANDIN_TESTS_DIR": TESTS_DIR, "NPU_STANDIN_MEMORY": f"{12 * GiB},{16 * GiB}",
           "NPU_STANDIN_KERNELS": json.dumps(KERNELS), "NPU_STANDIN_CALLS_FILE": str(tmp / "calls.json"),
           # as many threads as the in-process reference: a GEMM's reduction order may depend on it
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = ServerProcess(["--model", str(model_dir), *SERVER_FLAGS], tmp / "server.log", env=env)
    proc.calls_file = tmp / "calls.json"
    return proc


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    shared = SharedServer(lambda: start_server(model_dir, tmp_path_factory.mktemp("npu-server")))
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


def test_seed_request_is_answered_on_npu(server, model_dir, smollm2_tokenizer):
    url = server.url + "/v1/completions"
    data = {"model": str(model_dir), "prompt": SEED_PROMPT, "max_tokens": 1000, "temperature": 0.7, "top_p": 1}
    result = requests.post(url, json=data).json()

    assert result["object"] == "text_completion" and result["model"] == str(model_dir), result
    (choice,) = result["choices"]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] == len(smollm2_tokenizer.encode(SEED_PROMPT))
    assert 1 <= usage["completion_tokens"] <= 1000
    assert usage["completion_tokens"] == 1000 or choice["finish_reason"] == "stop"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_completion_matches_the_offline_engine_on_npu(server, model_dir):
    body = {"model": str(model_dir), "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "logprobs": 1}
    response = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]

    install(strict=True)  # the reference runs here, in-process, on the same stand-in kernels and thread count
    try:
        llm = LLM(str(model_dir), device="npu", **LLM_FLAGS)
        (ref,) = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12, logprobs=1))
        del llm
    finally:
        uninstall()
    completion = ref.outputs[0]
    assert choice["text"] == completion.text
    expected = [lp[tok].logprob for tok, lp in zip(completion.token_ids, completion.logprobs)]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_server_ran_on_the_standin_kernels_and_sized_kv_from_its_memory(server_to_stop):
    """A request with a few decode steps, then the server is stopped so that the shim writes its kernel counts."""
    response = requests.post(server_to_stop.url + "/v1/completions", timeout=120,
                             json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    assert server_to_stop.stop() == 0
    log = server_to_stop.log_path.read_text(errors="replace")
    assert "on npu (dtype bfloat16)" in log
    budget_line = next(line for line in log.splitlines() if "KV budget:" in line and "free at start" in line)
    for text in ("total 16.00 GiB", "free at start 12.00 GiB", "budget 8.00 GiB (x0.50)", "blocks of 128 tokens"):
        assert text in budget_line, (text, budget_line)
    calls = json.loads(server_to_stop.calls_file.read_text())
    assert all(calls.get(k) for k in KERNELS), calls
    assert calls["unpinned_copies"] == 0


def test_server_without_torch_npu_says_what_to_install(model_dir):
    """No shim: this machine has no torch_npu, as a machine without CANN.  One line on stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "npu_infer.api.server", "--model", str(model_dir), *SERVER_FLAGS],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --device npu needs torch_npu and CANN") and "Traceback" not in result.stderr
    for needed in ("npu_infer[npu]", "CANN toolkit", "set_env.sh", "torch-npu X.Y.Z needs torch==X.Y.Z"):
        assert needed in line
