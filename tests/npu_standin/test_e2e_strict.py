"""The whole engine on device-strict stand-ins ("npu" through the torch_npu stand-in, "cuda" on a CPU-only torch):
profile_run, chunked and mixed prefill, prefix-cache hits, preemption and sampling with every parameter, without
one host tensor mixed into device work and without one non_blocking copy from unpinned memory.  Greedy parity with
the CPU backend on the strict device, with prefix-cache hits, is test_e2e_parity.py; this file is about where
tensors live."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from npu_infer import LLM, SamplingParams

from . import install, strict_device, uninstall
from ._cuda import strict_cuda

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENGINE = dict(dtype="bfloat16", max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8,
              enable_prefix_caching=True, skip_tokenizer_init=True)


@contextlib.contextmanager
def strict(device: str):
    if device == "npu":
        install(strict=True)
        try:
            yield strict_device()
        finally:
            uninstall()
    else:
        with strict_cuda() as dev:
            yield dev


def prompts(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()  # noqa: E731
    first = ids(300)
    return [{"prompt_token_ids": p} for p in (first, ids(170), ids(40), ids(5), first[:260] + ids(9))]


EVERY_PARAMETER = [
    SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, prompt_logprobs=3, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=3, n=2, max_tokens=12, logprobs=1,
                   presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True),
    SamplingParams(temperature=1.0, max_tokens=12, prompt_logprobs=0, ignore_eos=True),
    SamplingParams(temperature=0.0, repetition_penalty=1.4, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=5, max_tokens=12, logprobs=0, ignore_eos=True),
]


# The block size is 128 on NPU and 16 on CUDA: blocks for 512 tokens (one longest sequence), where the batch
# needs about 900.
PREEMPTING = {"npu": 4, "cuda": 32}


@pytest.mark.parametrize("device", ["npu", "cuda"])
def test_every_feature_runs_device_strict(device, tiny_llama_dir):
    with strict(device) as dev:
        llm = LLM(str(tiny_llama_dir), device=device, num_gpu_blocks_override=PREEMPTING[device], **ENGINE)
        outputs = llm.generate(prompts(), EVERY_PARAMETER)
        # The seeded request alone gives the same tokens: its draws come from its own device generator.
        alone = llm.generate([prompts()[1]], EVERY_PARAMETER[1])[0]
        preemptions = llm.engine.scheduler.num_preemptions
        del llm
        gc.collect()
        assert dev.unpinned_copies == []
    assert preemptions > 0
    assert [len(o.outputs) for o in outputs] == [1, 2, 1, 1, 1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in outputs[1].outputs]
    assert all(len(c.token_ids) == 12 for o in outputs for c in o.outputs)
    assert len(outputs[0].prompt_logprobs) == 300 and len(outputs[2].prompt_logprobs) == 40
    assert all(len(lp) >= 2 for lp in outputs[0].outputs[0].logprobs)


@pytest.mark.parametrize("device", ["npu", "cuda"])
def test_a_host_tensor_mixed_into_device_logits_fails_the_run(device, tiny_llama_dir, monkeypatch):
    """The harness can fail: the defect of the first sampler (a host tensor combined with the logits) raises."""
    from npu_infer import sampling
    sample_with = sampling.sample_with

    def host_bias(logits, meta, ops=None):
        return sample_with(logits + torch.zeros(logits.shape), meta, ops)  # a host tensor of the logits' shape
    monkeypatch.setattr(sampling, "sample_with", host_bias)
    with strict(device), pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        LLM(str(tiny_llama_dir), device=device, kv_cache_memory="16MiB", **ENGINE)  # profile_run samples
    gc.collect()
    # The same code is fine where host and device are one: the failure above is the device's.
    llm = LLM(str(tiny_llama_dir), device="cpu", kv_cache_memory="16MiB", **ENGINE)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=2))


def test_an_unpinned_non_blocking_copy_is_reported():
    with strict("npu") as dev:
        torch.arange(4).to("npu:0", non_blocking=True)
        assert len(dev.unpinned_copies) == 1 and "unpinned" in dev.unpinned_copies[0]
        torch.arange(4).pin_memory().to("npu:0", non_blocking=True)
        torch.arange(4).to("npu:0")  # a blocking copy is safe from any memory
        assert len(dev.unpinned_copies) == 1


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_tensor_and_pipeline_parallel_run_device_strict(tp, pp, tiny_llama_dir, tmp_path, monkeypatch):
    """TP=2 and PP=2 over gloo: every rank is a spawned process on the strict stand-in (_shim.py), and gives the
    single-rank run's greedy tokens (near-ties aside: the ranks sum partial products in another order)."""
    from ._e2e import compare_greedy
    from ._shim import write_sitecustomize
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    batch = prompts()[1:4]
    with strict("npu"):
        single = LLM(str(tiny_llama_dir), device="npu", kv_cache_memory="16MiB", **ENGINE).generate(batch, params)
    gc.collect()
    monkeypatch.setenv("PYTHONPATH", write_sitecustomize(tmp_path / "shim"))
    monkeypatch.setenv("NPU_STANDIN_TESTS_DIR", _TESTS_DIR)
    monkeypatch.setenv("NPU_STANDIN_DEVICES", "2")
    monkeypatch.setenv("NPU_STANDIN_GLOO", "1")
    with strict("npu"):
        from . import set_device_count
        set_device_count(2)
        llm = LLM(str(tiny_llama_dir), device="npu", kv_cache_memory="16MiB", tensor_parallel_size=tp,
                  pipeline_parallel_size=pp, **ENGINE)
        try:
            parallel = llm.generate(batch, params)
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()
    assert len(parallel) == len(single)
    compare_greedy(single, parallel, min_agreement=0.6)  # asserts token agreement and logprob closeness


def test_prompt_logprobs_in_slices_equal_the_whole_chunk(tiny_llama_dir, monkeypatch):
    """ModelRunner computes prompt logprobs PROMPT_LOGPROBS_ROWS positions at a time (bounded memory); the slices
    give exactly what one pass over the chunk gives."""
    from npu_infer.worker import model_runner
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    llm = LLM(str(tiny_llama_dir), device="cpu", kv_cache_memory="16MiB", **ENGINE)
    whole = llm.generate(prompts()[1], params)[0].prompt_logprobs
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 7)
    sliced = llm.generate(prompts()[1], params)[0].prompt_logprobs
    assert len(whole) == 170 and sliced == whole
