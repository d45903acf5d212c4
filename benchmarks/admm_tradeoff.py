"""ADMM's time against its reconstruction error on real SmolLM2-135M layers, for cheaper settings than the default.

    python benchmarks/admm_tradeoff.py

Three layers of the dense model (block 5's down and q projections, block 20's gate projection), their input Hessians
from docs/protocol.md's 64 calibration windows of 512 tokens (random.Random(0)); each setting prunes each layer at
2:4, 50% and 70% from the same statistics, timed alone (2 torch threads, nothing cached between settings). Error:
||W X - Ŵ X||² relative to SparseGPT's on the same layer; time relative to SparseGPT's. Written to
results/admm_tradeoff.{json,md}.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine, versions  # noqa: E402

from prunekit import data  # noqa: E402
from prunekit.calibration.stats import LayerStats, Needs  # noqa: E402
from prunekit.importance.admm import ADMM  # noqa: E402
from prunekit.importance.reconstruction import curvature, reconstruction_error  # noqa: E402
from prunekit.importance.sparsegpt import SparseGPT  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = ["model.layers.5.mlp.down_proj", "model.layers.5.self_attn.q_proj", "model.layers.20.mlp.gate_proj"]
BUDGETS = {"2:4": (0.5, (2, 4)), "50%": (0.5, None), "70%": (0.7, None)}
SETTINGS = {
    "sparsegpt": SparseGPT(),
    "admm (default: 12 iterations, rho 0.1)": ADMM(),
    "admm, 20 iterations, rho 0.01 (the previous default)": ADMM(iterations=20, rho=0.01),
    "admm, 14 iterations, rho 0.1, growth 1.25": ADMM(iterations=14, growth=1.25),
    "admm, 10 iterations, rho 0.25, growth 1.25": ADMM(iterations=10, rho=0.25, growth=1.25),
    "admm, 8 iterations, rho 0.1, growth 1.48": ADMM(iterations=8, growth=1.3 ** 1.5),
    "admm, no swaps": ADMM(swaps=0),
    "admm, 20 CG steps": ADMM(refit_iterations=20),
}


def hessians(model, windows) -> dict[str, LayerStats]:
    modules = dict(model.named_modules())
    stats = {name: LayerStats(Needs.HESSIAN, modules[name].in_features) for name in LAYERS}
    hooks = [modules[name].register_forward_pre_hook(lambda _, args, name=name: stats[name].update(args[0]))
             for name in LAYERS]
    with torch.no_grad():
        for chunk in windows.split(8):
            model(chunk)
    for hook in hooks:
        hook.remove()
    return stats


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, tokenizer = data.load_smollm2()
    stats = hessians(model, data.calibration_windows(tokenizer, 64, 512))
    modules, rows = dict(model.named_modules()), []
    for name in LAYERS:
        weight = modules[name].weight.detach().float()
        h = curvature(stats[name].hessian().float())
        for budget, (sparsity, nm) in BUDGETS.items():
            count = round(sparsity * weight.numel())
            for setting, estimator in SETTINGS.items():
                stats[name].derived.clear()  # SparseGPT's factor is cached there; every setting pays for its own
                clock = time.perf_counter()
                pruned, keep = estimator.prune(weight.clone(), stats[name], count, nm)
                seconds = time.perf_counter() - clock
                rows.append({"layer": name, "budget": budget, "setting": setting, "seconds": seconds,
                             "error": reconstruction_error(weight, pruned.float() * keep, h)})
                print(rows[-1], flush=True)
    doc = {"command": "python benchmarks/admm_tradeoff.py", "machine": machine("cpu"), "versions": versions(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "seconds": round(time.perf_counter() - start, 1), "results": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "admm_tradeoff.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "admm_tradeoff.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    base = {(r["layer"], r["budget"]): r for r in doc["results"] if r["setting"] == "sparsegpt"}
    lines = ["# ADMM: time against reconstruction error on SmolLM2-135M layers", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
             f"2 torch threads  ", f"Date: {doc['date']}; {doc['seconds']:.0f} s", "",
             "Error and time are relative to SparseGPT's on the same layer and budget (error < 1: better).", "",
             "| layer | budget | setting | error | seconds | time |", "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        b = base[(r["layer"], r["budget"])]
        lines.append(f"| {r['layer']} | {r['budget']} | {r['setting']} | {r['error'] / b['error']:.3f} | "
                     f"{r['seconds']:.2f} | {r['seconds'] / b['seconds']:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
