"""Block-sparse kernels against dense and their peers, on LLaMA-7B layer shapes.

    python benchmarks/block_kernels.py --device cpu     # CPU rows: batch 1, 8 and 512, fp32, dense vs BSR vs auto
    python benchmarks/block_kernels.py --device cuda    # the GPU grid below (builds the extension on first use)

GPU grid: weights 4096x4096, 11008x4096 and 4096x11008 ([out, in], as q/o, gate/up and down projections), rows 1,
4, 16, 64 (decode, batched and speculative decode), 512 and 4096 (prefill), bf16, 50/70/90% of the blocks pruned at
random (exactly, in whole blocks) with 32x32 and 64x64 blocks. Peers in the same process, on the same inputs: cuBLAS
dense (F.linear of the masked weight), PyTorch's BSR (torch.sparse_bsr_tensor @ dense, Triton on the GPU) and, at
50%, 2:4 semi-structured sparsity (to_sparse_semi_structured) of a 2:4-pruned weight of the same shape. Our kernel
is timed as the layer runs it at inference (behind its bound operator), and so is the layer's own dense path by
default, "rebuilt": unless told to keep its dense weight (keep_dense, prunekit/kernels/sparse_layer.py), a
BlockSparseLinear rebuilds it from its blocks for each call where it runs dense.

Every path goes through copies of its weights in turn, as many as hold twice the cache (a GPU's L2, the CPU's
last-level cache; machine_info.in_turns), so that each call reads its weights from memory as a model's layers do: a
layer called in a loop keeps them in cache (a 4096x4096 bf16 weight fits in an H100's or H200's 50 MB L2), which
flatters whichever path reads more. (The dispatch's own measurement, in "auto_measured", times one layer alone,
on a GPU no faster than with the L2 flushed: dispatch.cold_device.)

Every path is timed in both of the ways a model runs (prunekit.kernels.dispatch.timings, the paths in turns,
sample by sample): "graph", replays of a captured CUDA graph of 10 calls (device time: what CUDA graphs and
torch.compile's cudagraphs pay), and "eager", the wall time of bursts of 10 calls (what a plain PyTorch loop pays,
host-side launch costs included). CPU rows are eager only. Every output is checked against the dense product before
it is timed. "auto" is what prunekit.kernels' dispatch picks in that mode (its own measurement) for the layer with
keep_dense=True, which runs dense as dense, and its speedup is that path's time in this run; "auto, lean" is the pick
of the default layer, which can run our kernel, PyTorch's BSR or dense rebuilt per call (credited with the rebuilt
time); "module" is the keep_dense layer itself, dispatch included.

With --variants (gpu_check.sh passes it), every launch of the planned kernel is timed too (launch.variants: the
one-row and bt kernels split 1, 2 or 4 ways, tc with 128- or 256-row tiles, and on an sm_90a build tcw, the same
tiles on wgmma), in graph mode, beside the one our backend's own tuning chose (prunekit.kernels.native: on a GPU the
first call of a batch-size bucket times these same variants and keeps the fastest), so the table shows whether the
tuning found the fastest and how far the planner's untuned guess (launch.THREAD_BLOCKS, TC_SMALL_ROWS, TC_WGMMA)
was from it.

Rows are saved as they are measured (the .md says when the grid was cut short); --resume <that .json> measures the
rest on the same kind of machine, for a grid split across time-limited GPU calls.

Targets (issue 25), per point, on our kernel's graph-mode speedup over dense: at 1 row, and at 2-64 rows with 32x32
blocks at 70% and 90%, at least 0.8 / (1 - sparsity) (the memory-bound ideal); at 512 rows and more with 64x64
blocks, 1.5x at 70% and 3x at 90%; faster than PyTorch's BSR everywhere; and in each mode, auto's pick within 5% of
the fastest path (so never below dense, 50% included), and the lean layer's within 5% of the fastest path it can run
(every one but dense itself).

On a GPU machine with nothing but this checkout and a CUDA build of torch: the extension compiles at first use
(PRUNEKIT_JIT_CUDA=1 is set here, about a minute for one architecture); CuPy is used instead when it is
installed and the extension is not (--backend cupy to force it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import copies_beyond_cache, in_turns, load_average, machine, versions  # noqa: E402

from prunekit.kernels import BlockLayout, BlockSparseLinear, backends, block_sparse_linear, dispatch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = (0.5, 0.7, 0.9)
BLOCKS = (32, 64)
ROWS = {"cuda": (1, 4, 16, 64, 512, 4096), "cpu": (1, 8, 512)}
MODES = {"cuda": ("graph", "eager"), "cpu": ("eager",)}
TOLERANCE = 1.05  # auto's pick may be this much slower than the fastest path of its row and mode
RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"rebuilt": "dense, rebuilt per call", "torch": "PyTorch BSR", "cpu": "prunekit (cpu)",
          "cuda_ext": "prunekit (cuda_ext)", "cupy": "prunekit (cupy)", "semi_structured": "2:4"}


def block_mask(out_f: int, in_f: int, block: int, sparsity: float, seed: int) -> torch.Tensor:
    """Exactly round(sparsity * tiles) tiles pruned, chosen at random."""
    rows, cols = out_f // block, in_f // block
    g = torch.Generator().manual_seed(seed)
    tiles = torch.ones(rows * cols, dtype=torch.bool)
    tiles[torch.randperm(rows * cols, generator=g)[: round(sparsity * rows * cols)]] = False
    return tiles.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)


def two_four_mask(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(-1)
    return (order < 2).view(out_f, in_f)


def check(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() + 1e-6
    if not err <= 2e-2 * scale:
        raise AssertionError(f"{name}: max error {err:.3g} against the dense product (scale {scale:.3g})")


def key(row: dict) -> tuple:
    """A grid point: shape, block ("2:4" for the semi-structured rows), sparsity and rows."""
    return tuple(row["shape"]), row["block"], row["sparsity"], row["rows"]


def run(device: str, backend_name: str | None, quick: bool, rows_only=None, variants: bool = False,
        done: dict | None = None, on_row=lambda row: None) -> list[dict]:
    """The grid's rows, in order; points in `done` (key -> row, from an earlier partial run) are kept as they are,
    not measured again. `on_row` sees the list after each new row (to save it as the grid goes)."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours = None
    if device == "cuda":
        os.environ.setdefault("PRUNEKIT_JIT_CUDA", "1")
        for name in ([backend_name] if backend_name else ["cuda_ext", "cupy"]):
            if backends.unavailable(name, dev, dtype, 32) is None:
                ours = name
                break
            print(f"{name}: {backends.unavailable(name, dev, dtype, 32)}", file=sys.stderr)
        if ours is None:
            raise SystemExit("neither the CUDA extension nor CuPy can run here; see the messages above")
    elif backends.unavailable("cpu", dev, dtype, 32) is None:
        ours = "cpu"  # prunekit's CPU kernel (csrc/sparse_cpu.cpp), block layout
    shapes = SHAPES[:1] if quick else SHAPES
    rows_list = rows_only or (ROWS[device][::2] if quick else ROWS[device])
    results, done = [], done or {}

    def add(row: dict, measured: bool = True) -> None:
        results.append(row)
        if measured:
            print(summary_line(row), flush=True)
            on_row(results)

    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(out_f + in_f)
        weight = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype).to(dev)
        inputs = {r: torch.randn(r, in_f, generator=g).to(dtype).to(dev) for r in rows_list}
        copies = copies_beyond_cache(weight.nbytes, dev)  # every path goes through its copies in turn
        for block in BLOCKS:
            for sparsity in SPARSITIES:
                keep = block_mask(out_f, in_f, block, sparsity, seed=block).to(dev)
                layout = BlockLayout.from_mask(keep, block)
                masked = [weight * keep for _ in range(copies)]
                values = [layout.gather(m) for m in masked]
                lean = [BlockSparseLinear(layout, v.clone(), None, backend="auto") for v in values]  # dense rebuilt
                kept = [BlockSparseLinear(layout, v.clone(), None, backend="auto", keep_dense=True) for v in values]
                for rows, x in inputs.items():
                    row = new_row(out_f, in_f, block, sparsity, rows, dtype)
                    if key(row) in done:
                        add(done[key(row)], measured=False)
                        continue
                    # ours and the layer's dense fallback as the layer runs them at inference (BlockSparseLinear.runner:
                    # our kernel behind its bound operator; dense on a weight rebuilt from the blocks for each call)
                    names = ("dense", *([ours] if ours else []))
                    runs = {name: [layer.runner(name, x) for layer in lean] for name in names}
                    torch_bsr = backends.get("torch")
                    paths = {"dense": in_turns([lambda x, m=m: F.linear(x, m) for m in masked], x),
                             "rebuilt": in_turns(runs["dense"], x),
                             "torch": in_turns([lambda x, v=v: block_sparse_linear(x, v, layout, None, torch_bsr)
                                                for v in values], x)}
                    if ours:
                        paths[ours] = in_turns(runs[ours], x)
                    reference = F.linear(x, masked[0])
                    measure(paths, reference, row, dev, module=in_turns(kept, x), copies=copies)
                    for mode in row["seconds"]:
                        for layer, field in ((kept[0], "auto"), (lean[0], "auto_lean")):
                            with torch.no_grad(), dispatch.mode(mode):
                                row[field][mode] = layer.choose(x)
                                problem = dispatch.Problem.of("bsr", (out_f, in_f), block, layout.density, dtype,
                                                              x.device, rows, "kept" if layer.keep_dense else "rebuilt")
                            choice = dispatch.known(problem)  # what the dispatch itself measured
                            row[f"{field}_measured"][mode] = choice.seconds if choice else {}
                    if variants and hasattr(backends.get(ours), "launch_forward"):
                        try:
                            row["variants"] = time_variants(backends.get(ours), x, values, layout, reference, copies)
                            row["tuned"] = backends.get(ours).planned(x, values[0], layout, None).name  # what ran
                        except Exception as e:  # noqa: BLE001 - reported; the grid goes on
                            row["errors"]["variants"] = f"{type(e).__name__}: {str(e)[:200]}"
                    add(row)
        if device == "cuda" and not quick:
            two_four(weight, inputs, done, add)
    return results


