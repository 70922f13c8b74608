"""STAND-IN for ``torch_npu`` -- NOT the real library.  For CI without an Ascend NPU.

This package fakes the parts of Huawei's ``torch_npu`` that npu_infer uses, on
CPU tensors, so the NPU code paths (``npu_infer/platform/npu_attention.py``,
``npu_infer/platform/npu_ops.py``) can be tested on a machine without an NPU
or CANN.  It follows the declarations and documentation of **torch_npu
2.14.0** (the wheel ``torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl``):
the signatures and the constraints it enforces are recorded in
``declarations.json``, generated from that wheel by
``tools/extract_npu_declarations.py`` and checked by ``test_declarations.py``.

It lives under ``tests/`` and is never importable from ``npu_infer``: a test
calls :func:`install` (e.g. in a fixture), which registers the stand-in as
``sys.modules["torch_npu"]`` / ``sys.modules["torch_npu.npu"]`` and sets
``torch.npu``; :func:`uninstall` restores what was there before.

Public names
------------
install() -> module          register the stand-in torch_npu and torch.npu
uninstall()                  undo install()
installed() -> bool
set_memory(free=, total=, peak=, allocated=)   numbers torch.npu reports (bytes)
set_device_count(n)          what torch.npu.device_count() returns (default 1)
configure(tnd_paged=True, wqbmm_nz=True)   doc readings that are ambiguous (see below)
reset_state()                forget process-wide op state (rotary cache), counters and runtime options
calls                        dict: how often set_device/synchronize/empty_cache/... were called
runtime_options() -> dict    options set through torch.npu.set_compile_mode / torch.npu.config
                             (e.g. {"jitCompile": "disable", "ALLOW_INTERNAL_FORMAT": "disable"})
NpuOpRejected                RuntimeError subclass raised where the real op would reject a call
torch_npu                    the stand-in module object of the current install()
                             (a fresh module each install, as a fresh process would have)

Ops (exact torch_npu 2.14.0 names, parameters, defaults, return forms)
----------------------------------------------------------------------
npu_rms_norm, npu_add_rms_norm, npu_swiglu, npu_fused_infer_attention_score
(paged: TND/BSH/BSND query; non-paged: BSH/BSND; sparse_mode 0 without mask, 2, 3),
_npu_reshape_and_cache, _npu_paged_attention, _npu_rotary_embedding;
int8 (_quant_ops.py): npu_dynamic_quant (per token, int8), npu_quant_matmul
(2-D int8, float32/bfloat16 scale, per-token scale, float output),
npu_weight_quant_batchmatmul (int8 weight, per-channel/per-tensor antiquant
scale and offset), npu_format_cast (ND <-> FRACTAL_NZ, a tag on the storage)
and get_npu_format.
Any other attribute of torch_npu is absent on purpose (AttributeError).

torch.npu namespace (signatures from torch_npu 2.14.0's torch_npu/npu/*.py)
---------------------------------------------------------------------------
is_available, device_count, set_device, current_device, synchronize,
empty_cache, mem_get_info, memory_allocated, max_memory_allocated,
reset_peak_memory_stats, set_compile_mode, get_device_name,
get_device_properties (.name, .total_memory) and config
(config.allow_internal_format = bool; write-only, as in torch_npu).
Features of the real ops that are not emulated raise NotImplementedError
(quantized attention, pse, shared prefix, rope inputs, BNSD, NZ caches, custom
masks; int4 and batched int8 matmuls, int64 scales, per-group scales).

Device seam
-----------
CPU PyTorch cannot build ``torch.device("npu:0")``.  The stand-in module has
an attribute the real one does not: ``torch_npu.standin_device(index)``,
returning ``torch.device("cpu")``.  ``NpuPlatform.device()``
(``npu_infer/platform/npu.py``) is the one place that builds NPU device
objects; it returns ``torch_npu.standin_device(i)`` when that attribute
exists and ``torch.device(f"npu:{i}")`` otherwise.  ``torch.npu.set_device``
accepts an int, ``"npu:N"`` or that cpu device (which keeps the current index).

Ambiguous documentation
-----------------------
The 2.14.0 docs of npu_fused_infer_attention_score say in the input_layout
paragraph that TND does not support page attention, yet the page-attention
paragraphs list the kv-cache layouts allowed "when the query input_layout is
BNSD or TND", and vllm-ascend runs TND + block_table + sparse_mode=3 in
production.  The stand-in accepts TND with page attention by default;
``configure(tnd_paged=False)`` makes it reject it (strict reading), for
testing the BSH path.  The docs' "TND scene" limits (N in 8..128 with
Q_N == K_N, D == 192, BF16 only) are read as applying to the non-paged TND
path, which the stand-in does not emulate.

npu_weight_quant_batchmatmul's 2.14.0 docs say a FRACTAL_NZ weight is
supported "in graph mode only, not as a single op", while the A2/A3 weight
paragraph lists ND and FRACTAL_NZ without that limit, and vllm-ascend's W8A16
method casts the weight to NZ by default (VLLM_ASCEND_ENABLE_NZ=1) and calls
the op eagerly.  The stand-in accepts an NZ weight by default;
``configure(wqbmm_nz=False)`` makes it reject one (strict reading).

The ATB ops (``_npu_*``) have
no documentation in the wheel; their constraints come from Ascend's ATB
operator pages and from the wheel's binary (URLs and evidence recorded in
``declarations.json``).

What it cannot check about the real kernels: numerics (it computes in
float32 on CPU; bf16/fp16 accumulation, inner_precise, row-invalid handling
differ), performance, device placement (e.g. that ``context_lens`` of
``_npu_paged_attention`` is a host tensor: everything is CPU here), memory
alignment and formats (an acl format is only a tag on the storage: NZ's
tiling, and what ops other than the int8 matmuls do with an NZ tensor, are
not modelled), stream/graph capture and workspaces, what
the kernels do with values they do not validate (the stand-in raises where
they would silently compute garbage), and any constraint the documentation
does not state or states wrongly.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

from . import _namespace, _ops, _quant_ops, _strict
from ._namespace import calls, set_device_count, set_memory
from ._ops import EVIDENCE_RELIED_ON, NpuOpRejected

TORCH_NPU_VERSION = _ops.VERSION
ALL_OPS = {**_ops.ALL_OPS, **_quant_ops.ALL_OPS}
CONSTRAINTS_RELIED_ON = {**_ops.CONSTRAINTS_RELIED_ON, **_quant_ops.CONSTRAINTS_RELIED_ON}
_MISSING = object()
_saved: dict = {}


def standin_device(index: int = 0) -> torch.device:
    """Device seam: the device object npu_infer uses for NPU ``index``: ``npu:index`` with the strict device on
    (install(strict=True)), else CPU."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"invalid device index {index!r}")
    return torch.device("npu", index) if _strict.ACTIVE is not None else torch.device("cpu")


