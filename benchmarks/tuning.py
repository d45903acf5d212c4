"""Fine-tuning methods on SmolLM2-135M (docs/protocol.md): trainable parameters, training memory, seconds per step and
perplexity after training, for full fine-tuning, peft's LoRA and SHiRA, a naive sparse update, and prunekit's
LIFT, S2FT, IST and SPT; on the dense model and on a 50%-pruned one (recovery fine-tuning).

    python benchmarks/tuning.py                                  # every method, dense and pruned
    python benchmarks/tuning.py --methods lora lift --variants dense --steps 4 --eval-windows 2   # a quick look
    python benchmarks/tuning.py --variants dense --methods lora lift --lrs 1e-4 2e-4 5e-4 1e-3 --jobs 2  # a sweep
    python benchmarks/tuning.py --methods s2ft --set s2ft.value_heads=0.37 s2ft.heads=0.125   # a method option
    python benchmarks/tuning.py --variants dense --methods lora lift --lrs 1e-3 --seeds 0 1 2   # the spread

Each (variant, method) runs in a fresh process with 1 torch thread. Training: 40 steps of torch's AdamW (only on
the selected entries for sparse methods) of batch 2 x 256 tokens, windows drawn from the calibration split with
random.Random(1 + seed),
next-token loss, at each learning rate given (--lrs; by default 2e-5 for full fine-tuning and 2e-4 for the others).
A seed (--seeds, default 0) fixes everything random in a run: the training windows, torch's generator (LoRA's
initialisation, randomised SVDs, SHiRA's mask) and the `seed` option of S2FT (its units) and IST (its layer draws).
With several seeds, each figure is the mean over them (± the sample standard deviation) and a table lists each
seed's test perplexity beside LoRA's with the same seed. The table shows, per method, the learning rate with the
lowest (mean) validation perplexity (8 x 512 eval-split windows that follow the 32 test windows, disjoint from them
and from the training text); the sweep table lists every rate run. Memory
overhead: the peak resident memory during set-up and training above what was resident with the model and data loaded
(Linux's peak counter is reset right before the method is set up: what a method needs to choose its parameters, such
as SPT's sensitivity pass or LIFT's SVDs, counts). Seconds per step: the median step. Perplexity: the first 32 x 512
eval windows after training (adapters active), the test set. The pruned variant is SmolLM2 pruned to 50% with Wanda
(64 x 512 calibration windows), computed once and cached. "Pruned entries nonzero" counts, after training, the
entries that the masks prune but the trained layers apply as nonzero: each layer is probed with the identity, adapters
included, so a LoRA's B·A counts as it would once merged into the weight. Every method is sized like LoRA r=16 on
the same seven projections (the naive sparse update trains LIFT's entries with a dense gradient and dense AdamW
state, the cost LIFT's reduced gradients avoid). Options given with --set (method.name=value) replace the method's
benchmark settings and are chosen on validation like the learning rate: the sweep lists each setting on its own row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from estimators import _status, peak_reset  # noqa: E402
from llm_quality import RESULTS, commit, header  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
METHODS = ["full", "lora", "shira", "naive_sparse", "lift", "s2ft", "ist", "spt"]
PRUNEKIT = ("lift", "s2ft", "ist", "spt")  # the methods whose options --set can change
LR = {"full": 2e-5}  # the others 2e-4, the usual rate for adapters and sparse updates at this scale
VALIDATION = 8  # eval-split windows after the test windows, for choosing the learning rate
CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "smollm2-wanda-50"


def load(variant: str):
    """(model, tokenizer): SmolLM2, or SmolLM2 pruned to 50% with Wanda (cached on disk after the first run)."""
    import prunekit
    from prunekit import data

    model, tokenizer = data.load_smollm2()
    if variant == "dense":
        return model, tokenizer
    if not CACHE.exists():
        report = prunekit.prune(model, 0.5, importance="wanda", calibration=data.calibration_windows(tokenizer, 64, 512))
        prunekit.save_pruned(model, CACHE.with_suffix(".partial"), report)
        CACHE.with_suffix(".partial").rename(CACHE)  # a run killed while saving leaves no half-written cache
    del model
    return prunekit.load_pruned(CACHE).eval(), tokenizer


def setup(method: str, model, batches, lr: float, overrides: dict | None = None, seed: int = 0):
    """(model to train, optimizer, trainable parameter count) for one method; `overrides` replace its options, `seed`
    seeds its own random choices (SHiRA's mask, S2FT's units, IST's draws)."""
    import peft
    import torch

    import prunekit
    from prunekit import tuning

    adapters = dict(r=RANK, target_modules=PROJECTIONS)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
        return model, torch.optim.AdamW(params, lr=lr), sum(p.numel() for p in params)
    if method in ("lora", "shira"):
        config = peft.LoraConfig(lora_alpha=2 * RANK, lora_dropout=0.0, **adapters) if method == "lora" \
            else peft.ShiraConfig(random_seed=seed, **adapters)
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=lr), sum(p.numel() for p in params)
    if method == "naive_sparse":
        tuned = tuning.prepare(model, "lift", rank=RANK, filter_rank=32, interval=0)
        params = []
        for module in tuned.layers.values():  # LIFT's entries, trained the naive way
            keep = torch.zeros(module.weight.numel(), dtype=torch.bool)
            keep[tuning.sparse.selection(module.weight).indices] = True
            tuning.sparse.unselect(module.weight)
            module.weight.requires_grad_(True)
            module.weight.register_hook(lambda g, keep=keep.view_as(module.weight): g * keep)  # noqa: B008
            params.append((module.weight, int(keep.sum())))
        return model, torch.optim.AdamW([p for p, _ in params], lr=lr), sum(k for _, k in params)
    # S2FT trains whole slices but only their unpruned entries: widen the slices by the kept fraction's inverse so
    # that it trains as many entries as LoRA r=16 on a pruned model too.
    masks = prunekit.masks(model).values()
    widen = sum(k.numel() for k in masks) / sum(int(k.sum()) for k in masks) if masks else 1.0
    options = {
        "lift": dict(rank=RANK, filter_rank=32),
        # the reference's O : down mix, LoRA r=16's count; a scored `select` reads the first training batches
        "s2ft": dict(heads=0.25, channels=0.09, calibration=torch.cat([b["input_ids"] for b in batches[:4]]),
                     seed=seed),
        "ist": dict(rank=RANK, seed=seed),
        "spt": dict(batches=batches[:4]),
    }[method] | (overrides or {})
    if method == "s2ft":
        options = {k: v * widen if k in tuning.s2ft.RATIOS else v for k, v in options.items()}
    tuned = tuning.prepare(model, method, **options)
    optimizer = tuned.optimizer(lr=lr)
    return tuned.model, optimizer, tuned.trainable_count()


