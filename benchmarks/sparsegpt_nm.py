"""SparseGPT at 2:4 against SparseGPT unstructured at the same 50%: time per layer, and the operations each launches.

    python benchmarks/sparsegpt_nm.py                   # the CPU (2 torch threads unless --threads)
    python benchmarks/sparsegpt_nm.py --device cuda     # a GPU, where the column loop is launch-bound

Layers of TinyLlama-1.1B's shapes ([out, in]: q_proj 2048x2048, gate_proj 5632x2048, down_proj 2048x5632) with
random weights and a Hessian from 2048 Gaussian rows: the time of the OBS column loop does not depend on the values.
The inverse Cholesky factor is computed once per layer before timing (as pruning shares it between levels), so each
time is the column loop alone; the two budgets alternate, three times each, and the median is reported. "ops" are
the top-level torch operations one prune of a 512 x 512 layer runs, views excluded: on a GPU each is a kernel
launch the sequential column loop waits on, which is why N:M, choosing each group's mask inside that loop, costs
more there than its arithmetic. Written to results/sparsegpt_nm_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine, versions  # noqa: E402

from prunekit.calibration.stats import LayerStats, Needs  # noqa: E402
from prunekit.importance.sparsegpt import SparseGPT  # noqa: E402

SHAPES = {"q_proj": (2048, 2048), "gate_proj": (5632, 2048), "down_proj": (2048, 5632)}
BUDGETS = {"50%": None, "2:4": (2, 4)}
RESULTS = Path(__file__).resolve().parent / "results"
VIEWS = {"aten::slice", "aten::select", "aten::view", "aten::as_strided", "aten::t", "aten::unsqueeze",
         "aten::expand", "aten::expand_as", "aten::diagonal", "aten::alias", "aten::empty", "aten::empty_like",
         "aten::transpose", "aten::reshape", "aten::_reshape_alias", "aten::lift_fresh", "aten::detach",
         "aten::resolve_conj", "aten::resolve_neg", "aten::permute", "aten::contiguous", "aten::squeeze"}


def layer(rows: int, cols: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    stats = LayerStats(Needs.HESSIAN, cols, device)
    stats.update(torch.randn(2048, cols, generator=g).to(device))
    return torch.randn(rows, cols, generator=g).to(device), stats


def prune_seconds(sg: SparseGPT, weight: torch.Tensor, stats: LayerStats, nm) -> float:
    w = weight.clone()
    if w.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    sg.prune(w, stats, weight.numel() // 2, nm)
    if w.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def launched_ops(device: torch.device) -> dict[str, int]:
    from torch.profiler import profile

    sg, (weight, stats) = SparseGPT(), layer(512, 512, device)
    sg.prune(weight.clone(), stats, weight.numel() // 2, None)  # the factorization, outside the count
    counts = {}
    for name, nm in BUDGETS.items():
        with profile() as prof:
            sg.prune(weight.clone(), stats, weight.numel() // 2, nm)
        counts[name] = sum(1 for e in prof.events() if e.cpu_parent is None and e.name not in VIEWS)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="results prefix (default results/sparsegpt_nm_<device>)")
    parser.add_argument("--note", default="", help="a paragraph for the results (what else ran, a comparison)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(device.type)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        weight, stats = layer(out_f, in_f, device)
        sg = SparseGPT()
        prune_seconds(sg, weight, stats, None)  # factor once, warm up
        times = {budget: [] for budget in BUDGETS}
        for _ in range(args.repeats):
            for budget, nm in BUDGETS.items():
                times[budget].append(prune_seconds(sg, weight, stats, nm))
        median = {budget: statistics.median(t) for budget, t in times.items()}
        rows.append({"layer": name, "shape": [out_f, in_f], "seconds": median, "ratio": median["2:4"] / median["50%"]})
        print(f"{name} {out_f}x{in_f}: 50% {median['50%']:.3f} s, 2:4 {median['2:4']:.3f} s, "
              f"{rows[-1]['ratio']:.2f}x", flush=True)
    ops = launched_ops(device)
    command = "python benchmarks/sparsegpt_nm.py" + (f" --device {args.device}" if args.device != "cpu" else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "")
    result = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "versions": versions(), "threads": args.threads, "repeats": args.repeats,
              "rows": rows, "ops_512x512": ops, "note": args.note}
    out = args.out or RESULTS / f"sparsegpt_nm_{device.type}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# SparseGPT at 2:4 against unstructured 50% ({device.type})", "",
             f"Command: `{command}`  ", f"Machine: {info.get('gpu', info['cpu'])}, {args.threads} torch threads  ",
             f"Date: {result['date']}", "",
             "| layer | shape | 50% s | 2:4 s | 2:4 / 50% |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['seconds']['50%']:.3f} | {r['seconds']['2:4']:.3f} "
              f"| {r['ratio']:.2f}x |" for r in rows]
    lines += ["", f"Operations one prune of a 512x512 layer launches (views excluded): 50% {ops['50%']}, "
              f"2:4 {ops['2:4']} ({ops['2:4'] / ops['50%']:.2f}x)."] + (["", args.note] if args.note else [])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"ops per 512x512 layer: {ops}; wrote {out}.md")


if __name__ == "__main__":
    main()
