"""Run by tests/test_offload.py in a fresh process: prune an offloaded checkpoint and report this process's peak RSS.

    python tests/offload_worker.py SRC OUT SEED   -> prints one JSON line {"baseline_mib", "peak_mib", "seconds"}

The peak (VmHWM) is reset after the imports (writing 5 to /proc/self/clear_refs), so it covers loading, pruning and
saving; baseline_mib is the resident size right after the imports (torch and transformers alone hold about 0.5 GB).
"""
import json
import re
import sys
import time

import torch
from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline, like torch)

import prunekit
from prunekit.offload import load_offloaded


def status_mib(key: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def calibration(seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(seed))


if __name__ == "__main__":
    src, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not allowed here: the peak then includes the imports, a stricter measurement
        pass
    baseline = status_mib("VmRSS")
    start = time.perf_counter()
    model = load_offloaded(src)
    report = prunekit.prune(model, 0.5, importance="wanda", calibration=calibration(seed, model.config.vocab_size),
                            progress=False)
    prunekit.save_pruned(model, out, report)
    print(json.dumps({"baseline_mib": baseline, "peak_mib": status_mib("VmHWM"),
                      "seconds": time.perf_counter() - start, "exact": report.exact}))
