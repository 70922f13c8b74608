"""msmodelslim (Ascend ModelSlim) int8 checkpoints, served as stored, as vllm-ascend serves them.

A `quant_model_description.json` beside the safetensors names each tensor's quant type ("model.layers.0.self_attn.
q_proj.weight": "W8A8_DYNAMIC", norms and embeddings "FLOAT", ...) and the model's ("model_quant_type"). Per decoder
linear `X`, the tensors vllm-ascend's methods read (vllm_ascend/quantization/methods/w8a8_dynamic.py, w8a16.py,
w8a8_static.py), and what they become here:

* W8A8_DYNAMIC: `X.weight` int8 [N, K], `X.weight_scale` [N, 1], `X.weight_offset` [N, 1] (zero: symmetric)
  -> w8a8 (int8_linear.py), as compressed-tensors' W8A8 is.
* W8A16: the same tensors -> w8a16.
* W8A8 (static): `X.weight` int8 [N, K], `X.input_scale` [1], `X.input_offset` [1], `X.deq_scale` [N] (fp32, or
  int64 holding the fp32's bits, as msmodelslim writes it for fp16 models), `X.quant_bias` [N] int32 (the layer's
  float bias folded in); `X.weight_scale` / `X.weight_offset` unused -> static W8A8 (int8_linear.py).
* FLOAT: `X.weight` in a float dtype -> unquantized.

A non-zero weight_offset (asymmetric weights), a missing or corrupt scale, and any other quant type are refused,
each in one sentence naming the tensor."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from npu_infer.config import EngineConfig
from npu_infer.loaders.formats import MSMODELSLIM_DESCRIPTION, feed_weights, iterate_source_weights, source_format
from npu_infer.models.layers.int8_linear import W8A8_STATIC, make_int8, make_int8_static
from npu_infer.models.layers.linear import LinearBase

SCHEMES = {"W8A8_DYNAMIC": "w8a8", "W8A16": "w8a16", "W8A8": W8A8_STATIC, "FLOAT": None}
SERVED = "W8A8_DYNAMIC, W8A8 (static, per-tensor activations) and W8A16 (per channel), or FLOAT"
NEEDED = {"w8a8": ("weight", "weight_scale"), "w8a16": ("weight", "weight_scale"),
          W8A8_STATIC: ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")}
# Description keys of attention / KV-cache quantization (vllm-ascend's C8 and FA3 paths), not served here.
KV_KEYS = ("kv_quant_type", "fa_quant_type", "kv_cache_type", "indexer_quant_type")


def read_description(model_path: str) -> dict:
    path = Path(model_path) / MSMODELSLIM_DESCRIPTION
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(desc, dict):
        raise ValueError(f"{path} must hold a JSON object of tensor name -> quant type")
    model_type = desc.get("model_quant_type")
    if model_type is not None and model_type not in SCHEMES:
        raise ValueError(f"{path}: model_quant_type {model_type!r} is not served here; msmodelslim {SERVED} are")
    for key in KV_KEYS:
        if desc.get(key) not in (None, "FLOAT"):
            raise ValueError(f"{path}: {key} {desc[key]!r} (attention / KV-cache quantization) is not served here")
    return desc


def _linears(model: nn.Module) -> Iterator[tuple[str, LinearBase, list[str]]]:
    """(our name, the layer, the HF names of its shards: q/k/v for qkv_proj) for each decoder linear."""
    shards_of: dict[str, list[str]] = {}
    for piece, (merged, _) in getattr(model, "packed_modules", {}).items():
        shards_of.setdefault(merged, []).append(piece)
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            prefix, leaf = name.rsplit(".", 1)
            yield name, module, [f"{prefix}.{shard}" for shard in shards_of.get(leaf, [leaf])]


def layer_schemes(model: nn.Module, desc: dict) -> dict[str, str | None]:
    """HF name of each decoder linear (`model.layers.0.self_attn.q_proj`) -> its scheme here (None: FLOAT). The
    shards of one merged layer (q/k/v, gate/up) must share a type, as vllm-ascend requires."""
    schemes: dict[str, str | None] = {}
    for name, _, shards in _linears(model):
        types = {}
        for shard in shards:
            key = f"{shard}.weight"
            if key not in desc:
                raise ValueError(f"{MSMODELSLIM_DESCRIPTION} has no entry for {key}")
            if desc[key] not in SCHEMES:
                raise ValueError(f"{key}: quant type {desc[key]!r} is not served here; msmodelslim {SERVED} are")
            types[key] = desc[key]
        if len(set(types.values())) > 1:
            raise ValueError(f"the shards of {name} have different quant types ({types}); msmodelslim quantizes "
                             "q/k/v and gate/up alike")
        schemes.update((shard, SCHEMES[types[f"{shard}.weight"]]) for shard in shards)
    for key, value in desc.items():  # nothing else may be quantized (embedding, LM head, norms)
        if key.endswith(".weight") and value != "FLOAT" and key[:-len(".weight")] not in schemes:
            raise ValueError(f"{key}: quant type {value!r} is not served here; only the decoder's linear layers "
                             "may be quantized (the embedding, LM head and norms stay FLOAT)")
    return schemes


def prepare_layers(model: nn.Module, schemes: dict[str, str | None]) -> None:
    """Give each quantized LinearBase its int8 tensors, TP-sliced by the layer's own weight_loader."""
    for name, module, shards in _linears(model):
        scheme = schemes[shards[0]]
        n, k = module.weight.shape
        device = module.weight.device
        if scheme is None:
            continue
        if scheme == W8A8_STATIC:
            make_int8_static(module, n, k, device)
            for part in ("weight", "deq_scale", "quant_bias"):
                getattr(module, part).weight_loader = module.weight_loader
            for part in ("input_scale", "input_offset"):
                getattr(module, part).weight_loader = _whole_tensor_loader(name, part)
        else:
            make_int8(module, scheme, torch.zeros(n, k, dtype=torch.int8, device=device), torch.ones(n, device=device))
            module.weight.weight_loader = module.weight_loader
            module.weight_scale.weight_loader = module.weight_loader


