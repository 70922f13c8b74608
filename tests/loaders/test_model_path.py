"""--model as a directory, a file, or a model id found in the local ModelScope or Hugging Face cache (no network)."""
from __future__ import annotations

import pytest

from npu_infer.loaders.model_path import resolve_model_path

MODEL_ID = "Qwen/Qwen2-0.5B-Instruct"


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Point every cache at empty folders, so the machine's own caches cannot answer."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def fake_model(directory):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    return directory


def test_local_directory_and_file_are_taken_as_they_are(tmp_path):
    d = fake_model(tmp_path / "m")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(d)) == str(d)
    assert resolve_model_path(str(gguf)) == str(gguf)


def test_tensors_file_stands_for_its_directory(tmp_path):
    d = fake_model(tmp_path / "tz")
    (d / "model.tensors").write_bytes(b"")
    assert resolve_model_path(str(d / "model.tensors")) == str(d)


@pytest.mark.parametrize("layout", ["hub", "hub/models"])
def test_modelscope_cache_with_dots_written_as_triple_underscores(tmp_path, layout):
    d = fake_model(tmp_path / "modelscope" / layout / "Qwen" / "Qwen2-0___5B-Instruct")
    assert resolve_model_path(MODEL_ID) == str(d)


def test_modelscope_cache_defaults_to_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELSCOPE_CACHE")
    d = fake_model(tmp_path / "home" / ".cache" / "modelscope" / "hub" / "Qwen" / "Qwen2-0___5B-Instruct")
    assert resolve_model_path(MODEL_ID) == str(d)


def test_hf_cache_snapshot_named_by_refs_main(tmp_path):
    repo = tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen2-0.5B-Instruct"
    fake_model(repo / "snapshots" / "old")
    new = fake_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert resolve_model_path(MODEL_ID) == str(new)


def test_hf_hub_cache_variable_wins_over_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    d = fake_model(tmp_path / "elsewhere" / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / "r1")
    assert resolve_model_path(MODEL_ID) == str(d)


def test_modelscope_is_looked_at_before_hf(tmp_path):
    ms = fake_model(tmp_path / "modelscope" / "hub" / "Qwen" / "Qwen2-0___5B-Instruct")
    fake_model(tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / "r1")
    assert resolve_model_path(MODEL_ID) == str(ms)


def test_missing_model_id_names_the_places_looked_in(tmp_path):
    with pytest.raises(ValueError) as exc:
        resolve_model_path(MODEL_ID)
    message = str(exc.value)
    assert "not in the ModelScope or Hugging Face cache" in message
    assert str(tmp_path / "modelscope" / "hub" / "Qwen" / "Qwen2-0___5B-Instruct") in message
    assert str(tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen2-0.5B-Instruct") in message
    assert "modelscope download --model Qwen/Qwen2-0.5B-Instruct" in message


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere" / "model"))


def test_engine_finds_a_cached_model_id(tmp_path, tiny_llama_dir):
    """End to end: LLM("org/name") runs the model from the ModelScope cache."""
    import shutil

    from npu_infer import LLM, SamplingParams
    target = tmp_path / "modelscope" / "hub" / "tiny-org" / "tiny-llama-0___1B"
    shutil.copytree(tiny_llama_dir, target)
    llm = LLM("tiny-org/tiny-llama-0.1B", device="cpu", dtype="float32", kv_cache_memory="4MiB",
              skip_tokenizer_init=True, max_model_len=64, max_num_batched_tokens=64, max_num_seqs=2)
    assert llm.engine.config.model_path == str(target)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