def time_variants(native, x: torch.Tensor, values: list, layout, ref: torch.Tensor, copies: int) -> dict:
    """Graph-mode seconds of every launch that computes this product (launch.variants: splits, tc tiles), the
    planned one first, through the Python launcher, on the copies of `values` in turn: what THREAD_BLOCKS and
    TC_SMALL_ROWS are tuned from."""
    from prunekit.kernels import launch as plan

    capability = torch.cuda.get_device_capability(x.device)
    launches = plan.variants(x.shape[0], layout.grid[0], layout.block, x.dtype, capability, wgmma=native.wgmma(x.device))
    paths = {v.name: in_turns([lambda x, v=v, w=w: native.launch_forward(v, x, w, layout, None) for w in values], x)
             for v in launches}
    row = {"seconds": {}, "errors": {}}
    measure(paths, ref, row, x.device, modes=("graph",), copies=copies)
    if row["errors"]:
        raise AssertionError("; ".join(f"{name}: {e}" for name, e in row["errors"].items()))
    return {name: row["seconds"]["graph"].get(name) for name in paths}


def new_row(out_f: int, in_f: int, block, sparsity: float, rows: int, dtype: torch.dtype) -> dict:
    return {"shape": [out_f, in_f], "block": block, "sparsity": sparsity, "rows": rows,
            "dtype": str(dtype).replace("torch.", ""), "seconds": {}, "errors": {}, "auto": {}, "auto_measured": {},
            "auto_lean": {}, "auto_lean_measured": {}}


