"""Per-device defaults and refusals: fp16 on 310P and pre-sm80 GPUs, the visible GPU count checked, bitsandbytes
refused on NPU in one sentence."""

from __future__ import annotations

import pytest
import torch

from npu_infer import LLM
from npu_infer.platform import CudaPlatform, DeviceUnavailableError, NpuPlatform

from . import _namespace
from ._cuda import strict_cuda


@pytest.mark.parametrize("name, dtype", [("Ascend910B1", torch.bfloat16), ("Ascend310P3", torch.float16)])
def test_npu_default_dtype_follows_the_chip(npu, name, dtype):
    _namespace.state["device_name"] = name
    assert NpuPlatform().default_dtype() == dtype


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                               ((7, 5), torch.float16)])
def test_cuda_default_dtype_is_float16_before_sm80(capability, dtype):
    with strict_cuda(capability=capability):
        assert CudaPlatform().default_dtype() == dtype


def test_cuda_rank_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with strict_cuda():
        assert CudaPlatform().device(0) == torch.device("cuda", 0)
        with pytest.raises(DeviceUnavailableError, match=r"needs cuda:1 but 1 GPU\(s\) are visible "
                                                         r"\(CUDA_VISIBLE_DEVICES=3\); lower -tp/-pp"):
            CudaPlatform().device(1)


def test_bitsandbytes_is_refused_on_npu(npu, tiny_llama_dir):
    with pytest.raises(ValueError, match="^--quantization bitsandbytes is not supported on npu .*; serve the "
                                         "unquantized model$"):
        LLM(str(tiny_llama_dir), device="npu", quantization="bitsandbytes", skip_tokenizer_init=True)
