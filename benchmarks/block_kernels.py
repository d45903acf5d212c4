"""Block-sparse kernels against dense and their peers, on LLaMA-7B layer shapes.

    python benchmarks/block_kernels.py --device cpu     # CPU rows: batch 1 and 8, fp32, dense vs PyTorch BSR vs auto
    python benchmarks/block_kernels.py --device cuda    # the GPU grid below (builds the extension on first use)

GPU grid: weights 4096x4096, 11008x4096 and 4096x11008 ([out, in], as q/o, gate/up and down projections), rows 1,
16, 512 and 4096, bf16, 50/70/90% of the blocks pruned at random (exactly, in whole blocks) with 32x32 and 64x64
blocks. Peers in the same process, on the same inputs: cuBLAS dense (F.linear of the masked weight), PyTorch's BSR
(torch.sparse_bsr_tensor @ dense) and, at 50%, 2:4 semi-structured sparsity (to_sparse_semi_structured) of a
2:4-pruned weight of the same shape. GPU times are CUDA-graph replays of 20 calls timed with events (a plain event
loop where a path cannot be captured), median of 5; CPU times are medians of the paths timed in turns, call by
call, for at least 0.3 s each (prunekit.kernels.dispatch.timings), so that load from elsewhere hits all alike.
Every output is checked against the dense product before it is timed. "auto" is what prunekit.kernels' dispatch
picks for the layer (its own measurement) and the time of that pick in this run.

Targets (issue 7), reported per point: at 1 and 16 rows a speedup over dense of at least 0.8 / (1 - sparsity) (the
memory-bound ideal); at 4096 rows with 64x64 blocks and 90% sparsity at least 4x; faster than PyTorch's BSR at
every point.

On a GPU machine with nothing but this checkout and a CUDA build of torch: the extension compiles at first use
(PRUNEKIT_JIT_CUDA=1 is set here, about two minutes for one architecture); CuPy is used instead when it is
installed and the extension is not (--backend cupy to force it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import load_average, machine, versions  # noqa: E402
from prunekit.kernels import BlockLayout, BlockSparseLinear, backends, block_sparse_linear, dispatch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = (0.5, 0.7, 0.9)
BLOCKS = (32, 64)
ROWS = {"cuda": (1, 16, 512, 4096), "cpu": (1, 8)}
RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"torch": "PyTorch BSR", "cuda_ext": "prunekit (cuda_ext)", "cupy": "prunekit (cupy)", "semi_structured": "2:4"}


def time_cuda(fn) -> tuple[float, str]:
    """Seconds per call: a CUDA graph of 20 calls replayed 5 times (median), or an event loop if capture fails."""
    calls = 20
    fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        runs, how = [], "graph"
        for _ in range(5):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            runs.append(begin.elapsed_time(end) / 1e3 / calls)
    except Exception:  # noqa: BLE001 - some peers cannot be captured (host-side work, allocations)
        runs, how = [], "events"
        for _ in range(5):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            runs.append(begin.elapsed_time(end) / 1e3 / calls)
    return statistics.median(runs), how


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


def run(device: str, backend_name: str | None, quick: bool) -> list[dict]:
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
    shapes = SHAPES[:1] if quick else SHAPES
    rows_list = ROWS[device][:2] if quick else ROWS[device]
    results = []
    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(out_f + in_f)
        weight = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype).to(dev)
        inputs = {r: torch.randn(r, in_f, generator=g).to(dtype).to(dev) for r in rows_list}
        for block in BLOCKS:
            for sparsity in SPARSITIES:
                keep = block_mask(out_f, in_f, block, sparsity, seed=block).to(dev)
                masked = weight * keep
                layout = BlockLayout.from_mask(keep, block)
                values = layout.gather(masked)
                bsr = BlockSparseLinear(layout, values.clone(), None, backend="auto")
                for rows, x in inputs.items():
                    ref = F.linear(x, masked)
                    row = {"shape": [out_f, in_f], "block": block, "sparsity": sparsity, "rows": rows,
                           "dtype": str(dtype).replace("torch.", ""), "seconds": {}, "timing": {}, "errors": {}}
                    paths = {"dense": lambda: F.linear(x, masked),
                             "torch": lambda: block_sparse_linear(x, values, layout, None, backends.get("torch"))}
                    if ours:
                        paths[ours] = lambda: block_sparse_linear(x, values, layout, None, backends.get(ours))
                    measure(paths, ref, row, dev)
                    with torch.no_grad():
                        row["auto"] = bsr.choose(x)
                    problem = dispatch.Problem.of("bsr", (out_f, in_f), block, layout.density, dtype, dev, rows)
                    row["auto_measured"] = dispatch.decisions()[problem].seconds  # what the dispatch itself saw
                    results.append(row)
                    print(summary_line(row), flush=True)
        if device == "cuda" and not quick:
            results.extend(two_four(weight, inputs))
    return results


def measure(paths: dict, ref: torch.Tensor, row: dict, device: torch.device) -> None:
    """Checks every path against the dense product, then times those that pass into row["seconds"]: on a GPU each
    alone (CUDA graphs), on the CPU in turns call by call (dispatch.timings), at least 0.3 s each."""
    ok = {}
    for name, fn in paths.items():
        try:
            with torch.no_grad():
                check(fn(), ref, name)
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this point is reported
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    with torch.no_grad():
        if device.type == "cuda":
            for name, fn in ok.items():
                row["seconds"][name], row["timing"][name] = time_cuda(fn)
        else:
            seconds, errors = dispatch.timings(ok, device, min_seconds=0.3, max_rounds=200)
            row["seconds"].update(seconds)
            row["errors"].update(errors)
            row["timing"] = {name: "clock, in turns" for name in seconds}


def two_four(weight: torch.Tensor, inputs: dict) -> list[dict]:
    """2:4 semi-structured at 50% on the same shape and inputs, against the dense product of that weight."""
    from prunekit.kernels import SemiStructuredLinear

    out_f, in_f = weight.shape
    masked = weight * two_four_mask(out_f, in_f, seed=1).to(weight.device)
    rows_out = []
    try:
        layer = SemiStructuredLinear(masked, None, backend="semi_structured")
    except Exception as e:  # noqa: BLE001
        return [{"shape": [out_f, in_f], "block": "2:4", "sparsity": 0.5, "rows": r, "seconds": {}, "timing": {},
                 "errors": {"semi_structured": f"{type(e).__name__}: {str(e)[:200]}"}} for r in inputs]
    for rows, x in inputs.items():
        row = {"shape": [out_f, in_f], "block": "2:4", "sparsity": 0.5, "rows": rows, "dtype": "bfloat16",
               "seconds": {}, "timing": {}, "errors": {}}
        measure({"dense": lambda: F.linear(x, masked), "semi_structured": lambda: layer(x)}, F.linear(x, masked), row,
                weight.device)
        rows_out.append(row)
        print(summary_line(row), flush=True)
    return rows_out


def speedups(row: dict) -> dict:
    dense = row["seconds"].get("dense")
    return {k: dense / v for k, v in row["seconds"].items() if dense and k != "dense"}


def summary_line(row: dict) -> str:
    sp = ", ".join(f"{k} {v:.2f}x" for k, v in speedups(row).items())
    auto = f", auto -> {row['auto']}" if "auto" in row else ""
    err = f", errors: {', '.join(row['errors'])}" if row["errors"] else ""
    return (f"{row['shape'][0]}x{row['shape'][1]} block {row['block']} sparsity {row['sparsity']:.0%} rows "
            f"{row['rows']}: dense {row['seconds'].get('dense', float('nan')) * 1e6:.1f} us; {sp}{auto}{err}")


def targets(row: dict, ours: str) -> dict:
    """The issue's targets at this point (only for our kernel's rows)."""
    sp = speedups(row)
    if ours not in sp:
        return {}
    out = {}
    if row["rows"] <= 16:
        out["memory-bound"] = sp[ours] >= 0.8 / (1 - row["sparsity"])
    if row["rows"] == 4096 and row["block"] == 64 and row["sparsity"] == 0.9:
        out["4x at 4096 rows"] = sp[ours] >= 4
    if "torch" in row["seconds"]:
        out["beats PyTorch BSR"] = row["seconds"][ours] < row["seconds"]["torch"]
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    where = f"{m.get('gpu', m['cpu'])}" + (f" (sm_{m['capability'].replace('.', '')}, CUDA {m['cuda']})"
                                            if "gpu" in m else f", {m['cores']} cores, {m['torch_threads']} torch threads")
    lines = [f"# Block-sparse kernels ({doc['device']})", "", f"Command: `{doc['command']}`  ", f"Machine: {where}  ",
             f"Load average (1/5/15 min) before: {m['load_before']}, after: {m.get('load_after')}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
             f"Date: {doc['date']}", ""] + ([doc["note"], ""] if doc.get("note") else []) + [
             "Speedup = dense time / path time on the same inputs (higher is better; < 1 is slower than dense). "
             "auto: the path prunekit.kernels' dispatch picks (its own measurement, margin "
             f"{doc['dispatch']['margin']}), and that path's speedup in this run.", "",
             "GPU times: CUDA-graph replays (see the JSON's timing field); CPU times: medians of the paths timed in "
             "turns, call by call, for at least 0.3 s each. The CPU "
             "rows are fp32: PyTorch's BSR matmul on the CPU (MKL) takes no fp16/bf16, and the CUDA kernels do not "
             "run there.", ""]
    ours = doc.get("ours")
    peers = [p for p in ([ours] if ours else []) + ["torch", "semi_structured"]
             if any(p in r["seconds"] or p in r["errors"] for r in doc["results"])]
    head = (["shape", "block", "sparsity", "rows", "dense us"] + [LABELS.get(p, p) for p in peers] + ["auto"]
            + (["targets"] if ours else []))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        sp = speedups(r)
        cells = [f"{r['shape'][0]}x{r['shape'][1]}", str(r["block"]), f"{r['sparsity']:.0%}", str(r["rows"]),
                 f"{r['seconds']['dense'] * 1e6:.1f}" if "dense" in r["seconds"] else "-"]
        cells += [f"{sp[p]:.2f}x" if p in sp else ("error" if p in r["errors"] else "") for p in peers]
        if "auto" in r:
            picked = sp.get(r["auto"], 1.0) if r["auto"] != "dense" else 1.0
            cells.append(f"{r['auto']} ({picked:.2f}x)")
        else:
            cells.append("")
        if ours:
            t = targets(r, ours)
            cells.append(", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in t.items()))
        lines.append("| " + " | ".join(cells) + " |")
    errors = {(p, e) for r in doc["results"] for p, e in r["errors"].items()}
    if errors:
        lines += ["", "Errors:"] + [f"- {p}: {e}" for p, e in sorted(errors)]
    return "\n".join(lines) + "\n"


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
                    pts = [(r["sparsity"], speedups(r).get(path_name)) for r in doc["results"]
                           if r["rows"] == rows and r["block"] == block and r["shape"] == list(shape)]
                    pts = [(s, v) for s, v in pts if v]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, ms=4, lw=1,
                                label=f"{LABELS[path_name]} {block}x{block} {shape[0]}x{shape[1]}")
        ax.axhline(1.0, color="k", lw=0.8)
        if doc["device"] == "cuda" and rows <= 16:
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
    parser.add_argument("--quick", action="store_true", help="one shape, two row counts: a smoke run")
    parser.add_argument("--out", type=Path, help="results prefix (default benchmarks/results/kernels_<device>)")
    parser.add_argument("--note", default="", help="a line for the results (what else the machine was doing)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared CPU, where a "
                        "second thread waits on whatever else holds the other core")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    info = machine(args.device)
    start = time.perf_counter()
    results = run(args.device, args.backend, args.quick)
    info["load_after"] = load_average()
    ours = next((p for r in results for p in r["seconds"] if p in ("cuda_ext", "cupy")), None)
    doc = {"device": args.device, "command": "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "machine": info, "versions": versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"), "seconds": round(time.perf_counter() - start, 1), "ours": ours,
           "dispatch": {"margin": dispatch.MARGIN}, "note": args.note, "results": results}
    out = args.out or RESULTS / f"kernels_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png in {doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
