"""--quantization w8a8 / w8a16 on the NPU: the layer torch_npu runs (npu_linear.py), prepared once as vllm-ascend
prepares it, and the whole engine on the device-strict stand-in against the CPU's plain-torch path.

Two comparisons per scheme, on the tiny Qwen2 (QKV biases, GQA):
* NPU against the CPU plain-torch twin: greedy parity as test_e2e_parity.py checks it (near-ties allowed). W8A8
  agrees outright on fewer tokens than bf16 does: per-token activation quantization turns a last-bit difference
  of an activation (the two platforms' norms, rotary and attention round differently) into a whole int8 step, so
  near-ties of these flat random models flip sooner (measured: 33-39 of 64 tokens before the first near-tie, every
  logprob within 0.11 nats until then, medians 0.02-0.03).
* NPU through torch_npu's int8 ops against the same engine on the same stand-in with the plain-torch int8 twin
  (int8_linear.py) in their place: every other op is then identical, and W8A8's formulas are the twin's, so the
  tokens and logprobs are equal exactly; W8A16's differ only by its scale rounded to the model dtype.
An msmodelslim W8A8_DYNAMIC checkpoint takes the same path (the same tokens as its weights quantized on load);
static W8A8 is refused on the NPU."""

from __future__ import annotations

import gc

import pytest
import torch

from npu_infer import LLM, SamplingParams

from . import NpuOpRejected, install, strict_device, uninstall
from ._e2e import compare_greedy

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BF16 = torch.bfloat16
ENGINE = dict(dtype="bfloat16", max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8,
              enable_prefix_caching=True, kv_cache_memory="64MiB", skip_tokenizer_init=True)
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, ignore_eos=True)
INT8_OPS = {"w8a8": ("npu_dynamic_quant", "npu_quant_matmul"), "w8a16": ("npu_weight_quant_batchmatmul",)}


def prompts(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in (300, 170, 40, 5)]


# =========================================================================== the layer

@pytest.fixture
def strict_npu():
    npu = install(strict=True)
    try:
        yield npu, strict_device()
    finally:
        uninstall()