def measure(paths: dict, ref: torch.Tensor, row: dict, device: torch.device, module=None, modes=None,
            copies: int = 1) -> None:
    """Checks every path (each going through `copies` copies of its weights in turn) against the dense product, on
    every copy, then times those that pass in each mode (the device's, or `modes`) into row["seconds"][mode]
    (dispatch.timings: in turns; at least 0.3 s each on the CPU, 0.05 s on a GPU, whose samples are bursts or graphs
    of 10 calls). `module`, the layer with its dispatch, is timed beside them but is not a candidate for "fastest"."""
    row["copies"] = copies
    ok = {}
    for name, fn in paths.items():
        try:
            with torch.no_grad():
                for _ in range(copies):
                    check(fn(), ref, name)
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this point is reported
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    least = 0.05 if device.type == "cuda" else 0.3
    for mode in modes or MODES[device.type]:
        timed = dict(ok)
        if module is not None:
            with torch.no_grad(), dispatch.mode(mode):
                for _ in range(copies):
                    module()  # each copy's choice for this mode, made (or measured) before it is timed
            timed["module"] = module
        with torch.no_grad(), dispatch.mode(mode):
            seconds, errors = dispatch.timings(timed, device, min_seconds=least, max_rounds=200, mode=mode)
        row["seconds"][mode] = seconds
        row["errors"].update({f"{name} ({mode})": e for name, e in errors.items()})


