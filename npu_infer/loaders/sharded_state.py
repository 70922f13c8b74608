"""--load-format sharded_state: each rank's already-sharded weights in its own safetensors file(s).

`save_sharded_state` (and `npu-infer save-sharded-state`) builds every rank's model in this one process, as rank r
of N would build it, loads the source checkpoint into it, and writes `model-rank-{r}-part-{p}.safetensors` with the
config and tokenizer files beside them. Loading copies each tensor into the rank's parameters by exact name: no name
mapping, no slicing, so start-up costs one read of 1/N of the model."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from npu_infer.config import EngineConfig
from npu_infer.distributed import parallel_state
from npu_infer.distributed.parallel_state import GroupCoordinator

FILE_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
_FILE_RE = re.compile(r"model-rank-(\d+)-part-(\d+)\.safetensors")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tensors", ".gguf")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def as_rank(tp_size: int, pp_size: int, rank: int) -> Iterator[None]:
    """Inside, models are built as global rank `rank` of tp_size x pp_size would build them (no torch.distributed:
    the groups have no process group, so nothing may run a collective here; loading never does)."""
    world = tp_size * pp_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside tensor parallel {tp_size} x pipeline parallel {pp_size}")
    pp_rank = rank // tp_size
    saved = parallel_state._TP, parallel_state._PP
    parallel_state._TP = GroupCoordinator(list(range(pp_rank * tp_size, (pp_rank + 1) * tp_size)), rank, None)
    parallel_state._PP = GroupCoordinator(list(range(rank % tp_size, world, tp_size)), rank, None)
    try:
        yield
    finally:
        parallel_state._TP, parallel_state._PP = saved


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


def copy_side_files(config: EngineConfig, output: Path) -> None:
    """Config, generation config and tokenizer files of the source, so the output is a self-contained model."""
    src = Path(config.model_path)
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
                shutil.copy2(f, output / f.name)
        return
    # A single-file checkpoint (GGUF): write what its metadata holds.
    from npu_infer.loaders.hf_files import load_tokenizer
    config.hf_config.save_pretrained(output)
    try:
        tokenizer = load_tokenizer(config)
    except ValueError:
        tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(output)


def source_config(model: str, dtype: str = "auto", load_format: str = "auto", tensor_parallel_size: int = 1,
                  pipeline_parallel_size: int = 1) -> EngineConfig:
    """An EngineConfig for reading a checkpoint on the CPU; dtype `auto` keeps the checkpoint's own dtype."""
    from npu_infer.loaders.hf_files import load_hf_config
    from npu_infer.loaders.model_path import resolve_model_path
    config = EngineConfig(model=model, device="cpu", dtype=dtype, load_format=load_format,
                          tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    config.model_path = resolve_model_path(model)
    hf_config = load_hf_config(config)
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if dtype == "auto":
        config.dtype = _DTYPE_NAMES.get(stored, "float32")
    config.resolve(hf_config, torch.float32, tuple(_DTYPE_NAMES), "cpu")
    return config


def build_rank_model(config: EngineConfig, rank: int) -> nn.Module:
    """Rank `rank`'s model, on the CPU, filled from config.model_path by the source's own loader."""
    from npu_infer.loaders.registry import load_weights
    from npu_infer.models.registry import get_model_class
    with as_rank(config.tensor_parallel_size, config.pipeline_parallel_size, rank):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device("cpu"):
                model = get_model_class(config.hf_config)(config.hf_config)
        finally:
            torch.set_default_dtype(previous)
        load_weights(model, config, rank)
    return model


def save_sharded_state(model: str, output: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                       dtype: str = "auto", load_format: str = "auto", max_file_size: int = 5 * 1024**3) -> list[Path]:
    """Write each rank's sharded weights of checkpoint `model` to `output`; return the files written."""
    from npu_infer.loaders.registry import detect_load_format
    config = source_config(model, dtype, load_format, tensor_parallel_size, pipeline_parallel_size)
    if detect_load_format(config) == "bitsandbytes":
        raise ValueError(f"{config.model_path} is a bitsandbytes checkpoint; save-sharded-state needs a "
                         "full-precision one")
    out = Path(output)
    if out.resolve() == Path(config.model_path).resolve():
        raise ValueError("--output must differ from the source model directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model-rank-*-part-*.safetensors"):  # a previous save for another rank count
        stale.unlink()
    meta = {"format": "pt", "tensor_parallel_size": str(tensor_parallel_size),
            "pipeline_parallel_size": str(pipeline_parallel_size), "dtype": _DTYPE_NAMES[config.torch_dtype]}
    written = []
    for rank in range(config.world_size):
        state = rank_state(build_rank_model(config, rank))
        parts: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if parts[-1] and size + nbytes > max_file_size:
                parts.append({})
                size = 0
            parts[-1][name] = tensor.contiguous()
            size += nbytes
        for part, tensors in enumerate(parts):
            file = out / FILE_PATTERN.format(rank=rank, part=part)
            save_file(tensors, str(file), metadata={**meta, "rank": str(rank)})
            written.append(file)
    copy_side_files(config, out)
    # The output holds weights in config.torch_dtype; say so, so `--dtype auto` picks it.
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype", "torch_dtype"]:
            cfg[key] = meta["dtype"]
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-infer save-sharded-state",
                                     description="Write each rank's already-sharded weights for "
                                                 "--load-format sharded_state.")
    parser.add_argument("--model", required=True, help="source checkpoint: HF directory, .gguf file or model id")
    parser.add_argument("--output", required=True, help="directory to write (created if missing)")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), float32, bfloat16, float16")
    parser.add_argument("--load-format", default="auto", help="how to read the source (default: by what it holds)")
    parser.add_argument("--max-file-size", default="5GiB", help="split a rank's weights into parts of this size")
    args = parser.parse_args(argv)
    from npu_infer.config import parse_bytes
    try:
        files = save_sharded_state(args.model, args.output, args.tensor_parallel_size, args.pipeline_parallel_size,
                                   args.dtype, args.load_format, parse_bytes(args.max_file_size))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {len(files)} files for {args.tensor_parallel_size * args.pipeline_parallel_size} ranks to "
          f"{args.output}; serve with --load-format sharded_state --model {args.output} "
          f"-tp {args.tensor_parallel_size} -pp {args.pipeline_parallel_size}")
    return 0
