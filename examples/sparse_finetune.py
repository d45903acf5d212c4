"""LIFT, S2FT, IST and SPT side by side on one task, each trained through transformers.Trainer.

    python examples/sparse_finetune.py                # bundled SmolLM2-135M pruned 50% (Wanda)
    python examples/sparse_finetune.py path/or/id --prune 0 --methods lift spt --steps 40

The task: next-token prediction on Wikipedia (docs/protocol.md's calibration split, windows drawn with random.Random(1);
perplexity on the eval split). The model is pruned once (--prune; 0 keeps it dense), then every method fine-tunes its
own copy for --steps Trainer steps, sized like a rank-`--rank` LoRA on every projection. Each method hands the
Trainer its optimizer (`tuned.optimizer(lr)`), whose step hooks run what the method does between steps (IST's layer
draws, LIFT's refreshes); max_grad_norm=0, since clipping would not see the sparse methods' reduced gradients.
The table: numbers trained, seconds per step, perplexity, and the pruned entries left nonzero (0 for all).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import prunekit
from prunekit import data
from prunekit.cli import load_model, run
from prunekit.errors import PrunekitError
from prunekit.evaluate import perplexity

METHODS = ("lift", "s2ft", "ist", "spt")


def options(method: str, args, batches: list[dict]) -> dict:
    return {"lift": dict(rank=args.rank, filter_rank=32, interval=0),
            "s2ft": dict(heads=args.heads, channels=args.channels),
            "ist": dict(rank=args.rank), "spt": dict(rank=args.rank, batches=batches[:2])}[method]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="Hugging Face causal LM id or directory (default: bundled SmolLM2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--prune", type=float, default=0.5,
                        help="Wanda sparsity before tuning (0: tune the dense model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank LIFT, IST and SPT are sized like")
    parser.add_argument("--heads", type=float, default=0.1, help="S2FT: share of KV groups trained (in O)")
    parser.add_argument("--channels", type=float, default=0.03, help="S2FT: share of MLP channels trained (in down)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    return parser.parse_args(argv)


def train(model, tuned, dataset: list[dict], args) -> float:
    """Trainer steps with the method's optimizer; returns seconds per step."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                     learning_rate=args.lr, max_grad_norm=0.0, lr_scheduler_type="constant",
                                     logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=dataset,
                          optimizers=(tuned.optimizer(lr=args.lr), None))
        clock = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - clock) / args.steps
    model.eval()
    return seconds


def main(argv=None) -> dict:
    args = parse(argv)
    if not 0 <= args.prune < 1:
        raise PrunekitError(f"--prune is a sparsity in [0, 1), got {args.prune}")
    if args.steps < 1:
        raise PrunekitError(f"--steps must be at least 1, got {args.steps}")
    model, tokenizer = load_model(args.model)
    windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)
    if args.prune:
        calibration = data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len)
        report = prunekit.prune(model, args.prune, importance="wanda", calibration=calibration)
        print(report.summary())
    base = perplexity(model, windows)
    training = data.calibration_windows(tokenizer, args.steps * args.batch_size, args.seq_len, seed=1)
    dataset = [{"input_ids": w, "labels": w} for w in training]
    sensitivity = [{"input_ids": b, "labels": b} for b in training.split(args.batch_size)]

    results = {}
    for method in args.methods:
        copy_ = copy.deepcopy(model)
        tuned = prunekit.tuning.prepare(copy_, method, **options(method, args, sensitivity))
        per_step = train(copy_, tuned, dataset, args)
        results[method] = {"trained": tuned.trainable_count(), "per_step": per_step,
                           "perplexity": perplexity(copy_, windows), "pruned_nonzero": prunekit.pruned_nonzero(copy_),
                           "model": copy_, "tuned": tuned}

    state = f"pruned {args.prune:.0%}" if args.prune else "dense"
    print(f"\n{state} model, perplexity {base:.3f} on {args.eval_windows} x {args.seq_len} eval tokens before tuning; "
          f"{args.steps} Trainer steps of {args.batch_size} x {args.seq_len} tokens each\n")
    print(f"{'method':8}{'trained':>12}{'s/step':>9}{'perplexity':>12}{'pruned nonzero':>16}")
    for method, r in results.items():
        print(f"{method:8}{r['trained']:12,}{r['per_step']:9.2f}{r['perplexity']:12.3f}{r['pruned_nonzero']:16}")
    return {"before": base, "results": results}


if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:], prog="sparse_finetune.py"))
