"""docs/benchmarks.md and the README's headline table, generated from benchmarks/results/*.json so that no figure in
them is typed by hand.

    python benchmarks/make_docs.py           # rewrite both
    python benchmarks/make_docs.py --check   # exit 1 if either differs from what the JSON gives (tests/test_docs.py)

Each result JSON gets a section: a short table computed from its rows, the command, machine and date it records, and
links to the full table (the .md its benchmark wrote beside it). A JSON this script has no table for still gets its
section (command, date, links); results kept only as Markdown, text or logs are listed at the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BEGIN = "<!-- headline results: benchmarks/make_docs.py -->"
END = "<!-- end of headline results -->"
LLAMA_7B = ([4096, 4096], [11008, 4096], [4096, 11008])  # the projection shapes of LLaMA-7B among the kernel rows
sys.path.insert(0, str(Path(__file__).parent))  # (the benchmarks' own functions read their results' rows)


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def ppl(x: float) -> str:
    """A perplexity to about four significant figures; past 10,000 as 1.3e4."""
    if x >= 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def span(values: list[float], digits: int = 1) -> str:
    """min-max of speedups, as '1.6-1.9x' (one value when they round alike)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return f"{low}x" if low == high else f"{low}-{high}x"


def link(name: str, prefix: str = "../benchmarks/results/") -> str:
    return f"[`{name}`]({prefix}{name})"


def provenance(name: str, doc: dict) -> list[str]:
    """Where a result is and what it ran on (its command and notes are in its .md)."""
    files = [link(f"{name}.json")] + [link(f"{name}.md") for _ in [0] if (RESULTS / f"{name}.md").is_file()]
    machine = doc.get("machine", {})
    where = machine.get("gpu") or machine.get("cpu", "?")
    cores = f", {machine['cores']} cores" if "cores" in machine and not machine.get("gpu") else ""
    return [f"Source: {', '.join(files)}; {where}{cores}; {str(doc.get('date', '?'))[:10]}.", ""]


def rows_of(doc: dict) -> list[dict]:
    return doc.get("results") or doc.get("rows") or []


# --- one section per result --------------------------------------------------------------------------------------

def quality_cell(found: dict, tool: str, config: str, seconds: bool = True) -> str:
    """One llm_quality row as a table cell: its perplexity, with its pruning seconds; "-" where it was not run."""
    r = found.get((tool, config))
    if r is None:
        return "-"
    return f"{ppl(r['perplexity'])} ({r['seconds']:.0f} s)" if seconds else ppl(r["perplexity"])


def llm_quality(doc: dict) -> list[str]:
    found = {(r["tool"], r["config"]): r for r in rows_of(doc)}
    dense = found[("prunekit", "dense")]["perplexity"]
    configs = [c for tool, c in found if tool == "prunekit" and c != "dense"]
    rows = [[config, quality_cell(found, "prunekit", config), quality_cell(found, "prunekit-block", config, False),
             quality_cell(found, "llmcompressor", config)] for config in configs]
    return [f"SmolLM2-135M pruned on the protocol's calibration windows, perplexity on its eval windows (dense "
            f"{ppl(dense)}); seconds of pruning on 2 CPU cores. Block order calibrates every layer of a block on the "
            "dense block, as llm-compressor does. The full table's notes say which rows shared the machine.", ""] + \
        table(["config", "prunekit", "prunekit, block order", "llm-compressor"], rows)


def llm_quality_seeds(docs: list[tuple[str, dict]]) -> list[str]:
    tools = ("prunekit", "prunekit-block", "llmcompressor")
    rows = []
    for name, doc in docs:
        found = {(r["tool"], r["config"]): r["perplexity"] for r in rows_of(doc) if "perplexity" in r}
        for config in sorted({c for _, c in found}):
            rows.append([config, doc["protocol"]["calibration"], link(f"{name}.json")]
                        + [ppl(found[(t, config)]) if (t, config) in found else "-" for t in tools])
    return ["The same configurations over other calibration samples (and, batch4, another calibration batch). The "
            "geometric means of the ratios are in " + link("llm_quality_seeds.md") + " (benchmarks/seeds_summary.py).",
            ""] + table(["config", "calibration", "result", *tools], rows)


