"""Writes a tiny msmodelslim int8 checkpoint from a transformers one, with msmodelslim's conventions (what
vllm-ascend reads): decoder linears int8 per channel with weight_scale / weight_offset [N, 1]; for static W8A8 also
input_scale / input_offset per tensor (asymmetric, calibrated here), deq_scale = input_scale * weight_scale and
quant_bias = round(bias / deq_scale) - input_offset * sum(q); everything else bf16, and quant_model_description.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from npu_infer.models.layers.int8_linear import quantize_weight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    parts = name.split(".")
    return ".layers." in name and parts[-1] == "weight" and parts[-2] in LINEARS


def calibrate(model_dir: Path) -> dict[str, tuple[float, float]]:
    """(min, max) of each linear's input over a calibration text, from transformers' own forward (fp32)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ranges: dict[str, tuple[float, float]] = {}

    def hook(name):
        def record(_module, args):
            x = args[0]
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        return record
    for name, module in model.named_modules():
        if name.split(".")[-1] in LINEARS:
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(7)))
    return ranges


def activation_params(lo: float, hi: float) -> tuple[float, float]:
    """msmodelslim's asymmetric per-tensor parameters: [lo, hi] onto [-128, 127]."""
    scale = (hi - lo) / 255
    return scale, float(round(-lo / scale) - 128)


def write_msmodelslim(src: Path, out: Path, kind: str = "W8A8_DYNAMIC", deq_int64: bool = False) -> Path:
    """`src` (a transformers checkpoint) as msmodelslim writes it: decoder linears int8 with their scales, the rest
    in bf16, and quant_model_description.json naming each tensor's type."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    tensors = load_file(src / "model.safetensors")
    ranges = calibrate(src) if kind == "W8A8" else {}
    saved, desc = {}, {"model_quant_type": kind, "version": "1.0.0"}
    for name, t in tensors.items():
        if not is_linear(name):
            saved[name] = t.to(torch.bfloat16)
            desc[name] = "FLOAT"
            continue
        base = name[:-len(".weight")]
        q, w_scale = quantize_weight(t.to(torch.bfloat16))  # as quantize-on-load sees it: the model's dtype first
        parts = {"weight": q, "weight_scale": w_scale[:, None], "weight_offset": torch.zeros(q.shape[0], 1)}
        if kind == "W8A8":
            x_scale, x_offset = activation_params(*ranges[base])
            deq = (torch.tensor(x_scale) * w_scale).float()
            bias = tensors.get(f"{base}.bias")
            folded = torch.round(bias.float() / deq) if bias is not None else torch.zeros_like(deq)
            parts.update(input_scale=torch.tensor([x_scale]), input_offset=torch.tensor([x_offset]),
                         deq_scale=deq.view(torch.int32).to(torch.int64) if deq_int64 else deq,
                         quant_bias=(folded - x_offset * q.sum(dim=1).float()).to(torch.int32))
        for part, value in parts.items():
            saved[f"{base}.{part}"] = value.contiguous()
            desc[f"{base}.{part}"] = kind
    save_file(saved, out / "model.safetensors")
    (out / "quant_model_description.json").write_text(json.dumps(desc, indent=2))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantize"] = kind.lower()  # what msmodelslim adds to config.json
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