def _whole_tensor_loader(layer: str, part: str):
    """A per-tensor activation parameter: the same on every TP rank and for every shard of a merged layer (q/k/v
    read the same input, so msmodelslim calibrates one scale for them)."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        value = loaded.reshape(1).to(param.device, param.dtype)
        if getattr(param, "_loaded", False) and not torch.equal(param.data, value):
            raise ValueError(f"the shards of {layer} have different {part}s ({float(param.data[0])} and "
                             f"{float(value[0])}); static W8A8 needs one per layer input")
        param.data.copy_(value)
        param._loaded = True
    return load


def translate(weights: Iterable[tuple[str, torch.Tensor]],
              schemes: dict[str, str | None]) -> Iterator[tuple[str, torch.Tensor]]:
    """msmodelslim's tensors -> ours, each scale checked where it enters; then every quantized linear must have had
    all its tensors."""
    seen: dict[str, set[str]] = {base: set() for base, scheme in schemes.items() if scheme is not None}
    for name, tensor in weights:
        base, part = name.rsplit(".", 1)
        scheme = schemes.get(base)
        if scheme is None:
            if base in schemes and part == "weight" and not tensor.is_floating_point():
                raise ValueError(f"{name}: a FLOAT layer's weight must be floating point, got {tensor.dtype}")
            yield name, tensor
            continue
        seen[base].add(part)
        if part == "weight":
            if tensor.dtype != torch.int8 or tensor.dim() != 2:
                raise ValueError(f"{name}: an int8 [N, K] weight expected, got {tensor.dtype} {tuple(tensor.shape)}")
            yield name, tensor
        elif part in ("weight_scale", "weight_offset") and scheme == W8A8_STATIC:
            continue  # folded into deq_scale and quant_bias; vllm-ascend does not read them either
        elif part == "weight_scale":
            yield name, _positive(name, _per_channel(name, tensor))
        elif part == "weight_offset":
            if bool((_per_channel(name, tensor) != 0).any()):
                raise ValueError(f"{name}: non-zero weight offsets (asymmetric weights) are not served here; only "
                                 "symmetric int8 weights are (quantize with msmodelslim's w_sym=True)")
        elif part == "input_scale":
            yield name, _positive(name, _scalar(name, tensor).float())
        elif part == "input_offset":
            offset = _scalar(name, tensor).float()
            if not bool(torch.isfinite(offset).all()) or offset.round() != offset or not -128 <= float(offset) <= 127:
                raise ValueError(f"{name}: an integer input offset in [-128, 127] expected, got {float(offset)}")
            yield name, offset
        elif part == "deq_scale":
            if tensor.dtype == torch.int64:  # the fp32 scale's bits, as npu_trans_quant_param stores them
                tensor = tensor.to(torch.int32).view(torch.float32)
            yield name, _positive(name, _per_channel(name, tensor))
        elif part == "quant_bias":
            if tensor.is_floating_point() or tensor.dim() != 1:
                raise ValueError(f"{name}: an int32 [N] quant_bias expected, got {tensor.dtype} {tuple(tensor.shape)}")
            yield name, tensor.to(torch.int32)
        else:
            yield name, tensor  # the layer's float bias (folded into quant_bias for static W8A8), or unknown
    for base, parts in seen.items():
        missing = [p for p in NEEDED[schemes[base]] if p not in parts]
        if missing:
            raise ValueError(f"{base}.{missing[0]} is missing from the checkpoint: a {_type_name(schemes[base])} "
                             f"layer needs {', '.join(NEEDED[schemes[base]])}")


def _type_name(scheme: str) -> str:
    return next(t for t, s in SCHEMES.items() if s == scheme)


def _per_channel(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.dim() != 1 or not tensor.is_floating_point():
        raise ValueError(f"{name}: a per-channel [N] or [N, 1] float tensor expected, got {tuple(tensor.shape)} "
                         f"{tensor.dtype}")
    return tensor.float()


def _scalar(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() != 1:
        raise ValueError(f"{name}: one value per tensor expected, got shape {tuple(tensor.shape)}")
    return tensor.reshape(1)


def _positive(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()) or bool((tensor <= 0).any()):
        raise ValueError(f"{name}: scales must be finite and positive; the checkpoint is corrupt")
    return tensor


def load_msmodelslim(model: nn.Module, config: EngineConfig) -> None:
    desc = read_description(config.model_path)
    schemes = layer_schemes(model, desc)
    prepare_layers(model, schemes)
    feed_weights(model, translate(iterate_source_weights(config, source_format(config)), schemes))