def llm_allocators(doc: dict) -> list[str]:
    found = {(r["sparsity"], r["importance"], r["allocator"]): r for r in rows_of(doc)}
    allocators = list(dict.fromkeys(a for _, _, a in found))
    rows = []
    for sparsity, importance in dict.fromkeys((s, i) for s, i, _ in found):
        got = {a: found[(sparsity, importance, a)]["perplexity"] for a in allocators
               if (sparsity, importance, a) in found}  # ADMM runs with DP only
        best = min(got.values())
        rows.append([f"{sparsity:.0%}", importance] + [
            "-" if a not in got else f"**{ppl(got[a])}**" if got[a] == best else ppl(got[a]) for a in allocators])
    return ["SmolLM2-135M perplexity with each allocator (best per row in bold); the time each allocator's "
            "measurement costs is in the full table.", ""] + table(["sparsity", "estimator", *allocators], rows)


def estimators(doc: dict) -> list[str]:
    llm = {r["estimator"]: r for r in rows_of(doc) if r["part"] == "llm"}
    enc = defaultdict(dict)
    for r in rows_of(doc):
        if r["part"] == "encoder" and r["estimator"] != "dense":
            enc[r["estimator"]][(r["kind"], r["fraction"])] = r["recall_at_1"]
    names = list(dict.fromkeys(list(llm) + list(enc)))
    cells = sorted({key for found in enc.values() for key in found})

    def recall(name, key):
        value = enc.get(name, {}).get(key)
        return "-" if value is None else f"{value:.3f}"

    rows = [[name, ppl(llm[name]["perplexity"]) if name in llm else "-",
             f"{llm[name]['seconds']:.0f}" if name in llm else "-"] + [recall(name, key) for key in cells]
            for name in names]
    dense = next(r["recall_at_1"] for r in rows_of(doc) if r["part"] == "encoder" and r["estimator"] == "dense")
    return ["Every estimator at 50% unstructured on SmolLM2-135M (perplexity, seconds), and MiniLM's heads and MLP "
            f"channels zeroed in every layer without refit (retrieval recall@1; dense {dense:.3f}).", ""] + \
        table(["estimator", "SmolLM2 50% perplexity", "s"] + [f"MiniLM {k} {f:.0%}" for k, f in cells], rows)


def structured(doc: dict) -> list[str]:
    rows = []
    encoder = [r for r in rows_of(doc) if r["part"] == "encoder" and r["config"] != "dense"]
    dense = next(r for r in rows_of(doc) if r["part"] == "encoder" and r["config"] == "dense")
    for ratio in sorted({r["ratio"] for r in encoder}):
        at = [r for r in encoder if r["ratio"] == ratio]
        tp = max((r for r in at if r["config"].startswith("tp-")), key=lambda r: r["recall_at_1"])
        ours = max((r for r in at if not r["config"].startswith("tp-")), key=lambda r: r["recall_at_1"])
        rows.append([f"{ratio:.0%}", f"{tp['recall_at_1']:.3f} ({tp['config']})",
                     f"{ours['recall_at_1']:.3f} ({ours['config']})", f"{ours['latency_ratio']:.2f}"])
    out = [f"all-MiniLM-L6-v2 with heads and MLP channels removed at equal MACs, no fine-tuning: best retrieval "
           f"recall@1 (dense {dense['recall_at_1']:.3f}) of Torch-Pruning and of prunekit.", ""]
    out += table(["channel ratio", "best Torch-Pruning", "best prunekit", "prunekit latency / dense"], rows)
    llm = [r for r in rows_of(doc) if r["part"] == "llm"]
    if llm:
        out += ["", "SmolLM2-135M with a share of its decoder weights removed (it reloads with "
                "`from_pretrained`):", ""]
        out += table(["importance", "weights removed", "perplexity", "tokens/s vs dense", "config after"],
                     [[r["config"], f"{r['sparsity']:.1%}", f"{ppl(r['dense_perplexity'])} -> {ppl(r['perplexity'])}",
                       f"{r['speedup']:.2f}x", ", ".join(f"{k} {v}" for k, v in r["config_after"].items())]
                      for r in llm])
    return out


