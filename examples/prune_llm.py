"""Prune a causal LM to a budget, recover with sparse fine-tuning, run it on kernels where faster, save it.

    python examples/prune_llm.py                      # bundled SmolLM2-135M, Wanda 50% + LIFT
    python examples/prune_llm.py path/or/id --importance sparsegpt --allocator owl --budget 0.6 --method spt
    python examples/prune_llm.py --budget 2:4 --importance sparsegpt --out pruned-2of4

Steps: perplexity of the dense model on the Wikipedia eval split (docs/protocol.md's, fewer windows by default);
prune to --budget with --importance and --allocator on calibration windows of the calibration split; perplexity;
fine-tune with --method (LIFT by default: its principal entries, pruned ones never chosen) on other windows of
the calibration split; the tuned deltas applied to a plain copy of the pruned model (prunekit.tuning.load_deltas:
no adapters, no selection hooks left); perplexity; prunekit.kernels.convert compresses every masked layer (its kept
weights only) onto prunekit's CPU kernels where they beat dense on this machine, and the decoding speed of the
masked dense model and the compressed one are timed on the same prompt; save_pruned writes the compressed layers to
--out. A table compares every stage.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import prunekit
from prunekit import data
from prunekit.cli import load_model, run
from prunekit.errors import PrunekitError
from prunekit.evaluate import perplexity
from prunekit.generate import generate

METHOD_OPTIONS = {  # sized like a rank-`--rank` LoRA on every projection; LIFT's choice is not refreshed in a short run
    "lift": dict(filter_rank=32, interval=0),
    "s2ft": dict(heads=0.1, channels=0.03),  # SmolLM2: 9 of its 90 KV groups, 1,382 of its 46,080 MLP channels
    "spt": dict(),
    "ist": dict(),
}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="Hugging Face causal LM id or directory (default: bundled SmolLM2)")
    parser.add_argument("--budget", default="0.5", help="share of the targeted weights to prune (0.5), or N:M (2:4)")
    parser.add_argument("--importance", default="wanda")
    parser.add_argument("--allocator", default="uniform")
    parser.add_argument("--method", default="lift", choices=[*METHOD_OPTIONS, "none"],
                        help="sparse fine-tuning after pruning (none: skip)")
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank the method is sized like (lift, spt, ist)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration, training and eval window")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded to time the compressed model")
    parser.add_argument("--out", help="directory to save the pruned (and tuned) model in")
    return parser.parse_args(argv)


def fine_tune(model, args) -> tuple[prunekit.tuning.Method, float]:
    """The method's training loop on windows of the calibration split drawn apart from the calibration ones
    (random.Random(1)); returns the method and the seconds per step."""
    windows = data.calibration_windows(model.tokenizer, args.steps * args.batch_size, args.seq_len, seed=1)
    options = dict(METHOD_OPTIONS[args.method], **({} if args.method == "s2ft" else {"rank": args.rank}))
    if args.method == "spt":  # sensitivity on the first two training batches
        first = windows[:2 * args.batch_size].split(args.batch_size)
        options["batches"] = [{"input_ids": w, "labels": w} for w in first]
    tuned = prunekit.tuning.prepare(model, args.method, **options)
    optimizer = tuned.optimizer(lr=args.lr)
    model.train()
    clock = time.perf_counter()
    for batch in tqdm(windows.split(args.batch_size), desc=f"{args.method}: training", unit="step"):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return tuned, (time.perf_counter() - clock) / args.steps


def main(argv=None) -> dict:
    args = parse(argv)
    budget = prunekit.Budget.coerce(args.budget)  # bad names and budgets fail before the model loads
    prunekit.importance.ESTIMATORS.create(args.importance)
    prunekit.allocation.ALLOCATORS.create(args.allocator)
    if args.steps < 1 and args.method != "none":
        raise PrunekitError(f"--steps must be at least 1 for --method {args.method} (or pass --method none)")
    model, tokenizer = load_model(args.model)
    windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)
    rows = {"dense": {"perplexity": perplexity(model, windows), "seconds": 0.0}}

    report = prunekit.prune(model, budget, importance=args.importance, allocator=args.allocator,
                            calibration=data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len))
    print(report)
    rows["pruned"] = {"perplexity": perplexity(model, windows), "seconds": report.seconds["total"]}

    if args.method != "none":
        plain = copy.deepcopy(model)  # the deltas land on this copy: a pruned model with nothing attached
        model.tokenizer = tokenizer
        clock = time.perf_counter()
        tuned, per_step = fine_tune(model, args)
        with tempfile.TemporaryDirectory() as scratch:
            deltas = prunekit.tuning.save_deltas(tuned, Path(scratch) / "deltas")
            prunekit.tuning.load_deltas(plain, deltas)
        rows[f"+ {args.method}"] = {"perplexity": perplexity(plain, windows), "seconds": time.perf_counter() - clock,
                                    "trained": tuned.trainable_count(), "per_step": per_step}
        model = plain
    nonzero = prunekit.pruned_nonzero(model)

    # Compressed: each masked layer holds only its kept weights and runs on prunekit's CPU kernel where that is
    # faster (measured per batch size). Decoding speed of the same pruned model, masked dense and compressed.
    prompt = windows[:1]
    masked = generate(model, prompt, args.new_tokens)
    conversion = prunekit.kernels.convert(model)
    compressed = generate(model, prompt, args.new_tokens)
    if conversion.converted:
        rows["compressed"] = {"perplexity": perplexity(model, windows), "seconds": 0.0}

    print(f"\n{'':14}{'perplexity':>12}{'sparsity':>10}{'seconds':>9}")
    for name, row in rows.items():
        print(f"{name:14}{row['perplexity']:12.3f}{0 if name == 'dense' else report.sparsity:10.1%}"
              f"{row['seconds']:9.1f}")
    speedup = compressed.tokens_per_second / masked.tokens_per_second
    print(f"\n{args.eval_windows} x {args.seq_len} eval tokens; pruned entries nonzero: {nonzero}\n"
          f"{conversion.summary()}\n"
          f"decoding {args.new_tokens} tokens after a {args.seq_len}-token window, {torch.get_num_threads()} "
          f"thread(s): {masked.tokens_per_second:.1f} tokens/s masked dense -> {compressed.tokens_per_second:.1f} "
          f"compressed ({speedup:.2f}x); weights resident {masked.resident_bytes / 2**20:.1f} -> "
          f"{compressed.resident_bytes / 2**20:.1f} MiB; same tokens: "
          f"{'yes' if torch.equal(masked.tokens, compressed.tokens) else 'no'}")
    if args.out:
        prunekit.save_pruned(model, args.out, report, tokenizer,
                             evaluation={"perplexity": rows[f"+ {args.method}" if args.method != "none" else "pruned"]
                                         ["perplexity"],
                                         "dense_perplexity": rows["dense"]["perplexity"],
                                         "eval_windows": args.eval_windows, "seq_len": args.seq_len})
        print(f"saved to {args.out} (compressed); load with prunekit.load_pruned({args.out!r})")
    return {"rows": rows, "report": report, "model": model, "pruned_nonzero": nonzero, "conversion": conversion,
            "speedup": speedup, "generations": (masked, compressed)}


if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:], prog="prune_llm.py"))
