"""Where a --model value lives: a directory, a file, or a model id in the local ModelScope / HF cache."""
from __future__ import annotations

from pathlib import Path

from npu_infer import envs


def _modelscope_dirs(model_id: str) -> list[Path]:
    # MODELSCOPE_CACHE is the cache root (~/.cache/modelscope); older releases pointed it at the hub folder itself.
    root = Path(envs.MODELSCOPE_CACHE or Path.home() / ".cache" / "modelscope").expanduser()
    # ModelScope writes dots in names as '___' (Qwen2-0.5B -> Qwen2-0___5B), under hub/ or hub/models/.
    names = [model_id.replace(".", "___"), model_id]
    return [root / sub / name for sub in ("hub", "hub/models", "models", "") for name in dict.fromkeys(names)]


def _hf_dirs(model_id: str) -> list[Path]:
    home = Path(envs.HF_HOME or Path.home() / ".cache" / "huggingface").expanduser()
    hub = Path(envs.HF_HUB_CACHE or envs.HUGGINGFACE_HUB_CACHE or home / "hub").expanduser()
    repo = hub / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():  # the revision the hub client last resolved for `main`
        return [repo / "snapshots" / ref.read_text().strip()]
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found
    return [snapshots / "<revision>"]


def resolve_model_path(model: str) -> str:
    """Return a local path for `model`, looking nowhere on the network.

    A directory or file is taken as it is, except a `*.tensors` file, which stands for its directory
    (the tensorizer loader reads the one `.tensors` file there, the config and tokenizer beside it)."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".tensors":
            return str(path.parent)
        return str(path)
    if model.count("/") == 1 and not model.startswith((".", "~")) and all(model.split("/")):
        candidates = _modelscope_dirs(model) + _hf_dirs(model)
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return str(candidate)
        looked = ", ".join(str(c) for c in candidates)
        raise ValueError(f"model {model!r} is not a local path and is not in the ModelScope or Hugging Face cache "
                         f"(looked in {looked}); download it first (e.g. `modelscope download --model {model}`) "
                         "or pass its directory")
    raise ValueError(f"model path {model!r} does not exist")