def pruned_entries_computed(model, pruned_counts: dict[str, int]) -> int:
    """How many entries that the masks prune the trained model computes as nonzero. Each masked layer, with whatever
    wraps it (a peft adapter, S2FT's slice hook, SPT's LoRA), is probed with the identity matrix, so the count is of
    the weight the layer applies: LoRA's B·A counts as it would once merged. The masks are read from the model, since
    S2FT permutes them with the weights; each must still prune as many entries as before training."""
    import torch

    import prunekit

    modules = dict(model.named_modules())
    computed = 0
    with torch.no_grad():
        for name, keep in prunekit.masks(model).items():
            original = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            if int((~keep).sum()) != pruned_counts[original]:
                raise RuntimeError(f"{original}: its mask prunes {int((~keep).sum())} entries after training, "
                                   f"{pruned_counts[original]} before")
            layer = modules[name.removesuffix(".base_layer")]
            eye = torch.eye(keep.shape[1])
            applied = (layer(eye) - layer(torch.zeros_like(eye[:1]))).t()  # rows: outputs, columns: inputs
            computed += int(applied[~keep].count_nonzero())
    return computed


def worker(variant: str, method: str, lr: float, args) -> dict:
    import torch

    import prunekit
    from prunekit import data
    from prunekit.evaluate import perplexity

    torch.set_num_threads(1)
    model, tokenizer = load(variant)
    pruned_counts = {name: int((~keep).sum()) for name, keep in prunekit.masks(model).items()}
    windows = data.calibration_windows(tokenizer, 2 * args.steps, 256, seed=1 + args.seed)
    batches = [{"input_ids": w, "labels": w} for w in windows.split(2)]
    held_out = data.eval_windows(tokenizer, args.eval_windows + VALIDATION, 512)
    eval_windows, validation = held_out[:args.eval_windows], held_out[args.eval_windows:]
    base = peak_reset()
    clock = time.perf_counter()
    options = args.options.get(method, {})
    torch.manual_seed(args.seed)  # LoRA's initialisation, randomised SVDs: a fresh process is seeded at random
    model, optimizer, trainable = setup(method, model, batches, lr, options, args.seed)
    setup_seconds = time.perf_counter() - clock
    model.train()
    seconds, losses = [], []
    for batch in batches[:args.steps]:
        clock = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - clock)
        losses.append(float(loss))
    peak = _status("VmHWM:")
    model.eval()
    leaked = pruned_entries_computed(model, pruned_counts)
    return {"variant": variant, "method": method, "lr": lr, "options": options, "seed": args.seed,
            "trainable": trainable, "overhead_mib": peak - base,
            "setup_seconds": setup_seconds, "seconds_per_step": statistics.median(seconds),
            "first_loss": losses[0], "last_loss": losses[-1],
            "validation_perplexity": perplexity(model, validation, progress=False),
            "perplexity": perplexity(model, eval_windows, progress=False), "pruned_nonzero": leaked,
            "steps": args.steps}


