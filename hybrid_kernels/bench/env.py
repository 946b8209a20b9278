"""What a benchmark ran on: versions, git revision, device, threads, CPU features, backends."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
from typing import Dict, Optional

import torch

__all__ = ["load_warning", "environment", "device_name", "git_revision", "versions", "cpu_features",
           "backend_status", "resolve_device"]


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def git_revision() -> str:
    """`git describe --always --dirty` of the checkout this package is imported from; 'installed'
    for an installed copy (even one under a checkout's directory, e.g. in its .venv: that
    checkout's revision would say nothing about the copy), else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    try:
        top = git("rev-parse", "--show-toplevel")
        if not top:
            return "unknown"
        if os.path.realpath(os.path.join(top, "hybrid_kernels")) != os.path.realpath(package):
            return "installed"
        return git("describe", "--always", "--dirty") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return None


def versions() -> Dict[str, Optional[str]]:
    from .. import __version__
    out = {"hybrid_kernels": __version__, "python": platform.python_version(),
           "torch": torch.__version__}
    for mod in ("triton", "flash_attn", "xformers", "sageattention"):
        v = _version(mod)
        if v is not None:
            out[mod] = v
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def cpu_features() -> Dict[str, object]:
    """From the native CPU module when built: detected features and the selected kernel ISA."""
    try:
        from ..backends.cpu import load_module
        mod = load_module()
    except Exception as exc:
        return {"error": f"native CPU module not built ({exc})"}
    return {"features": dict(mod.cpu_features()), "selected_isa": str(mod.selected_isa())}


def backend_status() -> Dict[str, Optional[str]]:
    """Backend name -> None if usable on this install, else why not."""
    from ..dispatch import backend_names, get_backend
    return {name: get_backend(name).unavailable_reason() for name in backend_names()}


def load_warning() -> Optional[str]:
    """A warning when other processes keep the CPUs busy (timings would then be unreliable)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus + 0.5:
        return (f"warning: load average {load:.1f} on {cpus} CPUs before the run: other "
                f"processes are using the CPUs, timings will be noisy and low")
    return None


def environment(device: str, threads: int) -> Dict[str, object]:
    info = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "device": device,
        "device_name": device_name(device),
        "threads": threads,
        "versions": versions(),
    }
    info["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    cpu = cpu_features()
    if "selected_isa" in cpu:
        info["cpu_isa"] = cpu["selected_isa"]
    return info
