"""Environment variables: read in envs.py only, each documented there and in docs/server.md, read when used."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from npu_infer import envs

REPO = Path(__file__).resolve().parents[1]
# Read only to extend it for a child tool (ninja onto PATH), not to configure npu_infer.
NOT_SETTINGS = {"PATH"}


def environment_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, variable or '?') for each os.environ / os.getenv read; os.environ[...] = and os.environ.pop write."""
    stores = {id(node.value) for node in ast.walk(tree)
              if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del))}
    stores |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "pop"}
    reads = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                and node.attr in ("environ", "getenv")) or id(node) in stores:
            continue
        reads.append(node.lineno)
    names = {}
    for node in ast.walk(tree):  # the literal name beside a read, where there is one
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            names[node.lineno] = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            names.setdefault(node.lineno, node.slice.value)
    return [(line, names.get(line, "?")) for line in reads]


def test_only_envs_reads_the_environment():
    offenders = []
    for path in sorted((REPO / "npu_infer").rglob("*.py")):
        if path.name == "envs.py":
            continue
        for line, name in environment_reads(ast.parse(path.read_text())):
            if name not in NOT_SETTINGS:
                offenders.append(f"{path.relative_to(REPO)}:{line} reads {name}")
    assert offenders == [], "read environment variables through npu_infer/envs.py: " + "; ".join(offenders)


def test_the_check_sees_a_read():
    assert environment_reads(ast.parse('import os\nx = os.environ.get("NPU_INFER_X", "1")')) == [(2, "NPU_INFER_X")]
    assert environment_reads(ast.parse('import os\nx = os.getenv("A")\ny = os.environ["B"]')) == [(2, "A"), (3, "B")]
    assert environment_reads(ast.parse('import os\nos.environ["B"] = "1"\nos.environ.pop("B")')) == []


def test_docs_list_every_variable_as_envs_describes_it():
    assert envs.markdown_table() in (REPO / "docs" / "server.md").read_text()
    assert all(var.doc and "\n" not in var.doc for var in envs.ENV_VARS)


def test_read_when_used_not_at_import(monkeypatch):
    monkeypatch.delenv("NPU_INFER_CPU_KERNELS", raising=False)
    assert envs.NPU_INFER_CPU_KERNELS is True
    monkeypatch.setenv("NPU_INFER_CPU_KERNELS", "0")
    assert envs.NPU_INFER_CPU_KERNELS is False
    monkeypatch.setenv("NPU_INFER_CPU_KV_CACHE_CAP", "1024")
    assert envs.NPU_INFER_CPU_KV_CACHE_CAP == 1024
    monkeypatch.setenv("NPU_INFER_API_KEY", "")
    assert envs.NPU_INFER_API_KEY is None  # set but empty: unset
    with pytest.raises(AttributeError):
        envs.NPU_INFER_NO_SUCH_VARIABLE


def test_a_bad_step_timeout_says_what_to_set(monkeypatch):
    monkeypatch.setenv("NPU_INFER_STEP_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="NPU_INFER_STEP_TIMEOUT='ten' is not a number of seconds"):
        envs.NPU_INFER_STEP_TIMEOUT
