"""benchmarks/soak.py for 75 s at concurrency 64 against a real server whose KV cache preempts: no 5xx, every
good request served, every malformed one refused with a 4xx, no connection dropped, nothing left allocated,
and the server exits 0 on SIGTERM. (The long run's figures are in docs/server.md.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from api.server_process import long_context_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402

GOOD = ("completion", "chat", "stream", "large_n", "echo_logprobs", "slow_reader", "disconnect")


@pytest.mark.soak
def test_two_minute_soak(tiny_chat_model_dir, tmp_path, capsys):
    model = long_context_copy(tiny_chat_model_dir, tmp_path / "model", 512)
    out = tmp_path / "soak.json"
    soak.main(["--minutes", "1.25", "--concurrency", "64", "--warmup", "5", "--max-model-len", "512",
               "--log", str(tmp_path / "server.log"), "--json-out", str(out), "--",
               "--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
               "--num-gpu-blocks-override", "48", "--max-num-seqs", "32", "--max-num-batched-tokens", "256",
               "--disable-log-stats"])
    result = json.loads(out.read_text())
    log = (tmp_path / "server.log").read_text()
    assert result["5xx"] == 0, (result, log[-3000:])
    assert not result["client_exceptions"], result
    for scenario in GOOD:
        statuses = result["by_class"][scenario]
        assert statuses and set(statuses) == {"200"}, (scenario, statuses)
    assert result["by_class"]["malformed"] and all(s.startswith("4") for s in result["by_class"]["malformed"])
    assert result["preemptions"] > 0, "the cache was meant to be small enough to preempt"
    assert result["kv_blocks_in_use_after"] == 0 and result["requests_running_after"] == 0
    assert result["rss_end_mib"] < 1.5 * result["rss_start_mib"]  # the long run's target is < 5 %
    assert result["server_exit_code"] == 0
    assert "Traceback" not in log
