"""The per-step logits masks (structured outputs, allowed ids, bad words, logit_bias, min_tokens) applied to device
logits on the strict stand-in: every tensor they combine with the logits is moved to the logits' device first."""
from __future__ import annotations

import numpy as np
import torch

from npu_infer.engine.logits_rules import allowed_bitmask
from npu_infer.platform.torch_ops import TorchOps
from npu_infer.worker.logits_masks import apply_logits_masks
from npu_infer.worker.step_io import LogitsMasks

VOCAB = 100


def test_masks_apply_on_the_device_as_on_the_host(strict_device):
    masks = LogitsMasks(["b"], np.stack([allowed_bitmask([3, 4, 99], VOCAB)]), ["a", "a", "b"],
                        np.array([1, 2, 3], np.int64), np.array([5.0, float("-inf"), 1.0], np.float32))
    host = torch.randn(2, VOCAB)
    got = apply_logits_masks(strict_device.tensor(host.clone()), masks, {"a": 0, "b": 1}, TorchOps()).cpu()
    strict_device.exit()
    want = apply_logits_masks(host.clone(), masks, {"a": 0, "b": 1}, TorchOps())
    assert torch.equal(got, want)
    assert want[0, 1] == host[0, 1] + 5 and want[0, 2] == float("-inf")
    assert torch.isfinite(want[1]).nonzero().flatten().tolist() == [3, 4, 99] and want[1, 3] == host[1, 3] + 1


def test_constrained_and_greedy_requests_run_through_the_npu_platforms_ops(tiny_chat_model_dir):
    """The engine on the strict stand-in takes the NPU platform's fused ops for the masks and the greedy argmax
    (NpuFusedOps once lacked both: every such request would have raised on a card)."""
    from npu_infer import LLM, SamplingParams
    from npu_infer.structured_output import StructuredOutputsParams
    from . import install, uninstall
    install(strict=True)
    try:
        llm = LLM(str(tiny_chat_model_dir), device="npu", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                  kv_cache_memory="64MiB")
        choice = StructuredOutputsParams(choice=["yes", "no", "maybe"])
        params = [SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=choice),
                  SamplingParams(temperature=0.9, seed=3, max_tokens=8, structured_outputs=choice),
                  SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
        outs = llm.generate(["Answer:", "Answer again:", "Go on:"], params, use_tqdm=False)
    finally:
        uninstall()
    assert [o.outputs[0].text in ("yes", "no", "maybe") for o in outs[:2]] == [True, True]
    assert len(outs[2].outputs[0].token_ids) == 6