def tuning_choice(doc: dict) -> dict:
    """{(variant, method label): (lr, [rows over seeds])}: per method, the learning rate with the lowest mean
    validation perplexity, as benchmarks/tuning.py chooses it."""
    runs = defaultdict(list)
    for r in rows_of(doc):
        options = " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted((r.get("options") or {}).items()))
        runs[(r["variant"], f"{r['method']} {options}".strip(), r["lr"])].append(r)
    chosen = {}
    for (variant, method, lr), rows in runs.items():
        score = statistics.mean(r["validation_perplexity"] for r in rows)
        if (variant, method) not in chosen or score < chosen[(variant, method)][0]:
            chosen[(variant, method)] = (score, lr, rows)
    return {key: (lr, rows) for key, (_, lr, rows) in chosen.items()}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def tuning_seeds(doc: dict) -> list[str]:
    chosen = tuning_choice(doc)
    out = ["40 training steps on SmolLM2-135M, dense and pruned to 50% with Wanda; per method the rate (and option) "
           "chosen on validation windows, over the seeds given; test perplexity as mean ± standard deviation; memory "
           "overhead against LoRA's; pruned entries a method leaves nonzero.", ""]
    rows = []
    for (variant, method), (lr, runs) in sorted(chosen.items()):
        lora = chosen.get((variant, "lora"))
        memory = statistics.mean(r["overhead_mib"] for r in runs)
        relative = f"{memory / statistics.mean(r['overhead_mib'] for r in lora[1]):.2f}x" if lora else "-"
        rows.append([variant, method, f"{lr:g}", len(runs), mean_sd([r["perplexity"] for r in runs]), relative,
                     f"{max(r['pruned_nonzero'] for r in runs):,}"])
    return out + table(["model", "method", "lr", "seeds", "test perplexity", "memory vs LoRA", "pruned nonzero"], rows)


def cpu_inference_model(doc: dict) -> list[str]:
    found = {(r["model"], r["mode"], r["dtype"]): r for r in rows_of(doc) if r["threads"] == 1}
    dense = {dtype: found[("dense", "dense", dtype)] for dtype in ("fp32", "bf16")}
    models = [m for m, mode, dtype in found if mode == "sparse" and dtype == "fp32"]
    rows = []
    for model in models:
        sparse = {dtype: found[(model, "sparse", dtype)] for dtype in ("fp32", "bf16")}
        speed = [sparse[d]["tokens_per_second"] / dense[d]["tokens_per_second"] for d in ("fp32", "bf16")]
        prefill = [dense[d]["prefill_seconds"] / sparse[d]["prefill_seconds"] for d in ("fp32", "bf16")]
        rows.append([model, f"{speed[0]:.2f}x", f"{speed[1]:.2f}x", f"{prefill[0]:.2f}x / {prefill[1]:.2f}x",
                     f"{sparse['fp32']['checkpoint_bytes'] / dense['fp32']['checkpoint_bytes']:.2f}x",
                     f"{sparse['fp32']['layer_bytes'] / sparse['fp32']['dense_layer_bytes']:.2f}x"])
    return [f"SmolLM2-135M compressed by `prunekit.kernels.convert` on 1 CPU thread, against the dense model of the "
            f"same dtype (dense decode: {dense['fp32']['tokens_per_second']:.1f} tokens/s fp32, "
            f"{dense['bf16']['tokens_per_second']:.1f} bf16); greedy decoding of 128 tokens after a 512-token window.",
            ""] + table(["pruned (compressed)", "decode fp32", "decode bf16", "prefill fp32 / bf16",
                         "checkpoint fp32", "pruned layers in memory"], rows)


def cpu_inference_keep_dense(doc: dict) -> list[str]:
    from cpu_inference import model_rows

    rows = []
    for dtype, _, dense, variants in model_rows(doc):
        for name, sparse, _, kept in variants:
            if sparse and kept:
                rows.append([name, dtype] + [
                    f"{sparse[k] / dense[k]:.2f}x / {kept[k] / dense[k]:.2f}x" if k == "tokens_per_second" else
                    f"{dense[k] / sparse[k]:.2f}x / {dense[k] / kept[k]:.2f}x"
                    for k in ("tokens_per_second", "prefill_seconds")] + [
                    f"{sparse['layer_bytes'] / sparse['dense_layer_bytes']:.2f}x / "
                    f"{kept['layer_bytes'] / kept['dense_layer_bytes']:.2f}x"])
    return [f"The same compressed SmolLM2-135M models on {doc['machine']['cpu']}, 1 thread, without / with "
            "`keep_dense=True`, against dense. Prefill here is a median of 3 in separate processes, which moves by "
            "about 10% between runs; the findings in the .md time it in turns in one process.", ""] + \
        table(["pruned", "dtype", "decode", "prefill", "pruned layers in memory"], rows)


