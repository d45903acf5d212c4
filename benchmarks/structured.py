"""Structured pruning on docs/protocol.md's models: all-MiniLM-L6-v2 (heads and MLP channels removed, no fine-tuning)
against Torch-Pruning's own importances in the same run, and SmolLM2-135M at 20% of its decoder weights removed.

    python benchmarks/structured.py                      # both parts
    python benchmarks/structured.py --part encoder --ratios 0.3

Every configuration runs in a fresh process of this script.

MiniLM (encoder protocol): 128 (first, second sentence) pairs of calibration articles calibrate; the loss that
gradient importances need is the in-batch contrastive loss the model was trained with (MultipleNegativesRankingLoss,
scale 20) against the dense model's embeddings of the 128 second sentences. Torch-Pruning 1.6 runs its BasePruner
at channel ratio r: pruning_ratio=r on the MLP channels and head_pruning_ratio=r on whole heads (num_heads set,
prune_num_heads=True, prune_head_dims=False: BERT cannot lose head dimensions), the residual stream left alone
(every layer writing it ignored), with its GroupMagnitudeImportance (L2) and TaylorImportance (|w * dL/dw| from the
same contrastive loss), each with local ranking (its BERT example) and with global_pruning=True. prunekit then gets,
per ratio, a budget equal to the share of encoder Linear weights Torch-Pruning removed there, so both remove the
same weights and the same Linear MACs (transformers' Linears process every token alike); its structured pruning
removes heads and MLP channels, the same widths in every layer (uniform) unless the row says "free"; "global" is
the allocator that ranks every layer's units together by importance per removed weight, "refit" the least-squares
refit of the kept input columns of the layers reading removed channels (Budget(refit=True)). Fidelity: mean cosine
between pruned and dense embeddings of the 512 eval first sentences; recall@1 from each to its own second sentence
among the 512. MACs: every Linear for one
128-token sentence (attention's QK^T and AV products excluded). Latency: median of 7 encodes of 64 eval sentences,
pruned over dense in the same process (the ratio is what survives a shared machine).

SmolLM2: prunekit.prune(Budget(sparsity=0.2, granularity="structured")) over the decoder Linears (uniform widths,
so the pruned model reloads with from_pretrained; query heads within KV groups), importance and allocator as in
the row (SparseGPT refits the kept columns), on 64 x 512 calibration windows (random.Random(0)); perplexity on the
first 32 x 512 eval windows; tokens per second of greedy generation of 64 new tokens after a 32-token prompt,
batch 1, KV cache on, best of 3, dense and pruned in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_quality import RESULTS, commit, header  # noqa: E402

RATIOS = (0.3, 0.5)
# name: (importance, global_pruning)
PEERS = {"tp-magnitude": ("magnitude", False), "tp-taylor": ("taylor", False),
         "tp-magnitude-global": ("magnitude", True), "tp-taylor-global": ("taylor", True)}
# name: (importance, allocator, uniform, refit, heads); uniform None: per layer alike (the default for a model with a
# config); None elsewhere: prunekit.prune's default ("default" is what a user gets who gives only the budget)
OURS = {
    "default": (None, None, None, None, None),
    "magnitude": ("magnitude", "uniform", None, False, "kv"),
    "wanda": ("wanda", "uniform", None, False, "kv"),
    "fisher": ("fisher", "uniform", None, False, "kv"),
    "structural_hessian": ("structural_hessian", "uniform", None, False, "kv"),
    "sparsegpt": ("sparsegpt", "uniform", None, False, "kv"),
    "fisher-refit": ("fisher", "uniform", None, True, "kv"),
    "structural_hessian-refit": ("structural_hessian", "uniform", None, True, "kv"),
    "structural_hessian-owl-free": ("structural_hessian", "owl", False, False, "kv"),
    "structural_hessian-global-free": ("structural_hessian", "global", False, False, "kv"),
    "structural_hessian-global-free-refit": ("structural_hessian", "global", False, True, "kv"),
    "fisher-global-free-refit": ("fisher", "global", False, True, "kv"),
    # heads left alone: the pruned BERT keeps its config's head size and reloads with plain from_pretrained
    "magnitude-heads-none-refit": ("magnitude", "uniform", None, True, "none"),
    "wanda-heads-none": ("wanda", "uniform", None, False, "none"),
    "wanda-heads-none-refit": ("wanda", "uniform", None, True, "none"),
    "sparsegpt-heads-none": ("sparsegpt", "uniform", None, False, "none"),
    "structural_hessian-heads-none-refit": ("structural_hessian", "uniform", None, True, "none"),
}
# name: (importance, allocator, refit)
LLM = {"default": (None, "uniform", None), "wanda": ("wanda", "uniform", False),
       "sparsegpt": ("sparsegpt", "uniform", False)}


def encoder_setup():
    import torch
    from estimators import minilm_task

    torch.manual_seed(0)
    model, tokenizer, batches, _, loss, _, queries, documents = minilm_task()
    return model, tokenizer, batches, loss, queries, documents


def encoder_linear_weights(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules()
               if n.startswith("encoder.layer.") and isinstance(m, __import__("torch").nn.Linear))


def encoder_measure(model, dense, tokenizer, queries, documents, dense_q) -> dict:
    from prunekit.evaluate import recall_at_1, sentence_embeddings
    from prunekit.structured.pipeline import model_size

    pruned = sentence_embeddings(model, tokenizer, queries)
    example = tokenizer([queries[0]], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    params, macs = model_size(model, dict(example))
    return {"fidelity": float((pruned * dense_q).sum(1).mean()),
            "recall_at_1": recall_at_1(pruned, sentence_embeddings(model, tokenizer, documents)),
            "params": params, "macs": macs, "encoder_linear_weights": encoder_linear_weights(model),
            "latency_ratio": latency_ratio(model, dense, tokenizer, queries)}


def latency_ratio(model, dense, tokenizer, sentences) -> float:
    """Median over 7 rounds of pruned / dense seconds to encode 64 sentences, the two timed back to back in each
    round, so that a slow moment of the shared machine slows both."""
    import torch

    batch = tokenizer(sentences[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    ratios = []
    with torch.no_grad():
        for _ in range(7):
            seconds = []
            for m in (model, dense):
                start = time.perf_counter()
                m(**batch)
                seconds.append(time.perf_counter() - start)
            ratios.append(seconds[0] / seconds[1])
    return statistics.median(ratios)


def encoder_worker(name: str, ratio: float, budget: float | None) -> dict:
    import copy

    from prunekit.evaluate import sentence_embeddings

    model, tokenizer, batches, loss, queries, documents = encoder_setup()
    dense = copy.deepcopy(model)
    dense_q = sentence_embeddings(model, tokenizer, queries)
    before = encoder_linear_weights(model)
    row = {"part": "encoder", "config": name, "ratio": ratio}
    if name == "dense":
        row.update(encoder_measure(model, dense, tokenizer, queries, documents, dense_q))
        return row
    start = time.perf_counter()
    if name in PEERS:
        torch_pruning_encoder(model, name, ratio, batches, loss)
    else:
        import prunekit
        from prunekit.importance import ESTIMATORS

        importance, allocator, uniform, refit, heads = OURS[name]
        given = {k: v for k, v in (("uniform", uniform), ("refit", refit), ("heads", heads)) if v is not None}
        options = {"loss": loss} if importance in ("fisher", "structural_hessian") else {}
        chosen = {k: v for k, v in (("allocator", allocator),) if v is not None}
        if importance is not None:
            chosen["importance"] = ESTIMATORS.create(importance, **options)
        report = prunekit.prune(model, prunekit.Budget(sparsity=budget, granularity="structured", **given),
                                calibration=batches, progress=False, **chosen)
        row["ran"] = report.importance + " / " + report.allocator
        row["settings"] = report.notes[0] if report.notes else ""
        row["reload"] = report.size["reload"]
        row["heads_kept"] = [r.units - r.removed for r in report.structures if r.kind == "heads"]
        row["channels_kept"] = [r.units - r.removed for r in report.structures if r.kind == "channels"]
    row["seconds"] = time.perf_counter() - start
    row.update(encoder_measure(model, dense, tokenizer, queries, documents, dense_q))
    row["removed_share"] = 1 - row["encoder_linear_weights"] / before
    return row


def torch_pruning_encoder(model, name: str, ratio: float, batches, loss) -> None:
    """Torch-Pruning's BasePruner as its BERT example sets it up, residual stream ignored."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    num_heads, ignored = {}, [model.embeddings, model.pooler]
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
    for layer in model.encoder.layer:  # the layers writing the residual stream
        ignored += [layer.attention.output.dense, layer.output.dense]
    kind, global_pruning = PEERS[name]
    if kind == "taylor":
        importance = tp.importance.TaylorImportance()
        model.zero_grad()
        for batch in batches:
            loss(model, batch).backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    example = {k: v[:1] for k, v in batches[0].items() if k != "labels"}
    pruner = tp.pruner.BasePruner(model, example, importance=importance, global_pruning=global_pruning,
                                  pruning_ratio=ratio, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                                  ignored_layers=ignored, output_transform=lambda out: out.last_hidden_state)
    for group in pruner.step(interactive=True):
        group.prune()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    model.zero_grad(set_to_none=True)


