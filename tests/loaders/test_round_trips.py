"""Lossless formats: write a tiny model with our tools, load it back, and get the very same model — every parameter
bit-identical, the same greedy tokens and the same logprobs (prompt and generated) as from the original checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from npu_infer import LLM, SamplingParams
from npu_infer.cli import main as cli_main
from npu_infer.loaders.conversion import source_config
from npu_infer.loaders.save_sharded_state import as_rank, build_rank_model, save_sharded_state
from npu_infer.loaders.sharded_state import rank_state

PROMPTS = [[1, 5, 9, 30, 7], list(range(40, 73))]


def make_llm(path, **kwargs) -> LLM:
    args = dict(device="cpu", dtype="float32", kv_cache_memory="4MiB", skip_tokenizer_init=True, max_model_len=128,
                max_num_seqs=4, max_num_batched_tokens=128)
    args.update(kwargs)
    return LLM(str(path), **args)


def run(llm: LLM) -> list[tuple[list[int], list, list]]:
    """Greedy tokens, their top-5 logprobs, and the prompt's top-5 logprobs, per prompt."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    flat = lambda dicts: [None if d is None else {t: lp.logprob for t, lp in d.items()} for d in dicts]  # noqa: E731
    return [(o.outputs[0].token_ids, flat(o.outputs[0].logprobs), flat(o.prompt_logprobs)) for o in outs]


def model_of(llm: LLM) -> torch.nn.Module:
    return llm.engine.executor.worker.model


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def source(request, tiny_llama_dir, tiny_qwen2_dir):
    """(checkpoint dir, the engine's model and outputs from it) — the reference every format must reproduce."""
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    llm = make_llm(path)
    return path, model_of(llm), run(llm)


def write_pt(src, out):
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(str(src / "model.safetensors"))
    torch.save(state, out / "pytorch_model.bin")
    return out


def write_sharded_index(src, out):
    """The same tensors split over two safetensors files with a model.safetensors.index.json."""
    from safetensors.torch import save_file
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def write_with_cli(command):
    def write(src, out):
        assert cli_main([command, "--model", str(src), "--output", str(out)]) == 0
        return out
    return write


WRITERS = {
    "safetensors-index": (write_sharded_index, "safetensors"),
    "pt": (write_pt, "pt"),
    "sharded_state": (write_with_cli("save-sharded-state"), "sharded_state"),
    "tensorizer": (write_with_cli("tensorize"), "tensorizer"),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("load_format", ["explicit", "auto"])
def test_round_trip_gives_the_same_model_and_outputs(source, fmt, load_format, tmp_path):
    path, ref_model, ref_outputs = source
    writer, name = WRITERS[fmt]
    out = writer(path, tmp_path / fmt)
    llm = make_llm(out, load_format=name if load_format == "explicit" else "auto")
    assert_same_model(model_of(llm), ref_model)
    assert run(llm) == ref_outputs


def test_tensorizer_file_path_stands_for_its_directory(tiny_qwen2_dir, tmp_path):
    assert cli_main(["tensorize", "--model", str(tiny_qwen2_dir), "--output", str(tmp_path / "tz")]) == 0
    assert {"config.json", "model.tensors"} <= {p.name for p in (tmp_path / "tz").iterdir()}
    by_file = make_llm(tmp_path / "tz" / "model.tensors", load_format="tensorizer")
    assert_same_model(model_of(by_file), model_of(make_llm(tiny_qwen2_dir)))


def test_tensorizer_dtype_conversion(tiny_llama_dir, tmp_path):
    from npu_infer.loaders.tensorize import tensorize_model
    from npu_infer.loaders.tensorizer_loader import iterate_tensorizer_weights
    target = tensorize_model(str(tiny_llama_dir), str(tmp_path / "bf16"), dtype="bfloat16")
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    streamed = dict(iterate_tensorizer_weights(str(target.parent)))
    assert streamed.keys() == original.keys()
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].bfloat16())


def test_tensorize_a_gguf_file_loads_like_the_gguf(write_tiny_gguf, tmp_path):
    gguf_path, _ = write_tiny_gguf("llama", quant=True)
    from npu_infer.loaders.tensorize import tensorize_model
    tensorize_model(gguf_path, str(tmp_path / "from-gguf"))
    from_gguf = make_llm(gguf_path)
    from_tensors = make_llm(tmp_path / "from-gguf", load_format="tensorizer")
    assert_same_model(model_of(from_tensors), model_of(from_gguf))
    assert run(from_tensors) == run(from_gguf)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_sharded_state_rank_files_hold_each_ranks_own_shard(tiny_qwen2_dir, tmp_path, tp, pp):
    """Each rank's file is exactly what that rank builds from the original checkpoint; loading it needs no slicing."""
    files = save_sharded_state(str(tiny_qwen2_dir), str(tmp_path / "out"), tensor_parallel_size=tp,
                               pipeline_parallel_size=pp)
    assert sorted(f.name for f in files) == [f"model-rank-{r}-part-0.safetensors" for r in range(tp * pp)]
    from npu_infer.config import EngineConfig
    from npu_infer.loaders.registry import load_weights
    reference = source_config(str(tiny_qwen2_dir), "float32", tensor_parallel_size=tp, pipeline_parallel_size=pp)
    loaded_cfg = source_config(str(tmp_path / "out"), "float32", tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert isinstance(loaded_cfg, EngineConfig)
    for rank in range(tp * pp):
        expected = rank_state(build_rank_model(reference, rank))
        saved = load_file(str(tmp_path / "out" / f"model-rank-{rank}-part-0.safetensors"))
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[n], expected[n]) for n in saved)
        # And the loader puts them back into a fresh rank model by name.
        with as_rank(tp, pp, rank):
            from npu_infer.models.registry import get_model_class
            model = get_model_class(loaded_cfg.hf_config)(loaded_cfg.hf_config)
        load_weights(model, loaded_cfg, rank)
        assert all(torch.equal(t, expected[n]) for n, t in rank_state(model).items())
    if tp == 2:  # the column-parallel QKV of rank 1 is really a different half
        r0 = load_file(str(tmp_path / "out" / "model-rank-0-part-0.safetensors"))
        r1 = load_file(str(tmp_path / "out" / "model-rank-1-part-0.safetensors"))
        name = next(n for n in r0 if n.endswith("qkv_proj.weight"))
        assert r0[name].shape == r1[name].shape and not torch.equal(r0[name], r1[name])


def test_sharded_state_splits_large_ranks_into_parts(tiny_llama_dir, tmp_path):
    files = save_sharded_state(str(tiny_llama_dir), str(tmp_path / "parts"), max_file_size=64 * 1024)
    assert len(files) > 1 and all("rank-0-part-" in f.name for f in files)
    assert_same_model(model_of(make_llm(tmp_path / "parts")), model_of(make_llm(tiny_llama_dir)))


def test_sharded_state_from_tp2_runs_with_two_workers(tiny_qwen2_dir, tmp_path):
    """End to end with the multi-process executor (gloo), when that executor exists."""
    pytest.importorskip("npu_infer.worker.multiproc_executor")
    save_sharded_state(str(tiny_qwen2_dir), str(tmp_path / "tp2"), tensor_parallel_size=2)
    expected = run(make_llm(tiny_qwen2_dir, tensor_parallel_size=2))
    got = run(make_llm(tmp_path / "tp2", tensor_parallel_size=2))
    assert [g[0] for g in got] == [e[0] for e in expected]
