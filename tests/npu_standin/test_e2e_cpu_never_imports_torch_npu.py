"""Importing npu_infer and running it with device="cpu" never imports (nor looks for) torch_npu.

Libraries we use look for it on their own: transformers and accelerate call find_spec("torch_npu") while
their modules import (and would import torch_npu where it is installed).  Those probes are not ours; the test
attributes every lookup to the code that made it and fails on any made from npu_infer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A meta-path finder first in line sees every attempt to find torch_npu (import statement, import_module or
# find_spec) and records who asked: the innermost frame outside the import machinery and the standard library.
SCRIPT = r"""
import importlib.abc, json, os, sys, sysconfig, traceback
sys.path.insert(0, sys.argv[2])
stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
asked = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch_npu":
            frames = traceback.extract_stack()[:-1]
            callers = [f.filename for f in frames if not f.filename.startswith("<")
                       and not os.path.realpath(f.filename).startswith(stdlib + os.sep)]
            asked.append([name, callers[-1] if callers else "?"])
        return None

sys.meta_path.insert(0, Watch())
import npu_infer
from npu_infer import LLM, SamplingParams
import npu_infer.env_report, npu_infer.platform.npu, npu_infer.platform.npu_attention, npu_infer.platform.npu_ops
import npu_infer.api.server, npu_infer.cli
llm = LLM(sys.argv[1], device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=64, max_num_seqs=2,
          kv_cache_memory="8MiB")
out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=3))
print(json.dumps({"asked": asked, "tokens": out[0].outputs[0].token_ids,
                  "loaded": sorted(m for m in sys.modules if m.startswith("torch_npu"))}))
"""


def test_cpu_run_never_imports_torch_npu(tiny_llama_dir):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(REPO)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [(name, caller) for name, caller in report["asked"] if Path(caller).resolve().is_relative_to(REPO / "npu_infer")]
    assert ours == [] and report["loaded"] == []
    assert len(report["tokens"]) == 3
    assert all("site-packages" in caller for _, caller in report["asked"]), report["asked"]
