"""Apply a step's LogitsMasks to the logits on their device, batched: the packed bitmask goes to the platform's
ban_by_bitmask_ (an AVX-512 kernel on the CPU; unpacked with one and-compare elsewhere), the sparse biases go in
with one index_put_."""
from __future__ import annotations

import torch

from npu_infer.platform.torch_ops import TorchOps
from npu_infer.worker.step_io import LogitsMasks


def apply_logits_masks(logits: torch.Tensor, masks: LogitsMasks, row_of: dict[str, int],
                       ops: TorchOps) -> torch.Tensor:
    """`logits` [rows, vocab] (edited in place and returned); `row_of` maps a request id to its row; `ops` is the
    platform's fused_ops()."""
    device = logits.device
    if masks.bitmask is not None and masks.mask_ids:
        words = torch.from_numpy(masks.bitmask).to(device)
        ops.ban_by_bitmask_(logits, words, [row_of[r] for r in masks.mask_ids])
    if masks.bias_ids:
        rows = torch.tensor([row_of[r] for r in masks.bias_ids], dtype=torch.long).to(device)
        tokens = torch.from_numpy(masks.bias_tokens).to(device)
        values = torch.from_numpy(masks.bias_values).to(device=device, dtype=logits.dtype)
        logits.index_put_((rows, tokens), values, accumulate=True)
    return logits
