"""--load-format name -> how the model's weights are filled."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from npu_infer.config import EngineConfig


def is_gguf(path: str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def detect_load_format(config: EngineConfig) -> str:
    """What `auto` means for this path."""
    if config.load_format != "auto":
        return config.load_format
    path = Path(config.model_path)
    if is_gguf(str(path)):
        return "gguf"
    if path.is_dir() and list(path.glob("model-rank-*-part-*.safetensors")):
        return "sharded_state"
    if path.is_file() and path.suffix == ".tensors":
        return "tensorizer"
    return "auto"


def load_weights(model: nn.Module, config: EngineConfig, rank: int = 0) -> None:
    """Fill `model` (already built on its device, already TP/PP-sharded) from config.model_path."""
    fmt = detect_load_format(config)
    if fmt == "dummy":
        from npu_infer.loaders.dummy_loader import fill_dummy_weights
        fill_dummy_weights(model, config.seed)
    elif fmt in ("auto", "safetensors", "pt"):
        from npu_infer.loaders.default_loader import iterate_weights, weight_files
        model.load_weights(iterate_weights(weight_files(config.model_path, fmt)))
    elif fmt == "gguf":
        from npu_infer.loaders.gguf_loader import iterate_gguf_weights
        model.load_weights(iterate_gguf_weights(config.model_path))
    else:
        raise ValueError(f"load format {fmt!r} is not available yet")
