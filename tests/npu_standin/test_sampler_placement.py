"""The sampler on a device-strict device: every per-row tensor it combines with the logits is on their device.

The first version built temperature, greedy rows, top-k/top-p/min-p and the penalty counts on the host and divided
the device's logits by them, which raises on a real NPU or GPU; these tests run each parameter on the strict
stand-in and compare the tokens and logprobs with the same sampler on the host."""

from __future__ import annotations

import pytest
import torch

from npu_infer.sampling import SamplerRow, SamplingParams, prompt_logprobs, sample

VOCAB = 64

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3),
    SamplingParams(temperature=1.0, seed=7, top_k=10, top_p=0.9, logprobs=0),
    SamplingParams(temperature=0.8, seed=11, logprobs=2, min_p=0.05),
]


def _rows(device) -> list[SamplerRow]:
    rows = []
    for i, p in enumerate(PARAMS):
        gen = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        rows.append(SamplerRow(p, gen, prompt_ids=[1, 2, 3, i, VOCAB + 5], output_ids=[4, 4, 9, i]))
    return rows


def _run(logits: torch.Tensor, device):
    torch.manual_seed(0)
    return sample(logits, _rows(device))


def test_every_sampling_parameter_runs_on_the_device_and_matches_the_host(strict_device):
    host_logits = torch.randn(len(PARAMS), VOCAB) * 3
    device_logits = strict_device.tensor(host_logits)
    got = _run(device_logits, device_logits.device)
    strict_device.exit()  # the host reference runs without the mode
    want = _run(host_logits, torch.device("cpu"))
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs


def test_all_greedy_batch_with_logprobs_on_the_device(strict_device):
    logits = strict_device.tensor(torch.randn(3, VOCAB))
    rows = [SamplerRow(SamplingParams(temperature=0.0, logprobs=2), None, [1], []) for _ in range(3)]
    out = sample(logits, rows)
    assert out.token_ids == logits.cpu().argmax(dim=-1).tolist()
    assert [lp[1] for lp in out.logprobs] == [1, 1, 1]


def test_prompt_logprobs_on_the_device(strict_device):
    host = torch.randn(4, VOCAB)
    got = prompt_logprobs(strict_device.tensor(host), [3, 1, 4, 1], 2)
    strict_device.exit()
    assert got == prompt_logprobs(host, [3, 1, 4, 1], 2)


def test_a_host_tensor_mixed_into_device_logits_raises(strict_device):
    logits = strict_device.tensor(torch.randn(2, VOCAB))
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        logits / torch.tensor([0.7, 1.0]).unsqueeze(1)  # what the first sampler did with the temperatures
    with pytest.raises(RuntimeError, match="generator"):
        logits[0].exponential_(generator=torch.Generator().manual_seed(0))
