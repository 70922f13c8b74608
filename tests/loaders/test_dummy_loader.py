"""--load-format dummy: a real-size model from config.json alone (no tokenizer, no weights), finite logits."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import requests
import torch

from api.server_process import ServerProcess
from npu_infer import LLM, SamplingParams
from npu_infer.loaders.dummy_loader import fill_dummy_weights

# Qwen2-0.5B-Instruct's config.json, copied into the repository so the tests need nothing beside it.
QWEN2_CONFIG_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2-0.5b-instruct"


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """Qwen2-0.5B-Instruct's config.json alone: no tokenizer, no weights."""
    out = tmp_path / "qwen2-0.5b"
    out.mkdir()
    shutil.copy(QWEN2_CONFIG_DIR / "config.json", out / "config.json")
    return out


def test_qwen2_0_5b_shaped_dummy_generates_finite_tokens(model_dir):
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, device="cpu", dtype="bfloat16",
              kv_cache_memory="32MiB", max_model_len=256, max_num_seqs=2, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": [151643, 9707, 11, 1879, 0]},
                         {"prompt_token_ids": list(range(1000, 1020))}], params)
    for out in outs:
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 4 and all(0 <= t < 151936 for t in tokens)
        for step in out.outputs[0].logprobs:
            values = [lp.logprob for lp in step.values()]
            assert all(math.isfinite(v) for v in values), values
            # Small random weights: near-uniform over 151,936 tokens (log 151936 = 11.9), never a collapse.
            assert -14.0 < max(values) < -5.0


def test_dummy_weights_are_seeded_and_sane():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(256, 512))
    model.add_module("norm", torch.nn.LayerNorm(256))
    fill_dummy_weights(model, seed=3)
    first = model.proj.weight.clone()
    assert abs(first.std().item() - 0.02) < 0.002 and first.abs().max().item() <= 0.0347
    assert torch.all(model.norm.weight == 1)
    fill_dummy_weights(model, seed=3)
    assert torch.equal(model.proj.weight, first)
    fill_dummy_weights(model, seed=4)
    assert not torch.equal(model.proj.weight, first)


def test_server_with_skip_tokenizer_init_serves_token_ids_like_the_offline_engine(model_dir, tmp_path):
    """`--load-format dummy --skip-tokenizer-init`: the server answers token-id prompts with the same greedy tokens
    and logprobs as the offline engine built from the same config and seed (fp32, one sequence, so no near-tie of
    random logits can flip between the two)."""
    pytest.importorskip("npu_infer.api.server")
    common = dict(max_model_len=128, max_num_seqs=1, max_num_batched_tokens=128)
    prompt = [151643, 9707, 11, 1879, 0]
    server = ServerProcess(["--model", str(model_dir), "--load-format", "dummy", "--skip-tokenizer-init", "--device",
                            "cpu", "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "128",
                            "--max-num-seqs", "1", "--max-num-batched-tokens", "128", "--disable-log-requests",
                            "--disable-log-stats"], tmp_path / "server.log", ready_timeout=300)
    try:
        llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, device="cpu", dtype="float32",
                  kv_cache_memory="16MiB", **common)
        offline = llm.generate([{"prompt_token_ids": prompt}],
                               SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))[0].outputs[0]
        del llm
        name = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = requests.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": 1}).json()
    finally:
        server.stop()
    logprobs = reply["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    assert tokens == offline.token_ids
    expected = [step[t].logprob for step, t in zip(offline.logprobs, offline.token_ids)]
    assert all(math.isfinite(v) for v in logprobs["token_logprobs"])
    assert max(abs(a - b) for a, b in zip(logprobs["token_logprobs"], expected)) < 1e-4
