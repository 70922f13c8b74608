"""The stand-in's signatures match torch_npu 2.14.0's own declarations (declarations.json, from the wheel)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import ALL_OPS, CONSTRAINTS_RELIED_ON, EVIDENCE_RELIED_ON, TORCH_NPU_VERSION
from . import __doc__ as PACKAGE_DOC

REPO = Path(__file__).resolve().parents[2]
OPS = ["npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_fused_infer_attention_score",
       "_npu_reshape_and_cache", "_npu_paged_attention", "_npu_rotary_embedding",
       "npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul", "npu_format_cast", "get_npu_format"]


def test_declarations_come_from_the_followed_version(declarations):
    assert declarations["torch_npu_version"] == TORCH_NPU_VERSION == "2.14.0"
    assert declarations["wheel"].startswith("torch_npu-2.14.0-")
    assert sorted(declarations["ops"]) == sorted(OPS)


@pytest.mark.parametrize("op", OPS)
def test_signature_matches_declaration(op, declarations):
    decl = declarations["ops"][op]
    assert decl["schema"], f"{op}: no schema recorded (re-run the extractor with binary schemas)"
    fn = ALL_OPS[op]
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == [d["name"] for d in decl["params"]], "names / order"
    for p, d in zip(params, decl["params"]):
        assert p.kind == (p.KEYWORD_ONLY if d["kwarg_only"] else p.POSITIONAL_OR_KEYWORD), f"{p.name}: keyword-only mark"
        assert (p.default is not p.empty) == d["has_default"], f"{p.name}: has a default"
        if d["has_default"]:
            assert p.default == d["default"] and type(p.default) is type(d["default"]), f"{p.name}: default"
    assert fn.__returns__ == decl["return_arity"], "return arity"


@pytest.mark.parametrize("op", OPS)
def test_relied_on_constraints_are_recorded(op, declarations):
    recorded = declarations["ops"][op]["constraints"]
    missing = [cid for cid in CONSTRAINTS_RELIED_ON[op] if cid not in recorded]
    assert not missing, f"{op}: constraints the stand-in enforces but declarations.json lacks: {missing}"
    for cid in CONSTRAINTS_RELIED_ON[op]:
        assert recorded[cid]["quote"].strip()


def test_binary_evidence_is_recorded(declarations):
    assert set(EVIDENCE_RELIED_ON) <= set(declarations["binary_evidence"])


def test_atb_schemas_agree_with_the_header(declarations):
    for op in ("_npu_reshape_and_cache", "_npu_paged_attention", "_npu_rotary_embedding"):
        decl = declarations["ops"][op]
        assert [p["name"] for p in decl["params"]] == [p["name"] for p in decl["header_params"]]


def test_module_docstring_says_standin_and_version(npu):
    for doc in (PACKAGE_DOC, npu.__doc__):
        assert "STAND-IN" in doc and "NOT the real library" in doc
        assert "torch_npu\n2.14.0" in doc or "torch_npu 2.14.0" in doc
    assert npu.__standin__ is True and npu.__version__ == "2.14.0"


def test_npu_infer_never_imports_the_standin():
    pattern = re.compile(r"^\s*(from|import)\s+[\w.]*npu_standin|import_module\([^)]*npu_standin", re.MULTILINE)
    hits = [str(p.relative_to(REPO)) for p in (REPO / "npu_infer").rglob("*.py")
            if pattern.search(p.read_text(encoding="utf-8"))]
    assert not hits
    # From the repository root (what `import npu_infer` sees) the stand-in is not importable.
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('npu_standin'))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None"


def test_npu_modules_import_torch_npu_lazily():
    # Importing the NPU kernel modules must not import torch_npu (CPU/CUDA users do not have it).
    code = ("import sys; import npu_infer.platform.npu_attention, npu_infer.platform.npu_ops; "
            "print('torch_npu' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# =========================================================================== torch.npu namespace

NAMESPACE_FUNCS = ["is_available", "device_count", "set_device", "current_device", "synchronize", "empty_cache",
                   "mem_get_info", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                   "set_compile_mode", "get_device_name", "get_device_properties"]


def test_namespace_declarations_cover_what_the_standin_offers(declarations):
    from . import _namespace
    offered = sorted(fn.__name__ for fn in _namespace.FUNCTIONS)
    assert offered == sorted(NAMESPACE_FUNCS) == sorted(declarations["namespace"]["functions"])


@pytest.mark.parametrize("name", NAMESPACE_FUNCS)
def test_namespace_signature_matches_declaration(name, declarations, npu):
    decl = declarations["namespace"]["functions"][name]
    assert decl["source"].startswith("torch_npu/npu/")
    params = list(inspect.signature(getattr(npu.npu, name)).parameters.values())
    assert [p.name for p in params] == [d["name"] for d in decl["params"]], "names / order"
    for p, d in zip(params, decl["params"]):
        assert p.kind == (p.KEYWORD_ONLY if d["kwarg_only"] else p.POSITIONAL_OR_KEYWORD), f"{p.name}: kind"
        assert (p.default is not p.empty) == d["has_default"], f"{p.name}: has a default"
        if d["has_default"]:
            assert p.default == d["default"] and type(p.default) is type(d["default"]), f"{p.name}: default"


def test_runtime_options_match_declarations(declarations, npu):
    """set_compile_mode and config.allow_internal_format set the options torch_npu's own code sets."""
    from . import _namespace, runtime_options
    ns = declarations["namespace"]
    compile_opts = ns["functions"]["set_compile_mode"]["runtime_options"]
    assert compile_opts == [{"jitCompile": ["disable", "enable"]}]
    config = ns["objects"]["config"]
    assert config["readable"] is False
    assert sorted(config["settable_attributes"]) == sorted(_namespace._NpuConfig._OPTIONS)
    for attr, entry in config["settable_attributes"].items():
        (option, values), = entry["runtime_options"][0].items()
        assert _namespace._NpuConfig._OPTIONS[attr] == option and values == ["disable", "enable"]
    npu.npu.set_compile_mode(jit_compile=False)
    npu.npu.config.allow_internal_format = False
    assert runtime_options() == {"jitCompile": "disable", "ALLOW_INTERNAL_FORMAT": "disable"}
    with pytest.raises(AttributeError):  # write-only, as torch_npu's _npuConfig
        npu.npu.config.allow_internal_format
    with pytest.raises(AttributeError, match="no option"):  # a typo would be silently ignored by torch_npu
        npu.npu.config.allow_internal_formats = False