def layer_case(dev, n=48, k=64, seed=0):
    from npu_infer.models.layers.int8_linear import quantize_weight
    g = torch.Generator().manual_seed(seed)
    wq, scale = quantize_weight(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(BF16)
    x = (torch.randn(2, 5, k, generator=g) * 2).to(BF16)
    return [dev.tensor(t) for t in (wq, scale, bias, x)]


def test_w8a8_layer_is_prepared_once_as_vllm_ascend_does_and_equals_the_twin(strict_npu):
    from npu_infer.models.layers.int8_linear import w8a8_linear
    from npu_infer.platform.npu_linear import NpuInt8Linear
    npu, dev = strict_npu
    wq, scale, bias, x = layer_case(dev)
    layer = NpuInt8Linear(wq, scale, bias, "w8a8", BF16)
    assert layer.weight.shape == (64, 48) and torch.equal(layer.weight, wq.t())  # [K, N]
    assert npu.get_npu_format(layer.weight) == 29  # FRACTAL_NZ
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (48,)
    assert layer.bias.dtype == torch.float32
    assert all(t.device.type == "npu" for t in (layer.weight, layer.scale, layer.bias))
    y = layer(x, bias)
    assert y.shape == (2, 5, 48) and y.device.type == "npu"
    assert torch.equal(y, w8a8_linear(x.reshape(10, 64), wq, scale, bias).reshape(2, 5, 48))
    assert torch.equal(layer(x, None), w8a8_linear(x.reshape(10, 64), wq, scale, None).reshape(2, 5, 48))


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_w8a16_layer_takes_its_scale_in_the_model_dtype(strict_npu, dtype):
    from npu_infer.models.layers.int8_linear import w8a16_linear
    from npu_infer.platform.npu_linear import NpuInt8Linear
    npu, dev = strict_npu
    wq, scale, bias, x = layer_case(dev)
    bias, x = bias.to(dtype), x.to(dtype)
    layer = NpuInt8Linear(wq, scale, bias, "w8a16", dtype)
    assert npu.get_npu_format(layer.weight) == 29 and layer.weight.shape == (64, 48)
    assert layer.scale.dtype == dtype  # antiquant_scale must match x
    assert layer.bias.dtype == (torch.float32 if dtype == BF16 else torch.float16)
    y = layer(x, bias)
    twin = w8a16_linear(x.reshape(10, 64), wq, scale, bias).reshape(2, 5, 48)
    # Apart by the rounding of the scale and of the dequantized weight to the model dtype, and of the output.
    torch.testing.assert_close(y.float(), twin.float(), rtol=2 ** -6, atol=2 ** -6 * float(twin.abs().max()))


def test_a_weight_left_untransposed_or_a_scale_left_on_the_host_fails(strict_npu, monkeypatch):
    """The harness can fail: what the real ops refuse, the stand-in refuses."""
    from npu_infer.platform import npu_linear
    npu, dev = strict_npu
    wq, scale, bias, x = layer_case(dev)
    with pytest.raises(RuntimeError, match="argument 'scale' is a host tensor"):
        npu_linear.NpuInt8Linear(wq, scale.cpu(), bias, "w8a8", BF16)(x, bias)
    layer = npu_linear.NpuInt8Linear(wq, scale, bias, "w8a8", BF16)
    layer.weight = npu.npu_format_cast(wq, 29)  # [N, K], as loaded
    with pytest.raises(NpuOpRejected, match="meta_k_same"):
        layer(x, bias)


# =========================================================================== the engine

def run(model: str, device: str, scheme: str, **kwargs):
    llm = LLM(model, device=device, quantization=scheme, **ENGINE, **kwargs)
    outputs = llm.generate(prompts(), PARAMS)
    del llm
    gc.collect()
    return outputs


def run_npu(model: str, scheme: str, monkeypatch, kernels: bool = True):
    """The engine on the strict stand-in; returns (outputs, int8 kernel calls, the int8 layers' tensors)."""
    from npu_infer.platform.npu import NpuPlatform
    npu = install(strict=True)
    calls: dict[str, int] = {}
    layers: list = []
    try:
        for name in ("npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul", "npu_format_cast"):
            def counted(*args, _fn=getattr(npu, name), _name=name, **kw):
                calls[_name] = calls.get(_name, 0) + 1
                return _fn(*args, **kw)
            monkeypatch.setattr(npu, name, counted)
        prepare = NpuPlatform.prepare_model

        def recording_prepare(self, model, dtype):
            if kernels:
                prepare(self, model, dtype)
            layers.extend((npu.get_npu_format(m.weight), m.weight.shape, m.weight.device.type, m.weight_scale.dtype,
                           m.weight_scale.device.type, type(m.platform_matmul).__name__)
                          for m in model.modules() if getattr(m, "quant_scheme", None))
        monkeypatch.setattr(NpuPlatform, "prepare_model", recording_prepare)
        outputs = run(model, "npu", scheme)
        assert strict_device().unpinned_copies == []
    finally:
        monkeypatch.undo()
        uninstall()
    return outputs, calls, layers


def cpu_plain_torch(model: str, scheme: str):
    from conftest import set_cpu_kernels
    set_cpu_kernels(False)
    try:
        return run(model, "cpu", scheme)
    finally:
        set_cpu_kernels(True)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_int8_on_the_npu_matches_the_cpu_twin(scheme, tiny_qwen2_dir, monkeypatch):
    model = str(tiny_qwen2_dir)
    cpu = cpu_plain_torch(model, scheme)
    npu, calls, layers = run_npu(model, scheme, monkeypatch)
    twin, twin_calls, _ = run_npu(model, scheme, monkeypatch, kernels=False)

    # 2 decoder layers x (qkv, o, gate_up, down), each prepared once: [K, N] in NZ, its scale on the device.
    assert len(layers) == 8 and calls.get("npu_format_cast") == 8
    scale_dtype = torch.float32 if scheme == "w8a8" else BF16
    for fmt, shape, where, s_dtype, s_where, impl in layers:
        assert (fmt, where, s_dtype, s_where, impl) == (29, "npu", scale_dtype, "npu", "NpuInt8Linear")
    assert {tuple(layer[1]) for layer in layers} == {(64, 128), (64, 64), (64, 256), (128, 64)}  # qkv, o, gate_up, down
    assert all(calls.get(op) for op in INT8_OPS[scheme]), calls
    assert not any(twin_calls.get(op) for op in INT8_OPS[scheme]), twin_calls

    compare_greedy(cpu, npu, min_agreement=0.4 if scheme == "w8a8" else 0.6)
    if scheme == "w8a8":  # the twin's formulas: equal to the last bit
        assert [o.outputs[0].token_ids for o in npu] == [o.outputs[0].token_ids for o in twin]
        assert [o.outputs[0].logprobs for o in npu] == [o.outputs[0].logprobs for o in twin]
    else:
        compare_greedy(twin, npu, min_agreement=0.6)


def test_w8a8_is_refused_on_atlas_300i(npu):
    from npu_infer.config import EngineConfig
    from npu_infer.platform import NpuPlatform

    from . import _namespace
    _namespace.state["device_name"] = "Ascend310P3"

    class HF:
        max_position_embeddings = 512
    with pytest.raises(ValueError, match=r"^--quantization w8a8 is not supported on Atlas 300I \(310P\).*w8a16$"):
        EngineConfig(model="m", quantization="w8a8").resolve(HF(), NpuPlatform())
    config = EngineConfig(model="m", quantization="w8a16")
    config.resolve(HF(), NpuPlatform())
    assert config.torch_dtype == torch.float16  # what 310P serves


def test_an_msmodelslim_checkpoint_runs_on_the_npu_as_its_weights_quantized_on_load(tiny_qwen2_dir, tmp_path,
                                                                                  monkeypatch):
    """W8A8_DYNAMIC from quant_model_description.json takes the same torch_npu path, with the same weights."""
    from loaders.msmodelslim_writer import write_msmodelslim
    ckpt = write_msmodelslim(tiny_qwen2_dir, tmp_path / "msmodelslim")
    with pytest.MonkeyPatch.context() as env:  # run_npu undoes `monkeypatch`; this outlives both runs
        env.setenv("NPU_INFER_W8A8_SMOOTHING", "0")  # the checkpoint holds plain per-channel weights
        served, calls, layers = run_npu(str(ckpt), None, monkeypatch)
        on_load, _, _ = run_npu(str(tiny_qwen2_dir), "w8a8", monkeypatch)
    assert len(layers) == 8 and calls.get("npu_quant_matmul")
    assert [o.outputs[0].token_ids for o in served] == [o.outputs[0].token_ids for o in on_load]
    assert [o.outputs[0].logprobs for o in served] == [o.outputs[0].logprobs for o in on_load]


def test_static_w8a8_is_refused_on_the_npu_in_one_sentence(tiny_llama_dir, tmp_path):
    from loaders.msmodelslim_writer import write_msmodelslim
    ckpt = write_msmodelslim(tiny_llama_dir, tmp_path / "static", "W8A8")
    install(strict=True)
    try:
        with pytest.raises(ValueError, match=r"^static W8A8 \(an msmodelslim 'W8A8' checkpoint\) is served on the "
                                             "CPU only for now: .*serve a W8A8_DYNAMIC checkpoint$"):
            LLM(str(ckpt), device="npu", **ENGINE)
    finally:
        uninstall()
        gc.collect()


def test_an_int8_lm_head_runs_through_torch_npus_int8_ops(tiny_qwen2_dir, monkeypatch):
    """NPU_INFER_INT8_LM_HEAD=1: the (tied) LM head is prepared and run like the decoder's linears, and the engine
    agrees with the CPU plain-torch twin under the same setting."""
    model = str(tiny_qwen2_dir)
    monkeypatch.setenv("NPU_INFER_INT8_LM_HEAD", "1")
    cpu = cpu_plain_torch(model, "w8a8")
    monkeypatch.setenv("NPU_INFER_INT8_LM_HEAD", "1")  # run_npu undoes the monkeypatch when it ends
    npu, calls, layers = run_npu(model, "w8a8", monkeypatch)
    assert len(layers) == 9 and calls.get("npu_format_cast") == 9  # 8 decoder linears and the head
    assert sum(tuple(layer[1]) == (64, 256) for layer in layers) == 3  # 2 gate_up and the head [hidden, vocab]
    assert all(layer[0] == 29 and layer[2] == "npu" and layer[5] == "NpuInt8Linear" for layer in layers)
    compare_greedy(cpu, npu, min_agreement=0.4)
