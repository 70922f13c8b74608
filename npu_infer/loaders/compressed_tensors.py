"""vLLM's compressed-tensors int8 checkpoints, read and written as they are (never dequantized to bf16).

Two layouts (what llm-compressor writes and vLLM serves), per linear layer `X` of the decoder:
* W8A8 (format `int-quantized`): `X.weight` int8 [N, K], `X.weight_scale` [N, 1]; activations int8 per token,
  dynamic (config `input_activations`: 8-bit int, strategy token, dynamic).
* W8A16 (format `pack-quantized`): `X.weight_packed` int32 [N, K / 4] (four int8, offset by 128, packed by
  compressed_tensors' pack_to_int32), `X.weight_scale` [N, 1] (strategy channel) or [N, K / G] (strategy group,
  group_size G: vLLM's CompressedTensorsWNA16 layout), `X.weight_shape` [2]; no input_activations.
Weights symmetric; W8A8 per channel only. The embedding and `lm_head` are left out (config `ignore`).
`npu-infer quantize` writes these from a full checkpoint (safetensors or GGUF); loading reads the config through
the `compressed-tensors` package (pip install 'npu_infer[quant]')."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from npu_infer.config import EngineConfig
from npu_infer.loaders.formats import feed_weights, iterate_source_weights, source_format
from npu_infer.models.layers.int8_linear import check_int8_scales, prepare_int8, quantize_weight
from npu_infer.models.layers.linear import LinearBase
from npu_infer.optional_deps import import_optional

FORMATS = {"w8a8": "int-quantized", "w8a16": "pack-quantized"}
# HF names of the decoder's linear weights (Llama / Qwen2), the ones quantized.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _import():
    import_optional("compressed_tensors", "compressed-tensors int8 checkpoints")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    return QuantizationConfig, pack_to_int32, unpack_from_int32


def quantization_config(scheme: str, group_size: int | None = None) -> dict:
    """config.json's quantization_config for `scheme` (w8a16: per group of `group_size` input channels, or per
    channel with None), built by compressed_tensors itself."""
    QuantizationConfig, _, _ = _import()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    strategy = {"strategy": "channel"} if group_size is None else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=False, **strategy)
    acts = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
            if scheme == "w8a8" else None)
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    qc = QuantizationConfig(config_groups={"group_0": group}, format=FORMATS[scheme], ignore=["lm_head"],
                            quantization_status="compressed")
    return json.loads(qc.model_dump_json(exclude_none=True))


def checkpoint_scheme(qc: dict) -> tuple[str, int | None]:
    """(w8a8 or w8a16, the group size or None for per channel) for a compressed-tensors quantization_config this
    engine serves; else one clear error."""
    QuantizationConfig, _, _ = _import()
    try:
        parsed = QuantizationConfig.model_validate(qc)
    except Exception as exc:
        raise ValueError(f"the checkpoint's compressed-tensors quantization_config is not valid: "
                         f"{str(exc).splitlines()[0]}") from None
    groups = list(parsed.config_groups.values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: one config group supported, the checkpoint has {len(groups)}")
    w, a = groups[0].weights, groups[0].input_activations
    weights_ok = w is not None and w.num_bits == 8 and w.type == "int" and w.symmetric and not w.dynamic
    channel = weights_ok and w.strategy == "channel"
    # Group-wise for W8A16 only (its kernel applies a scale per K-group). Groups in activation order come with an
    # X.weight_g_idx tensor, refused by decompress.
    group = weights_ok and w.strategy == "group" and w.group_size is not None and w.group_size > 0
    if (channel or group) and a is None and parsed.format == FORMATS["w8a16"]:
        return "w8a16", w.group_size if group else None
    if (channel and a is not None and a.num_bits == 8 and a.type == "int" and a.symmetric and a.dynamic
            and a.strategy == "token" and parsed.format == FORMATS["w8a8"]):
        return "w8a8", None
    raise ValueError("compressed-tensors: only int8 symmetric weights, per channel with dynamic int8 per-token "
                     "activations (int-quantized) or per channel or group with none (pack-quantized), are served "
                     f"here; this checkpoint has format {parsed.format}, weights "
                     f"{w and w.model_dump(exclude_none=True)}, activations {a and a.model_dump(exclude_none=True)}")


def _is_linear(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES and ".layers." in name


def compress(weights: Iterable[tuple[str, torch.Tensor]], scheme: str, dtype: torch.dtype,
             group_size: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors -> the compressed-tensors ones: linear weights int8 per channel (or per group of
    `group_size` input channels, w8a16), the rest in `dtype`."""
    _, pack_to_int32, _ = _import()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if not _is_linear(name):
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        try:  # as quantize-on-load sees it: the model's dtype first
            q, scale = quantize_weight(tensor.to(dtype), group_size)
        except ValueError as exc:  # one config group holds every linear: a group size must fit them all
            raise ValueError(f"{name}: {exc}") from None
        base = name[:-len(".weight")]
        if scheme == "w8a8":
            yield name, q
        else:
            yield f"{base}.weight_packed", pack_to_int32(q, 8)
            yield f"{base}.weight_shape", torch.tensor(q.shape)
        yield f"{base}.weight_scale", (scale[:, None] if scale.dim() == 1 else scale).contiguous()


