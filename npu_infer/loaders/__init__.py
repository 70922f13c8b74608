"""Weight loaders, one module per --load-format, picked through load_weights()."""
from __future__ import annotations

from npu_infer.loaders.formats import detect_load_format
from npu_infer.loaders.registry import load_weights

__all__ = ["detect_load_format", "load_weights"]
