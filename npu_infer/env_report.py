"""`npu-infer env`: the versions and devices a bug report needs (torch, torch_npu, CANN, NNAL/ATB and whether
libatb.so loads, the Ascend driver, transformers, memory)."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform as host
import re
from pathlib import Path

import torch

from npu_infer import envs

GiB = 1024**3
# Where CANN puts itself when set_env.sh was not sourced (CANN >= 9 and the older ascend-toolkit layout).
DEFAULT_CANN_ROOTS = ("/usr/local/Ascend/cann", "/usr/local/Ascend/ascend-toolkit/latest")
_VERSION_LINE = re.compile(r"^\s*version\s*=\s*(\S+)", re.IGNORECASE | re.MULTILINE)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cann_roots() -> list[Path]:
    """CANN install directories to look in: the ones set_env.sh exports first, then the default paths."""
    named = [envs.ASCEND_TOOLKIT_HOME, envs.ASCEND_HOME_PATH]
    roots = [Path(p) for p in named if p] + [Path(p) for p in DEFAULT_CANN_ROOTS]
    return list(dict.fromkeys(roots))


def cann_version() -> tuple[str, str | None]:
    """(version, file it was read from): `ascend_*_install.info` (`version=...`) or a `version.info`."""
    for root in cann_roots():
        if not root.is_dir():
            continue
        candidates = (sorted(root.glob("*/ascend_*_install.info")) + sorted(root.glob("ascend_*_install.info"))
                      + [root / sub / "version.info" for sub in ("compiler", "runtime", "")])
        for path in candidates:
            try:
                match = _VERSION_LINE.search(path.read_text(errors="replace"))
            except OSError:
                continue
            if match:
                return match.group(1), str(path)
    return "not found (install CANN and source its set_env.sh, which sets ASCEND_HOME_PATH)", None


# NNAL's ATB (libatb.so: the _npu_* ops) and the driver, where their installers put them.
DEFAULT_NNAL_ROOT = "/usr/local/Ascend/nnal/atb"
DEFAULT_DRIVER_ROOT = "/usr/local/Ascend/driver"
NNAL_HINT = f"install NNAL and `source {DEFAULT_NNAL_ROOT}/set_env.sh` (the _npu_* attention ops need libatb.so)"


def atb_status() -> tuple[str, str]:
    """(NNAL/ATB version, whether libatb.so loads): ATB_HOME_PATH is what nnal/atb/set_env.sh exports."""
    homes = [Path(envs.ATB_HOME_PATH)] if envs.ATB_HOME_PATH else []
    homes += sorted(Path(DEFAULT_NNAL_ROOT).glob("*/atb/cxx_abi_*"))
    libs = [home / "lib" / "libatb.so" for home in homes if (home / "lib" / "libatb.so").is_file()]
    version = "not found"
    for info in [Path(DEFAULT_NNAL_ROOT) / "latest" / "version.info"] + [h.parents[1] / "version.info" for h in homes]:
        match = _VERSION_LINE.search(info.read_text(errors="replace")) if info.is_file() else None
        if match:
            version = f"{match.group(1)} ({info})"
            break
    if not libs:
        return version, f"not found; {NNAL_HINT}"
    try:
        import ctypes
        ctypes.CDLL(str(libs[0]))
    except OSError as exc:
        return version, f"{libs[0]} fails to load ({exc}); source the CANN and NNAL set_env.sh scripts"
    return version, f"loads ({libs[0]})"


def driver_version() -> str:
    info = Path(DEFAULT_DRIVER_ROOT) / "version.info"
    match = _VERSION_LINE.search(info.read_text(errors="replace")) if info.is_file() else None
    return match.group(1) if match else "not found"


def torch_npu_status():
    """(module or None, text for the report)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "not installed"
    try:
        module = importlib.import_module("torch_npu")
    except Exception as exc:  # present but unusable: usually CANN's libraries are not on the library path
        return None, f"installed but fails to import ({type(exc).__name__}: {exc})"
    text = getattr(module, "__version__", "unknown version")
    if getattr(module, "__standin__", False):
        text += " (test stand-in, not the real torch_npu)"
    return module, text


def _device_rows(kind: str, count: int, name_of, mem_of) -> list[dict]:
    rows = []
    for i in range(count):
        row = {"device": f"{kind}:{i}"}
        try:
            row["name"] = name_of(i)
            row["free"], row["total"] = mem_of(i)
        except Exception as exc:  # one broken card must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def devices(torch_npu) -> list[dict]:
    rows: list[dict] = []
    if torch_npu is not None and torch.npu.is_available():
        rows += _device_rows("npu", torch.npu.device_count(), torch.npu.get_device_name, torch.npu.mem_get_info)
    if torch.cuda.is_available():
        rows += _device_rows("cuda", torch.cuda.device_count(), torch.cuda.get_device_name, torch.cuda.mem_get_info)
    from npu_infer.platform.cpu import CpuPlatform, cpu_has_fast_bf16
    free, total = CpuPlatform().mem_get_info()
    rows.append({"device": "cpu", "name": f"{host.processor() or host.machine()}, {os.cpu_count()} logical cores, "
                 f"fast bf16 {'yes' if cpu_has_fast_bf16() else 'no'}", "free": free, "total": total})
    return rows


def collect() -> dict:
    from npu_infer import __version__
    torch_npu, torch_npu_text = torch_npu_status()
    version, source = cann_version()
    atb = atb_status()
    visible = envs.ASCEND_RT_VISIBLE_DEVICES
    return {
        "npu_infer": __version__,
        "python": host.python_version(),
        "os": host.platform(),
        "torch": torch.__version__,
        "torch_npu": torch_npu_text,
        "CANN": version + (f" ({source})" if source else ""),
        "NNAL/ATB": atb[0],
        "libatb.so": atb[1],
        "Ascend driver": driver_version(),
        "transformers": package_version("transformers"),
        "CUDA (torch build)": torch.version.cuda or "none",
        "ASCEND_RT_VISIBLE_DEVICES": "(unset)" if visible is None else visible,
        "devices": devices(torch_npu),
    }


def format_report(info: dict) -> str:
    lines = [f"{key:27s}{value}" for key, value in info.items() if key != "devices"]
    lines.append("devices:")
    for row in info["devices"]:
        if "error" in row:
            lines.append(f"  {row['device']:8s} {row.get('name', '?')}: {row['error']}")
        else:
            lines.append(f"  {row['device']:8s} {row['free'] / GiB:7.2f} GiB free of {row['total'] / GiB:7.2f} GiB  "
                         f"{row['name']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-infer env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
