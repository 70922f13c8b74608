"""A missing optional package is one line naming the extra to install: MissingDependencyError offline, exit code 2
and no traceback from the command line. Each package is hidden (a None entry in sys.modules makes its import fail
exactly as when it is not installed)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npu_infer import LLM
from npu_infer.optional_deps import EXTRAS, MissingDependencyError, install_command

REPO = Path(__file__).resolve().parents[1]
CASES = {  # hidden module -> the LLM kwargs and server flags that need it
    "tensorizer": ({"load_format": "tensorizer"}, ["--load-format", "tensorizer"]),
    "bitsandbytes": ({"quantization": "bitsandbytes"}, ["--quantization", "bitsandbytes"]),
    "torch_npu": ({"device": "npu"}, ["--device", "npu"]),
    "compressed_tensors": ({}, []),  # the model: a compressed-tensors checkpoint (model_for)
}


def model_for(module: str, tiny_llama_dir: Path, tmp_path: Path) -> str:
    """The tiny model; for compressed_tensors, a copy whose config.json says it is a compressed-tensors checkpoint."""
    if module != "compressed_tensors":
        return str(tiny_llama_dir)
    out = tmp_path / "ct"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_every_extra_module_has_a_case():
    assert set(CASES) == set(EXTRAS)


@pytest.mark.parametrize("module", sorted(CASES))
def test_offline_raises_missing_dependency_error(module, monkeypatch, tiny_llama_dir, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    kwargs, _ = CASES[module]
    with pytest.raises(MissingDependencyError) as info:
        LLM(model_for(module, tiny_llama_dir, tmp_path), kv_cache_memory="16MiB", skip_tokenizer_init=True, **kwargs)
    assert install_command(module) in str(info.value)
    assert install_command(module) == f'pip install "npu_infer[{EXTRAS[module]}]"'


def _run_hidden(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None; from npu_infer.cli import main; "
            f"sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("module", sorted(CASES))
def test_command_line_says_one_line_and_exits_2(module, tiny_llama_dir, tmp_path):
    _, flags = CASES[module]
    out = _run_hidden(module, ["serve", "--model", model_for(module, tiny_llama_dir, tmp_path), "--kv-cache-memory", "16MiB", "--skip-tokenizer-init", *flags])
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and install_command(module) in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_tensorize_without_tensorizer(tiny_llama_dir, tmp_path):
    out = _run_hidden("tensorizer", ["tensorize", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "t")])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        'error: --load-format tensorizer needs the tensorizer package, which is not installed: '
        'pip install "npu_infer[tensorizer]"']
