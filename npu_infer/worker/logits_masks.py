"""Apply a step's LogitsMasks to the logits on their device, batched: the packed bitmask is unpacked on the device
(one shift-and-mask op) and disallowed tokens set to -inf; the sparse biases go in with one index_put_."""
from __future__ import annotations

import torch

from npu_infer.worker.step_io import LogitsMasks

_BITS = {}


def _bit_positions(device: torch.device) -> torch.Tensor:
    if device not in _BITS:
        _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return _BITS[device]


def apply_logits_masks(logits: torch.Tensor, masks: LogitsMasks, row_of: dict[str, int]) -> torch.Tensor:
    """`logits` [rows, vocab] (edited in place and returned); `row_of` maps a request id to its row."""
    device = logits.device
    vocab = logits.shape[1]
    if masks.bitmask is not None and masks.mask_ids:
        rows = torch.tensor([row_of[r] for r in masks.mask_ids], dtype=torch.long).to(device)
        words = torch.from_numpy(masks.bitmask).to(device)
        allowed = ((words.unsqueeze(-1) >> _bit_positions(device)) & 1).bool().flatten(1)
        if allowed.shape[1] < vocab:  # the model's vocabulary is padded beyond the tokenizer's
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
        logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))
    if masks.bias_ids:
        rows = torch.tensor([row_of[r] for r in masks.bias_ids], dtype=torch.long).to(device)
        tokens = torch.from_numpy(masks.bias_tokens).to(device)
        values = torch.from_numpy(masks.bias_values).to(device=device, dtype=logits.dtype)
        logits.index_put_((rows, tokens), values, accumulate=True)
    return logits
