"""`npu-infer tensorize`: a checkpoint's HF-named full tensors serialized once with CoreWeave's `tensorizer`, with
its config and tokenizer files, for --load-format tensorizer (tensorizer_loader.py streams them back)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from npu_infer.loaders.conversion import copy_side_files, source_config
from npu_infer.loaders.formats import detect_load_format, iterate_source_weights
from npu_infer.loaders.tensorizer_loader import TENSORS_FILE, import_tensorizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensorize_model(model: str, output: str, dtype: str = "auto", load_format: str = "auto") -> Path:
    """Serialize checkpoint `model` (any format the engine reads, GGUF included) to `output`/model.tensors, with its
    config and tokenizer files; dtype `auto` keeps each tensor's stored dtype. Returns the .tensors path."""
    tensorizer = import_tensorizer()
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    config = source_config(model, "auto", load_format)
    fmt = detect_load_format(config)
    if fmt in ("bitsandbytes", "sharded_state", "dummy"):
        raise ValueError(f"{config.model_path} loads as {fmt}; tensorize needs a full-precision checkpoint "
                         "(safetensors, .bin/.pt or GGUF)")
    out = Path(output)
    if out.suffix == ".tensors":
        raise ValueError(f"--output is a directory (model.tensors and the config and tokenizer files go in it), "
                         f"not a file: try {out.with_suffix('')}")
    if out.resolve() == Path(config.model_path).resolve():
        raise ValueError("--output must differ from the source model directory")
    out.mkdir(parents=True, exist_ok=True)
    target = out / TENSORS_FILE
    serializer = tensorizer.TensorSerializer(str(target))
    try:
        for name, tensor in iterate_source_weights(config, fmt):
            if "rotary_emb.inv_freq" in name:
                continue
            if dtype != "auto" and tensor.is_floating_point():
                tensor = tensor.to(_DTYPES[dtype])
            serializer.write_tensor(0, name, tensorizer.TensorType.PARAM, tensor.contiguous())
    finally:
        serializer.close()
    copy_side_files(config, out)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-infer tensorize",
                                     description="Serialize a model's weights for --load-format tensorizer.")
    parser.add_argument("--model", required=True, help="source checkpoint: HF directory, .gguf file or model id")
    parser.add_argument("--output", required=True, help="directory to write: model.tensors plus config and tokenizer")
    parser.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    parser.add_argument("--load-format", default="auto", help="how to read the source (default: by what it holds)")
    args = parser.parse_args(argv)
    try:
        target = tensorize_model(args.model, args.output, args.dtype, args.load_format)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB); serve with --load-format tensorizer "
          f"--model {target.parent}")
    return 0
