"""The machine and versions a benchmark ran on, for its results (shared by the benchmark scripts)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import prunekit


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_before": load_average()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    out = {"prunekit": prunekit.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        pass
    return out