def llm_worker(name: str) -> dict:
    import torch

    import prunekit
    from prunekit import data
    from prunekit.evaluate import perplexity

    model, tokenizer = data.load_smollm2()
    windows = data.calibration_windows(tokenizer, 64, 512)
    eval_windows = data.eval_windows(tokenizer, 32, 512)
    prompt = eval_windows[:1, :32]
    row = {"part": "llm", "config": name, "dense_perplexity": perplexity(model, eval_windows, progress=False),
           "dense_tokens_per_s": tokens_per_second(model, prompt)}
    importance, allocator, refit = LLM[name]
    start = time.perf_counter()
    report = prunekit.prune(model, prunekit.Budget(sparsity=0.2, granularity="structured", refit=refit),
                            importance=importance, allocator=allocator, calibration=windows, progress=False)
    row["ran"] = f"{report.importance}, {report.notes[0]}"
    row.update(seconds=time.perf_counter() - start, sparsity=report.sparsity, exact=report.exact,
               params=report.size["params"], macs=report.size["macs"], reload=report.size["reload"],
               config_after={k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads",
                                                                    "head_dim", "intermediate_size")},
               perplexity=perplexity(model, eval_windows, progress=False),
               tokens_per_s=tokens_per_second(model, prompt))
    row["speedup"] = row["tokens_per_s"] / row["dense_tokens_per_s"]
    del torch
    return row


