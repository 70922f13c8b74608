"""Apply a step's LogitsMasks to the logits on their device, batched: the packed bitmask is unpacked on the device
(one shift-and-mask op) and disallowed tokens set to -inf; the sparse biases go in with one index_put_."""
from __future__ import annotations

import torch

from npu_infer.worker.step_io import LogitsMasks

_BITS: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """1 << i for i in 0..31 as int32 (bit 31 is the sign bit)."""
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)
    return _BITS[device]


def apply_logits_masks(logits: torch.Tensor, masks: LogitsMasks, row_of: dict[str, int]) -> torch.Tensor:
    """`logits` [rows, vocab] (edited in place and returned); `row_of` maps a request id to its row."""
    device = logits.device
    vocab = logits.shape[1]
    if masks.bitmask is not None and masks.mask_ids:
        rows = [row_of[r] for r in masks.mask_ids]
        words = torch.from_numpy(masks.bitmask).to(device)
        banned = (words.unsqueeze(-1) & _bit_values(device)).eq(0).flatten(1)
        if banned.shape[1] < vocab:  # the model's vocabulary is padded beyond the tokenizer's: those are banned
            banned = torch.nn.functional.pad(banned, (0, vocab - banned.shape[1]), value=True)
        banned = banned[:, :vocab]
        # Every row constrained, in order (the common case): in place, without the gather and scatter below
        # (16 rows x 49152 on 2 cores: 3.2 -> 2.2 ms a step with the unpack above).
        if rows == list(range(len(logits))):
            logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor(rows, dtype=torch.long).to(device)
            logits[index] = logits[index].masked_fill_(banned, float("-inf"))
    if masks.bias_ids:
        rows = torch.tensor([row_of[r] for r in masks.bias_ids], dtype=torch.long).to(device)
        tokens = torch.from_numpy(masks.bias_tokens).to(device)
        values = torch.from_numpy(masks.bias_values).to(device=device, dtype=logits.dtype)
        logits.index_put_((rows, tokens), values, accumulate=True)
    return logits
