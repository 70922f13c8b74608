"""When the CPU kernels rebuild (cpu_kernels.py's build_name): on any change to any C++ source or header, so an
edit never loads a stale build. Runs on every CPU (nothing is compiled)."""
from __future__ import annotations

import shutil
from pathlib import Path

from npu_infer.platform import cpu_kernels

FLAGS = set(cpu_kernels.REQUIRED_FLAGS)


def _copy_sources(to: Path) -> list[Path]:
    to.mkdir()
    for path in cpu_kernels.source_files():
        shutil.copy(path, to / path.name)
    return cpu_kernels.source_files(to)


def test_the_build_covers_every_cpp_and_header_beside_the_loader():
    names = {path.name for path in cpu_kernels.source_files()}
    on_disk = {path.name for path in cpu_kernels.HERE.iterdir() if path.suffix in (".cpp", ".h")}
    assert names == on_disk
    assert {"cpu_kernels.cpp", "cpu_kernels.h", "cpu_simd.h", "cpu_decode_stack.cpp", "cpu_module.cpp"} <= names


def test_editing_any_source_or_header_changes_the_build_name(tmp_path):
    copies = _copy_sources(tmp_path / "src")
    original = cpu_kernels.build_name(FLAGS, tmp_path / "src")
    assert original == cpu_kernels.build_name(FLAGS)  # only names and bytes count, not where the files lie
    for path in copies:  # one changed byte in each file, headers included, gives another build
        text = path.read_bytes()
        path.write_bytes(text[:-1] + (b" " if text[-1:] != b" " else b"\n"))
        assert cpu_kernels.build_name(FLAGS, tmp_path / "src") != original, path.name
        path.write_bytes(text)
    assert cpu_kernels.build_name(FLAGS, tmp_path / "src") == original
    (tmp_path / "src" / "cpu_new.h").write_text("#pragma once\n")  # a new header is in the key too
    assert cpu_kernels.build_name(FLAGS, tmp_path / "src") != original


def test_the_build_name_depends_on_the_cpu_flags():
    assert cpu_kernels.build_name(FLAGS) != cpu_kernels.build_name(FLAGS | {"avx512_fp16"})
