"""Two "nodes" on one machine: the engine holds rank 0, `npu-infer worker --node-rank 1` the other rank.

With pp=2 the sampling rank lives on node 1, so steps reach it through rank 0's gloo broadcast and its tokens
come back through rank 0: the multi-node paths, over the same torch.distributed rendezvous as real nodes."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from api.server_process import free_port
from conftest import make_tiny_model
from npu_infer import LLM, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              kv_cache_memory="4MiB", skip_tokenizer_init=True)
# Node 1 reaches node 0's store by this machine's host name: a loopback --master-addr is refused on node >= 1
# (on real nodes it is always a mistake), and node 0's rendezvous store listens on every interface.
FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
         "--kv-cache-memory", "4MiB", "--skip-tokenizer-init", "-pp", "2", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", socket.gethostname(), "--host", "0.0.0.0", "--port", "8000"]  # server-only flags ignored
PROMPTS = [[1, 2, 3, 4, 5], [(5 * j) % 200 + 1 for j in range(37)]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2", num_layers=2, num_heads=4, num_kv_heads=2)


def start_node1(model_dir, port: int, log: Path, *extra: str) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, "-m", "npu_infer.cli", "worker", "--model", str(model_dir), *FLAGS,
                                 "--master-port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT)


def test_second_node_runs_the_last_stage_and_tokens_match_one_process(tiny_dir, tmp_path):
    llm = LLM(str(tiny_dir), **ENGINE)
    try:
        reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.shutdown()
    port = free_port()
    log = tmp_path / "node1.log"
    node1 = start_node1(tiny_dir, port, log, "--max-num-batched-tokens", "32")
    try:
        llm = LLM(str(tiny_dir), pipeline_parallel_size=2, nnodes=2, master_port=port, **ENGINE)
        try:
            assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
        finally:
            llm.engine.shutdown()
        assert node1.wait(timeout=60) == 0, log.read_text()
    finally:
        node1.kill()


def test_second_node_with_other_settings_is_refused(tiny_dir, tmp_path):
    port = free_port()
    node1 = start_node1(tiny_dir, port, tmp_path / "node1.log", "--max-num-batched-tokens", "64")
    try:
        with pytest.raises(RuntimeError, match=r"different settings.*rank 1 has --max-num-batched-tokens 64 where "
                                               r"node 0 has 32"):
            LLM(str(tiny_dir), pipeline_parallel_size=2, nnodes=2, master_port=port, **ENGINE)
        assert node1.wait(timeout=60) != 0
    finally:
        node1.kill()
