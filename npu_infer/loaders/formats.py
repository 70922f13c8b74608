"""Checkpoint formats: what a path holds, how its config.json says it is quantized, and its weights as (HF name,
tensor) pairs. A leaf of the loaders: the dispatcher (registry.py) and the loaders import it, it imports none of them
back (only the readers of the HF-named formats)."""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from npu_infer.config import LOAD_FORMATS, EngineConfig
from npu_infer.loaders.default_loader import iterate_weights, weight_files
from npu_infer.loaders.tensorizer_loader import iterate_tensorizer_weights
from npu_infer.models.layers.int8_linear import INT8_SCHEMES

# "ascend": vllm-ascend's name for msmodelslim checkpoints, accepted so its command lines work as they are.
QUANTIZATIONS = (None, "bitsandbytes", "gguf", "compressed-tensors", "ascend", *INT8_SCHEMES)
MSMODELSLIM_DESCRIPTION = "quant_model_description.json"  # beside an msmodelslim checkpoint's weights


def is_gguf(path: str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def bnb_checkpoint_config(hf_config) -> dict | None:
    """The checkpoint's bitsandbytes quantization_config (a pre-quantized checkpoint), or None."""
    qc = checkpoint_quant_config(hf_config)
    return qc if qc and qc.get("quant_method") == "bitsandbytes" else None


def checkpoint_quant_config(hf_config) -> dict | None:
    """config.json's quantization_config as a dict, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return qc or None


def checkpoint_quant_method(hf_config) -> str | None:
    """The quant_method of config.json's quantization_config (bitsandbytes, compressed-tensors, ...), or None."""
    qc = checkpoint_quant_config(hf_config)
    return qc.get("quant_method") if qc else None


def is_msmodelslim(model_path: str) -> bool:
    """An msmodelslim (Ascend ModelSlim) int8 checkpoint: a directory with quant_model_description.json."""
    return (Path(model_path) / MSMODELSLIM_DESCRIPTION).is_file()


def check_not_quantized_otherwise(config: EngineConfig) -> None:
    """--quantization w8a8 / w8a16 quantizes full-precision weights: a checkpoint already quantized another way
    is refused, clearly, rather than dequantized and quantized twice."""
    if is_msmodelslim(config.model_path):
        if config.quantization not in (None, "ascend"):
            raise ValueError(f"{config.model_path} is an msmodelslim int8 checkpoint ({MSMODELSLIM_DESCRIPTION}), "
                             f"served as stored; load it without --quantization {config.quantization}")
        return
    if config.quantization == "ascend":
        raise ValueError(f"--quantization ascend serves msmodelslim checkpoints, but {config.model_path} has no "
                         f"{MSMODELSLIM_DESCRIPTION}")
    method = checkpoint_quant_method(config.hf_config)
    if config.quantization == "compressed-tensors" and method != "compressed-tensors":
        raise ValueError(f"--quantization compressed-tensors, but {config.model_path} is not a compressed-tensors "
                         "checkpoint (config.json has no such quantization_config)")
    if config.quantization in INT8_SCHEMES and method is not None:
        raise ValueError(f"--quantization {config.quantization} quantizes a full-precision checkpoint, but "
                         f"{config.model_path} is already quantized ({method}); load it without --quantization")
    if config.quantization == "w8a8" and is_gguf(config.model_path):
        from npu_infer.loaders.gguf_as_stored import q8_0_linear_weights
        if q8_0_linear_weights(config.model_path):  # other GGUF types are dequantized first, as full precision
            raise ValueError(f"--quantization w8a8 quantizes a full-precision checkpoint, but {config.model_path}'s "
                             "linears are already int8 (GGUF Q8_0, served as stored as W8A16 with 32-weight groups); "
                             "load it without --quantization")


def detect_load_format(config: EngineConfig) -> str:
    """What `auto` means for this path: gguf, sharded_state, tensorizer, bitsandbytes, or auto (the default
    loader: safetensors, else .bin/.pt)."""
    fmt = config.load_format
    if fmt not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {fmt!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if config.quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {config.quantization!r}; choose one of "
                         f"{', '.join(q for q in QUANTIZATIONS if q)} (or none)")
    if config.quantization == "gguf" and not is_gguf(config.model_path):
        raise ValueError(f"--quantization gguf needs a .gguf file, but {config.model_path} is not one")
    prequantized = bnb_checkpoint_config(config.hf_config) is not None
    check_not_quantized_otherwise(config)
    # bitsandbytes quantizes whatever full checkpoint it is given (safetensors, .bin, GGUF, tensorizer, dummy).
    if fmt != "sharded_state" and (config.quantization == "bitsandbytes" or prequantized):
        return "bitsandbytes"
    return source_format(config) if fmt == "auto" else fmt


def source_format(config: EngineConfig) -> str:
    """The container at config.model_path, judged by what the path holds (bitsandbytes aside)."""
    path = Path(config.model_path)
    if is_gguf(str(path)):
        return "gguf"
    if path.is_dir() and any(path.glob("model-rank-*-part-*.safetensors")):
        return "sharded_state"
    if path.is_dir() and any(path.glob("*.tensors")) and not any(path.glob("*.safetensors")):
        return "tensorizer"
    return "auto"


def iterate_source_weights(config: EngineConfig, fmt: str, owns: Callable[[str], bool] | None = None,
                           int8: Collection[str] = (),
                           int4: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs from a checkpoint in an HF-named format: auto/safetensors/pt, gguf, tensorizer.

    `owns` (the model's owns_weight): GGUF skips the tensors it rejects before dequantizing them, the costly
    part; the other formats yield every tensor (a read, not a conversion) and the model's load_weights skips.
    `int8` / `int4` (GGUF): the Q8_0 / Q4 weights to yield as stored, with their block scales (gguf_as_stored.py)."""
    if fmt in ("auto", "safetensors", "pt"):
        return iterate_weights(weight_files(config.model_path, fmt))
    if fmt == "gguf":
        if not is_gguf(config.model_path):
            raise ValueError(f"--load-format gguf needs a .gguf file, but {config.model_path} is not one")
        from npu_infer.loaders.gguf_loader import iterate_gguf_weights  # lazy: importing gguf takes ~0.1 s
        return iterate_gguf_weights(config.model_path, owns=owns, int8=int8, int4=int4)
    if fmt == "tensorizer":
        return iterate_tensorizer_weights(config.model_path)
    raise ValueError(f"load format {fmt!r} does not hold HF-named full tensors")


def feed_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """model.load_weights(weights), with a tensor that cannot be sliced into its parameter reported by name."""
    current: list = [None]

    def tracked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            current[0] = (name, tuple(tensor.shape))
            yield name, tensor

    try:
        model.load_weights(tracked())
    except RuntimeError as exc:
        if current[0] is None:
            raise
        name, shape = current[0]
        raise ValueError(f"checkpoint tensor {name} of shape {shape} does not match this model "
                         f"({str(exc).splitlines()[0]}); does config.json describe this checkpoint?") from None