def cpu_inference_turns(doc: dict) -> list[str]:
    from cpu_inference import turns_ratios, turns_rows

    rows = []
    for dtype, name, _, speed in turns_rows(doc):
        (decode, prefill), (kept_decode, kept_prefill) = (turns_ratios(speed)[m] for m in ("sparse", "kept"))
        rows.append([name, dtype, f"{decode:.2f}x / {kept_decode:.2f}x", f"{prefill:.3f}x / {kept_prefill:.3f}x"])
    return [f"The compressed SmolLM2-135M models without / with `keep_dense=True` against dense, the three in one "
            f"process taking turns (medians of {len(rows_of(doc)[0]['prefill_seconds'])}), on "
            f"{doc['machine']['cpu']}, 1 thread: differences of a few percent that separate processes cannot resolve.",
            ""] + table(["pruned", "dtype", "decode", "prefill"], rows)


def cpu_inference_layers(doc: dict) -> list[str]:
    speedups = defaultdict(list)
    for r in rows_of(doc):
        if r["shape"] in LLAMA_7B and r["threads"] == 1 and r["rows"] == 1 and "prunekit" in r["seconds"]:
            speedups[(r["pattern"], r["dtype"])].append(r["seconds"]["dense"] / r["seconds"]["prunekit"])
    patterns = list(dict.fromkeys(p for p, _ in speedups))
    rows = [[p] + [span(speedups[(p, d)]) if (p, d) in speedups else "-" for d in ("fp32", "bf16")]
            for p in patterns]
    return ["One Linear of LLaMA-7B's shapes, 1 row (decode), 1 thread: prunekit's CPU kernel against dense, the "
            "range over the three shapes.", ""] + table(["mask", "fp32", "bf16"], rows)


def kernels_cpu(doc: dict) -> list[str]:
    from block_kernels import auto_speedup

    paths = {"cpu": "prunekit's kernel", "torch": "PyTorch BSR", "rebuilt": "dense, rebuilt per call",
             "auto": "auto, keep_dense", "auto_lean": "auto"}
    speedups = defaultdict(lambda: defaultdict(list))
    for r in rows_of(doc):
        seconds = r["seconds"].get("eager", {})
        found = speedups[(r["block"], r["sparsity"], r["rows"])]
        for name in paths:
            if name in seconds:
                found[name].append(seconds["dense"] / seconds[name])
            elif name.startswith("auto") and auto_speedup(r, "eager", name) is not None:
                found[name].append(auto_speedup(r, "eager", name))
    rows = [[f"{b}x{b}", f"{s:.0%}", n] + [span(found[name]) if found[name] else "-" for name in paths]
            for (b, s, n), found in sorted(speedups.items())]
    return ["A block-sparse layer's paths against dense on the CPU (fp32, 1 thread), over the three LLaMA-7B shapes; "
            "\"dense, rebuilt per call\" is what a BlockSparseLinear pays where it runs dense, unless it keeps its "
            "dense weight (keep_dense); auto: the path the layer's dispatch picks, as the layer runs it.", ""] + \
        table(["block", "sparsity", "rows", *paths.values()], rows)


def cuda_speedups(doc: dict) -> dict:
    """(rows, block, sparsity) -> graph-mode speedups of prunekit's CUDA kernel over cuBLAS, one per shape."""
    speedups = defaultdict(list)
    for r in rows_of(doc):
        graph = r["seconds"].get("graph", {})
        if isinstance(r["block"], int) and "cuda_ext" in graph:
            speedups[(r["rows"], r["block"], r["sparsity"])].append(graph["dense"] / graph["cuda_ext"])
    return speedups


