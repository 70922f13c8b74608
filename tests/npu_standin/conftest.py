"""Fixtures: the torch_npu stand-in installed for one test, and the recorded declarations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from . import install, uninstall

DECLARATIONS = Path(__file__).with_name("declarations.json")


def _settle_library_probes() -> None:
    """Let transformers (and accelerate) look for torch_npu before any test installs the stand-in.

    Their probes are cached for the process: evaluated while the stand-in is installed they would answer True,
    and those libraries would later reach for NPU kernels the stand-in does not have (or, after uninstall, a
    torch_npu that is gone), breaking tests that run after these in the same session."""
    from transformers.utils import import_utils
    import_utils.is_torch_npu_available()
    import_utils.is_torch_npu_available(check_device=True)
    try:
        from accelerate.utils import imports
    except ImportError:
        return
    imports.is_npu_available()
    imports.is_npu_available(check_device=True)


_settle_library_probes()


@pytest.fixture(scope="session")
def declarations() -> dict:
    return json.loads(DECLARATIONS.read_text(encoding="utf-8"))


@pytest.fixture
def npu():
    """The stand-in torch_npu module, installed as sys.modules['torch_npu'] and torch.npu for this test."""
    module = install()
    try:
        yield module
    finally:
        uninstall()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)




@pytest.fixture(params=["npu", "cuda"])
def strict_device(request):
    """A device-strict stand-in device ("npu" and "cuda"): device tensors do not mix with host tensors."""
    from ._strict import StrictDevice
    strict = StrictDevice(request.param)
    strict.enter()
    try:
        yield strict
    finally:
        strict.exit()
