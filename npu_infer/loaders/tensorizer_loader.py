"""--load-format tensorizer: the model's weights serialized once with CoreWeave's `tensorizer`, streamed back.

Layout (what `npu-infer tensorize --model X --output DIR` writes): `DIR/model.tensors` holding the HF-named full
tensors, and the config and tokenizer files beside it, so `--model DIR` (or `--model DIR/model.tensors`) is a
whole model. The tensors are full, not per-rank: one file serves any -tp/-pp, each rank slicing its share as it
streams them."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from npu_infer.optional_deps import import_optional

TENSORS_FILE = "model.tensors"


def import_tensorizer():
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
    tensorizer = import_tensorizer()
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