def kernels_cuda_table(doc: dict) -> list[str]:
    """Graph-mode speedup by rows, block and sparsity (range over the shapes)."""
    speedups = cuda_speedups(doc)
    sparsities = sorted({s for _, _, s in speedups})
    rows = [[n, f"{b}x{b}"] + [span(speedups[(n, b, s)]) if (n, b, s) in speedups else "-" for s in sparsities]
            for n, b in sorted({(n, b) for n, b, _ in speedups})]
    return table(["rows", "block"] + [f"{s:.0%}" for s in sparsities], rows)


def kernels_cuda(doc: dict) -> list[str]:
    return [f"One bf16 Linear of LLaMA-7B's shapes with random block masks on an {doc['machine'].get('gpu', 'GPU')}: "
            "prunekit's `cuda_ext` kernel against cuBLAS dense, replayed in a CUDA graph (range over the three "
            "shapes). The 2-64-row kernel was reworked after this run; its new figures are in "
            + link("kernels_cuda_bt.md") + " (Markdown only).", ""] + kernels_cuda_table(doc)


def kernels_cuda_model(doc: dict) -> list[str]:
    decode, model = doc["decode"], doc["model"]
    return [f"A {model['parameters'] / 1e9:.1f}B-parameter Llama (random weights, {model['dtype']}) with "
            f"{doc['sparsity']:.0%} of its {doc['block']}x{doc['block']} blocks pruned, on an "
            f"{doc['machine'].get('gpu', 'GPU')}:", ""] + \
        table(["", "dense", "block-sparse", "speedup"],
              [["decode, CUDA graph (tokens/s)", f"{decode['dense graph']['tokens_per_second']:.0f}",
                f"{decode['sparse graph']['tokens_per_second']:.0f}", f"{decode['speedup graph']:.2f}x"],
               ["decode, eager (tokens/s)", f"{decode['dense eager']['tokens_per_second']:.0f}",
                f"{decode['sparse eager']['tokens_per_second']:.0f}", f"{decode['speedup eager']:.2f}x"],
               [f"prefill {' x '.join(map(str, doc['prefill']['batch']))} tokens (ms)",
                f"{doc['prefill']['dense'] * 1e3:.1f}", f"{doc['prefill']['sparse'] * 1e3:.1f}",
                f"{doc['prefill']['speedup']:.2f}x"]])


def vision(doc: dict) -> list[str]:
    rows = []
    for (model, ratio) in dict.fromkeys((r["model"], r["ratio"]) for r in rows_of(doc)):
        at = [r for r in rows_of(doc) if (r["model"], r["ratio"]) == (model, ratio)]
        best = {tool: max((r for r in at if r["tool"] == tool), key=lambda r: r["top1_agreement"])
                for tool in ("prunekit", "Torch-Pruning")}
        rows.append([model, f"{ratio:.0%}"] + [f"{best[t]['top1_agreement']:.3f} ({best[t]['config']})"
                                                for t in best] + [f"{doc['dense'][model]['accuracy']:.3f}"])
    return ["Pretrained CNNs with channels removed until the whole model's MACs fall by the ratio, no fine-tuning: "
            "the best top-1 agreement with the dense model of each tool.", ""] + \
        table(["model", "MACs removed", "best prunekit", "best Torch-Pruning", "dense labelled top-1"], rows)


SECTIONS = {  # result name -> (title, table)
    "llm_quality": ("LLM quality against llm-compressor", llm_quality),
    "llm_allocators": ("Allocators", llm_allocators),
    "estimators": ("Importance estimators", estimators),
    "structured": ("Structured pruning", structured),
    "tuning_seeds": ("Fine-tuning", tuning_seeds),
    "cpu_inference_model": ("CPU inference: a whole model", cpu_inference_model),
    "cpu_inference_layers": ("CPU inference: one layer", cpu_inference_layers),
    "cpu_inference_model_keep_dense": ("CPU inference: keep_dense", cpu_inference_keep_dense),
    "cpu_inference_turns": ("CPU inference: keep_dense, in turns", cpu_inference_turns),
    "kernels_cuda": ("GPU kernels: one layer", kernels_cuda),
    "kernels_cuda_model": ("GPU kernels: a whole model", kernels_cuda_model),
    "kernels_cpu": ("Block-sparse kernels on the CPU", kernels_cpu),
    "vision": ("Vision: structured pruning of CNNs", vision),
}
SEEDS = ("llm_quality_seed", "llm_quality_batch")  # folded into one section of their own


