"""CPU implementations of the torch_npu ops npu_infer calls, with torch_npu's signatures.

Every function here has exactly the parameter names, order, defaults and
keyword-only marks of torch_npu 2.14.0's declaration (``declarations.json``,
checked by ``test_declarations.py``), and rejects what the real op rejects
according to its documentation.  Each rejection names the constraint id it
enforces; the ids are keys of ``declarations.json`` (``CONSTRAINTS_RELIED_ON``
lists them per op and ``test_declarations.py`` checks they exist).

Exceptions:
  * :class:`NpuOpRejected` (a ``RuntimeError``, as torch_npu's TORCH_CHECK
    failures are) -- the real op would reject the call.
  * ``TypeError`` -- an argument of the wrong Python type (the binding rejects it).
  * ``NotImplementedError`` -- a feature of the real op the stand-in does not
    emulate (quantization, pse, prefix, rope inputs, some layouts/masks).  This
    says nothing about the real op.

Some checks go beyond the documentation where the real kernel would silently
compute garbage instead of failing (block ids out of range, fully-masked
rows, a second rotary cos/sin cache); those raise too and say so
("caller bug the kernel does not check").
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref

import torch

from . import _strict

VERSION = "2.14.0"

HALF = (torch.float16, torch.bfloat16)
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)

CONSTRAINTS_RELIED_ON: dict[str, list[str]] = {
    "npu_rms_norm": ["dtype", "self_rank", "gamma_dtype", "outputs"],
    "npu_add_rms_norm": ["no_doc"],
    "npu_swiglu": ["formula", "x_dtype"],
    "npu_fused_infer_attention_score": [
        "tnd_heads", "tnd_head_dim", "tnd_dtype",
        "query_dtype_contiguous", "key_contiguous", "value_contiguous", "atten_mask_dtype",
        "atten_mask_sparse_234_shape", "actual_seq_lengths_tnd", "actual_seq_lengths_tnd_cumulative",
        "actual_seq_lengths_padding", "actual_seq_lengths_kv_pa_tnd", "block_table_dtype", "num_heads",
        "num_key_value_heads", "sparse_mode_values", "sparse_mode_0", "sparse_mode_2", "sparse_mode_3",
        "sparse_mode_234_mask", "input_layouts_a2", "qs_gt1_limits", "qs_gt1_d_align",
        "pa_block_size_qs_gt1", "pa_block_size_qs_1", "pa_requires_kv_lengths", "pa_block_table_2d",
        "pa_kv_layouts", "pa_h_limit", "pa_no_int8_query", "pa_kv_dtypes", "kv_same_shape", "outputs",
        "softmax_lse",
    ],
    "_npu_reshape_and_cache": ["shapes_dtypes", "same_dtype", "in_place"],
    "_npu_paged_attention": ["block_size_head_size", "shapes", "kv_head_num", "context_lens_host"],
    "_npu_rotary_embedding": ["first_cache_wins", "neox_tables", "cache_dtype"],
}

# Binary evidence ids (declarations.json["binary_evidence"]) the stand-in relies on.
EVIDENCE_RELIED_ON = ["output_must_be_contiguous", "rotary_first_cache_wins"]

# Readings of the documentation where it is ambiguous; see configure().
OPTIONS = {"tnd_paged": True, "wqbmm_nz": True}

# Process-wide state of the real ops that the stand-in mirrors.
_STATE: dict = {}
_CONST: dict = {}


def reset_state() -> None:
    _STATE.clear()


class NpuOpRejected(RuntimeError):
    """The real torch_npu op would reject this call."""


def _reject(op: str, cid: str, msg: str):
    raise NpuOpRejected(f"{op}: {msg} [torch_npu {VERSION} constraint '{cid}']")


def _check(cond: bool, op: str, cid: str, msg: str) -> None:
    if not cond:
        _reject(op, cid, msg)


def _tensor(op: str, name: str, x, optional: bool = False):
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(x).__name__}")
    return x


def _int(op: str, name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{op}(): argument '{name}' must be int, not {type(x).__name__}")
    return x


def _float(op: str, name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}(): argument '{name}' must be float, not {type(x).__name__}")
    return float(x)


def _int_list(op: str, name: str, x, optional: bool = True):
    if x is None and optional:
        return None
    if not isinstance(x, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in x):
        raise TypeError(f"{op}(): argument '{name}' must be a list of ints (SymInt[]), not {type(x).__name__}"
                        + (" (pass a Python list, e.g. tensor.tolist())" if isinstance(x, torch.Tensor) else ""))
    return list(x)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _output_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    # ATB ops: inputs are copied to contiguous memory, outputs are used in place and must be contiguous.
    if not x.is_contiguous():
        raise NpuOpRejected(f"{op}: at_tensor is not contiguous (output '{name}' is written in place) "
                            "[torch_npu binary evidence 'output_must_be_contiguous']")


# =========================================================================== norms / activation

def npu_rms_norm(self, gamma, epsilon=1e-06):
    op = "npu_rms_norm"
    x = _tensor(op, "self", self)
    gamma = _tensor(op, "gamma", gamma)
    eps = _float(op, "epsilon", epsilon)
    _check(x.dtype in NORM_DTYPES, op, "dtype", f"self dtype {x.dtype} not in float16/bfloat16/float32")
    _check(2 <= x.dim() <= 8, op, "self_rank", f"self must have 2-8 dims, got {x.dim()}")
    _check(gamma.dtype == x.dtype, op, "gamma_dtype", f"gamma dtype {gamma.dtype} != self dtype {x.dtype}")
    _check(1 <= gamma.dim() <= x.dim() and tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim():]),
           op, "gamma_dtype", f"gamma shape {tuple(gamma.shape)} must equal the trailing dims of self {tuple(x.shape)}")
    return _rms(x.float(), gamma, eps, x.dtype)


def _rms(xf: torch.Tensor, gamma: torch.Tensor, eps: float, dtype: torch.dtype):
    dims = tuple(range(xf.dim() - gamma.dim(), xf.dim()))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    y = (xf * rstd * gamma.float()).to(dtype)
    return y, rstd


npu_rms_norm.__returns__ = 2


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    op = "npu_add_rms_norm"
    x1 = _tensor(op, "x1", x1)
    x2 = _tensor(op, "x2", x2)
    gamma = _tensor(op, "gamma", gamma)
    eps = _float(op, "epsilon", epsilon)
    _check(x1.dtype in NORM_DTYPES, op, "no_doc", f"x1 dtype {x1.dtype} not in float16/bfloat16/float32")
    _check(x2.dtype == x1.dtype and gamma.dtype == x1.dtype, op, "no_doc",
           f"x1/x2/gamma dtypes differ: {x1.dtype}, {x2.dtype}, {gamma.dtype}")
    _check(x1.shape == x2.shape, op, "no_doc", f"x1 shape {tuple(x1.shape)} != x2 shape {tuple(x2.shape)}")
    _check(2 <= x1.dim() <= 8, op, "no_doc", f"x1 must have 2-8 dims, got {x1.dim()}")
    _check(1 <= gamma.dim() <= x1.dim() and tuple(gamma.shape) == tuple(x1.shape[x1.dim() - gamma.dim():]),
           op, "no_doc", f"gamma shape {tuple(gamma.shape)} must equal the trailing dims of x1 {tuple(x1.shape)}")
    s = x1.float() + x2.float()
    y, rstd = _rms(s, gamma, eps, x1.dtype)
    return y, rstd, s.to(x1.dtype)


npu_add_rms_norm.__returns__ = 3


def npu_swiglu(self, dim=-1):
    op = "npu_swiglu"
    x = _tensor(op, "self", self)
    dim = _int(op, "dim", dim)
    _check(x.dtype in NORM_DTYPES, op, "x_dtype", f"dtype {x.dtype} not in FP32/FP16/BF16")
    _check(1 <= x.dim() <= 8, op, "x_dtype", f"x must have 1-8 dims, got {x.dim()}")
    _check(-x.dim() <= dim < x.dim(), op, "formula", f"dim {dim} out of range for {x.dim()} dims")
    _check(x.shape[dim] % 2 == 0, op, "formula", f"size {x.shape[dim]} of dim {dim} is not even")
    a, b = x.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(x.dtype)


npu_swiglu.__returns__ = 1


# =========================================================================== ATB: KV cache write

def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    op = "_npu_reshape_and_cache"
    key = _tensor(op, "key", key)
    value = _tensor(op, "value", value)
    key_cache = _tensor(op, "key_cache", key_cache)
    value_cache = _tensor(op, "value_cache", value_cache)
    slots = _tensor(op, "slot_indices", slot_indices)
    dtypes = {key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}
    _check(len(dtypes) == 1, op, "same_dtype", f"key/value/key_cache/value_cache dtypes differ: {sorted(map(str, dtypes))}")
    _check(key.dtype in HALF + (torch.int8,), op, "shapes_dtypes", f"dtype {key.dtype} not in float16/bfloat16/int8")
    _check(key.dim() == 3 and value.dim() == 3, op, "shapes_dtypes",
           f"key/value must be [num_tokens, num_heads, head_size], got {tuple(key.shape)} / {tuple(value.shape)}")
    _check(key_cache.dim() == 4 and value_cache.dim() == 4, op, "shapes_dtypes",
           f"caches must be [num_blocks, block_size, num_heads, head_size], got {tuple(key_cache.shape)} / "
           f"{tuple(value_cache.shape)}")
    T = key.shape[0]
    _check(value.shape[:2] == key.shape[:2], op, "shapes_dtypes", "key and value disagree on num_tokens/num_heads")
    _check(key_cache.shape[:3] == value_cache.shape[:3], op, "shapes_dtypes", "key_cache and value_cache disagree on blocks/heads")
    _check(key_cache.shape[2:] == key.shape[1:], op, "shapes_dtypes",
           f"key [T, heads, head_size]={tuple(key.shape)} does not fit key_cache {tuple(key_cache.shape)} "
           "(layout must be [num_blocks, block_size, num_heads, head_size])")
    _check(value_cache.shape[2:] == value.shape[1:], op, "shapes_dtypes",
           f"value {tuple(value.shape)} does not fit value_cache {tuple(value_cache.shape)}")
    _check(slots.dtype == torch.int32, op, "shapes_dtypes", f"slot_indices dtype {slots.dtype} != int32")
    _check(slots.dim() == 1 and slots.shape[0] == T, op, "shapes_dtypes",
           f"slot_indices must be [num_tokens={T}], got {tuple(slots.shape)}")
    _output_contiguous(op, "key_cache", key_cache)
    _output_contiguous(op, "value_cache", value_cache)
    nb, bs = key_cache.shape[:2]
    if T:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= nb * bs:
            raise NpuOpRejected(f"{op}: slot index out of [0, {nb * bs}) (got {lo}..{hi}); "
                                "caller bug the kernel does not check")
    s = slots.long()
    key_cache.view(nb * bs, *key_cache.shape[2:])[s] = key
    value_cache.view(nb * bs, *value_cache.shape[2:])[s] = value


_npu_reshape_and_cache.__returns__ = 0


# =========================================================================== ATB: decode attention

def _npu_paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table,
                         context_lens, out, *, workspace=None):
    op = "_npu_paged_attention"
    q = _tensor(op, "query", query)
    kc = _tensor(op, "key_cache", key_cache)
    vc = _tensor(op, "value_cache", value_cache)
    kvh = _int(op, "num_kv_heads", num_kv_heads)
    nh = _int(op, "num_heads", num_heads)
    scale = _float(op, "scale_value", scale_value)
    bt = _tensor(op, "block_table", block_table)
    cl = _tensor(op, "context_lens", context_lens)
    out = _tensor(op, "out", out)
    _tensor(op, "workspace", workspace, optional=True)

    _check(q.dtype in HALF, op, "shapes", f"query dtype {q.dtype} not in float16/bf16")
    _check(q.dim() == 3, op, "shapes", f"query must be [num_tokens, num_heads, head_size], got {tuple(q.shape)}")
    B, N, D = q.shape
    _check(nh > 0 and N == nh, op, "shapes", f"num_heads={nh} but query has {N} heads")
    _check(kc.dim() == 4 and vc.dim() == 4, op, "shapes",
           f"caches must be [num_blocks, block_size, kv_heads, head_size], got {tuple(kc.shape)} / {tuple(vc.shape)}")
    _check(kc.dtype == q.dtype and vc.dtype == q.dtype, op, "shapes", f"cache dtypes {kc.dtype}/{vc.dtype} != query {q.dtype}")
    _check(kc.shape == vc.shape, op, "shapes", "key_cache and value_cache shapes differ")
    nb, bs, kv_n, kd = kc.shape
    kvh = kvh or nh
    _check(kv_n == kvh, op, "kv_head_num",
           f"num_kv_heads={kvh} but key_cache dim 2 is {kv_n} (layout [num_blocks, block_size, kv_heads, head_size])")
    _check(kd == D, op, "shapes", f"key_cache head_size {kd} != query head_size {D}")
    _check(nh % kvh == 0, op, "kv_head_num", f"num_heads={nh} not a multiple of num_kv_heads={kvh}")
    _check(bs % 16 == 0, op, "block_size_head_size", f"block_size {bs} is not a multiple of 16")
    _check(0 < D <= 256, op, "block_size_head_size", f"head_size {D} not in (0, 256]")
    _check(bs * D <= 128 * 128, op, "block_size_head_size", f"block_size*head_size = {bs}*{D} > 128*128")
    _check(bt.dtype == torch.int32 and bt.dim() == 2 and bt.shape[0] == B, op, "context_lens_host",
           f"block_table must be int32 [batch={B}, max_blocks], got {bt.dtype} {tuple(bt.shape)}")
    _check(cl.dtype == torch.int32 and cl.dim() == 1 and cl.shape[0] == B, op, "context_lens_host",
           f"context_lens must be int32 [batch={B}], got {cl.dtype} {tuple(cl.shape)}")
    _check(out.shape == q.shape and out.dtype == q.dtype, op, "shapes",
           f"out must match query {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    _output_contiguous(op, "out", out)
    if bt.numel():
        _check(int(bt.min()) >= 0 and int(bt.max()) < nb, op, "block_size_head_size",
               f"blockTables values must be in [0, {nb}), got {int(bt.min())}..{int(bt.max())}")
    lens = [int(v) for v in cl.tolist()]
    for b, n in enumerate(lens):
        if not 1 <= n <= bt.shape[1] * bs:
            raise NpuOpRejected(f"{op}: context_lens[{b}]={n} outside [1, {bt.shape[1] * bs}] "
                                "(block_table width * block_size); caller bug the kernel does not check")

    group = nh // kvh
    for b, n in enumerate(lens):
        blocks = bt[b, : -(-n // bs)].long()
        k = kc[blocks].reshape(-1, kvh, D)[:n].float().repeat_interleave(group, dim=1)  # [n, N, D]
        v = vc[blocks].reshape(-1, kvh, D)[:n].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,khd->hk", q[b].float(), k) * scale
        out[b] = torch.einsum("hk,khd->hd", s.softmax(dim=-1), v).to(out.dtype)


_npu_paged_attention.__returns__ = 0


# =========================================================================== ATB: rotary

def _npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox_style):
    op = "_npu_rotary_embedding"
    pos = _tensor(op, "positions", positions)
    q = _tensor(op, "query", query)
    k = _tensor(op, "key", key)
    hs = _int(op, "head_size", head_size)
    cache = _tensor(op, "cos_sin_cache", cos_sin_cache)
    if not isinstance(is_neox_style, bool):
        raise TypeError(f"{op}(): argument 'is_neox_style' must be bool, not {type(is_neox_style).__name__}")

    _check(pos.dtype in (torch.int32, torch.int64), op, "neox_tables", f"positions dtype {pos.dtype} is not int32/int64")
    T = pos.numel()
    _check(q.dtype in HALF and k.dtype == q.dtype, op, "cache_dtype",
           f"query/key dtypes {q.dtype}/{k.dtype} must be one of float16/bfloat16 and equal")
    _check(cache.dtype == q.dtype, op, "cache_dtype", f"cos_sin_cache dtype {cache.dtype} != query dtype {q.dtype}")
    _check(q.dim() == 2 and k.dim() == 2 and q.shape[0] == T and k.shape[0] == T, op, "neox_tables",
           f"query/key must be [num_tokens={T}, heads*head_size], got {tuple(q.shape)} / {tuple(k.shape)}")
    _check(cache.dim() == 2 and cache.shape[1] % 2 == 0, op, "neox_tables",
           f"cos_sin_cache must be [max_position, rotary_dim] = cat(cos, sin), got {tuple(cache.shape)}")
    rot = cache.shape[1]
    _check(hs == rot, op, "neox_tables",
           f"head_size={hs} but cos_sin_cache has rotary_dim {rot}: the kernel rotates in chunks of the cache "
           "width, so pass the rotated slice only (head_size == rotary_dim)")
    _check(q.shape[1] % rot == 0 and k.shape[1] % rot == 0, op, "neox_tables",
           f"query/key widths {q.shape[1]}/{k.shape[1]} are not multiples of rotary_dim {rot}")
    _output_contiguous(op, "query", q)
    _output_contiguous(op, "key", k)
    if T:
        _check(int(pos.min()) >= 0 and int(pos.max()) < cache.shape[0], op, "neox_tables",
               f"positions out of [0, {cache.shape[0]})")

    saved = _STATE.get("rope_cache")
    if saved is None:
        _STATE["rope_cache"] = saved = cache.detach().clone()
        _STATE["rope_seen"] = {}
    # tensors already found equal to the first cache (keyed by identity, invalidated by in-place writes)
    seen = _STATE["rope_seen"]
    hit = seen.get(id(cache))
    if hit is None or hit[0]() is not cache or hit[1] != _version(cache):
        if tuple(cache.shape) != tuple(saved.shape) or not torch.equal(saved, cache):
            raise NpuOpRejected(
                f"{op}: a different cos_sin_cache than the first one of this process was passed; the real op "
                "builds its cos/sin tables once and would silently keep using the first cache "
                "[torch_npu binary evidence 'rotary_first_cache_wins']")
        seen[id(cache)] = (weakref.ref(cache), _version(cache))
    cache = saved

    cos, sin = cache[pos.flatten().long()].float().chunk(2, dim=-1)  # [T, rot/2]
    for x in (q, k):
        xv = x.view(T, -1, rot)
        xf = xv.float()
        if is_neox_style:
            x1, x2 = xf[..., : rot // 2], xf[..., rot // 2:]
            c, s_ = cos[:, None, :], sin[:, None, :]
            xv.copy_(torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1).to(x.dtype))
        else:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            c, s_ = cos[:, None, :], sin[:, None, :]
            xv.copy_(torch.stack([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1).flatten(-2).to(x.dtype))


_npu_rotary_embedding.__returns__ = 0


# =========================================================================== FIA (prefill, paged)

_NOT_EMULATED = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                 "antiquant_scale", "antiquant_offset", "key_antiquant_scale", "key_antiquant_offset",
                 "value_antiquant_scale", "value_antiquant_offset", "query_padding_size", "kv_padding_size",
                 "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope",
                 "key_rope_antiquant_scale")


def npu_fused_infer_attention_score(
        query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
        dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
        antiquant_scale=None, antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
        value_antiquant_scale=None, value_antiquant_offset=None, block_table=None, query_padding_size=None,
        kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
        query_rope=None, key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
        pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
        softmax_lse_flag=False):
    op = "npu_fused_infer_attention_score"
    args = dict(locals())
    q = _tensor(op, "query", query)
    key = _tensor(op, "key", key)
    value = _tensor(op, "value", value)
    mask = _tensor(op, "atten_mask", atten_mask, optional=True)
    bt = _tensor(op, "block_table", block_table, optional=True)
    q_lens_arg = _int_list(op, "actual_seq_lengths", actual_seq_lengths)
    kv_lens_arg = _int_list(op, "actual_seq_lengths_kv", actual_seq_lengths_kv)
    nh = _int(op, "num_heads", num_heads)
    scale = _float(op, "scale", scale)
    for n in ("pre_tokens", "next_tokens", "num_key_value_heads", "sparse_mode", "inner_precise", "block_size",
              "antiquant_mode", "key_antiquant_mode", "value_antiquant_mode"):
        _int(op, n, args[n])
    if not isinstance(input_layout, str):
        raise TypeError(f"{op}(): argument 'input_layout' must be str, not {type(input_layout).__name__}")
    if not isinstance(softmax_lse_flag, bool):
        raise TypeError(f"{op}(): argument 'softmax_lse_flag' must be bool")
    for n in _NOT_EMULATED:
        if args[n] is not None:
            raise NotImplementedError(f"stand-in {op}: '{n}' is not emulated")
    for n in ("antiquant_mode", "key_antiquant_mode", "value_antiquant_mode"):
        if args[n] != 0:
            raise NotImplementedError(f"stand-in {op}: '{n}'={args[n]} is not emulated")
    _check(inner_precise in (0, 1, 2, 3), op, "outputs", f"inner_precise {inner_precise} not in 0..3")

    # ---- dtypes / contiguity
    _check(q.dtype in HALF + (torch.int8,), op, "query_dtype_contiguous", f"query dtype {q.dtype} not in float16/bfloat16/int8")
    _check(q.is_contiguous(), op, "query_dtype_contiguous", "query is not contiguous")
    _check(key.is_contiguous(), op, "key_contiguous", "key is not contiguous")
    _check(value.is_contiguous(), op, "value_contiguous", "value is not contiguous")
    _check(key.shape == value.shape, op, "kv_same_shape", f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if q.dtype == torch.int8 and bt is not None:
        _reject(op, "pa_no_int8_query", "int8 query is not supported with page attention")
    if q.dtype == torch.int8:
        raise NotImplementedError(f"stand-in {op}: int8 query is not emulated")

    # ---- heads
    _check(nh > 0, op, "num_heads", f"num_heads must be > 0, got {nh}")
    kvh = num_key_value_heads or nh
    _check(nh % kvh == 0, op, "num_key_value_heads", f"num_heads={nh} not divisible by num_key_value_heads={kvh}")
    _check(nh // kvh <= 64, op, "num_key_value_heads", f"num_heads/num_key_value_heads = {nh // kvh} > 64")

    # ---- query layout -> per-batch query rows
    layouts = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
    _check(input_layout in layouts, op, "input_layouts_a2", f"input_layout {input_layout!r} not in {layouts}")
    if input_layout not in ("TND", "BSH", "BSND"):
        raise NotImplementedError(f"stand-in {op}: input_layout {input_layout!r} is not emulated")
    if input_layout == "TND":
        _check(q.dim() == 3, op, "input_layouts_a2", f"TND query must be [T, N, D], got {tuple(q.shape)}")
        T, qn, D = q.shape
        _check(qn == nh, op, "num_heads", f"num_heads={nh} but TND query has N={qn}")
        _check(q_lens_arg is not None and len(q_lens_arg) > 0, op, "actual_seq_lengths_tnd",
               "actual_seq_lengths must be passed for TND")
        cum = q_lens_arg
        _check(all(c >= 0 for c in cum) and all(b >= a for a, b in itertools.pairwise(cum)), op,
               "actual_seq_lengths_tnd_cumulative", f"actual_seq_lengths must be cumulative and non-decreasing, got {cum}")
        _check(cum[-1] == T, op, "actual_seq_lengths_tnd",
               f"last actual_seq_lengths {cum[-1]} != query T={T} (vllm-ascend FiaOpConstraint)")
        B = len(cum)
        starts = [0] + cum[:-1]
        q_lens = [b - a for a, b in zip(starts, cum)]
        rows = [torch.arange(a, b) for a, b in zip(starts, cum)]
        S_max = max(q_lens) if q_lens else 0
    else:
        if input_layout == "BSH":
            _check(q.dim() == 3, op, "input_layouts_a2", f"BSH query must be [B, S, H], got {tuple(q.shape)}")
            _check(q.shape[2] % nh == 0, op, "num_heads", f"H={q.shape[2]} not divisible by num_heads={nh}")
            B, S, D = q.shape[0], q.shape[1], q.shape[2] // nh
        else:
            _check(q.dim() == 4, op, "input_layouts_a2", f"BSND query must be [B, S, N, D], got {tuple(q.shape)}")
            _check(q.shape[2] == nh, op, "num_heads", f"num_heads={nh} but BSND query has N={q.shape[2]}")
            B, S, D = q.shape[0], q.shape[1], q.shape[3]
        if q_lens_arg is None:
            q_lens = [S] * B
        else:
            _check(len(q_lens_arg) == 1 or len(q_lens_arg) >= B, op, "actual_seq_lengths_padding",
                   f"actual_seq_lengths length {len(q_lens_arg)} must be 1 or >= batch {B}")
            q_lens = q_lens_arg * B if len(q_lens_arg) == 1 else q_lens_arg[:B]
        _check(all(0 <= n <= S for n in q_lens), op, "actual_seq_lengths_padding",
               f"actual_seq_lengths {q_lens} must be within [0, S={S}]")
        rows = [torch.arange(b * S, b * S + n) for b, n in enumerate(q_lens)]
        S_max = S
    qs_gt1 = S_max > 1
    _check(nh <= 256 and D <= 512, op, "qs_gt1_limits", f"N={nh} must be <= 256 and D={D} <= 512")
    if qs_gt1:
        _check(D % 16 == 0, op, "qs_gt1_d_align", f"head dim D={D} is not 16-aligned")
        _check(B <= 65536, op, "qs_gt1_limits", f"batch {B} > 65536")

    # ---- key / value
    _check(key.dtype == q.dtype and value.dtype == q.dtype, op, "pa_kv_dtypes",
           f"key/value dtype {key.dtype}/{value.dtype} != query dtype {q.dtype} (quantized KV is not emulated)")
    if bt is None:
        kv_rows, kv_lens, kc, vc, bsz = _dense_kv(op, input_layout, q, key, value, B, nh, kvh, D, kv_lens_arg)
    else:
        kv_rows = None
        kv_lens, kc, vc, bsz = _paged_kv(op, input_layout, key, value, bt, B, kvh, D, block_size, qs_gt1, kv_lens_arg)

    # ---- sparse mode / mask
    _check(sparse_mode in (0, 1, 2, 3, 4, 9), op, "sparse_mode_values", f"sparse_mode {sparse_mode} is not supported")
    if sparse_mode in (1, 4, 9) or (sparse_mode == 0 and mask is not None):
        raise NotImplementedError(f"stand-in {op}: sparse_mode={sparse_mode} with this mask is not emulated")
    if sparse_mode in (2, 3):
        _check(mask is not None, op, "sparse_mode_234_mask", f"sparse_mode={sparse_mode} needs the 2048x2048 atten_mask")
        _check(mask.dtype in MASK_DTYPES, op, "atten_mask_dtype", f"atten_mask dtype {mask.dtype} not in bool/int8/uint8")
        _check(tuple(mask.shape) in ((2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)), op,
               "atten_mask_sparse_234_shape", f"atten_mask shape {tuple(mask.shape)} must be (2048, 2048) (+ leading 1s)")
        _check(mask.is_contiguous(), op, "atten_mask_dtype", "atten_mask is not contiguous")
        m2 = mask.reshape(2048, 2048) != 0
        if "causal_2048" not in _CONST:
            _CONST["causal_2048"] = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
        _check(torch.equal(m2, _CONST["causal_2048"]), op, "sparse_mode_234_mask",
               "atten_mask must be the compressed causal mask triu(ones(2048, 2048), diagonal=1) (1 = masked)")
    if sparse_mode == 3:
        for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
            if nq > nk:
                raise NpuOpRejected(f"{op}: batch {b} has {nq} query rows but {nk} kv rows; with rightDownCausal the "
                                    "first rows would see no key (caller bug the kernel does not check)")

    # ---- compute
    q_rows = q.reshape(-1, nh, D)
    out_rows = torch.full_like(q_rows, float("nan"))  # rows outside actual_seq_lengths: unspecified -> NaN
    lse_rows = torch.full((q_rows.shape[0], nh), float("nan"), dtype=torch.float32)
    group = nh // kvh
    for b in range(B):
        nq, nk, idx = q_lens[b], kv_lens[b], rows[b]
        if nq == 0:
            continue
        if nk == 0:
            out_rows[idx] = 0
            lse_rows[idx] = float("-inf")
            continue
        if bt is not None:
            blocks = bt[b, : -(-nk // bsz)].long()
            k, v = kc[blocks].reshape(-1, kvh, D)[:nk], vc[blocks].reshape(-1, kvh, D)[:nk]
        else:
            k, v = kc[kv_rows[b]], vc[kv_rows[b]]
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q_rows[idx].float(), k) * scale
        if sparse_mode in (2, 3):
            offset = nk - nq if sparse_mode == 3 else 0
            allowed = torch.arange(nk)[None, :] <= (torch.arange(nq)[:, None] + offset)
            s = s.masked_fill(~allowed, float("-inf"))
        lse_rows[idx] = torch.logsumexp(s, dim=-1).transpose(0, 1)
        out_rows[idx] = torch.einsum("hqk,khd->qhd", s.softmax(dim=-1), v).to(q.dtype)
    attention_out = out_rows.view(q.shape)
    if not softmax_lse_flag:
        lse = torch.zeros(1, dtype=torch.float32)
    elif input_layout == "TND":
        lse = lse_rows.unsqueeze(-1)  # (T, N, 1)
    else:
        lse = lse_rows.view(B, S_max, nh).transpose(1, 2).unsqueeze(-1).contiguous()  # (B, N, S, 1)
    return attention_out, lse


npu_fused_infer_attention_score.__returns__ = 2


def _dense_kv(op, layout, q, key, value, B, nh, kvh, D, kv_lens_arg):
    """Non-paged key/value: same layout as the query."""
    _check(key.dim() == q.dim(), op, "kv_same_shape",
           f"without page attention key must have the query's {q.dim()} dims, got {tuple(key.shape)}")
    if layout == "TND":
        _, kn, kd = key.shape
        # The "TND scene" limits of the docs; the stand-in reads them as the non-paged TND path.
        _check(kn == nh and kn in (8, 16, 32, 64, 128), op, "tnd_heads", f"TND needs N in 8/16/32/64/128 and Q_N == K_N, got {nh}/{kn}")
        _check(kd == 192 and D == 192, op, "tnd_head_dim", f"TND needs Q_D == K_D == 192, got {D}/{kd}")
        _check(q.dtype == torch.bfloat16, op, "tnd_dtype", f"TND supports only bfloat16, got {q.dtype}")
        raise NotImplementedError(f"stand-in {op}: non-paged TND is not emulated")
    if layout == "BSH":
        Bk, S_kv, kh = key.shape
        _check(kh == kvh * D, op, "num_key_value_heads", f"key H={kh} != num_key_value_heads*D = {kvh}*{D}")
    else:  # BSND
        Bk, S_kv, kn, kd = key.shape
        _check(kn == kvh and kd == D, op, "num_key_value_heads", f"key must be [B, S, {kvh}, {D}], got {tuple(key.shape)}")
    _check(Bk == B, op, "kv_same_shape", f"key batch {Bk} != query batch {B}")
    if kv_lens_arg is None:
        kv_lens = [S_kv] * B
    else:
        _check(len(kv_lens_arg) == 1 or len(kv_lens_arg) >= B, op, "pa_requires_kv_lengths",
               f"actual_seq_lengths_kv length {len(kv_lens_arg)} must be 1 or >= batch {B}")
        kv_lens = kv_lens_arg * B if len(kv_lens_arg) == 1 else kv_lens_arg[:B]
    _check(all(0 <= n <= S_kv for n in kv_lens), op, "actual_seq_lengths_padding",
           f"actual_seq_lengths_kv {kv_lens} must be within [0, S_kv={S_kv}]")
    kv_rows = [torch.arange(b * S_kv, b * S_kv + n) for b, n in enumerate(kv_lens)]
    return kv_rows, kv_lens, key.reshape(-1, kvh, D), value.reshape(-1, kvh, D), None


def _paged_kv(op, layout, key, value, bt, B, kvh, D, block_size, qs_gt1, kv_lens_arg):
    """Paged key/value (block_table given): returns per-batch kv lengths and [nb, bs, kvh, D] views."""
    if layout == "TND" and not OPTIONS["tnd_paged"]:
        _reject(op, "input_layouts_a2", "TND does not support page attention (strict reading of the input_layout "
                "documentation; see configure(tnd_paged=...))")
    _check(bt.dtype == torch.int32, op, "block_table_dtype", f"block_table dtype {bt.dtype} != int32")
    _check(bt.dim() == 2 and bt.shape[0] == B, op, "pa_block_table_2d",
           f"block_table must be 2-D with first dim == batch {B}, got {tuple(bt.shape)}")
    if key.dim() == 3:
        nb, kbs, kh = key.shape
        _check(kh == kvh * D, op, "pa_kv_layouts",
               f"key (blocknum, blocksize, H) has H={kh}, expected num_key_value_heads*D = {kvh}*{D}")
        _check(kh <= 65535, op, "pa_h_limit", f"KV_N*D = {kh} exceeds 65535 in (blocknum, blocksize, H) layout")
        kc, vc = key.view(nb, kbs, kvh, D), value.view(nb, kbs, kvh, D)
    elif key.dim() == 4:
        _check(layout in ("TND", "BNSD"), op, "pa_kv_layouts",
               f"with input_layout {layout} the kv cache must be (blocknum, blocksize, H), got 4-D {tuple(key.shape)}")
        nb, kn, kbs, kd = key.shape
        _check(kn == kvh and kd == D, op, "pa_kv_layouts",
               f"4-D key must be (blocknum, KV_N={kvh}, blocksize, D={D}), got {tuple(key.shape)}")
        kc, vc = key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)
    else:
        raise NotImplementedError(f"stand-in {op}: {key.dim()}-D paged key (e.g. NZ) is not emulated")
    bsz = block_size
    _check(kbs == bsz, op, "pa_block_size_qs_gt1", f"block_size={bsz} but the kv cache blocks hold {kbs} tokens")
    if qs_gt1:
        _check(bsz in (128, 256, 384, 512), op, "pa_block_size_qs_gt1",
               f"block_size {bsz} must be a multiple of 128 in [128, 512] when Q_S > 1")
    else:
        _check(0 < bsz <= 512 and bsz % 16 == 0, op, "pa_block_size_qs_1",
               f"block_size {bsz} must be non-zero, <= 512 and 16-aligned")
    _check(kv_lens_arg is not None, op, "pa_requires_kv_lengths", "actual_seq_lengths_kv must be passed with page attention")
    if layout == "TND":
        _check(len(kv_lens_arg) == B, op, "actual_seq_lengths_kv_pa_tnd",
               f"actual_seq_lengths_kv must have one per-batch length for each of {B} batches, got {len(kv_lens_arg)}")
        kv_lens = kv_lens_arg
    else:
        _check(len(kv_lens_arg) == 1 or len(kv_lens_arg) >= B, op, "pa_requires_kv_lengths",
               f"actual_seq_lengths_kv length {len(kv_lens_arg)} must be 1 or >= batch {B}")
        kv_lens = kv_lens_arg * B if len(kv_lens_arg) == 1 else kv_lens_arg[:B]
    cap = bt.shape[1] * bsz
    _check(all(0 <= n <= cap for n in kv_lens), op, "pa_block_table_2d",
           f"actual_seq_lengths_kv {kv_lens} exceed block_table width*block_size = {cap}")
    for b, n in enumerate(kv_lens):
        used = bt[b, : -(-n // bsz)]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= nb):
            raise NpuOpRejected(f"{op}: block_table[{b}] references blocks outside [0, {nb}); "
                                "caller bug the kernel does not check ('pa_kv_dtypes': ids are not validated)")
    return kv_lens, kc, vc, bsz

# Arguments each op reads on the host; every other tensor argument must be on the device (strict stand-in).
HOST_ARGS: dict[str, tuple[str, ...]] = {"_npu_paged_attention": ("context_lens",)}


def device_op(fn, host_args: tuple[str, ...] = ()):
    """``fn`` as the device op it stands in for: under a strict stand-in device (_strict.py) its tensor arguments
    must be device tensors (those named in ``host_args``: host tensors), it computes with the mode off, and its
    new outputs are device tensors.  Without one, ``fn`` runs as is.  Ops added later wrap themselves the same way."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def op(*args, **kwargs):
        strict = _strict.ACTIVE
        if strict is None:
            return fn(*args, **kwargs)
        device = None
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if not isinstance(value, torch.Tensor):
                continue
            where = _strict.device_of(value)
            if name in host_args:
                if where is not None:
                    raise NpuOpRejected(f"{fn.__name__}: {name} must be a host tensor (the kernel reads it on the "
                                        f"host), got one on {where}")
            elif where is None:
                raise RuntimeError(f"{fn.__name__}: argument '{name}' is a host tensor; expected a tensor on "
                                   f"{strict.device_type} (strict stand-in)")
            else:
                device = where
        with torch._C.DisableTorchFunction():
            out = fn(*args, **kwargs)
        for t in (out if isinstance(out, tuple) else (out,)):
            if isinstance(t, torch.Tensor) and device is not None and _strict.device_of(t) is None:
                strict.tag(t, device)
        return out
    return op


ALL_OPS = {f.__name__: device_op(f, HOST_ARGS.get(f.__name__, ()))
           for f in (npu_rms_norm, npu_add_rms_norm, npu_swiglu, npu_fused_infer_attention_score,
                     _npu_reshape_and_cache, _npu_paged_attention, _npu_rotary_embedding)}
