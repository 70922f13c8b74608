"""`npu-infer quantize`: write an int8 compressed-tensors checkpoint (vLLM's format) from a full-precision one,
with the weights quantize-on-load would make (for w8a8: after the same SmoothQuant calibration, run through an
engine; hence a module above the loaders, which an engine imports)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from npu_infer import envs
from npu_infer.llm import LLM
from npu_infer.loaders.compressed_tensors import compress, quantization_config
from npu_infer.loaders.conversion import copy_side_files, source_config
from npu_infer.loaders.formats import detect_load_format, iterate_source_weights
from npu_infer.models.layers.int8_linear import INT8_SCHEMES
from npu_infer.models.layers.smooth_quant import fold_into_checkpoint


def smoothquant_factors(model: str, dtype: str) -> dict:
    """The SmoothQuant factors quantize-on-load finds for `model`: from an engine that loads it with w8a8 (the
    same calibration run, on the same weights, in the same process layout)."""
    llm = LLM(model, device="cpu", dtype=dtype, quantization="w8a8", skip_tokenizer_init=True, max_model_len=256,
              kv_cache_memory="16MiB", enable_prefix_caching=False)
    try:
        return llm.engine.executor.worker.model.smoothquant_factors
    finally:
        llm.engine.shutdown()


def write_quantized(model: str, output: str, scheme: str, dtype: str = "bfloat16",
                    group_size: int | None = None) -> Path:
    """Quantize checkpoint `model` (safetensors, .bin or GGUF) to `output` as a compressed-tensors checkpoint;
    `group_size` (w8a16): one scale per that many input channels, None for one per output channel."""
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")
    if group_size is not None and scheme != "w8a16":
        raise ValueError(f"--group-size is for w8a16; {scheme} takes one scale per output channel")
    config = source_config(model, dtype)
    fmt = detect_load_format(config)
    if fmt not in ("auto", "safetensors", "pt", "gguf"):
        raise ValueError(f"{config.model_path} loads as {fmt}; quantize needs a full-precision checkpoint "
                         "(safetensors, .bin/.pt or GGUF)")
    out = Path(output)
    if out.resolve() == Path(config.model_path).resolve():
        raise ValueError("--output must differ from the source model directory")
    out.mkdir(parents=True, exist_ok=True)
    weights = iterate_source_weights(config, fmt)
    if scheme == "w8a8" and envs.NPU_INFER_W8A8_SMOOTHING > 0:  # the SmoothQuant folds quantize-on-load makes
        weights = fold_into_checkpoint(weights, smoothquant_factors(model, dtype), config.torch_dtype)
    tensors = dict(compress(weights, scheme, config.torch_dtype, group_size))
    copy_side_files(config, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = quantization_config(scheme, group_size)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    target = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata={"format": "pt"})
    return target


def _group_size(flag: str | None, scheme: str) -> int | None:
    """--group-size as write_quantized takes it: None for per channel (always so for w8a8 by default)."""
    if flag is None:
        return (envs.NPU_INFER_W8A16_GROUP_SIZE or None) if scheme == "w8a16" else None
    if flag == "channel":
        return None
    if not flag.isdigit() or int(flag) == 0:
        raise ValueError(f"--group-size {flag!r}: give a number of input channels (e.g. 32, 64, 128) or `channel`")
    return int(flag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-infer quantize", description="Write an int8 compressed-tensors "
                                     "checkpoint (vLLM's format) from a full-precision one.")
    parser.add_argument("--model", required=True, help="source checkpoint: HF directory, .gguf file or model id")
    parser.add_argument("--output", required=True, help="directory to write (model.safetensors, config, tokenizer)")
    parser.add_argument("--scheme", required=True, choices=INT8_SCHEMES)
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the tensors left unquantized")
    parser.add_argument("--group-size", help="w8a16: input channels per weight scale (strategy group), or `channel` "
                        "for one per output channel; default: what --quantization w8a16 uses on load "
                        "(NPU_INFER_W8A16_GROUP_SIZE)")
    args = parser.parse_args(argv)
    try:
        group_size = _group_size(args.group_size, args.scheme)
        target = write_quantized(args.model, args.output, args.scheme, args.dtype, group_size)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    layout = f"group size {group_size}" if group_size else "per channel"
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB), {args.scheme} {layout}; serve with --model "
          f"{target.parent}")
    return 0
