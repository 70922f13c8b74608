"""Vectorised PyTorch dequantization of GGML/GGUF tensor data.

Every quantized GGML type stores a tensor as a flat sequence of fixed-size
*blocks* (``type_size`` bytes encoding ``block_size`` values).  The functions
here view the raw bytes as a ``(n_blocks, type_size)`` uint8 tensor and decode
all blocks at once with tensor ops (no Python loop over blocks).  Very large
tensors are decoded in a few big chunks to bound peak memory.

The arithmetic mirrors the reference NumPy implementation in
``gguf.quants`` (which itself mirrors ``ggml-quants.c``) operation for
operation, so results are bit-identical to ``gguf.quants.dequantize``.

Public API: :func:`dequantize`, :data:`SUPPORTED_TYPES`,
:func:`is_supported`, :func:`split_q8_0` (Q8_0 as stored: int8 values and block scales).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["SUPPORTED_TYPES", "dequantize", "is_supported", "split_q8_0"]

QK_K = 256
K_SCALE_SIZE = 12

# Elements decoded per chunk for very large tensors (bounds temporaries).
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian half floats -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8, device=device).reshape(tuple(shape))


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split packed 4-bit values: for each run of ``group`` bytes, first the
    ``group`` low nibbles, then the ``group`` high nibbles.

    ``qs``: (n, k*group) uint8 -> (n, k, 2, group) uint8
    """
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(b: torch.Tensor, nbits: int) -> torch.Tensor:
    """(..., g) uint8 -> (..., nbits, g): bit i of every byte in slot i."""
    sh = _shifts(range(nbits), (nbits, 1), b.device)
    return (b.unsqueeze(-2) >> sh) & 1


# --------------------------------------------------------------------------- #
# per-type block decoders: (n_blocks, type_size) uint8 -> (n_blocks, block_size) f32
# --------------------------------------------------------------------------- #
def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = _nibbles(blocks[:, 2:], 16).reshape(n, -1).to(torch.int8) - 8
    return qs.to(torch.float32).mul_(d)


def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    qs = _nibbles(blocks[:, 4:], 16).reshape(n, -1).to(torch.float32)
    return qs.mul_(d).add_(m)