def parse_set(settings: list[str]) -> dict[str, dict]:
    """--set items (method.name=value; the value a Python literal, else the string) as method -> options."""
    import ast

    out: dict[str, dict] = {}
    for item in settings:
        target, _, value = item.partition("=")
        owner, _, name = target.partition(".")
        if not (owner and name and value):
            raise SystemExit(f"--set {item!r}: write method.name=value, e.g. s2ft.value_heads=0.37")
        if owner not in PRUNEKIT:
            raise SystemExit(f"--set {item!r}: options can be set for {', '.join(PRUNEKIT)}, not {owner!r}")
        options = out.setdefault(owner, {})
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name] = value  # a bare word, e.g. s2ft.select=wanda
    return out


def label(row: dict) -> str:
    """The method with the options it ran with, e.g. "s2ft heads=0.125 value_heads=0.37"."""
    return " ".join([row["method"]] + [f"{k}={v}" for k, v in sorted(row.get("options", {}).items())])


def run_worker(variant: str, method: str, lr: float, seed: int, args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", variant, method, "--lr", repr(lr), "--seed", str(seed),
               "--steps", str(args.steps), "--eval-windows", str(args.eval_windows), "--set", *args.set]
    code = commit()  # before the run: the worker imports the code as it is now
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"variant": variant, "method": method, "lr": lr, "options": args.options.get(method, {}), "seed": seed,
                "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return {**json.loads(lines[-1][len("RESULT "):]), "commit": code}


def settings(rows: list[dict]) -> list[dict]:
    """One row per setting (variant, method and options, learning rate), its figures the means over the setting's
    runs (one per seed; the most pruned entries any run left nonzero), and those runs under "runs"."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], label(r), r["lr"]), []).append(r)
    out = []
    for runs in groups.values():
        row = {**runs[0], "runs": sorted(runs, key=lambda r: r.get("seed") or 0)}
        for key in ("trainable", "overhead_mib", "seconds_per_step", "first_loss", "last_loss",
                    "validation_perplexity", "perplexity"):
            row[key] = statistics.mean(r[key] for r in runs)
        row["pruned_nonzero"] = max(r["pruned_nonzero"] for r in runs)
        out.append(row)
    return out


def spread(row: dict, key: str) -> str:
    """The mean, and the sample standard deviation over seeds when there are several."""
    values = [r[key] for r in row["runs"]]
    return f"{row[key]:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def chosen(rows: list[dict]) -> list[dict]:
    """Per method (in first-run order), the row (learning rate and options) with the lowest validation perplexity."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or r["validation_perplexity"] < best[r["method"]]["validation_perplexity"]:
            best[r["method"]] = r
    return list(best.values())


