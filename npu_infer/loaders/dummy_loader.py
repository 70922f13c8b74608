"""--load-format dummy: no file is read; seeded random weights of a sane scale (for profiling, benchmarks)."""
from __future__ import annotations

import torch
from torch import nn


def fill_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)  # RMSNorm gains stay 1, so activations keep a unit scale
            continue
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        param.data.copy_(values)
