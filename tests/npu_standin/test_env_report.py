"""`npu-infer env`: versions (torch, torch_npu, CANN, transformers) and the visible devices with their memory."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from npu_infer import cli, env_report

from . import set_device_count, set_memory

GiB = 1 << 30


@pytest.fixture
def no_cann(monkeypatch, tmp_path):
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_RT_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(env_report, "DEFAULT_CANN_ROOTS", (str(tmp_path / "nowhere"),))


def test_cpu_only_machine(no_cann, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # find_spec -> None: not installed
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch                      {torch.__version__}" in out
    assert "torch_npu                  not installed" in out
    assert "CANN                       not found" in out
    assert "transformers               " + env_report.package_version("transformers") in out
    assert "ASCEND_RT_VISIBLE_DEVICES  (unset)" in out
    assert "\n  cpu " in out and "npu:" not in out


def test_npu_devices_with_their_memory(npu, no_cann, monkeypatch, capsys):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "2,3")
    set_device_count(2)
    set_memory(free=50 * GiB, total=64 * GiB)
    assert env_report.main([]) == 0
    out = capsys.readouterr().out
    assert "torch_npu                  2.14.0 (test stand-in, not the real torch_npu)" in out
    assert "ASCEND_RT_VISIBLE_DEVICES  2,3" in out
    for i in (0, 1):
        assert f"  npu:{i}      50.00 GiB free of   64.00 GiB  Ascend910B1 (stand-in)" in out
    assert "npu:2" not in out


def test_json_report_lists_each_device_with_its_memory_then_the_cpu(npu, no_cann, capsys):
    set_memory(free=3 * GiB, total=32 * GiB)
    env_report.main(["--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["devices"][0] == {"device": "npu:0", "name": "Ascend910B1 (stand-in)", "free": 3 * GiB,
                                  "total": 32 * GiB}
    assert info["devices"][-1]["device"] == "cpu"


@pytest.mark.parametrize("var", ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"])
def test_cann_version_from_the_toolkit_install_info(var, no_cann, monkeypatch, tmp_path):
    root = tmp_path / "ascend-toolkit" / "latest"
    (root / "aarch64-linux").mkdir(parents=True)
    info = root / "aarch64-linux" / "ascend_toolkit_install.info"
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001C19SPC001\n")
    monkeypatch.setenv(var, str(root))
    assert env_report.cann_version() == ("8.0.RC3", str(info))


def test_cann_version_from_version_info(no_cann, monkeypatch, tmp_path):
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "version.info").write_text("Version=9.1.0\nversion_dir=9.1.0\n")
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path))
    assert env_report.cann_version()[0] == "9.1.0"


def test_torch_npu_that_fails_to_import_is_reported(no_cann, monkeypatch):
    import importlib
    import importlib.util
    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module

    def broken(name, *args):
        if name == "torch_npu":
            raise OSError("libascendcl.so: cannot open shared object file")
        return real_import(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch_npu"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(importlib, "import_module", broken)
    module, text = env_report.torch_npu_status()
    assert module is None and "fails to import (OSError: libascendcl.so" in text


def test_nnal_atb_and_driver_are_reported(no_cann, monkeypatch, tmp_path):
    monkeypatch.setattr(env_report, "DEFAULT_NNAL_ROOT", str(tmp_path / "nnal" / "atb"))
    monkeypatch.setattr(env_report, "DEFAULT_DRIVER_ROOT", str(tmp_path / "driver"))
    monkeypatch.delenv("ATB_HOME_PATH", raising=False)
    info = env_report.collect()
    assert info["NNAL/ATB"] == "not found" and info["Ascend driver"] == "not found"
    assert info["libatb.so"].startswith("not found; install NNAL and `source ") and "nnal/atb/set_env.sh" in info["libatb.so"]

    home = tmp_path / "nnal" / "atb" / "latest" / "atb" / "cxx_abi_1"
    (home / "lib").mkdir(parents=True)
    (home / "lib" / "libatb.so").write_bytes(b"not a shared library")
    (tmp_path / "nnal" / "atb" / "latest" / "version.info").write_text("version=8.1.RC1\n")
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "version.info").write_text("Version=24.1.rc3\n")
    monkeypatch.setenv("ATB_HOME_PATH", str(home))
    info = env_report.collect()
    assert info["NNAL/ATB"].startswith("8.1.RC1 (") and info["Ascend driver"] == "24.1.rc3"
    assert info["libatb.so"].startswith(f"{home / 'lib' / 'libatb.so'} fails to load (")