def two_four(weight: torch.Tensor, inputs: dict, done: dict, add) -> None:
    """2:4 semi-structured at 50% on the same shape and inputs, against the dense product of that weight; each row
    to `add` (those in `done` as they are)."""
    from prunekit.kernels import SemiStructuredLinear

    out_f, in_f = weight.shape
    rows_todo = {}
    for rows, x in inputs.items():
        row = new_row(out_f, in_f, "2:4", 0.5, rows, weight.dtype)
        if key(row) in done:
            add(done[key(row)], measured=False)
        else:
            rows_todo[rows] = x
    if not rows_todo:
        return
    copies = copies_beyond_cache(weight.nbytes, weight.device)
    masked = [weight * two_four_mask(out_f, in_f, seed=1).to(weight.device) for _ in range(copies)]
    try:
        layers = [SemiStructuredLinear(m, None, backend="semi_structured") for m in masked]
        auto = [SemiStructuredLinear(m, None, backend="auto") for m in masked]
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {str(e)[:200]}"
        for r in rows_todo:
            add(dict(new_row(out_f, in_f, "2:4", 0.5, r, weight.dtype), errors={"semi_structured": error}))
        return
    for rows, x in rows_todo.items():
        row = new_row(out_f, in_f, "2:4", 0.5, rows, weight.dtype)
        paths = {"dense": in_turns([lambda x, m=m: F.linear(x, m) for m in masked], x),
                 "semi_structured": in_turns(layers, x)}
        measure(paths, F.linear(x, masked[0]), row, weight.device, module=in_turns(auto, x), copies=copies)
        for mode in row["seconds"]:
            with torch.no_grad(), dispatch.mode(mode):
                row["auto"][mode] = auto[0].choose(x)
        add(row)


def speedups(row: dict, mode: str) -> dict:
    seconds = row["seconds"].get(mode, {})
    dense = seconds.get("dense")
    return {k: dense / v for k, v in seconds.items() if dense and k != "dense"}


def picked(row: dict, mode: str, field: str = "auto") -> str | None:
    """The path that runs what auto picked (field "auto": the keep_dense layer), or what the lean layer picked
    ("auto_lean": a pick of dense runs "rebuilt", its weight rebuilt from the blocks for each call)."""
    pick = row.get(field, {}).get(mode)
    return "rebuilt" if pick == "dense" and field == "auto_lean" else pick