def benchmarks_page() -> str:
    names = sorted(p.stem for p in RESULTS.glob("*.json"))
    out = ["# Benchmarks", "",
           "Generated by `python benchmarks/make_docs.py` from the JSON results in `benchmarks/results/`: every figure "
           "on this page is computed from them. Each section links the full table its benchmark wrote, which says "
           "how it was run; the protocol is in [protocol.md](protocol.md).", ""]
    for name in [n for n in SECTIONS if n in names] + [n for n in names if n not in SECTIONS and not n.startswith(SEEDS)]:
        doc = load(name)
        title, render = SECTIONS.get(name, (f"`{name}`", None))
        out += [f"## {title}", ""] + provenance(name, doc)
        if render is not None:
            out += render(doc) + [""]
    seeds = [(n, load(n)) for n in names if n.startswith(SEEDS)]
    if seeds:
        out += ["## LLM quality over calibration seeds", ""] + llm_quality_seeds(seeds) + [""]
    others = sorted(p.name for p in RESULTS.iterdir()
                    if p.suffix in (".md", ".txt", ".log") and not (RESULTS / f"{p.stem}.json").is_file())
    out += ["## Results without a JSON", "",
            "Tables and logs kept as they were written (their figures are not recomputed here):", ""]
    out += [f"- {link(name)}" for name in others]
    return "\n".join(out) + "\n"


def headline() -> str:
    """The README's results table: a few figures per stage, each with its source."""
    quality = {(r["tool"], r["config"]): r for r in rows_of(load("llm_quality"))}
    dense = quality[("prunekit", "dense")]["perplexity"]
    rows = []
    for config, what in (("wanda-50", "Wanda 50%"), ("sparsegpt-2:4", "SparseGPT 2:4")):
        ours, theirs = quality[("prunekit", config)], quality[("llmcompressor", config)]
        rows.append([f"SmolLM2-135M, {what}: perplexity (dense {ppl(dense)})",
                     f"{ppl(ours['perplexity'])} in {ours['seconds']:.0f} s (llm-compressor: "
                     f"{ppl(theirs['perplexity'])} in {theirs['seconds']:.0f} s)", "llm_quality.md"])
    allocation = {(r["sparsity"], r["importance"], r["allocator"]): r["perplexity"]
                  for r in rows_of(load("llm_allocators"))}
    rows.append(["SmolLM2-135M, Wanda 70%: perplexity by allocator",
                 f"uniform {ppl(allocation[(0.7, 'wanda', 'uniform')])}, OWL {ppl(allocation[(0.7, 'wanda', 'owl')])}"
                 f", DP {ppl(allocation[(0.7, 'wanda', 'dp')])}", "llm_allocators.md"])
    encoder = [r for r in rows_of(load("structured")) if r["part"] == "encoder" and r["ratio"] == 0.3]
    tp = max((r for r in encoder if r["config"].startswith("tp-")), key=lambda r: r["recall_at_1"])
    ours = max((r for r in encoder if not r["config"].startswith("tp-")), key=lambda r: r["recall_at_1"])
    rows.append(["MiniLM, 30% of heads and channels removed: recall@1 (dense "
                 f"{next(r['recall_at_1'] for r in rows_of(load('structured')) if r['config'] == 'dense'):.3f})",
                 f"{ours['recall_at_1']:.3f} (Torch-Pruning's best: {tp['recall_at_1']:.3f})", "structured.md"])
    chosen = tuning_choice(load("tuning_seeds"))
    lift, lora = chosen[("pruned", "lift")][1], chosen[("pruned", "lora")][1]
    memory = statistics.mean(r["overhead_mib"] for r in lift) / statistics.mean(r["overhead_mib"] for r in lora)
    rows.append(["Fine-tuning SmolLM2 pruned to 50%, 40 steps: perplexity",
                 f"LIFT {mean_sd([r['perplexity'] for r in lift])} at {memory:.2f}x LoRA's memory, pruned entries "
                 f"kept zero (LoRA: {mean_sd([r['perplexity'] for r in lora])})", "tuning_seeds.md"])
    cpu = {(r["model"], r["mode"], r["dtype"]): r for r in rows_of(load("cpu_inference_model")) if r["threads"] == 1}
    sparse, dense_cpu = cpu[("wanda 50%", "sparse", "fp32")], cpu[("dense", "dense", "fp32")]
    rows.append(["SmolLM2 Wanda 50%, compressed, 1 CPU thread (fp32)",
                 f"{sparse['tokens_per_second'] / dense_cpu['tokens_per_second']:.2f}x dense decode speed, checkpoint "
                 f"{sparse['checkpoint_bytes'] / dense_cpu['checkpoint_bytes']:.2f}x", "cpu_inference_model.md"])
    gpu = load("kernels_cuda_model")
    rows.append([f"{gpu['model']['parameters'] / 1e9:.1f}B Llama, {gpu['sparsity']:.0%} of 32x32 blocks, "
                 f"{gpu['machine']['gpu']}", f"{gpu['decode']['speedup graph']:.2f}x dense decode speed in a CUDA "
                 "graph", "kernels_cuda_model.md"])
    rows = [row[:2] + [link(row[2], "benchmarks/results/")] for row in rows]
    return "\n".join([BEGIN, *table(["", "measured", "source"], rows), END])


