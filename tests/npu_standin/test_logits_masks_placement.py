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
