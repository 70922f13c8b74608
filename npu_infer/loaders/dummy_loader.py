"""--load-format dummy: no file is read; seeded random weights of a sane scale (for profiling, benchmarks)."""
from __future__ import annotations

import torch
from torch import nn

# HF's initializer_range as the standard deviation: with unit RMSNorm gains, activations and logits stay O(1) at any
# depth, so a dummy model gives finite, non-degenerate logits (random tokens, not NaN) in bf16 and fp16 too.
# Drawn uniform in [-a, a] with a = std * sqrt(3): twice as fast as normal_ on the CPU, and no tails.
STD = 0.02
_BOUND = STD * 3 ** 0.5


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)  # RMSNorm gains stay 1, so activations keep a unit scale
        elif param.device.type == "cpu":
            param.data.uniform_(-_BOUND, _BOUND, generator=generator)
        else:  # the generator lives on the CPU: draw there, one copy to the device
            values = torch.empty(param.shape, dtype=param.dtype).uniform_(-_BOUND, _BOUND, generator=generator)
            param.data.copy_(values)
