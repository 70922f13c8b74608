"""Platform selection and the CPU platform's answers."""
from __future__ import annotations

import torch

from npu_infer.platform import CpuPlatform, get_platform
from npu_infer.platform.cpu import cpu_has_fast_bf16
from npu_infer.config import parse_bytes


def test_auto_picks_cpu_here():
    platform = get_platform("auto")
    assert isinstance(platform, CpuPlatform)  # no NPU, no CUDA on CI machines
    assert platform.dist_backend == "gloo" and platform.device(3) == torch.device("cpu")


def test_cpu_default_dtype_follows_the_cpu():
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert CpuPlatform().default_dtype() == expected


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 1024**3
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(123) == 123
