"""NpuPlatform: Ascend NPUs through torch_npu (imported lazily, through torch_npu_import.py)."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from npu_infer import envs
from npu_infer.platform.interface import DeviceUnavailableError, Platform
from npu_infer.platform.npu_attention import BLOCK_SIZE, NpuAttentionBackend
from npu_infer.platform.npu_ops import NpuFusedOps
from npu_infer.platform.torch_npu_import import import_torch_npu

if TYPE_CHECKING:
    from npu_infer.config import EngineConfig


def _visible_devices_note() -> str:
    visible = envs.ASCEND_RT_VISIBLE_DEVICES
    return f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible is not None else ""


class NpuPlatform(Platform):
    device_type = "npu"
    dist_backend = "hccl"

    def __init__(self):
        self._runtime_configured = False

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        try:
            import_torch_npu()
            return torch.npu.is_available()
        except DeviceUnavailableError:
            return False

    def check_usable(self) -> None:
        import_torch_npu()
        if not torch.npu.is_available():
            raise DeviceUnavailableError(f"--device npu found torch_npu but no NPU{_visible_devices_note()}; "
                               "check the driver with npu-smi info")

    def device(self, local_rank: int = 0) -> torch.device:
        # ASCEND_RT_VISIBLE_DEVICES is applied by the runtime: npu:0 is the first visible card.
        torch_npu = import_torch_npu()
        count = torch.npu.device_count()
        if local_rank >= count:
            raise DeviceUnavailableError(f"this rank needs npu:{local_rank} but {count} NPU(s) are visible"
                               f"{_visible_devices_note()}; lower -tp/-pp or make more cards visible")
        standin_device = getattr(torch_npu, "standin_device", None)  # tests' stand-in runs on CPU tensors
        return standin_device(local_rank) if standin_device else torch.device(f"npu:{local_rank}")

    def set_device(self, device: torch.device) -> None:
        import_torch_npu()
        torch.npu.set_device(device)
        self._configure_runtime()

    def _configure_runtime(self) -> None:
        """The process-wide settings vllm-ascend also applies, once, before the first kernel runs."""
        if self._runtime_configured:
            return
        # Use CANN's prebuilt binary kernels instead of compiling each op online for every new input shape:
        # an inference engine sees a new shape nearly every step (token counts vary), and online compiles
        # would stall those steps for seconds.
        torch.npu.set_compile_mode(jit_compile=False)
        # Keep every tensor in the plain ND layout. With internal formats on, torch_npu may silently store
        # tensors (weights, caches) in private formats such as FRACTAL_NZ: the paged attention kernels and
        # our views/reshapes of the KV cache assume ND, and the format casts cost time on every step.
        torch.npu.config.allow_internal_format = False
        self._runtime_configured = True

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def empty_cache(self) -> None:
        torch.npu.empty_cache()

    def mem_get_info(self) -> tuple[int, int]:
        import_torch_npu()
        return torch.npu.mem_get_info()

    def memory_in_use(self) -> int:
        return torch.npu.memory_allocated()

    def peak_memory(self) -> int:
        return torch.npu.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats()

    def default_dtype(self) -> torch.dtype:
        # Atlas 300I (310P) chips have no bf16 kernels; vllm-ascend serves float16 there too.
        return torch.float16 if "310P" in self._device_name() else torch.bfloat16

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        # npu_fused_infer_attention_score takes no float32 query (float16, bfloat16, int8 only).
        return (torch.bfloat16, torch.float16)

    def default_block_size(self) -> int:
        return BLOCK_SIZE  # what the paged kernels need (npu_attention.py); vllm-ascend defaults to it too

    def supported_block_sizes(self) -> tuple[int, ...]:
        return (BLOCK_SIZE,)

    def check_and_update_config(self, config: EngineConfig) -> None:
        super().check_and_update_config(config)
        if config.quantization == "bitsandbytes":
            raise ValueError("--quantization bitsandbytes is not supported on npu (bitsandbytes has no NPU kernels: "
                             "it would dequantize every weight on every matmul); serve the unquantized model")
        if config.quantization == "w8a8" and "310P" in self._device_name():
            raise ValueError("--quantization w8a8 is not supported on Atlas 300I (310P): its npu_quant_matmul takes "
                             "no per-token scales and npu_dynamic_quant is A2/A3-only; use --quantization w8a16")

    def _device_name(self) -> str:
        import_torch_npu()
        return torch.npu.get_device_name(0)

    def prepare_model(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """int8 linears (W8A8 / W8A16): their weights transposed, cast to NZ and their scales converted once, for
        torch_npu's int8 matmuls (npu_linear.py). The prepared tensors replace the loaded ones, so each weight is
        held once on the device."""
        from npu_infer.models.layers.int8_linear import INT8_SCHEMES
        from npu_infer.platform.npu_linear import NpuInt8Linear
        for module in model.modules():
            if getattr(module, "quant_scheme", None) is None:
                continue
            if module.quant_scheme not in INT8_SCHEMES:
                raise ValueError("static W8A8 (an msmodelslim 'W8A8' checkpoint) is served on the CPU only for now: "
                                 "its NPU path (npu_quantize, then npu_quant_matmul with deq_scale and quant_bias) is "
                                 "not written yet; on the NPU serve a W8A8_DYNAMIC checkpoint")
            linear = NpuInt8Linear(module.weight.detach(), module.weight_scale.detach(), getattr(module, "bias", None),
                                   module.quant_scheme, dtype)
            module.weight = torch.nn.Parameter(linear.weight, requires_grad=False)
            module.weight_scale = torch.nn.Parameter(linear.scale, requires_grad=False)
            module.platform_matmul = linear

    def attention_backend(self, head_dim: int, dtype: torch.dtype) -> NpuAttentionBackend:
        return NpuAttentionBackend(head_dim)

    def fused_ops(self) -> NpuFusedOps:
        return NpuFusedOps()
