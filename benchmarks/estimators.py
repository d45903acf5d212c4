"""Every importance estimator on docs/protocol.md's models: 50% unstructured on SmolLM2-135M (perplexity), and 30% /
50% of heads or of MLP channels on all-MiniLM-L6-v2 (embedding fidelity and retrieval recall@1).

    python benchmarks/estimators.py                       # both parts
    python benchmarks/estimators.py --part encoder --estimators fisher lrp

Each (part, estimator) runs in a fresh process. Seconds: the estimator's whole measurement and pruning (LLM: the
prunekit.prune call; encoder: prunekit.score plus choosing groups). Peak MiB: the highest resident memory during
that call above what was resident before it (the model, the data): Linux's peak counter is reset right before.

SmolLM2: 64 x 512 calibration windows (random.Random(0)), perplexity on the first 32 x 512 eval windows, every
decoder Linear pruned to 50% by prunekit.prune with the estimator and the uniform allocator. "lrp+magnitude_qk"
follows LRP's docstring: under the AH-rule the query and key projections get no relevance, so they are pruned by
magnitude and every other layer by LRP.

MiniLM: 128 (first sentence, second sentence) pairs of calibration articles calibrate; the loss the gradient
estimators need is the in-batch contrastive loss the model was trained with (sentence-transformers'
MultipleNegativesRankingLoss, scale 20), each first sentence against the dense model's embeddings of all 128 second
sentences, so it is defined per sample. LRP starts from the same logit of the true pair. Per layer, heads are
scored as the sum of their group scores in query, key, value (rows) and attention output (columns); MLP channels
as intermediate rows plus output columns (the structural Hessian sums per sample across these parts before
squaring, as NViT defines it). The lowest-scoring 4 of 12 heads (33%) or 6 (50%), or 30% / 50% of the 1536
channels, are zeroed in every layer, which is exactly what removing them computes. Fidelity: mean cosine between
pruned and dense embeddings of the 512 eval first sentences; recall@1 from each to its own second sentence among
the 512. MaskSparsity's mask is what will go, so it trains once per cell: the cell's share of units, chosen by
magnitude on the layers that produce them (whole heads on the value projections, whose values then are zero;
channels on the intermediate layer), 16 SGD steps of the contrastive loss with the selected gates pulled to zero,
then units ranked by their trained gates (its seconds and memory are per cell). On SmolLM2 its default mask, half of
every layer's output channels, is the 50% budget itself: it removes whole rows, not scattered weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_quality import RESULTS, commit, header  # noqa: E402

LLM_ESTIMATORS = ["magnitude", "wanda", "sparsegpt", "fisher", "hutchinson", "zeroth_order", "beta_rank", "lrp",
                  "lrp+magnitude_qk", "mask_sparsity"]
QK = r"self_attn\.(q|k)_proj$"  # what the AH-rule gives no relevance: "lrp+magnitude_qk" prunes them by magnitude
ENCODER_ESTIMATORS = ["magnitude", "wanda", "sparsegpt", "fisher", "structural_hessian", "hutchinson",
                      "zeroth_order", "beta_rank", "lrp", "mask_sparsity"]
HEADS, HEAD_DIM, CHANNELS = 12, 32, 1536
FRACTIONS = (0.3, 0.5)


def estimator(name: str, loss=None, start=None, **extra):
    """The estimator with the options this benchmark uses (what a user would pick for a 2-core CPU), plus `extra`."""
    from prunekit.importance import ESTIMATORS

    options = {
        "hutchinson": {"probes": 1, "samples": 32},
        "zeroth_order": {"probes": 8, "samples": 4},
        "mask_sparsity": {"steps": 16},  # 16 SGD steps of the whole model; the default 100 took > 95 min on the LLM
    }.get(name, {}) | extra
    if loss is not None and name in ("fisher", "structural_hessian", "hutchinson", "zeroth_order", "mask_sparsity"):
        options["loss"] = loss
    if start is not None and name == "lrp":
        options["start"] = start
    return ESTIMATORS.create(name, **options)


def peak_reset() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def _status(field: str) -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) / 1024


def llm_worker(name: str) -> dict:
    import prunekit
    from prunekit import data
    from prunekit.evaluate import perplexity

    model, tokenizer = data.load_smollm2()
    windows = data.calibration_windows(tokenizer, 64, 512)
    eval_windows = data.eval_windows(tokenizer, 32, 512)
    base = peak_reset()
    start = time.perf_counter()
    if name == "lrp+magnitude_qk":  # LRP's own advice for the layers it cannot score (see its docstring)
        reports = [prunekit.prune(model, prunekit.Budget(sparsity=0.5, exclude=QK), importance=estimator("lrp"),
                                  calibration=windows, progress=False),
                   prunekit.prune(model, prunekit.Budget(sparsity=0.5, include=QK), importance="magnitude",
                                  progress=False)]
    else:
        reports = [prunekit.prune(model, 0.5, importance=estimator(name), calibration=windows, progress=False)]
    seconds = time.perf_counter() - start
    peak = _status("VmHWM:") - base
    rows = [row for report in reports for row in report.layers]
    sparsity = sum(row.pruned for row in rows) / sum(row.shape[0] * row.shape[1] for row in rows)
    return {"part": "llm", "estimator": name, "seconds": seconds, "peak_mib": peak, "sparsity": sparsity,
            "perplexity": perplexity(model, eval_windows, progress=False)}


def minilm_task():
    """MiniLM, 8 calibration batches of 16 first sentences labelled with their pair's index, the mean-pooled
    embedding, and the contrastive loss against the dense embeddings (`bank`) of the 128 second sentences; also the
    512 eval pairs. Shared with structured.py."""
    import torch

    from prunekit import data
    from prunekit.evaluate import sentence_embeddings

    model, tokenizer = data.load_minilm()
    cal_first, cal_second = data.sentence_pairs("calibration", 128)
    queries, documents = data.sentence_pairs("eval", 512)
    bank = sentence_embeddings(model, tokenizer, cal_second)

    def embed(m, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = m(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def loss(m, batch):  # MultipleNegativesRankingLoss against the dense positives
        return torch.nn.functional.cross_entropy(20 * embed(m, batch) @ bank.t(), batch["labels"])

    encoded = tokenizer(cal_first, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batches = [{**{k: v[i:i + 16] for k, v in encoded.items()}, "labels": torch.arange(i, min(i + 16, 128))}
               for i in range(0, 128, 16)]
    return model, tokenizer, batches, embed, loss, bank, queries, documents


def encoder_worker(name: str) -> list[dict]:
    import torch

    import prunekit
    from prunekit.evaluate import recall_at_1, sentence_embeddings
    from prunekit.importance.hessian import StructuralHessian, structure_saliency

    model, tokenizer, batches, embed, loss, bank, queries, documents = minilm_task()
    dense_queries = sentence_embeddings(model, tokenizer, queries)

    def logit(m, batch):  # LRP's start: the true pair's similarity logit
        return (20 * embed(m, batch) * bank[batch["labels"]]).sum()

    dense_recall = recall_at_1(dense_queries, sentence_embeddings(model, tokenizer, documents))
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def parts(i: int, kind: str) -> list:
        p = f"encoder.layer.{i}."
        if kind == "heads":
            return [(p + "attention.self.query", HEAD_DIM, 0), (p + "attention.self.key", HEAD_DIM, 0),
                    (p + "attention.self.value", HEAD_DIM, 0), (p + "attention.output.dense", HEAD_DIM, 1)]
        return [(p + "intermediate.dense", 1, 0), (p + "output.dense", 1, 1)]

    def ranked(chosen, kinds, include=None) -> dict:
        """(layer, kind) -> (units in increasing importance, parts), from one prunekit.score."""
        scores = prunekit.score(model, chosen, batches, include=include, progress=False)
        out = {}
        for i in range(len(model.encoder.layer)):
            for kind in kinds:
                if isinstance(chosen, StructuralHessian):
                    value = structure_saliency([(scores._find(n)[1], size, dim) for n, size, dim in parts(i, kind)])
                elif name == "mask_sparsity":  # only the gated layer was scored: its summed |gate| per unit
                    n, size, dim = parts(i, kind)[2 if kind == "heads" else 0]
                    value = scores.groups(n, size, dim)
                else:
                    value = sum(scores.groups(n, size, dim) for n, size, dim in parts(i, kind))
                out[(i, kind)] = (value.argsort(), parts(i, kind))
        return out

    def measured(fn):
        base = peak_reset()
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start, _status("VmHWM:") - base

    cells = [(kind, total, round(total * fraction)) for kind, total in (("heads", HEADS), ("channels", CHANNELS))
             for fraction in FRACTIONS]
    if name != "mask_sparsity":  # one measurement serves every cell
        shared = measured(lambda: ranked(estimator(name, loss=loss, start=logit), ("heads", "channels")))
    rows = []
    for kind, total, count in cells:
        if name == "mask_sparsity":
            # MaskSparsity's mask is what will go: this cell's share of units, on the layers that produce them
            # (value rows for heads, whose values then are zero, intermediate rows for channels); one phase per cell
            chosen = estimator(name, loss=loss, fraction=count / total, group=HEAD_DIM if kind == "heads" else 1)
            include = r"attention\.self\.value$" if kind == "heads" else r"intermediate\.dense$"
            order, seconds, peak = measured(lambda: ranked(chosen, (kind,), include))
        else:
            order, seconds, peak = shared
        with torch.no_grad():
            for (_, k), (units, layer_parts) in order.items():
                if k != kind:
                    continue
                for n, size, dim in layer_parts:
                    weight = model.get_submodule(n).weight
                    for g in units[:count].tolist():
                        weight.narrow(dim, g * size, size).zero_()
        pruned = sentence_embeddings(model, tokenizer, queries)
        rows.append({"part": "encoder", "estimator": name, "kind": kind, "fraction": count / total,
                     "fidelity": float((pruned * dense_queries).sum(1).mean()),
                     "recall_at_1": recall_at_1(pruned, sentence_embeddings(model, tokenizer, documents)),
                     "seconds": seconds, "peak_mib": peak})
        model.load_state_dict(original)
    rows.append({"part": "encoder", "estimator": "dense", "kind": "-", "fraction": 0.0, "fidelity": 1.0,
                 "recall_at_1": dense_recall})
    return rows


def run_worker(part: str, name: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    code = commit()
    proc = subprocess.run([sys.executable, __file__, "--worker", part, name], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return [{"part": part, "estimator": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}]
    result = json.loads(lines[-1][len("RESULT "):])
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        row["commit"] = code
    return rows


def markdown(doc: dict) -> str:
    commits = sorted({r["commit"] for r in doc["results"] if r.get("commit")})
    out = ["# Importance estimators, docs/protocol.md", "", f"Command: `{doc['command']}`  ",
           f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['machine']['threads']} torch "
           f"threads  ", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + "  ",
           f"Date: {doc['date']}; prunekit commit(s): {', '.join(commits) or '-'}", "",
           (__doc__ or "").split("\n\n", 2)[2].strip(), "", "## SmolLM2-135M, 50% unstructured", "",
           "| estimator | perplexity | seconds | peak MiB | sparsity |", "|---|---|---|---|---|"]
    for r in doc["results"]:
        if r.get("part") == "llm" and "perplexity" in r:
            out.append(f"| {r['estimator']} | {r['perplexity']:.2f} | {r['seconds']:.0f} | {r['peak_mib']:.0f} | "
                       f"{r['sparsity']:.4f} |")
    out += ["", "## all-MiniLM-L6-v2, heads and MLP channels", "",
            "| estimator | heads 33%: fidelity / recall@1 | heads 50% | channels 30% | channels 50% | seconds | "
            "peak MiB |", "|---|---|---|---|---|---|---|"]
    encoder = [r for r in doc["results"] if r.get("part") == "encoder" and "fidelity" in r]
    dense = next((r for r in encoder if r["estimator"] == "dense"), None)
    if dense:
        out.append(f"| dense | - | - | - | recall@1 {dense['recall_at_1']:.3f} | - | - |")
    for name in dict.fromkeys(r["estimator"] for r in encoder if r["estimator"] != "dense"):
        cells = {(r["kind"], round(r["fraction"], 1)): r for r in encoder if r["estimator"] == name}
        row = [f"{cells[k]['fidelity']:.3f} / {cells[k]['recall_at_1']:.3f}" if k in cells else "-"
               for k in (("heads", 0.3), ("heads", 0.5), ("channels", 0.3), ("channels", 0.5))]
        any_row = next(iter(cells.values()))
        out.append(f"| {name} | " + " | ".join(row) + f" | {any_row['seconds']:.0f} | {any_row['peak_mib']:.0f} |")
    errors = [r for r in doc["results"] if "error" in r]
    if errors:
        out += ["", "Failed runs:"] + [f"- {r['part']} {r['estimator']}: {r['error']}" for r in errors]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="*", default=["llm", "encoder"], choices=["llm", "encoder"])
    parser.add_argument("--estimators", nargs="*", help="default: every estimator of the part")
    parser.add_argument("--out", type=Path, default=RESULTS / "estimators", help="results path without suffix")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run what is missing")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        part, name = args.worker
        print("RESULT " + json.dumps(llm_worker(name) if part == "llm" else encoder_worker(name)), flush=True)
        return
    path = args.out.with_suffix(".json")
    results = [r for r in json.loads(path.read_text())["results"] if "error" not in r] \
        if args.resume and path.exists() else []
    done = {(r["part"], r["estimator"]) for r in results}
    for part in args.part:
        for name in args.estimators or (LLM_ESTIMATORS if part == "llm" else ENCODER_ESTIMATORS):
            if (part, name) in done:
                continue
            clock = time.perf_counter()
            rows = run_worker(part, name)
            if part == "encoder":  # one dense row is enough
                results = [r for r in results if not (r.get("part") == "encoder" and r.get("estimator") == "dense")]
            results += rows
            print(f"[{time.perf_counter() - clock:5.0f} s] {part} {name}: "
                  + "; ".join(str({k: v for k, v in r.items() if k not in ('part', 'estimator', 'commit')})
                              for r in rows), flush=True)
            save(args, results)
    print(save(args, results))


def save(args, results) -> str:
    ns = argparse.Namespace(out=args.out, calibration_windows=64, seq_len=512, eval_windows=32, repeats=1)
    doc = header(ns, results)
    doc["protocol"] = {"llm": "64 x 512 calibration windows, 32 x 512 eval windows",
                       "encoder": "128 calibration pairs, 512 eval pairs"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
