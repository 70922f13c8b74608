"""Imports: no cycle among npu_infer's modules, and every module imports on its own in a fresh interpreter.

A cycle hidden by an import inside a function still counts: hoisting that import (a common lint fix) would break
start-up, so only imports that never run (under `if TYPE_CHECKING:`) are left out of the graph."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_files(root: Path = REPO) -> dict[str, Path]:
    """npu_infer's modules by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((root / "npu_infer").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(root: Path = REPO) -> dict[str, dict[str, int]]:
    """module -> {npu_infer module it imports: line}, wherever the import stands (module level or in a function)."""
    modules = module_files(root)

    def resolve(name: str) -> str | None:  # the module that a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str | None]:
        if isinstance(node, ast.Import):
            return {resolve(alias.name) for alias in node.names}
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # `from a import b` imports the module a.b when there is one, else a name of a.
        return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else resolve(base) for a in node.names}

    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        pending = list(ast.parse(path.read_text(encoding="utf-8")).body)
        while pending:
            node = pending.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                pending.extend(node.orelse)  # the body never runs
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in targets(node, module, path.name == "__init__.py"):
                    if target and target != module:
                        edges[target] = min(edges.get(target, node.lineno), node.lineno)
            pending.extend(ast.iter_child_nodes(node))
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_npu_infer_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "npu_infer.platform.npu_attention" in graph["npu_infer.platform.npu"]
    cycles = import_cycles(graph)
    described = ["; ".join(f"{a} imports {b} (line {graph[a][b]})" for a in group for b in graph[a] if b in group)
                 for group in cycles]
    assert not cycles, "import cycles (break each with a leaf module both sides import):\n" + "\n".join(described)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "npu_infer" / "sub").mkdir(parents=True)
    (tmp_path / "npu_infer" / "__init__.py").write_text("")
    (tmp_path / "npu_infer" / "sub" / "__init__.py").write_text("")
    (tmp_path / "npu_infer" / "a.py").write_text("from npu_infer.sub import b\n")
    (tmp_path / "npu_infer" / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from npu_infer import c\n"
        "def f():\n    from .. import a\n")
    (tmp_path / "npu_infer" / "c.py").write_text("import npu_infer.sub.b\n")
    graph = import_graph(tmp_path)
    assert graph["npu_infer.sub.b"] == {"npu_infer.a": 5}  # the TYPE_CHECKING import never runs
    assert import_cycles(graph) == [["npu_infer.a", "npu_infer.sub.b"]]


# Third-party packages are imported once, then every npu_infer module is dropped from sys.modules and each one is
# imported in a forked child: npu_infer's modules execute in exactly the order `python -c "import npu_infer.x"`
# would run them, without paying torch's import ~100 times. `import npu_infer.x` always runs the whole root package
# (npu_infer/__init__.py) first, so the root is imported once, fresh, before the children are forked.
_ISOLATED_IMPORTS = r"""
import importlib, os, sys, traceback
names = sys.argv[1:]
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # reported below
for loaded in [m for m in sys.modules if m == "npu_infer" or m.startswith("npu_infer.")]:
    del sys.modules[loaded]
import npu_infer
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(f"--- import {name}\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("failed:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = list(module_files())
    result = subprocess.run([sys.executable, "-c", _ISOLATED_IMPORTS, *names], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert result.stdout.strip() == "failed:"
