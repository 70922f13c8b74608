"""RMSNorm (+ residual), rotary and SwiGLU on the CPU through the AVX-512 kernels: one call each, one pass over
memory, instead of 3-6 torch ops. Same numerics as TorchOps up to fp32 rounding of intermediates."""
from __future__ import annotations

from types import ModuleType

import torch

from npu_infer.platform.torch_ops import RopeStep, TorchOps

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _rows(x: torch.Tensor) -> bool:
    """A [rows, features] tensor the kernels take: unit stride along features, a dtype they are built for."""
    return x.dim() == 2 and x.stride(1) == 1 and x.dtype in KERNEL_DTYPES


class CpuOps(TorchOps):
    def __init__(self, kernels: ModuleType):
        self.kernels = kernels

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.device.type != "cpu" or not _rows(logits) or logits.shape[1] == 0:
            return super().argmax_rows(logits)
        tokens, has_nan = self.kernels.argmax_rows(logits)
        if bool(has_nan.any()):  # torch calls NaN the maximum: its answer for those rows
            tokens[has_nan] = super().argmax_rows(logits[has_nan])
        return tokens

    def ban_by_bitmask_(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        if logits.device.type != "cpu" or not _rows(logits) or bitmask.dtype != torch.int32 or bitmask.stride(-1) != 1:
            return super().ban_by_bitmask_(logits, bitmask, rows)
        self.kernels.ban_by_bitmask_(logits, bitmask, torch.tensor(rows, dtype=torch.int64))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _rows(x) or weight.dtype != x.dtype:
            return super().rms_norm(x, weight, eps)
        return self.kernels.rms_norm(x, None, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x in place (the caller hands over its residual), then RMSNorm of it."""
        if not _rows(x) or weight.dtype != x.dtype or residual.dtype != x.dtype or not residual.is_contiguous():
            return super().add_rms_norm(x, residual, weight, eps)
        return self.kernels.rms_norm(x, residual, weight, eps), residual

    def rope_step(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
                  dtype: torch.dtype) -> RopeStep:
        """The kernel reads the table at the positions itself: no cos/sin rows, unless it cannot take the dtype."""
        if dtype not in KERNEL_DTYPES or positions.dtype != torch.int64 or head_dim % 2:
            return super().rope_step(positions, cos_sin_cache, head_dim, dtype)
        return RopeStep(positions, cos_sin_cache, head_dim)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rope: RopeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """In place when q and k sit side by side in the fused QKV output (always, for our models)."""
        head_dim, positions = rope.head_dim, rope.positions
        if not (_rows(q) and k.data_ptr() == q.data_ptr() + q.shape[1] * q.element_size()
                and q.stride() == k.stride() and head_dim % 2 == 0 and positions.dtype == torch.int64):
            return super().rotary(q, k, rope)
        heads = (q.shape[1] + k.shape[1]) // head_dim
        qk = q.as_strided((q.shape[0], heads * head_dim), q.stride())
        self.kernels.rotary_(qk, positions, rope.cos_sin_cache, heads, head_dim)
        return q, k

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if not _rows(x):
            return super().silu_and_mul(x)
        return self.kernels.silu_and_mul(x)
