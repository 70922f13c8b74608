"""`npu-infer` console script: serve | env | save-sharded-state | tensorize | quantize | selftest | worker."""
from __future__ import annotations

import importlib
import sys

from npu_infer.optional_deps import MissingDependencyError

# subcommand -> (module, function, one-line help); each module owns its own argument parsing.
COMMANDS = {
    "serve": ("npu_infer.api.server", "main", "start the OpenAI-compatible server (same flags as vLLM)"),
    "env": ("npu_infer.env_report", "main", "print torch / torch_npu / CANN / transformers versions and devices"),
    "save-sharded-state": ("npu_infer.loaders.save_sharded_state", "main", "write each rank's weights to its own file"),
    "tensorize": ("npu_infer.loaders.tensorize", "main", "serialize a model for --load-format tensorizer"),
    "quantize": ("npu_infer.quantize", "main", "write an int8 (w8a8 | w8a16) compressed-tensors checkpoint"),
    "selftest": ("npu_infer.selftest", "main", "check every kernel, the sampler and two tiny models on the device"),
    "worker": ("npu_infer.worker.worker_cli", "worker_main", "run the worker ranks of one node (multi-node)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: npu-infer {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, _, text) in COMMANDS.items():
            print(f"  {name:20s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    try:
        result = getattr(importlib.import_module(module), function)(argv[1:])
    except MissingDependencyError as exc:  # one line saying what to install, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
