"""SmolLM2-135M (9 query heads, 3 KV heads, 30 layers) split over processes, served over HTTP.

tp=2: 9 heads do not split in two, and giving ranks unequal head counts would leave the row-parallel output
projection and the KV cache lopsided; the engine and the server refuse it with the sizes that do work (1, 3, 9)
before any worker starts. pp=2: 15 layers per stage; the server answers like one in-process engine, and when a
worker is killed mid-request it fails the request, says which rank died, and exits non-zero."""
from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from npu_infer import LLM, SamplingParams
from api.server_process import REPO, ServerProcess, SharedServer

ENGINE = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
              kv_cache_memory="32MiB")
FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--kv-cache-memory", "32MiB", "--disable-log-stats"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
MAX_TOKENS = 8


def test_smollm2_at_tp2_is_refused_before_any_worker_starts(smollm2_hf_dir):
    with pytest.raises(ValueError, match=r"9 attention heads do not divide by --tensor-parallel-size 2; use a "
                                         r"tensor parallel size of 1, 3, 9, or split by layers"):
        LLM(str(smollm2_hf_dir), tensor_parallel_size=2, **ENGINE)
    assert multiprocessing.active_children() == []


def test_server_at_tp2_exits_with_the_sizes_that_work(smollm2_hf_dir):
    out = subprocess.run([sys.executable, "-m", "npu_infer.api.server", "--model", str(smollm2_hf_dir), *FLAGS,
                          "-tp", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "9 attention heads do not divide by --tensor-parallel-size 2" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def pp2_servers(smollm2_hf_dir, tmp_path_factory):
    shared = SharedServer(lambda: ServerProcess(["--model", str(smollm2_hf_dir), *FLAGS, "-pp", "2"],
                                                tmp_path_factory.mktemp("pp2") / "server.log", ready_timeout=300))
    yield shared
    shared.stop()


@pytest.fixture
def pp2_server(pp2_servers):
    return pp2_servers.get()


@pytest.fixture
def pp2_server_to_stop(pp2_servers):
    server = pp2_servers.take()
    yield server
    server.stop()


def test_served_smollm2_at_pp2_answers_like_one_process(smollm2_hf_dir, pp2_server):
    llm = LLM(str(smollm2_hf_dir), **ENGINE)
    try:
        reference = [o.outputs[0] for o in llm.generate(
            PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0))]
    finally:
        llm.engine.shutdown()
    body = requests.post(pp2_server.url + "/v1/completions", timeout=300, json={
        "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}).json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [r.text for r in reference]
    for choice, ref in zip(choices, reference):
        want = [lp[token].logprob for lp, token in zip(ref.logprobs, ref.token_ids)]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-3)


def test_killing_a_worker_mid_request_fails_it_and_the_server_exits_non_zero(pp2_server_to_stop):
    """Rank 0 (the first stage) is killed, the rank the engine does not read tokens from, so only watching every
    worker process can notice it."""
    pids = re.search(r"worker processes: rank 0 pid (\d+), rank 1 pid (\d+)", pp2_server_to_stop.log())
    assert pids, pp2_server_to_stop.log()[-2000:]
    r = requests.post(pp2_server_to_stop.url + "/v1/completions", stream=True, timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: {"))
    start = time.monotonic()
    os.kill(int(pids.group(1)), signal.SIGKILL)
    rest = b"\n".join(line for line in lines if line)
    assert b"worker rank 0" in rest and b"killed by SIGKILL" in rest  # the request is told why
    assert pp2_server_to_stop.proc.wait(60) != 0
    assert time.monotonic() - start < 30
    log = pp2_server_to_stop.log()
    assert f"worker rank 0 (pid {pids.group(1)}) was killed by SIGKILL" in log
    assert "error: the engine stopped" in log