def auto_speedup(row: dict, mode: str, field: str = "auto") -> float | None:
    """The speedup over dense of the path auto picked, as timed in this run (1.0 for dense)."""
    pick = picked(row, mode, field)
    return None if pick is None else 1.0 if pick == "dense" else speedups(row, mode).get(pick)


def auto_within(row: dict, mode: str, field: str = "auto") -> bool | None:
    """The pick, as the layer runs it, within TOLERANCE of the fastest path it could have run, timed in this row and
    mode (the lean layer cannot run dense itself, only rebuilt)."""
    seconds = {k: v for k, v in row["seconds"].get(mode, {}).items()
               if k != "module" and not (field == "auto_lean" and k == "dense")}
    pick = picked(row, mode, field)
    if pick not in seconds:
        return None
    return seconds[pick] <= TOLERANCE * min(seconds.values())


def summary_line(row: dict) -> str:
    parts = []
    for mode in row["seconds"]:
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in speedups(row, mode).items())
        dense = row["seconds"][mode].get("dense", float("nan")) * 1e6
        lean = f", lean {row['auto_lean'][mode]}" if mode in row.get("auto_lean", {}) else ""
        parts.append(f"[{mode}] dense {dense:.1f} us; {sp}; auto -> {row['auto'].get(mode)}{lean}")
    err = f"; errors: {', '.join(row['errors'])}" if row["errors"] else ""
    return (f"{row['shape'][0]}x{row['shape'][1]} block {row['block']} sparsity {row['sparsity']:.0%} rows "
            f"{row['rows']}: " + " ".join(parts) + err)


