"""Fused ops on Ascend NPUs through torch_npu (imported lazily, in the constructor).

rms_norm      -> torch_npu.npu_rms_norm(self, gamma, epsilon) -> (y, rstd)
add_rms_norm  -> torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
rotary        -> torch_npu._npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox_style),
                 in place on contiguous [T, heads*head_dim] copies of q and k; rope_step (once per step) hands
                 it the positions and the table in the query's dtype
silu_and_mul  -> torch_npu.npu_swiglu(self, dim=-1): silu(first half) * second half
argmax_rows, ban_by_bitmask_ (greedy sampling, structured-output masks): TorchOps' plain-torch ops, on the device

Signatures and constraints: torch_npu 2.14.0, recorded in tests/npu_standin/declarations.json.
"""
from __future__ import annotations

import weakref

import torch

from npu_infer.platform.torch_npu_import import import_torch_npu
from npu_infer.platform.torch_ops import RopeStep, TorchOps

# _npu_rotary_embedding builds its cos/sin tables from the FIRST cos_sin_cache it is given in the process and
# silently reuses them afterwards (op-plugin's InitializeCosSinCache).  A model owns one table (its
# RotaryEmbedding); another model's equal table is mapped to the first one, and a table with other values is
# refused instead of being ignored by the kernel.  Keyed by the torch_npu module, whose lifetime is the kernel
# state's.
_FIRST_ROPE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NpuFusedOps(TorchOps):
    def __init__(self):
        self._npu = import_torch_npu()
        self._rope: dict[tuple, tuple] = {}  # (id(cache), dtype) -> (weakref, version, cache passed to the op)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._npu.npu_rms_norm(x, _like(weight, x), epsilon=eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual)."""
        y, _rstd, summed = self._npu.npu_add_rms_norm(x, residual, _like(weight, x), epsilon=eps)
        return y, summed

    def rope_step(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int,
                  dtype: torch.dtype) -> RopeStep:
        """Once per step: the positions, and the table as the kernel takes it (in the query's dtype)."""
        if cos_sin_cache.shape[-1] != head_dim:
            raise ValueError(f"cos_sin_cache width {cos_sin_cache.shape[-1]} != head_dim {head_dim}: "
                             "partial rotary is not supported on NPU")
        return RopeStep(positions, self._rope_cache(cos_sin_cache, dtype), head_dim)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rope: RopeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary; q [T, Hq*head_dim], k [T, Hk*head_dim]; returns new tensors (inputs untouched)."""
        # The op rotates in place and refuses non-contiguous outputs; q and k usually are strided views of
        # the fused qkv projection, so this is the one copy the op needs anyway.
        q = q.clone(memory_format=torch.contiguous_format)
        k = k.clone(memory_format=torch.contiguous_format)
        self._npu._npu_rotary_embedding(rope.positions, q, k, rope.head_dim, rope.cos_sin_cache, True)
        return q, k

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._npu.npu_swiglu(x, dim=-1)

    def _rope_cache(self, cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        hit = self._rope.get((id(cache), dtype))
        if hit is not None and hit[0]() is cache and hit[1] == _version(cache):
            return hit[2]
        converted = cache.to(dtype).contiguous()  # the op needs the cache in the query's dtype
        first = _FIRST_ROPE_CACHE.get(self._npu)
        if first is None:
            _FIRST_ROPE_CACHE[self._npu] = first = converted
        elif first.shape != converted.shape or first.dtype != converted.dtype or not torch.equal(first, converted):
            raise RuntimeError(
                "torch_npu._npu_rotary_embedding keeps the first cos/sin cache of the process, and this model "
                "needs a different one (other rope parameters, length or dtype); run it in a separate process")
        self._rope[(id(cache), dtype)] = (weakref.ref(cache), _version(cache), first)
        return first


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return None


def _like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # npu_rms_norm / npu_add_rms_norm take gamma in the input's dtype.
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)
