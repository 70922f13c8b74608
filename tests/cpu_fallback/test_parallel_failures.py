"""A worker that dies or raises ends the run with a clear RuntimeError, fast, and leaves no process behind."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from api.server_process import ServerProcess
from conftest import make_tiny_model
from npu_infer import LLM, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
              kv_cache_memory="4MiB", skip_tokenizer_init=True)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7]]
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", num_layers=2, num_heads=4, num_kv_heads=2)


def test_killed_worker_mid_run_fails_fast_with_a_clear_error(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, **ENGINE)
    executor = llm.engine.executor
    try:
        assert len(llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4))) == 2
        victim = executor.procs[1]
        send, sends = executor._send, []

        def send_then_kill(method, arg):  # kill rank 1 while it works on the 5th step of the long run
            send(method, arg)
            sends.append(method)
            if len(sends) == 5:
                os.kill(victim.pid, signal.SIGKILL)

        executor._send = send_then_kill
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
            llm.generate(PROMPTS, LONG)
        assert time.monotonic() - start < 10
        assert not any(p.is_alive() for p in executor.procs)  # rank 0 is stopped too
        with pytest.raises(RuntimeError, match="worker processes have stopped"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=2))
    finally:
        llm.engine.shutdown()


def test_worker_that_fails_while_loading_reports_its_error(tmp_path, tiny_dir):
    """The last pipeline stage misses a tensor: its ValueError reaches the engine, not a hang in the first stage."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(tiny_dir / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker rank 1 failed during start: ValueError: checkpoint lacks "
                                           r"tensors: model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(broken), pipeline_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 60


def test_clean_shutdown_stops_every_worker(tiny_dir):
    llm = LLM(str(tiny_dir), pipeline_parallel_size=2, **ENGINE)
    procs = list(llm.engine.executor.procs)
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=2))
    llm.engine.shutdown()
    assert [p.exitcode for p in procs] == [0, 0]  # they left on the shutdown message, not by a signal
    llm.engine.shutdown()  # twice is harmless


def test_server_whose_worker_dies_while_idle_exits_non_zero_without_a_request(tiny_dir, tmp_path):
    server = ServerProcess(["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
                            "--kv-cache-memory", "4MiB", "--skip-tokenizer-init", "--disable-log-stats", "-pp", "2"],
                           tmp_path / "server.log")
    try:
        pids = re.search(r"worker processes: rank 0 pid (\d+), rank 1 pid (\d+)", server.log())
        assert pids, server.log()[-2000:]
        start = time.monotonic()
        os.kill(int(pids.group(2)), signal.SIGKILL)
        assert server.proc.wait(30) == 1
        assert time.monotonic() - start < 20
        log = server.log()
        assert f"worker rank 1 (pid {pids.group(2)}) was killed by SIGKILL during idle time" in log
        assert "error: the engine stopped" in log
        assert not any(_alive(int(pid)) for pid in pids.groups())  # rank 0 went down with the server
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is not running


def test_a_rank_that_stops_answering_turns_health_503_then_stops_the_server(tiny_dir, tmp_path):
    """SIGSTOP (a hung device looks the same): the step watchdog (--step-timeout) makes /health say 503, then gives
    the step up; the server exits 1, naming the cause, and no worker process is left."""
    import requests
    server = ServerProcess(["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
                            "--kv-cache-memory", "4MiB", "--skip-tokenizer-init", "--disable-log-stats", "-tp", "2",
                            "--step-timeout", "4"], tmp_path / "server.log")
    pids = re.search(r"worker processes: rank 0 pid (\d+), rank 1 pid (\d+)", server.log())
    try:
        assert pids, server.log()[-2000:]
        stream = requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
            "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "stream": True})
        assert next(line for line in stream.iter_lines() if line.startswith(b"data: {"))
        os.kill(int(pids.group(2)), signal.SIGSTOP)
        statuses = []
        while server.proc.poll() is None:
            try:
                statuses.append(requests.get(server.url + "/health", timeout=2).status_code)
            except requests.RequestException:
                pass
            time.sleep(0.3)
            assert len(statuses) < 200, "the server never gave the step up"
        assert statuses[0] == 200 and 503 in statuses, statuses
        assert server.proc.returncode == 1
        assert "within the step timeout of 4 s" in server.log()
        time.sleep(1)
        assert not any(_alive(int(pid)) for pid in pids.groups())
    finally:
        if pids:
            for pid in pids.groups():
                try:
                    os.kill(int(pid), signal.SIGCONT)
                except ProcessLookupError:
                    pass
        server.stop()