CPU_BEGIN = "<!-- CPU table: benchmarks/make_docs.py -->"
CPU_END = "<!-- end of CPU table -->"


def cpu_table() -> str:
    """The README's kernels section: SmolLM2-135M compressed against dense on one CPU thread."""
    doc = load("cpu_inference_model")
    runs = {(r["model"], r["mode"], r["dtype"]): r for r in rows_of(doc) if r["threads"] == 1}
    rows = []
    for name in dict.fromkeys(r["model"] for r in rows_of(doc) if r["model"] != "dense"):
        cells = [name]
        for dtype in ("fp32", "bf16"):
            dense, sparse = runs[("dense", "dense", dtype)], runs[(name, "sparse", dtype)]
            cells += [f"{sparse['tokens_per_second'] / dense['tokens_per_second']:.2f}x",
                      f"{dense['prefill_seconds'] / sparse['prefill_seconds']:.2f}x"]
        fp32 = runs[(name, "sparse", "fp32")]
        cells.append(f"{fp32['checkpoint_bytes'] / runs[('dense', 'dense', 'fp32')]['checkpoint_bytes']:.2f}x")
        rows.append(cells)
    caption = (f"SmolLM2-135M, 1 thread, {doc['machine']['cpu']}: speed and size of the compressed model over "
               f"dense ({link('cpu_inference_model.md', 'benchmarks/results/')}).")
    return "\n".join([CPU_BEGIN, caption, "", *table(
        ["pruned", "decode fp32", "prefill fp32", "decode bf16", "prefill bf16", "checkpoint"], rows), "",
        missed_cpu_targets(doc), CPU_END])


def missed_cpu_targets(doc: dict) -> str:
    """One sentence: which of the benchmark's targets this run missed, and where the profile that explains it is."""
    from cpu_inference import model_rows, model_targets

    missed = defaultdict(list)
    for dtype, threads, dense, variants in model_rows(doc):
        for name, sparse, *_ in variants:
            for target, met in model_targets(name, dtype, threads, dense, sparse).items():
                if not met:
                    ratio = (sparse["tokens_per_second"] / dense["tokens_per_second"] if target.startswith("decode")
                             else dense["prefill_seconds"] / sparse["prefill_seconds"])
                    missed[(dtype, target)].append((name, ratio))
    if not missed:
        return "Every target of the benchmark is met in this run."
    parts = [f"{dtype} {target.split()[0]} of " + ", ".join(f"{n} ({r:.2f}x)" for n, r in found)
             + f" (target {' '.join(target.split()[1:])})" for (dtype, target), found in missed.items()]
    return ("Missed in this run: " + "; ".join(parts) + ". The results file says why, from the profile: the "
            "attention and the dense tied lm_head, which pruning does not touch, cap bf16 decode; prefill runs dense "
            "at 512 rows on a weight decompressed per call (the layer never keeps it dense), which costs about 2% "
            "in bf16.")


GPU_BEGIN = "<!-- GPU table: benchmarks/make_docs.py -->"
GPU_END = "<!-- end of GPU table -->"