def decompress(weights: Iterable[tuple[str, torch.Tensor]], scheme: str,
               group_size: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """compressed-tensors tensors -> ours: `X.weight` int8 [N, K] and `X.weight_scale` fp32 [N] (or [N, K / G] as
    stored, group-wise)."""
    _, _, unpack_from_int32 = _import()
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        if name.endswith((".input_scale", ".input_zero_point", ".weight_zero_point", ".weight_g_idx")):
            raise ValueError(f"{name}: static or asymmetric quantization is not served here (only symmetric "
                             "per-channel weights, dynamic per-token activations)")
        if name.endswith(".weight_scale"):
            if group_size is not None:  # [N, K / G], checked against the layer when loaded into it
                if tensor.dim() != 2 or not tensor.is_floating_point():
                    raise ValueError(f"{name}: a group-wise scale [N, K / {group_size}] expected, got "
                                     f"{tuple(tensor.shape)} {tensor.dtype}")
                yield name, tensor.float()
                continue
            if tensor.dim() == 2 and tensor.shape[1] == 1:
                tensor = tensor[:, 0]
            if tensor.dim() != 1 or not tensor.is_floating_point():
                raise ValueError(f"{name}: a per-channel scale [N] or [N, 1] expected, got {tuple(tensor.shape)} "
                                 f"{tensor.dtype}")
            yield name, tensor.float()
        elif name.endswith((".weight_packed", ".weight_shape")):
            base, part = name.rsplit(".", 1)
            packed.setdefault(base, {})[part] = tensor
            if len(packed[base]) == 2:
                parts = packed.pop(base)
                shape = torch.Size(parts["weight_shape"].tolist())
                yield f"{base}.weight", unpack_from_int32(parts["weight_packed"], 8, shape)
        elif _is_linear(name) and tensor.dtype != torch.int8:
            raise ValueError(f"{name}: an int8 weight expected in a {scheme} checkpoint, got {tensor.dtype}")
        else:
            yield name, tensor
    if packed:
        raise ValueError(f"compressed-tensors: {next(iter(packed))} lacks its weight_packed or weight_shape")


def prepare_int8_layers(model: nn.Module, scheme: str, group_size: int | None = None) -> None:
    """Give every decoder LinearBase an int8 weight and fp32 scales to be loaded into (int8_linear.prepare_int8)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            try:
                prepare_int8(module, scheme, group_size)
            except ValueError as exc:  # a row-parallel layer's K is split over the TP ranks
                raise ValueError(f"{name} (its input features on this tensor-parallel rank): {exc}") from None


def load_compressed_tensors(model: nn.Module, config: EngineConfig, qc: dict) -> None:
    scheme, group_size = checkpoint_scheme(qc)
    prepare_int8_layers(model, scheme, group_size)
    feed_weights(model, decompress(iterate_source_weights(config, source_format(config)), scheme, group_size))
    check_int8_scales(model)
