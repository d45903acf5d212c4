"""Where prunekit (block order) and llm-compressor choose different masks for the same method, layer by layer.

    python benchmarks/mask_diff.py 8 2:4 wanda > benchmarks/results/mask_diff_wanda_2of4_8windows.txt
    python benchmarks/mask_diff.py 8 0.7 wanda > benchmarks/results/mask_diff_wanda_70_8windows.txt

Arguments: number of calibration windows (the first N of the protocol's 64), budget, importance. Prints, per decoder
Linear, the fraction of entries whose zero/non-zero state differs between the two tools and the largest weight
difference. Used to explain the Wanda 2:4 and 70% perplexity gaps in results/llm_quality.md.
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_quality as q  # noqa: E402

import prunekit  # noqa: E402
from prunekit import data  # noqa: E402


def main(windows: int, budget: str, importance: str) -> None:
    torch.set_num_threads(1)
    model, tokenizer = data.load_smollm2()
    calibration = data.calibration_windows(tokenizer, 64, 512)[:windows]
    ours, peer = copy.deepcopy(model), copy.deepcopy(model)
    prunekit.prune(ours, budget, importance=importance, calibration=calibration, order="block", progress=False)
    q.run_llmcompressor(peer, tokenizer, calibration, importance, budget, "uniform")
    theirs = dict(peer.named_modules())
    for name, module in ours.named_modules():
        if name.startswith("model.layers.") and name.endswith(q.TARGETS):
            other = theirs[name].weight
            differ = ((module.weight == 0) != (other == 0)).float().mean().item()
            print(f"{name:40s} mask diff {differ:.5f} weight maxdiff {(module.weight - other).abs().max().item():.2e}",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
