"""`npu-infer save-sharded-state`: every rank's model built in this one process, as rank r of N would build it,
filled from the source checkpoint, and written as `model-rank-{r}-part-{p}.safetensors` for --load-format
sharded_state (sharded_state.py reads them)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from npu_infer.config import EngineConfig, parse_bytes
from npu_infer.distributed import parallel_state
from npu_infer.distributed.parallel_state import GroupCoordinator
from npu_infer.loaders.conversion import DTYPE_NAMES, copy_side_files, source_config
from npu_infer.loaders.formats import detect_load_format
from npu_infer.loaders.registry import load_weights
from npu_infer.loaders.sharded_state import FILE_PATTERN, rank_state
from npu_infer.models.registry import get_model_class


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


def build_rank_model(config: EngineConfig, rank: int) -> nn.Module:
    """Rank `rank`'s model, on the CPU, filled from config.model_path by the source's own loader."""
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
            "pipeline_parallel_size": str(pipeline_parallel_size), "dtype": DTYPE_NAMES[config.torch_dtype]}
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
    try:
        files = save_sharded_state(args.model, args.output, args.tensor_parallel_size, args.pipeline_parallel_size,
                                   args.dtype, args.load_format, parse_bytes(args.max_file_size))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {len(files)} files for {args.tensor_parallel_size * args.pipeline_parallel_size} ranks to "
          f"{args.output}; serve with --load-format sharded_state --model {args.output} "
          f"-tp {args.tensor_parallel_size} -pp {args.pipeline_parallel_size}")
    return 0
