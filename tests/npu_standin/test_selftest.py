"""`npu-infer selftest` on the strict NPU stand-in (every check, both prefill layouts, the tiny models against the
CPU backend) and through the console script with --device cpu; a kernel that rejects TND fails its row with the
hint that names the layout variable, and the exit status says so."""

from __future__ import annotations

import os
import subprocess
import sys

from npu_infer import selftest
from npu_infer.platform.npu_attention import LAYOUT_ENV

from . import configure, install, set_memory, uninstall

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_check_passes_on_the_strict_npu_standin(capsys):
    install(strict=True)
    set_memory(total=1 << 29, free=1 << 29)  # the KV budget check allocates its share of it, here in host memory
    try:
        checks = selftest.run("npu")
    finally:
        uninstall()
    selftest.print_table(checks, "npu")
    table = capsys.readouterr().out
    assert all(c.ok for c in checks), table
    names = [c.name for c in checks]
    assert any("TND" in n for n in names) and any("BSH" in n for n in names)
    assert {"tiny llama end to end", "tiny qwen2 end to end", "KV budget", "sampler (every parameter)"} <= set(names)
    assert "0 failed" in table


def test_a_rejected_tnd_layout_fails_its_row_with_the_hint(capsys):
    install(strict=True)
    try:
        configure(tnd_paged=False)  # a CANN that rejects TND with a block table
        assert selftest.main(["--device", "npu", "--skip-models"]) == 1
    finally:
        uninstall()
    table = capsys.readouterr().out
    tnd_row = next(line for line in table.splitlines() if "FAIL" in line)
    assert "TND" in tnd_row and f"hint: this CANN rejects the TND paged prefill: run with {LAYOUT_ENV}=BSH" in table
    assert "PASS  attention BSH" in table and "1 failed" in table


def test_console_script_with_device_cpu():
    result = subprocess.run([sys.executable, "-m", "npu_infer.cli", "selftest", "--device", "cpu", "--skip-models"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "PASS  fused ops" in result.stdout and "0 failed" in result.stdout
