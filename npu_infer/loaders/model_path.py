"""Where a --model value lives: a directory, a file, or a model id in the local ModelScope / HF cache."""
from __future__ import annotations

import os
from pathlib import Path


def _modelscope_dirs(model_id: str) -> list[Path]:
    root = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
    # ModelScope writes dots in names as '___' (Qwen2-0.5B -> Qwen2-0___5B), under hub/ or hub/models/.
    names = [model_id, model_id.replace(".", "___")]
    return [root / sub / name for sub in ("hub", "hub/models", "") for name in names]


def _hf_dirs(model_id: str) -> list[Path]:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    repo = hub / ("models--" + model_id.replace("/", "--"))
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (repo / "snapshots").is_dir() else []
    return snapshots or [repo / "snapshots" / "<revision>"]


def resolve_model_path(model: str) -> str:
    """Return a local path for `model`, looking nowhere on the network."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if "/" in model and not model.startswith(("/", ".", "~")):
        candidates = _modelscope_dirs(model) + _hf_dirs(model)
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return str(candidate)
        looked = ", ".join(str(c) for c in candidates)
        raise ValueError(f"model {model!r} is not a local path and was not found in the caches ({looked}); "
                         "download it first (e.g. `modelscope download {model}`) or pass its directory")
    raise ValueError(f"model path {model!r} does not exist")