def tokens_per_second(model, prompt) -> float:
    import torch

    best = 0.0
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False, pad_token_id=0)
            best = max(best, (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start))
    return best


def run_worker(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    code = commit()
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"part": args[0], "config": args[1], "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    row = json.loads(lines[-1][len("RESULT "):])
    row["commit"] = code
    return row


def markdown(doc: dict) -> str:
    commits = sorted({r["commit"] for r in doc["results"] if r.get("commit")})
    rows = doc["results"]
    out = ["# Structured pruning, docs/protocol.md", "", f"Command: `{doc['command']}`  ",
           f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['machine']['threads']} torch "
           f"threads  ", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + "  ",
           f"Date: {doc['date']}; prunekit commit(s): {', '.join(commits) or '-'}", "",
           (__doc__ or "").split("\n\n", 3)[3].strip(), "", "## all-MiniLM-L6-v2, heads and MLP channels", ""]
    dense = next((r for r in rows if r.get("config") == "dense" and "recall_at_1" in r), None)
    if dense:
        out.append(f"Dense: recall@1 {dense['recall_at_1']:.3f}, {dense['params']:,} parameters, "
                   f"{dense['macs'] / 1e6:.1f} M MACs per 128-token sentence.")
        out.append("")
    for ratio in sorted({r["ratio"] for r in rows if r.get("part") == "encoder" and r.get("config") != "dense"
                         and "ratio" in r}):
        out += [f"### channel ratio {ratio:.0%}", "",
                "| tool | configuration | removed share of encoder weights | MACs (M) | MACs / dense | fidelity | "
                "recall@1 | latency / dense | seconds | reloads with |", "|---|---|---|---|---|---|---|---|---|---|"]
        here = [r for r in rows if r.get("part") == "encoder" and r.get("ratio") == ratio and "recall_at_1" in r]
        for r in sorted(here, key=lambda r: (r["config"] not in PEERS, -r["recall_at_1"])):
            tool = "Torch-Pruning" if r["config"] in PEERS else "prunekit"
            out.append(f"| {tool} | {r['config']} | {r['removed_share']:.4f} | {r['macs'] / 1e6:.1f} | "
                       f"{r['macs'] / dense['macs']:.3f} | {r['fidelity']:.3f} | {r['recall_at_1']:.3f} | "
                       f"{r['latency_ratio']:.2f} | {r['seconds']:.0f} | {r.get('reload', '-').split(':')[0]} |"
                       if dense else f"| {tool} | {r['config']} | ... |")
        peers = [r["recall_at_1"] for r in here if r["config"] in PEERS]
        ours = [r["recall_at_1"] for r in here if r["config"] not in PEERS]
        if peers and ours:
            out += ["", f"Best prunekit recall@1 {max(ours):.3f} vs best Torch-Pruning {max(peers):.3f}: "
                        f"{100 * (max(ours) - max(peers)):+.1f} points (target: +5)."]
        default = next((r for r in here if r["config"] == "default"), None)
        if default:
            reloadable = max(r["recall_at_1"] for r in here if r.get("reload") == "from_pretrained")
            out += [f"The default (prunekit.prune with only the budget; it ran {default['ran']}, "
                    f"{default.get('settings', '')}) reaches {default['recall_at_1']:.3f} against the best "
                    f"{max(ours):.3f} and the best that reloads with from_pretrained {reloadable:.3f}."]
        out.append("")
    llm = [r for r in rows if r.get("part") == "llm" and "perplexity" in r]
    if llm:
        out += ["## SmolLM2-135M, 20% of decoder weights removed", "",
                "| configuration | ppl dense | ppl pruned | tokens/s dense | tokens/s pruned | speedup | params | "
                "MACs per token (M) | config after | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in llm:
            out.append(f"| {r['config']} | {r['dense_perplexity']:.2f} | {r['perplexity']:.2f} | "
                       f"{r['dense_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                       f"{r['params'][0]:,} -> {r['params'][1]:,} | {r['macs'][0] / 512e6:.1f} -> "
                       f"{r['macs'][1] / 512e6:.1f} | {r['config_after']} | {r['seconds']:.0f} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        out += ["", "Failed runs:"] + [f"- {r['part']} {r['config']}: {r['error']}" for r in errors]
    reasons = sorted({r["reload"] for r in rows if ":" in r.get("reload", "")})
    if reasons:
        out += ["", "Why some reload through prunekit.load_pruned only:"]
        out += [f"- {r.split(': ', 1)[1]}" for r in reasons]
    return "\n".join(out) + "\n"


def save(args, results) -> str:
    ns = argparse.Namespace(out=args.out, calibration_windows=64, seq_len=512, eval_windows=32, repeats=1)
    doc = header(ns, results)
    doc["protocol"] = {"encoder": "128 calibration pairs, 512 eval pairs", "llm": "64 x 512 calibration windows, "
                                                                                  "32 x 512 eval windows"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    args.out.with_suffix(".md").write_text(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="*", default=["encoder", "llm"], choices=["encoder", "llm"])
    parser.add_argument("--ratios", nargs="*", type=float, default=list(RATIOS))
    parser.add_argument("--configs", nargs="*", help="prunekit configurations (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "structured", help="results path without suffix")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run what is missing")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        part, name, *rest = args.worker
        row = llm_worker(name) if part == "llm" else encoder_worker(
            name, float(rest[0]), float(rest[1]) if len(rest) > 1 else None)
        print("RESULT " + json.dumps(row), flush=True)
        return
    path = args.out.with_suffix(".json")
    results = [r for r in json.loads(path.read_text())["results"] if "error" not in r] \
        if args.resume and path.exists() else []
    done = {(r["part"], r["config"], r.get("ratio")) for r in results}

    def run(worker_args, key):
        if key in done:
            return
        clock = time.perf_counter()
        results.append(run_worker(worker_args))
        shown = {k: v for k, v in results[-1].items() if k not in ("part", "commit")}
        print(f"[{time.perf_counter() - clock:5.0f} s] {shown}", flush=True)
        save(args, results)

    if "encoder" in args.part:
        run(["encoder", "dense", "0"], ("encoder", "dense", 0.0))
        for ratio in args.ratios:
            for peer in PEERS:
                run(["encoder", peer, str(ratio)], ("encoder", peer, ratio))
            shares = [r["removed_share"] for r in results if r.get("ratio") == ratio and r.get("config") in PEERS
                      and "removed_share" in r]
            if not shares:
                continue
            share = shares[0]  # every peer removes the same numbers of heads and channels
            for name in args.configs or OURS:
                run(["encoder", name, str(ratio), repr(share)], ("encoder", name, ratio))
    if "llm" in args.part:
        for name in LLM:
            run(["llm", name], ("llm", name, None))
    print(save(args, results))


if __name__ == "__main__":
    main()
