"""npu_infer.loaders.gguf_dequant vs the reference NumPy code in ``gguf.quants``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from npu_infer.loaders import gguf_dequant
from npu_infer.loaders.gguf_dequant import SUPPORTED_TYPES, dequantize, is_supported

# types gguf-py can quantize itself (real encoder output as test data)
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# K-quants: gguf-py only dequantizes them -> random block bytes; byte offsets
# of the fp16 scale fields (which must be finite) inside one block.
K_QUANT_F16_FIELDS = {
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def _reference(data: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def _random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in K_QUANT_F16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def test_supported_types_cover_the_brief():
    for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K):
        assert t in SUPPORTED_TYPES and is_supported(t) and is_supported(int(t))
    assert not is_supported(T.IQ2_XXS)
    assert not is_supported(9999)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(8, 512), (3, 2, 256), (64,)], ids=str)
def test_quantizable_types_match_gguf(qtype, shape):
    rng = np.random.default_rng(int(qtype) * 7 + len(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    data = gguf.quants.quantize(x, qtype)
    ref = _reference(data, qtype)
    out = dequantize(data, qtype, shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape and out.is_contiguous()
    assert torch.equal(out, ref)
    # shape inferred from the array like gguf does, and torch input
    assert torch.equal(dequantize(data, qtype), ref)
    assert torch.equal(dequantize(torch.from_numpy(np.ascontiguousarray(data)), qtype, shape), ref)
    # sanity: close to the input (quantization error only)
    assert torch.allclose(out, torch.from_numpy(x), atol=float(np.abs(x).max()) / 4)


@pytest.mark.parametrize("qtype", list(K_QUANT_F16_FIELDS), ids=lambda t: t.name)
def test_k_quants_match_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    data = _random_k_blocks(qtype, 6, 1024, rng)
    ref = _reference(data, qtype)
    assert torch.isfinite(ref).all()
    out = dequantize(data, qtype, (6, 1024))
    assert tuple(out.shape) == (6, 1024)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_read_only_memmap_input_and_no_aliasing(tmp_path):
    """GGUFReader hands out read-only memmaps; results must own their memory."""
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for qtype in (T.F32, T.Q8_0):
        data = gguf.quants.quantize(x, qtype)
        f = tmp_path / f"{qtype.name}.bin"
        data.tofile(f)
        mm = np.memmap(f, dtype=data.dtype, mode="r", shape=data.shape)
        out = dequantize(mm, qtype, (4, 64))
        assert torch.equal(out, _reference(data, qtype))
        out += 1  # writable, does not touch the file
        assert np.array_equal(np.asarray(mm), data)


def test_chunked_path_matches(monkeypatch):
    """Large tensors are decoded in chunks: force tiny chunks and compare."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 256)).astype(np.float32)
    data_q4 = gguf.quants.quantize(x, T.Q4_1)
    data_k = _random_k_blocks(T.Q6_K, 10, 256, rng)
    monkeypatch.setattr(gguf_dequant, "_CHUNK_ELEMENTS", 96)  # 3 blocks of 32 / <1 block of 256
    assert torch.equal(dequantize(data_q4, T.Q4_1, (10, 256)), _reference(data_q4, T.Q4_1))
    assert torch.equal(dequantize(data_k, T.Q6_K, (10, 256)), _reference(data_k, T.Q6_K))


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unsupported GGML tensor type IQ2_XXS.*Q4_K"):
        dequantize(np.zeros((1, 66), dtype=np.uint8), T.IQ2_XXS, (1, 256))
    with pytest.raises(ValueError, match="Unsupported GGML tensor type"):
        dequantize(np.zeros(4, dtype=np.uint8), 9999, (1,))


def test_wrong_byte_count_is_an_error():
    data = gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="needs 102 bytes, got 136"):
        dequantize(data, T.Q8_0, (3, 32))
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        dequantize(data, T.Q8_0, (2, 60))