def targets(row: dict, ours: str | None) -> dict:
    """The issue's targets at this point."""
    out = {}
    sp = speedups(row, "graph")
    if ours in sp:
        s, rows, block = row["sparsity"], row["rows"], row["block"]
        if rows == 1 or (rows <= 64 and block == 32 and s >= 0.7):
            out["0.8/(1-s)"] = sp[ours] >= 0.8 / (1 - s)
        if rows >= 512 and block == 64 and s in (0.7, 0.9):
            goal = 1.5 if s == 0.7 else 3
            out[f"{goal:g}x"] = sp[ours] >= goal
        if "torch" in sp:
            out["beats BSR"] = sp[ours] > sp["torch"]
    for mode in row["seconds"]:
        for field, label in (("auto", "auto"), ("auto_lean", "lean auto")):
            ok = auto_within(row, mode, field)
            if ok is not None:
                out[f"{label} {mode}"] = ok
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    where = f"{m.get('gpu', m['cpu'])}" + (f" (sm_{m['capability'].replace('.', '')}, CUDA {m['cuda']})"
                                            if "gpu" in m else f", {m['cores']} cores, {m['torch_threads']} torch threads")
    modes = MODES[doc["device"]]
    lines = [f"# Block-sparse kernels ({doc['device']})", "", f"Command: `{doc['command']}`  ", f"Machine: {where}  ",
             f"Load average (1/5/15 min) before: {m['load_before']}, after: {m.get('load_after')}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
             f"Date: {doc['date']}", ""] + ([doc["note"], ""] if doc.get("note") else []) + (
             [f"Measured in {doc['runs']} runs on this kind of machine, each going on from the last one's rows "
              "(--resume).", ""]
             if doc.get("runs", 1) > 1 else []) + (
             [f"**Cut short: {len(doc['results'])} rows of the grid so far.**", ""] if not doc.get("complete", True)
             else []) + [
             "Speedup = dense time / path time on the same inputs (higher is better; < 1 is slower than dense), per "
             "mode: graph = CUDA-graph replays (device time), eager = wall time of bursts of plain calls (host launch "
             "costs included). auto: the path prunekit.kernels' dispatch picks in that mode (its own measurement, "
             f"margin {doc['dispatch']['margin']}) for a layer with keep_dense=True, and that path's speedup here; "
             "auto, lean: the same for the default layer, which runs dense on a weight rebuilt per call; module: the "
             "keep_dense layer itself, dispatch included. Targets are listed in the script's docstring; met/MISSED "
             "per point." + copies_line(doc["results"]), ""]
    ours = doc.get("ours")
    peers = [p for p in ([ours] if ours else []) + ["rebuilt", "torch", "semi_structured"]
             if any(p in r["seconds"].get(mode, {}) or p in r["errors"] for r in doc["results"] for mode in modes)]
    head = ["shape", "block", "sparsity", "rows"]
    for mode in modes:
        head += [f"dense us ({mode})"] + [f"{LABELS.get(p, p)} ({mode})" for p in peers] + [
            f"auto ({mode})", f"auto, lean ({mode})", f"module ({mode})"]
    head.append("targets")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        cells = [f"{r['shape'][0]}x{r['shape'][1]}", str(r["block"]), f"{r['sparsity']:.0%}", str(r["rows"])]
        for mode in modes:
            sp, sec = speedups(r, mode), r["seconds"].get(mode, {})
            cells.append(f"{sec['dense'] * 1e6:.1f}" if "dense" in sec else "-")
            cells += [f"{sp[p]:.2f}x" if p in sp else ("error" if p in r["errors"] else "") for p in peers]
            for field in ("auto", "auto_lean"):
                gain = auto_speedup(r, mode, field)
                cells.append(f"{picked(r, mode, field)} ({gain:.2f}x)" if gain is not None else "")
            cells.append(f"{sp['module']:.2f}x" if "module" in sp else "")
        cells.append(", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets(r, ours).items()))
        lines.append("| " + " | ".join(cells) + " |")
    summary = {}
    for r in doc["results"]:
        for k, v in targets(r, ours).items():
            summary.setdefault(k, [0, 0])[0 if v else 1] += 1
    if summary:
        lines += ["", "Targets: " + "; ".join(f"{k}: {met} met, {missed} missed" for k, (met, missed) in
                                              summary.items())]
    varied = [r for r in doc["results"] if len(r.get("variants") or {}) > 1]
    if varied:
        lines += ["", "Kernel variants (graph mode, us; the planner's launch first, * the fastest here, > the one "
                  "the backend's own tuning chose and ran above):", "",
                  "| shape | block | sparsity | rows | variants |", "|---|---|---|---|---|"]
        for r in varied:
            best = min((v for v in r["variants"].values() if v), default=None)
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['block']} | {r['sparsity']:.0%} | {r['rows']} | "
                         + ", ".join(f"{'>' if name == r.get('tuned') else ''}{name.removeprefix('pk_')} "
                                     f"{v * 1e6:.1f}{'*' if v == best else ''}"
                                     for name, v in r["variants"].items() if v) + " |")
    errors = {(p, e) for r in doc["results"] for p, e in r["errors"].items()}
    if errors:
        lines += ["", "Errors:"] + [f"- {p}: {e}" for p, e in sorted(errors)]
    return "\n".join(lines) + "\n"


