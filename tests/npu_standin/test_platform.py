"""NpuPlatform on the stand-in: start-up settings, devices, block size and dtype choices, missing torch_npu."""

from __future__ import annotations

import sys

import pytest
import torch

from npu_infer.config import EngineConfig

from . import calls, runtime_options, set_device_count


def test_set_device_applies_the_vllm_ascend_runtime_settings_once(npu):
    from npu_infer.platform.npu import NpuPlatform
    platform = NpuPlatform()
    assert runtime_options() == {}
    platform.set_device(platform.device(0))
    assert runtime_options() == {"jitCompile": "disable", "ALLOW_INTERNAL_FORMAT": "disable"}
    platform.set_device(platform.device(0))
    assert calls["set_compile_mode"] == 1 and calls["config.allow_internal_format"] == 1


def test_device_beyond_the_visible_cards_is_a_clear_error(npu, monkeypatch):
    from npu_infer.platform.npu import NpuPlatform
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    set_device_count(2)
    platform = NpuPlatform()
    assert platform.device(1) == torch.device("cpu")  # the stand-in's seam
    with pytest.raises(RuntimeError, match=r"npu:2 but 2 NPU\(s\) are visible \(ASCEND_RT_VISIBLE_DEVICES=4,5\)"):
        platform.device(2)


def test_no_npu_is_a_clear_error(npu):
    from npu_infer.platform import get_platform
    set_device_count(0)
    with pytest.raises(RuntimeError, match="found torch_npu but no NPU"):
        get_platform("npu")


def test_missing_torch_npu_names_what_to_install(monkeypatch):
    from npu_infer.platform import get_platform
    from npu_infer.platform.npu import NpuPlatform
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    assert not NpuPlatform.is_available()
    with pytest.raises(RuntimeError) as err:
        get_platform("npu")
    message = str(err.value)
    for needed in ("npu_infer[npu]", "CANN", "set_env.sh", "torch-npu X.Y.Z needs torch==X.Y.Z",
                   torch.__version__.split("+")[0]):
        assert needed in message
    assert "\n" not in message


def test_platform_defaults(npu):
    from npu_infer.platform import CpuPlatform, NpuPlatform
    npu_platform, cpu_platform = NpuPlatform(), CpuPlatform()
    assert npu_platform.default_block_size() == 128 and npu_platform.supported_block_sizes() == (128,)
    assert cpu_platform.default_block_size() == 16 and cpu_platform.supported_block_sizes() is None
    assert npu_platform.default_dtype() == torch.bfloat16
    assert torch.float32 not in npu_platform.supported_dtypes()
    assert npu_platform.dist_backend == "hccl"


class _HF:
    max_position_embeddings = 512


def _resolve(platform, **kwargs) -> EngineConfig:
    config = EngineConfig(model="m", **kwargs)
    config.resolve(_HF(), platform)
    return config


def test_block_size_defaults_per_platform(npu):
    from npu_infer.platform import CpuPlatform, NpuPlatform
    assert EngineConfig(model="m").block_size is None
    assert _resolve(NpuPlatform()).block_size == 128
    assert _resolve(CpuPlatform()).block_size == 16
    assert _resolve(CpuPlatform(), block_size=64).block_size == 64
    assert _resolve(NpuPlatform(), block_size=128).block_size == 128


def test_unsupported_block_size_on_npu_is_refused_at_config(npu):
    from npu_infer.platform import NpuPlatform
    for bad in (16, 64, 256):  # the kernels take 128 only (npu_attention.BLOCK_SIZE)
        with pytest.raises(ValueError, match=rf"^--block-size {bad} is not supported on npu: .* pass 128$"):
            _resolve(NpuPlatform(), block_size=bad)


def test_float32_is_refused_on_npu_and_auto_picks_bf16(npu):
    from npu_infer.platform import NpuPlatform
    assert _resolve(NpuPlatform()).torch_dtype == torch.bfloat16
    assert _resolve(NpuPlatform(), dtype="float16").torch_dtype == torch.float16
    with pytest.raises(ValueError, match=r"float32 is not supported on npu; use one of bfloat16, float16"):
        _resolve(NpuPlatform(), dtype="float32")


def test_engine_start_refuses_bad_block_size_before_loading(npu, tiny_llama_dir, monkeypatch):
    """The error comes from the config, before any weights are read."""
    from npu_infer import LLM
    from npu_infer.worker import worker

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the block size was checked")
    monkeypatch.setattr(worker.Worker, "load_model", no_load)
    with pytest.raises(ValueError, match="--block-size 16 is not supported on npu"):
        LLM(str(tiny_llama_dir), device="npu", block_size=16, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="float32 is not supported on npu"):
        LLM(str(tiny_llama_dir), device="npu", dtype="float32", skip_tokenizer_init=True)