def markdown(doc: dict) -> str:
    out = ["# Fine-tuning methods: SmolLM2-135M, docs/protocol.md", "", f"Command: `{doc['command']}`  ",
           f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, 1 torch thread per run  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + "  ",
           f"Date: {doc['date']}", "", (__doc__ or "").split("\n\n", 2)[2].strip()]
    for variant in ("dense", "pruned"):
        swept = settings([r for r in doc["results"] if r.get("variant") == variant and "perplexity" in r])
        rows = chosen(swept)
        if not rows:
            continue
        lora = next((r for r in rows if r["method"] == "lora"), None)
        out += ["", f"## {variant} SmolLM2-135M" + (" (50% Wanda)" if variant == "pruned" else ""), "",
                "| method | lr | trainable | overhead MiB | x LoRA | s/step | loss first -> last | validation ppl | "
                "test ppl | x LoRA | pruned entries nonzero |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = lambda key: f"{r[key] / lora[key]:.2f}" if lora else "-"  # noqa: E731
            out.append(f"| {label(r)} | {r['lr']:g} | {r['trainable']:,.0f} | {r['overhead_mib']:.0f} | "
                       f"{ratio('overhead_mib')} | {r['seconds_per_step']:.2f} | {r['first_loss']:.3f} -> "
                       f"{r['last_loss']:.3f} | {spread(r, 'validation_perplexity')} | {spread(r, 'perplexity')} | "
                       f"{ratio('perplexity')} | {r['pruned_nonzero'] if variant == 'pruned' else '-'} |")
        out += seeds_table(rows, lora)
        lrs = sorted({r["lr"] for r in swept})
        if len(swept) > len(rows):
            out += ["", f"Sweep, {variant}: validation / test perplexity per learning rate (the chosen run in bold).",
                    "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
            labels = list(dict.fromkeys(label(r) for best in rows for r in swept if r["method"] == best["method"]))
            for name in labels:
                at = {r["lr"]: r for r in swept if label(r) == name}
                cells = [("**{}**" if at[lr] in rows else "{}").format(
                    f"{at[lr]['validation_perplexity']:.3f} / {at[lr]['perplexity']:.3f}") if lr in at else "-"
                    for lr in lrs]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [r for r in doc["results"] if "error" in r]
    if errors:
        out += ["", "Failed runs:"] + [f"- {r['variant']} {r['method']}: {r['error']}" for r in errors]
    return "\n".join(out) + "\n"


def seeds_table(rows: list[dict], lora: dict | None) -> list[str]:
    """Test perplexity of each chosen setting per seed, with its ratio to LoRA's run on the same seed (the same
    training windows), when any setting ran with more than one seed."""
    seeds = sorted({r.get("seed") for row in rows for r in row["runs"] if r.get("seed") is not None})
    if len(seeds) < 2:
        return []
    base = {r.get("seed"): r["perplexity"] for r in lora["runs"]} if lora else {}
    out = ["", "Per seed: test perplexity (x LoRA's with the same seed).", "",
           "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (x LoRA's mean) |",
           "|---|" + "---|" * (len(seeds) + 1)]
    for row in rows:
        at = {r.get("seed"): r["perplexity"] for r in row["runs"]}
        cells = [f"{at[s]:.3f}" + (f" ({at[s] / base[s]:.3f})" if s in base else "") if s in at else "-"
                 for s in seeds]
        mean = spread(row, "perplexity") + (f" ({row['perplexity'] / lora['perplexity']:.3f})" if lora else "")
        out.append(f"| {label(row)} | " + " | ".join(cells) + f" | {mean} |")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--variants", nargs="*", default=["dense", "pruned"], choices=["dense", "pruned"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "tuning", help="results path without suffix")
    parser.add_argument("--lrs", nargs="*", type=float, help="learning rates to run each method at (default: 2e-5 "
                                                                  "for full fine-tuning, 2e-4 for the others)")
    parser.add_argument("--jobs", type=int, default=1, help="workers at a time (each uses one thread)")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.NAME=VALUE",
                        help="a method option for this run, e.g. s2ft.value_heads=0.37 ist.update=0.5")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="run each setting once per seed "
                                                                           "(training windows and every random choice)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run what is missing")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.options = parse_set(args.set)  # a malformed --set fails here, before any worker starts
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.lr, args)), flush=True)
        return
    path = args.out.with_suffix(".json")
    results = [r for r in json.loads(path.read_text())["results"] if "error" not in r] \
        if args.resume and path.exists() else []
    done = {(r["variant"], label(r), r["lr"], r.get("seed")) for r in results}
    todo = [(variant, method, lr, seed) for variant in args.variants for method in args.methods
            for lr in (args.lrs or [LR.get(method, 2e-4)]) for seed in args.seeds
            if (variant, label({"method": method, "options": args.options.get(method, {})}), lr, seed) not in done]
    lock = threading.Lock()

    def run(job):
        clock = time.perf_counter()
        row = run_worker(*job, args)
        with lock:
            results.append(row)
            print(f"[{time.perf_counter() - clock:5.0f} s] {job}: {row}", flush=True)
            save(args, results)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    print(save(args, results))


def save(args, results) -> str:
    ns = argparse.Namespace(out=args.out, calibration_windows=2 * args.steps, seq_len=256,
                            eval_windows=args.eval_windows, repeats=1)
    doc = header(ns, results)
    doc["protocol"] = {"train": f"{args.steps} steps of 2 x 256 tokens, calibration split, random.Random(1 + seed)",
                       "eval": f"first {args.eval_windows} x 512 eval windows",
                       "validation": f"eval windows {args.eval_windows} to {args.eval_windows + VALIDATION - 1}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