def gpu_table() -> str:
    """The README's kernels section: one layer's speedup on a GPU at 1, 16 and 4096 rows, 70% and 90% of blocks."""
    doc = load("kernels_cuda")
    speedups = cuda_speedups(doc)
    rows = [[f"{b}x{b}, {s:.0%}"] + [span(speedups[(n, b, s)]) for n in (1, 16, 4096)]
            for b in (32, 64) for s in (0.7, 0.9)]
    caption = (f"{doc['machine'].get('gpu', 'GPU')}, a bf16 LLaMA-7B layer (3 shapes), CUDA graph, commit "
               f"{doc.get('commit', '?')}: kernel over cuBLAS ({link('kernels_cuda.md', 'benchmarks/results/')}).")
    return "\n".join([GPU_BEGIN, caption, "", *table(["blocks pruned", "1 row", "16 rows", "4096 rows"], rows),
                      GPU_END])


ESTIMATORS_BEGIN = "<!-- estimators table: benchmarks/make_docs.py -->"
ESTIMATORS_END = "<!-- end of estimators table -->"


def estimators_table() -> str:
    """The README's importance section: the reconstruction estimators against llm-compressor's SparseGPT."""
    found = {(r["tool"], r["config"]): r for r in rows_of(load("llm_quality"))}
    dense = found[("prunekit", "dense")]["perplexity"]
    rows = []
    for budget, config in (("50%", "50"), ("2:4", "2:4"), ("60%", "60"), ("70%", "70"), ("80%", "80")):
        ours, theirs = found.get(("prunekit", f"admm-{config}")), found.get(("llmcompressor", f"sparsegpt-{config}"))
        ratio = f"{ours['perplexity'] / theirs['perplexity']:.2f}x" if ours and theirs else "-"
        rows.append([budget, quality_cell(found, "prunekit", f"wanda-{config}", False),
                     quality_cell(found, "prunekit", f"sparsegpt-{config}"),
                     quality_cell(found, "prunekit", f"admm-{config}"),
                     quality_cell(found, "llmcompressor", f"sparsegpt-{config}"), ratio])
    caption = (f"SmolLM2-135M perplexity after one-shot pruning at the same sparsity in every layer (dense "
               f"{ppl(dense)}), seconds of pruning on 2 CPU cores "
               f"({link('llm_quality.md', 'benchmarks/results/')}; with an allocator: "
               f"{link('llm_allocators.md', 'benchmarks/results/')}).")
    admm, sparsegpt = found[("prunekit", "admm-2:4")], found[("prunekit", "sparsegpt-2:4")]
    why = (f"ADMM is the default for N:M budgets because it measured best at 2:4, where no allocator can help (the "
           f"sparsity of every layer is fixed): perplexity {ppl(admm['perplexity'])} against SparseGPT's "
           f"{ppl(sparsegpt['perplexity'])}, in {admm['seconds'] / sparsegpt['seconds']:.1f}x its time. Other "
           "budgets default to Wanda, the fastest of the three.")
    allocated = {r["sparsity"]: r["perplexity"] for r in rows_of(load("llm_allocators"))
                 if r["importance"] == "admm" and r["allocator"] == "dp"}
    if allocated:
        why += (" With the DP allocator (on SparseGPT's distortion curves) ADMM reaches "
                + ", ".join(f"{ppl(p)} at {s:.0%}" for s, p in sorted(allocated.items())) + ".")
    return "\n".join([ESTIMATORS_BEGIN, caption, "", *table(
        ["budget", "wanda", "sparsegpt", "admm", "llm-compressor sparsegpt", "admm / llm-compressor"], rows),
        "", why, ESTIMATORS_END])


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"README.md lacks the markers {begin!r} ... {end!r}")
    return text[:start] + block + text[stop + len(end):]


def with_headline(readme: str) -> str:
    for begin, end, block in ((BEGIN, END, headline), (CPU_BEGIN, CPU_END, cpu_table), (GPU_BEGIN, GPU_END, gpu_table),
                              (ESTIMATORS_BEGIN, ESTIMATORS_END, estimators_table)):
        readme = replace_between(readme, begin, end, block())
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that both are up to date")
    args = parser.parse_args(argv)
    wanted = {PAGE: benchmarks_page(), README: with_headline(README.read_text())}
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python benchmarks/make_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
