"""--load-format sharded_state: each rank's already-sharded weights in its own safetensors file(s), as
`npu-infer save-sharded-state` (save_sharded_state.py) writes them. Loading copies each tensor into the rank's
parameters by exact name: no name mapping, no slicing, so start-up costs one read of 1/N of the model."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from npu_infer.config import EngineConfig

FILE_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
_FILE_RE = re.compile(r"model-rank-(\d+)-part-(\d+)\.safetensors")


def rank_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a rank's file holds: every parameter and persistent buffer once (a tied LM head is the embedding)."""
    state = dict(model.named_parameters())  # drops the second name of a shared parameter
    persistent = model.state_dict(keep_vars=True)
    state.update((n, b) for n, b in model.named_buffers() if n in persistent)
    return {n: t.detach() for n, t in state.items()}


def _rank_files(path: Path) -> dict[int, list[Path]]:
    files: dict[int, list[tuple[int, Path]]] = {}
    for f in path.glob("model-rank-*-part-*.safetensors"):
        m = _FILE_RE.fullmatch(f.name)
        if m:
            files.setdefault(int(m.group(1)), []).append((int(m.group(2)), f))
    return {r: [f for _, f in sorted(parts)] for r, parts in files.items()}


def load_sharded_state(model: nn.Module, config: EngineConfig, rank: int) -> None:
    """Copy this rank's saved tensors into the model's parameters by exact name."""
    path = Path(config.model_path)
    files = _rank_files(path) if path.is_dir() else {}
    if not files:
        raise ValueError(f"{path} holds no model-rank-*-part-*.safetensors files; write them with "
                         "`npu-infer save-sharded-state --model <checkpoint> --output <dir> -tp N`")
    saved_world = len(files)
    meta = {}
    try:
        with safe_open(str(files[min(files)][0]), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{files[min(files)][0]} is not a valid safetensors file: {exc}") from None
    saved_tp, saved_pp = int(meta.get("tensor_parallel_size", saved_world)), int(meta.get("pipeline_parallel_size", 1))
    if (saved_tp, saved_pp) != (config.tensor_parallel_size, config.pipeline_parallel_size) or rank not in files:
        raise ValueError(f"{path} was saved for tensor parallel {saved_tp} x pipeline parallel {saved_pp} "
                         f"({saved_world} rank files) but this engine runs {config.tensor_parallel_size} x "
                         f"{config.pipeline_parallel_size}; save it again with matching -tp/-pp")
    targets = rank_state(model)
    done: set[str] = set()
    for file in files[rank]:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    target = targets.get(name)
                    if target is None:
                        raise ValueError(f"{file.name} holds {name!r}, which this model does not have; was it saved "
                                         "from a different model or configuration?")
                    tensor = f.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)} but this rank's "
                                         f"parameter is {tuple(target.shape)}; save it again for this model")
                    target.copy_(tensor)
                    done.add(name)
        except ValueError:
            raise
        except Exception as exc:  # safetensors' own errors for corrupt or truncated files
            raise ValueError(f"{file} is not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    missing = [n for n in targets if n not in done]
    if missing:
        raise ValueError(f"the rank {rank} files in {path} lack {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