def _make_module() -> types.ModuleType:
    mod = types.ModuleType("torch_npu", __doc__)
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None, origin=__file__)  # find_spec works
    mod.__version__ = TORCH_NPU_VERSION
    mod.__standin__ = True
    mod.npu = _namespace.make_module()
    mod.standin_device = standin_device
    for name, fn in ALL_OPS.items():
        setattr(mod, name, fn)
    return mod


torch_npu = _make_module()


def runtime_options() -> dict:
    """The runtime options set so far (what torch_npu would pass to _npu_setOption)."""
    return dict(_namespace.state["options"])


def installed() -> bool:
    return sys.modules.get("torch_npu") is torch_npu


def reset_state() -> None:
    _ops.reset_state()
    _namespace.reset()


def configure(*, tnd_paged: bool | None = None, wqbmm_nz: bool | None = None) -> None:
    if tnd_paged is not None:
        _ops.OPTIONS["tnd_paged"] = bool(tnd_paged)
    if wqbmm_nz is not None:
        _ops.OPTIONS["wqbmm_nz"] = bool(wqbmm_nz)


def install(strict: bool = False) -> types.ModuleType:
    """Register the stand-in as ``torch_npu`` and ``torch.npu``; returns the module.  ``strict``: NPU tensors are
    device-strict (_strict.py) and memory is measured; ``strict_device()`` is then the StrictDevice."""
    global torch_npu
    if installed():
        return torch_npu
    _saved.clear()
    _saved["torch_npu"] = sys.modules.get("torch_npu", _MISSING)
    _saved["torch_npu.npu"] = sys.modules.get("torch_npu.npu", _MISSING)
    _saved["torch.npu"] = getattr(torch, "npu", _MISSING)
    reset_state()
    configure(tnd_paged=True, wqbmm_nz=True)
    torch_npu = _make_module()
    sys.modules["torch_npu"] = torch_npu
    sys.modules["torch_npu.npu"] = torch_npu.npu
    torch.npu = torch_npu.npu
    if strict:
        _strict.StrictDevice("npu").enter()
    return torch_npu


def strict_device():
    """The strict device of the current install(strict=True), or None."""
    return _strict.ACTIVE


def uninstall() -> None:
    """Undo :func:`install` (restores previous modules and ``torch.npu``)."""
    if not installed():
        return
    if _strict.ACTIVE is not None:
        _strict.ACTIVE.exit()
    for key in ("torch_npu", "torch_npu.npu"):
        prev = _saved.get(key, _MISSING)
        if prev is _MISSING:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = prev
    prev = _saved.get("torch.npu", _MISSING)
    if prev is _MISSING:
        if hasattr(torch, "npu"):
            delattr(torch, "npu")
    else:
        torch.npu = prev
    _saved.clear()
    reset_state()


__all__ = [
    "ALL_OPS",
    "CONSTRAINTS_RELIED_ON",
    "EVIDENCE_RELIED_ON",
    "TORCH_NPU_VERSION",
    "NpuOpRejected",
    "calls",
    "configure",
    "install",
    "installed",
    "reset_state",
    "runtime_options",
    "set_device_count",
    "set_memory",
    "strict_device",
    "torch_npu",
    "uninstall",
]