def _q5_values(qh_bytes: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values of a Q5_0/Q5_1 block as uint8 (n, 32).

    ``qh_bytes`` holds a little-endian uint32 whose bit j is the 5th bit of
    element j.
    """
    n = qs.shape[0]
    qh = _bits(qh_bytes, 8)  # (n, 8 bits, 4 bytes): [bit, byte]
    qh = qh.transpose(1, 2).reshape(n, 32)  # element j = byte j//8, bit j%8
    ql = _nibbles(qs, 16).reshape(n, 32)
    return ql | (qh << 4)


def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return q.to(torch.float32).mul_(d)


def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:]).to(torch.float32)
    return q.mul_(d).add_(m)


def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x.mul_(d)


def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, : QK_K // 16]
    qs = blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4]
    d = _f16(blocks[:, QK_K // 16 + QK_K // 4 : QK_K // 16 + QK_K // 4 + 2])
    dmin = _f16(blocks[:, QK_K // 16 + QK_K // 4 + 2 :])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, QK_K // 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs.device)) & 3
    q = q.reshape(n, QK_K // 16, 16).to(torch.float32)
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask = blocks[:, : QK_K // 8]
    qs = blocks[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
    scales = blocks[:, QK_K // 8 + QK_K // 4 : QK_K // 8 + QK_K // 4 + 12]
    d = _f16(blocks[:, QK_K // 8 + QK_K // 4 + 12 :])
    lscales = scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), blocks.device)
    lscales = lscales.reshape(n, 16)
    hscales = scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), blocks.device)
    hscales = hscales.reshape(n, 16)
    sc = (lscales & 0x0F) | ((hscales & 0x03) << 4)
    sc = (sc.to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), blocks.device)
    qh = hmask.reshape(n, -1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), blocks.device)
    ql = ql.reshape(n, 16, QK_K // 16) & 3
    qh = (qh.reshape(n, 16, QK_K // 16) & 1) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return q.mul_(dl).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit (scale, min) table of Q4_K / Q5_K -> 2x (n, 8) uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4 : 4 + K_SCALE_SIZE])
    qs = blocks[:, 4 + K_SCALE_SIZE :]
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(qs, 32).reshape(n, -1, 32).to(torch.float32)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4 : 4 + K_SCALE_SIZE])
    off = 4 + K_SCALE_SIZE
    qh = blocks[:, off : off + QK_K // 8]
    qs = blocks[:, off + QK_K // 8 :]
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    qhb = _bits(qh, 8).reshape(n, -1, 32)  # sub-block i uses bit i of qh
    q = (ql | (qhb << 4)).to(torch.float32)
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = blocks[:, : QK_K // 2]
    qh = blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(blocks[:, QK_K // 2 + QK_K // 4 + QK_K // 16 :])
    scales = scales.contiguous().view(torch.int8).to(torch.float32)
    d = (d * scales).reshape(n, QK_K // 16, 1)
    lo = _nibbles(ql, 64).reshape(n, -1, 32)
    hi = (qh.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), blocks.device)) & 3
    hi = hi.reshape(n, -1, 32)
    q = (lo | (hi << 4)).to(torch.int8) - 32
    q = q.reshape(n, QK_K // 16, -1).to(torch.float32)
    return q.mul_(d).reshape(n, QK_K)


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q4_0: _deq_q4_0,
    GGMLQuantizationType.Q4_1: _deq_q4_1,
    GGMLQuantizationType.Q5_0: _deq_q5_0,
    GGMLQuantizationType.Q5_1: _deq_q5_1,
    GGMLQuantizationType.Q8_0: _deq_q8_0,
    GGMLQuantizationType.Q2_K: _deq_q2_k,
    GGMLQuantizationType.Q3_K: _deq_q3_k,
    GGMLQuantizationType.Q4_K: _deq_q4_k,
    GGMLQuantizationType.Q5_K: _deq_q5_k,
    GGMLQuantizationType.Q6_K: _deq_q6_k,
}

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = _FLOAT_TYPES + tuple(_BLOCK_DECODERS)


def is_supported(qtype: GGMLQuantizationType | int) -> bool:
    try:
        return GGMLQuantizationType(int(qtype)) in SUPPORTED_TYPES
    except ValueError:
        return False


# --------------------------------------------------------------------------- #
# public entry point
# --------------------------------------------------------------------------- #
def _as_byte_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flat uint8 torch view of ``data``'s bytes (no copy when possible)."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8)
    arr = np.asarray(data)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    arr = arr.reshape(-1).view(np.uint8)
    if not arr.flags.writeable:
        # Read-only memmap from GGUFReader: we only ever read from it (every
        # decode path allocates fresh outputs), so sharing is safe.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _infer_shape(data: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Logical shape from the array shape, as ``gguf.quants.dequantize`` does."""
    shape = tuple(int(s) for s in data.shape)
    is_bytes = data.dtype == (torch.uint8 if isinstance(data, torch.Tensor) else np.uint8)
    if not is_bytes:
        # already typed elements (F32 / F16 arrays from GGUFReader)
        return shape
    if not shape:
        raise ValueError("cannot infer the logical shape of a 0-d byte array; pass shape=")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % type_size != 0:
        raise ValueError(
            f"{qtype.name} data has {shape[-1]} bytes per row, not a multiple of the "
            f"type size {type_size}; pass the logical shape explicitly"
        )
    return (*shape[:-1], shape[-1] // type_size * block_size)


def dequantize(
    data: np.ndarray | torch.Tensor,
    qtype: GGMLQuantizationType | int,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Decode GGML tensor data into a new float32 ``torch.Tensor``.

    Args:
        data: the tensor's raw data as ``gguf.GGUFReader`` gives it
            (``ReaderTensor.data``: a uint8 array of block bytes for
            quantized types, a float32/float16 array for F32/F16), or any
            numpy array / torch tensor holding exactly those bytes.
        qtype: the ``gguf.GGMLQuantizationType`` of the data.
        shape: logical shape of the result in PyTorch (row-major) order, i.e.
            the GGUF ``ne`` dimensions reversed (``ReaderTensor.shape[::-1]``).
            When omitted it is inferred from ``data.shape`` the way
            ``gguf.quants.dequantize`` does (last dim = bytes per row).

    Returns:
        A contiguous float32 tensor of ``shape`` that owns its memory.

    Raises:
        ValueError: unsupported type, or byte count inconsistent with shape.
    """
    try:
        qtype = GGMLQuantizationType(int(qtype))
    except ValueError:
        qtype_name = str(qtype)
    else:
        qtype_name = qtype.name
    if not isinstance(qtype, GGMLQuantizationType) or qtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"Unsupported GGML tensor type {qtype_name}; supported types are: "
            + ", ".join(t.name for t in SUPPORTED_TYPES)
        )

    if shape is None:
        shape = _infer_shape(data, qtype)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s

    raw = _as_byte_tensor(data)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if numel % block_size != 0:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} has {numel} elements, not a multiple of "
            f"the block size {block_size}"
        )
    n_blocks = numel // block_size
    expected = n_blocks * type_size
    if raw.numel() != expected:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}"
        )

    if qtype == GGMLQuantizationType.F32:
        return raw.view(torch.float32).clone().reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return raw.view(torch.float16).to(torch.float32).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        return raw.view(torch.bfloat16).to(torch.float32).reshape(shape)

    decode = _BLOCK_DECODERS[qtype]
    blocks = raw.reshape(n_blocks, type_size)
    per_chunk = max(1, _CHUNK_ELEMENTS // block_size)
    if n_blocks <= per_chunk:
        out = decode(blocks)
    else:
        out = torch.empty((n_blocks, block_size), dtype=torch.float32, device=raw.device)
        for start in range(0, n_blocks, per_chunk):
            stop = min(start + per_chunk, n_blocks)
            out[start:stop] = decode(blocks[start:stop])
    return out.reshape(shape).contiguous()


def split_q8_0(data: np.ndarray | torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 data of logical 2-D ``shape`` [N, K] as stored: (int8 q [N, K], float32 d [N, K / 32]), so that
    ``q * d`` per 32-element block is :func:`dequantize`'s result exactly (fp16 d is exact in fp32, and q * d needs
    at most 19 bits). A block with d = 0 (all its weights zero) comes out as q = 0, d = 1: the same zeros, and
    every scale positive as the int8 layers require."""
    n, k = (int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    raw = _as_byte_tensor(data)
    if k % block_size or raw.numel() != n * k // block_size * type_size:
        raise ValueError(f"Q8_0 tensor of shape {(n, k)} needs K a multiple of {block_size} and "
                         f"{n * k // block_size * type_size} bytes, got K = {k} and {raw.numel()} bytes")
    blocks = raw.reshape(n, k // block_size, type_size)
    d = blocks[:, :, :2].contiguous().view(torch.float16).to(torch.float32).reshape(n, k // block_size)
    q = blocks[:, :, 2:].contiguous().view(torch.int8)
    zero = d == 0
    q = torch.where(zero[:, :, None], torch.zeros_like(q), q)
    return q.reshape(n, k), torch.where(zero, torch.ones_like(d), d)


Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def split_q4(data: np.ndarray | torch.Tensor, kind: GGMLQuantizationType,
             shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 data of logical 2-D ``shape`` [N, K] as stored: (uint8 q [N, K] in 0..15, float32 d and m
    [N, K / 32]) with ``d * q + m`` per 32-element block equal to :func:`dequantize`'s result (Q4_0: m = -8 d, as
    its (q - 8) * d)."""
    if kind not in Q4_TYPES:
        raise ValueError(f"split_q4 takes Q4_0 or Q4_1, got {kind.name}")
    n, k = (int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[kind]
    raw = _as_byte_tensor(data)
    if k % block_size or raw.numel() != n * k // block_size * type_size:
        raise ValueError(f"{kind.name} tensor of shape {(n, k)} needs K a multiple of {block_size} and "
                         f"{n * k // block_size * type_size} bytes, got K = {k} and {raw.numel()} bytes")
    blocks = raw.reshape(n * k // block_size, type_size)
    d = _f16(blocks[:, :2])
    if kind == GGMLQuantizationType.Q4_1:
        m, packed = _f16(blocks[:, 2:4]), blocks[:, 4:]
    else:
        m, packed = d * -8.0, blocks[:, 2:]
    q = _nibbles(packed, 16).reshape(n, k)
    return q, d.reshape(n, k // block_size), m.reshape(n, k // block_size)
