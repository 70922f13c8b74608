"""--load-format bitsandbytes / --quantization bitsandbytes: linear layers held by bitsandbytes (8-bit or 4-bit).

Two sources:
* a full-precision checkpoint, quantized as it loads: 4-bit nf4 by default (vLLM's in-flight choice), or
  `NPU_INFER_BNB_QUANT=fp4|int8|nf4`;
* a pre-quantized bitsandbytes checkpoint (transformers' BitsAndBytesConfig; config.json has a
  `quantization_config` with quant_method bitsandbytes): its mode, threshold, block size and double quantization
  are taken from there.
Either way the checkpoint's tensors go through the model's own load_weights (pre-quantized ones dequantized first,
so TP slicing and the q/k/v and gate/up merges work as for any checkpoint), then each linear layer is quantized
in place. Embeddings, norms and the LM head stay in the model dtype, as in transformers and vLLM."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.loaders.registry import bnb_checkpoint_config, feed_weights, iterate_source_weights, source_format
from npu_infer.optional_deps import import_optional

ENV_MODE = "NPU_INFER_BNB_QUANT"
_PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
               "quant_state.bitsandbytes__fp4")


def import_bitsandbytes():
    return import_optional("bitsandbytes", "--quantization bitsandbytes")


def bnb_settings(config: EngineConfig) -> dict:
    """mode (nf4 | fp4 | int8), threshold, blocksize, double_quant, skip, prequantized."""
    qc = bnb_checkpoint_config(config.hf_config)
    if qc is None:
        mode = envs.NPU_INFER_BNB_QUANT.lower()
        if mode not in ("nf4", "fp4", "int8"):
            raise ValueError(f"{ENV_MODE}={mode!r} is not a bitsandbytes mode; use nf4, fp4 or int8")
        return dict(mode=mode, threshold=6.0, blocksize=64, double_quant=False, skip=(), prequantized=False)
    if qc.get("load_in_8bit"):
        mode = "int8"
    elif qc.get("load_in_4bit"):
        mode = qc.get("bnb_4bit_quant_type", "fp4")
    else:
        raise ValueError("the checkpoint's bitsandbytes quantization_config sets neither load_in_8bit nor load_in_4bit")
    skip = tuple(_PACKED.get(s, s) for s in (qc.get("llm_int8_skip_modules") or []))
    # Requantizing the dequantized weights gives back the checkpoint's own codes and block scales exactly — but
    # only with plain fp32 scales: double quantization would quantize the scales again, in other groups. So a
    # double-quantized checkpoint costs 0.4 bit a weight more here, and computes exactly what it stores.
    return dict(mode=mode, threshold=float(qc.get("llm_int8_threshold", 6.0)), blocksize=64, double_quant=False,
                skip=skip, prequantized=True)


def check_device(device: torch.device, mode: str) -> None:
    """One small quantize + matmul on the model's device, so a backend bitsandbytes lacks fails here, clearly."""
    bnb = import_bitsandbytes()
    import bitsandbytes.functional as bnbf
    try:
        w = torch.randn(64, 64, device=device)
        if mode == "int8":
            cb, scb, _ = bnbf.int8_vectorwise_quant(w.half())
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights, state.is_training = cb, scb, False, False
            bnb.matmul(torch.randn(2, 64, device=device).half(), cb, state=state)
        else:
            packed, qs = bnbf.quantize_4bit(w, quant_type=mode)
            bnb.matmul_4bit(torch.randn(2, 64, device=device), packed.t(), qs)
    except Exception as exc:
        raise ValueError(f"bitsandbytes {bnb.__version__} cannot run {mode} on {device.type} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); use a device it "
                         "supports (CUDA, or CPU with bitsandbytes >= 0.50) or another --load-format") from None


def dequantize_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """A pre-quantized bnb checkpoint's tensors as full ones: `X.weight` + `X.SCB` (int8), or `X.weight` +
    `X.weight.absmax` / `.quant_map` / `.quant_state.bitsandbytes__*` (4-bit) become one `X.weight` of `dtype`."""
    import bitsandbytes.functional as bnbf
    tensors = dict(weights)  # a weight's companions may come before or after it
    for name in list(tensors):
        if name.endswith(".weight_format"):  # transformers' int8 layout tag (always row-major here)
            del tensors[name]
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".SCB") or any(name.endswith(f".weight.{p}") for p in _4BIT_PARTS):
            continue
        if name.endswith(".weight") and f"{name[:-7]}.SCB" in tensors:
            tensor = bnbf.int8_vectorwise_dequant(tensor, tensors[f"{name[:-7]}.SCB"])
        elif name.endswith(".weight") and f"{name}.absmax" in tensors:
            parts = {p: tensors[f"{name}.{p}"] for p in _4BIT_PARTS if f"{name}.{p}" in tensors}
            try:
                state = bnbf.QuantState.from_dict(parts, device=tensor.device)
            except (ValueError, AssertionError, KeyError) as exc:
                raise ValueError(f"{name}: the bitsandbytes 4-bit state is not readable ({exc})") from None
            tensor = bnbf.dequantize_4bit(tensor, state)
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    yield from out.items()


def load_bitsandbytes(model: nn.Module, config: EngineConfig) -> None:
    """Load full weights through the model's own mapping, then quantize every linear layer with bitsandbytes."""
    from npu_infer.models.layers.quantized_linear import quantize_linears
    settings = bnb_settings(config)
    device = next(model.parameters()).device
    check_device(device, settings["mode"])
    # An explicit source format (e.g. --load-format tensorizer --quantization bitsandbytes) is honoured.
    fmt = config.load_format if config.load_format not in ("auto", "bitsandbytes") else source_format(config)
    if fmt == "sharded_state":
        raise ValueError("bitsandbytes quantizes full checkpoints as they load; a sharded_state directory holds "
                         "already-sharded weights: give the original checkpoint")
    if fmt == "dummy":  # real-size quantized model without weights, for profiling and benchmarks
        from npu_infer.loaders.dummy_loader import fill_dummy_weights
        fill_dummy_weights(model, config.seed)
    else:
        weights = iterate_source_weights(config, fmt)
        if settings["prequantized"]:
            weights = dequantize_checkpoint(weights, config.torch_dtype)
        feed_weights(model, weights)
    count = quantize_linears(model, settings["mode"], settings["threshold"], settings["blocksize"],
                             settings["double_quant"], settings["skip"])
    if count == 0:
        raise ValueError("bitsandbytes found no linear layers to quantize in this model")
