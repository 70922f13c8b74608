"""The default loader: HF safetensors (mmap; single file or index-json shards) or .bin/.pt (weights_only)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

logger = logging.getLogger(__name__)


def weight_files(path: str, load_format: str) -> list[Path]:
    """The checkpoint files of a model directory (or a single file), for safetensors or pt."""
    root = Path(path)
    if root.is_file():
        return [root]
    if load_format in ("auto", "safetensors"):
        index = root / "model.safetensors.index.json"
        if index.is_file():
            return index_files(root, index)
        files = sorted(root.glob("*.safetensors"))
        if files:
            return files
        if load_format == "safetensors":
            raise ValueError(f"no .safetensors files in {path}")
    index = root / "pytorch_model.bin.index.json"
    if index.is_file():
        return index_files(root, index)
    files = sorted(list(root.glob("*.bin")) + list(root.glob("*.pt")) + list(root.glob("*.pth")))
    if not files:
        raise ValueError(f"no weight files (.safetensors, .bin, .pt) in {path}")
    return files


def index_files(root: Path, index: Path) -> list[Path]:
    """The shard files an index names; each must be a plain file name inside the model directory (an index
    from the network must not make the loader open /etc/passwd or ../other-model)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is not a valid index file: {exc}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    base = root.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        path = (root / name).resolve() if isinstance(name, str) else None
        if path is None or Path(name).is_absolute() or not path.is_relative_to(base):
            raise ValueError(f"{index}: the shard {name!r} is outside the model directory; refused")
        files.append(root / name)
    return files


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every file, with a progress bar over files."""
    for file in tqdm(files, desc="Loading weights", unit="file", disable=len(files) < 2):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{file} is not a valid safetensors file: {exc}") from None
        else:
            try:
                # weights_only: a pickle that holds anything but tensors is refused, never executed.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ValueError(f"{file} cannot be loaded as a PyTorch weights file (weights_only=True): "
                                 f"{str(exc).splitlines()[0]}") from None
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{file} does not hold a dict of tensors")
            yield from state.items()
