"""The machine and versions a benchmark ran on, for its results, and how to time a layer as a model reads it (shared
by the benchmark scripts)."""
from __future__ import annotations

import itertools
import os
import platform
from pathlib import Path
from typing import Callable

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


def cache_bytes(device: torch.device) -> int:
    """The cache a layer's weights could sit in between calls: a GPU's L2, or the CPU's largest cache (sysfs; 32 MiB
    where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 << 20)


def copies_beyond_cache(weight_bytes: int, device: torch.device) -> int:
    """How many copies of a weight together hold twice the cache (at least one)."""
    return max(1, -(-2 * cache_bytes(device) // weight_bytes))


def in_turns(calls: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call of the next of `calls` (copies of one layer whose weights together exceed the cache) in turn, so that
    each call reads its weights from memory, as a decoding model does: a layer timed alone in a loop sits in the
    cache, where a compressed layer often fits and its dense twin does not (and on a GPU, a 4096x4096 bf16 weight
    fits in an H100's L2)."""
    turns = itertools.cycle(calls)
    return lambda: next(turns)(x)