def copies_line(results: list[dict]) -> str:
    """Where the rows read their weights from, per shape (rows from before copies were kept say nothing)."""
    found = {f"{r['shape'][0]}x{r['shape'][1]}": r["copies"] for r in results if "copies" in r}
    if not found:
        return ""
    return (" Each path went through copies of its weights in turn, as many as hold twice the cache, so that every "
            "call read them from memory (" + ", ".join(f"{shape}: {n}" for shape, n in found.items()) + ").")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows_list = sorted({r["rows"] for r in doc["results"]})
    fig, axes = plt.subplots(1, len(rows_list), figsize=(4.5 * len(rows_list), 3.8), squeeze=False,
                             constrained_layout=True)
    ours = doc.get("ours")
    for ax, rows in zip(axes[0], rows_list):
        for path_name, style in ((ours, "-"), ("torch", "--")):
            if not path_name:
                continue
            for block, marker in ((32, "o"), (64, "s")):
                for shape in SHAPES:
                    pts = [(r["sparsity"], speedups(r, MODES[doc["device"]][0]).get(path_name)) for r in doc["results"]
                           if r["rows"] == rows and r["block"] == block and r["shape"] == list(shape)]
                    pts = [(s, v) for s, v in pts if v]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, ms=4, lw=1,
                                label=f"{LABELS[path_name]} {block}x{block} {shape[0]}x{shape[1]}")
        ax.axhline(1.0, color="k", lw=0.8)
        if doc["device"] == "cuda" and rows <= 64:
            xs = [s for s in SPARSITIES]
            ax.plot(xs, [0.8 / (1 - s) for s in xs], ":", color="0.4", label="target 0.8/(1-s)")
        ax.set(title=f"{rows} rows", xlabel="block sparsity", ylabel="speedup over dense", yscale="log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].legend(fontsize=6)
    where = doc["machine"].get("gpu", doc["machine"]["cpu"])
    fig.suptitle(f"block-sparse x dense, {doc['results'][0]['dtype']}, {where}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["cuda_ext", "cupy"], help="our kernels through this launcher only")
    parser.add_argument("--quick", action="store_true", help="one shape, half the row counts: a smoke run")
    parser.add_argument("--rows", type=int, nargs="+", help="only these row counts (default: the grid's)")
    parser.add_argument("--out", type=Path, help="results prefix (default benchmarks/results/kernels_<device>)")
    parser.add_argument("--note", default="", help="a line for the results (what else the machine was doing)")
    parser.add_argument("--variants", action="store_true", help="on a GPU also time every launch of the planned kernel "
                        "(splits, tc tiles) in graph mode, to tune launch.THREAD_BLOCKS and TC_SMALL_ROWS")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared CPU, where a "
                        "second thread waits on whatever else holds the other core")
    parser.add_argument("--resume", type=Path, help="the .json of an earlier run of this grid cut short (a time "
                        "limit): its rows are kept and only the rest are measured")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    here = machine(args.device)
    earlier = json.loads(args.resume.read_text()) if args.resume else None
    model = lambda info: info.get("gpu", info["cpu"])  # noqa: E731
    if earlier and (earlier["device"], model(earlier["machine"])) != (args.device, model(here)):
        raise SystemExit(f"--resume {args.resume} was measured on {model(earlier['machine'])}, not on this "
                         f"{model(here)}: one table, one kind of machine; run the grid afresh")
    start = time.perf_counter()
    doc = {"device": args.device, "command": "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "machine": earlier["machine"] if earlier else here, "versions": versions(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0,
           "ours": None, "dispatch": {"margin": dispatch.MARGIN}, "note": args.note, "complete": False,
           "runs": earlier.get("runs", 1) + 1 if earlier else 1, "results": []}
    out = args.out or RESULTS / f"kernels_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: list[dict]) -> None:  # after every row, so that a run cut short keeps what it measured
        doc["results"] = results
        doc["seconds"] = round(time.perf_counter() - start + (earlier["seconds"] if earlier else 0.0), 1)
        doc["ours"] = next((p for r in results for m in r["seconds"].values() for p in m
                            if p in ("cuda_ext", "cupy", "cpu")), None)
        partial = out.with_suffix(".json.partial")  # then renamed: a run killed while writing keeps the last rows
        partial.write_text(json.dumps(doc, indent=1))
        partial.replace(out.with_suffix(".json"))
        out.with_suffix(".md").write_text(markdown(doc))

    done = {key(r): r for r in earlier["results"]} if earlier else None
    results = run(args.device, args.backend, args.quick, args.rows, args.variants, done, save)
    doc["machine"]["load_after"] = load_average()
    doc["complete"] = True
    save(results)
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png in {doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
