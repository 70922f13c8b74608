"""--load-format name -> the loader that fills the model's weights (format detection: formats.py)."""
from __future__ import annotations

import dataclasses
import logging
import time

from torch import nn

from npu_infer import envs
from npu_infer.config import EngineConfig
from npu_infer.loaders.bitsandbytes_loader import load_bitsandbytes
from npu_infer.loaders.compressed_tensors import load_compressed_tensors
from npu_infer.loaders.dummy_loader import fill_dummy_weights
from npu_infer.loaders.formats import (checkpoint_quant_config, checkpoint_quant_method, detect_load_format,
                                       feed_weights, is_msmodelslim, iterate_source_weights)
from npu_infer.loaders.gguf_as_stored import prepare_q4_layers, prepare_q8_0_layers, serve_q8_0_head_as_stored
from npu_infer.loaders.msmodelslim import load_msmodelslim
from npu_infer.loaders.sharded_state import load_sharded_state
from npu_infer.models.layers.embedding import quantize_lm_head_int8
from npu_infer.models.layers.int4_linear import check_int4
from npu_infer.models.layers.int8_linear import INT8_SCHEMES, check_int8_scales
from npu_infer.models.layers.linear import quantize_linears_int8
from npu_infer.models.layers.smooth_quant import (CALIBRATION_SEQ_LEN, activation_ranges, calibration_token_ids,
                                                  smooth_decoder_layers)

logger = logging.getLogger(__name__)


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
    elif is_msmodelslim(config.model_path):  # int8, served as it is stored
        load_msmodelslim(model, config)
    elif checkpoint_quant_method(config.hf_config) == "compressed-tensors":  # int8, served as it is stored
        load_compressed_tensors(model, config, checkpoint_quant_config(config.hf_config))
    else:
        int8 = prepare_q8_0_layers(model, config) if fmt == "gguf" else set()  # Q8_0 linears, served as stored
        int4 = prepare_q4_layers(model, config) if fmt == "gguf" else set()  # Q4 ones, with --quantization gguf
        feed_weights(model, iterate_source_weights(config, fmt, getattr(model, "owns_weight", None), int8, int4))
        if int8:
            check_int8_scales(model)
        if int4:
            check_int4(model)
        if fmt == "gguf" and serve_q8_0_head_as_stored(model, config):
            check_int8_scales(model)
    if config.quantization in INT8_SCHEMES:  # quantize on load, whatever the full-precision source
        if config.quantization == "w8a8" and envs.NPU_INFER_W8A8_SMOOTHING > 0:
            smooth_for_w8a8(model, config)
        group = envs.NPU_INFER_W8A16_GROUP_SIZE if config.quantization == "w8a16" else 0
        quantize_linears_int8(model, config.quantization, group or None)
        if envs.NPU_INFER_INT8_LM_HEAD:
            quantize_lm_head_int8(model, config.quantization, group or None)


def smooth_for_w8a8(model: nn.Module, config: EngineConfig) -> None:
    """SmoothQuant (smooth_quant.py): run the calibration text through the full-precision model, as one no-cache
    prefill step of every rank (TP and PP ranks load at the same time), then fold the factors into the weights."""
    from npu_infer.loaders.hf_files import load_tokenizer
    from npu_infer.sampling import SamplingParams
    from npu_infer.worker.model_runner import ModelRunner
    from npu_infer.worker.step_io import NewRequest, SeqChunk, StepInput

    hf = config.hf_config
    try:  # the tokenizer even with skip_tokenizer_init: `npu-infer quantize` and serving must calibrate alike
        tokenizer = load_tokenizer(dataclasses.replace(config, skip_tokenizer_init=False))
    except (OSError, ValueError):
        tokenizer = None
    longest = getattr(hf, "max_position_embeddings", None) or CALIBRATION_SEQ_LEN
    sequences = [ids[:longest] for ids in calibration_token_ids(tokenizer, hf.vocab_size) if ids]
    runner = ModelRunner(model, next(model.parameters()).device, config.block_size, hf.hidden_size,
                         config.torch_dtype)
    params = SamplingParams(max_tokens=1, temperature=0)
    step = StepInput([SeqChunk(f"calibrate-{i}", ids, 0, [0] * -(-len(ids) // config.block_size), True)
                      for i, ids in enumerate(sequences)],
                     [NewRequest(f"calibrate-{i}", params, num_prompt_tokens=len(ids), token_ids=ids)
                      for i, ids in enumerate(sequences)])
    started = time.perf_counter()
    ranges = activation_ranges(model, lambda: runner.execute(step))
    alpha = envs.NPU_INFER_W8A8_SMOOTHING
    model.smoothquant_factors = smooth_decoder_layers(model, ranges, alpha)
    logger.info("w8a8: SmoothQuant (alpha %.2f) on %d layers from %d calibration tokens in %.1f s", alpha,
                len(model.smoothquant_factors),
                sum(map(len, sequences)), time.perf_counter() - started)
