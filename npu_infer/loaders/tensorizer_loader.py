"""--load-format tensorizer: the model's weights serialized once with CoreWeave's `tensorizer`, streamed back.

Layout (what `npu-infer tensorize --model X --output DIR` writes): `DIR/model.tensors` holding the HF-named full
tensors, and the config and tokenizer files beside it, so `--model DIR` (or `--model DIR/model.tensors`) is a
whole model. The tensors are full, not per-rank: one file serves any -tp/-pp, each rank slicing its share as it
streams them."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from npu_infer.optional_deps import import_optional

TENSORS_FILE = "model.tensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_tensorizer():
    return import_optional("tensorizer", "--load-format tensorizer")


def tensors_file(path: str) -> Path:
    """The one `.tensors` file of a tensorized model directory (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return p
    files = sorted(p.glob("*.tensors")) if p.is_dir() else []
    if len(files) == 1:
        return files[0]
    if not files:
        raise ValueError(f"{path} holds no .tensors file; write one with "
                         "`npu-infer tensorize --model <checkpoint> --output <dir>`")
    names = ", ".join(f.name for f in files)
    raise ValueError(f"{path} holds several .tensors files ({names}); keep one per directory")


def iterate_tensorizer_weights(path: str, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) as the deserializer streams them from the file."""
    tensorizer = _import_tensorizer()
    file = tensors_file(path)
    try:
        deserializer = tensorizer.TensorDeserializer(str(file), device=device, lazy_load=True)
    except Exception as exc:  # tensorizer raises assorted errors for foreign or damaged headers
        why = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ValueError(f"{file} is not a readable tensorizer file: {why}") from None
    try:
        for name in list(deserializer.keys()):
            try:
                tensor = deserializer[name]
            except Exception as exc:
                raise ValueError(f"{file} is damaged or truncated (reading {name}): "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            yield name, tensor
    finally:
        deserializer.close()


def tensorize_model(model: str, output: str, dtype: str = "auto", load_format: str = "auto") -> Path:
    """Serialize checkpoint `model` (any format the engine reads, GGUF included) to `output`/model.tensors, with its
    config and tokenizer files; dtype `auto` keeps each tensor's stored dtype. Returns the .tensors path."""
    tensorizer = _import_tensorizer()
    from npu_infer.loaders.registry import detect_load_format, iterate_source_weights
    from npu_infer.loaders.sharded_state import copy_side_files, source_config
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
