"""Platform selection and the CPU platform's answers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from npu_infer.config import EngineConfig, parse_bytes
from npu_infer.platform import CpuPlatform, get_platform
from npu_infer.platform.cpu import cpu_has_fast_bf16


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


def test_layers_cannot_be_built_before_a_platform_is_decided():
    import npu_infer.platform as platform
    from npu_infer.models.layers.layernorm import RMSNorm
    platform._current = None  # a fresh process
    with pytest.raises(RuntimeError, match="^no platform was decided for this process"):
        RMSNorm(8)
    decided = platform.init_platform("cpu")
    assert platform.current_platform() is decided and isinstance(decided, CpuPlatform)
    assert RMSNorm(8).ops is not None


def test_resolving_the_config_writes_down_the_decided_device_for_the_workers():
    """`--device auto` becomes the platform's device, so worker processes decide the same platform from it."""
    config = EngineConfig(model="m", device="auto")
    config.resolve(SimpleNamespace(max_position_embeddings=64), get_platform("auto"))
    assert (config.device, config.block_size, config.max_model_len) == ("cpu", 16, 64)
    assert config.torch_dtype == CpuPlatform().default_dtype()
