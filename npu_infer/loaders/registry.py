"""--load-format name -> the loader that fills the model's weights (format detection: formats.py)."""
from __future__ import annotations

from torch import nn

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.loaders.bitsandbytes_loader import load_bitsandbytes
from npu_infer.loaders.compressed_tensors import load_compressed_tensors
from npu_infer.loaders.dummy_loader import fill_dummy_weights
from npu_infer.loaders.formats import (checkpoint_quant_config, checkpoint_quant_method, detect_load_format,
                                       feed_weights, iterate_source_weights)
from npu_infer.loaders.gguf_q8_0 import prepare_q8_0_layers
from npu_infer.loaders.sharded_state import load_sharded_state
from npu_infer.models.layers.int8_linear import INT8_SCHEMES, check_int8_scales
from npu_infer.models.layers.linear import quantize_linears_int8


def load_weights(model: nn.Module, config: EngineConfig, rank: int = 0) -> None:
    """Fill `model` (already built on its device, already TP/PP-sharded) from config.model_path.

    `rank` is the worker's global rank (sharded_state reads that rank's file)."""
    fmt = detect_load_format(config)
    if fmt == "dummy":
        fill_dummy_weights(model, config.seed)
    elif fmt == "sharded_state":
        load_sharded_state(model, config, rank)
    elif fmt == "bitsandbytes":
        load_bitsandbytes(model, config)
    elif checkpoint_quant_method(config.hf_config) == "compressed-tensors":  # int8, served as it is stored
        load_compressed_tensors(model, config, checkpoint_quant_config(config.hf_config))
    else:
        int8 = prepare_q8_0_layers(model, config) if fmt == "gguf" else set()  # Q8_0 linears, served as stored
        feed_weights(model, iterate_source_weights(config, fmt, getattr(model, "owns_weight", None), int8))
        if int8:
            check_int8_scales(model)
    if config.quantization in INT8_SCHEMES:  # quantize on load, whatever the full-precision source
        group = envs.NPU_INFER_W8A16_GROUP_SIZE if config.quantization == "w8a16" else 0
        quantize_linears_int8(model, config.quantization, group or None)
