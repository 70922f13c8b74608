"""Optional packages: each belongs to one extra of pyproject.toml, and its absence is one sentence, not a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

# module -> the pyproject extra that installs it
EXTRAS = {"tensorizer": "tensorizer", "bitsandbytes": "bnb", "torch_npu": "npu", "compressed_tensors": "quant"}


class MissingDependencyError(ImportError):
    """An optional package that this feature needs is not installed; the message says how to install it.
    The command line prints it as one line and exits 2."""


def install_command(module: str) -> str:
    return f'pip install "npu_infer[{EXTRAS[module]}]"'


def import_optional(module: str, needed_for: str) -> ModuleType:
    """Import `module` (a key of EXTRAS), or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = (exc.name or module).split(".")[0]
        if top != module.split(".")[0]:
            raise  # the package is there but one of its own imports failed: that traceback is the useful one
        raise MissingDependencyError(f"{needed_for} needs the {module} package, which is not installed: "
                                     f"{install_command(module)}") from None
