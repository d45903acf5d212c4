"""Prune a Hugging Face ViT structurally and unstructurally, recover with SPT, and compare held-out accuracy.

    python examples/prune_vit.py                        # a small ViT trained here on real digits
    python examples/prune_vit.py path/or/id/of/a/vit --epochs 2 --image-size 224

No pretrained ViT is reachable offline, so by default the example first trains a small one (4 blocks, width 64) on
scikit-learn's handwritten digits (1,797 real 8x8 images, upscaled to 16x16; 20% held out). Given a model, it
fine-tunes that one on the digits instead (its classifier resized to the 10 classes). Then, on copies of it:

- unstructured: 50% of every block's Linear weights masked (Wanda), then SPT fine-tuning, which trains the entries
  (or LoRA factors) the task's gradients are most sensitive to, with the pruned entries kept at zero;
- structured: 30% of the blocks' weights removed as whole heads and MLP channels (the model gets smaller), then SPT.

Every number is accuracy on the held-out images, which no step trains or calibrates on.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import prunekit
from prunekit import data
from prunekit.cli import run
from prunekit.errors import PrunekitError


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="Hugging Face ViT id or directory (default: train a small one here)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 40 from scratch, 3 "
                                                                  "for a given model)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels per side (default: the model's, 16 "
                                                                      "from scratch)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured: share of weights masked")
    parser.add_argument("--structured", type=float, default=0.3, help="structured: share of weights removed")
    parser.add_argument("--importance", default="wanda")
    parser.add_argument("--spt-epochs", type=int, default=2, help="SPT fine-tuning epochs after each prune")
    parser.add_argument("--spt-rank", type=int, default=4, help="SPT's LoRA rank (its budget: that LoRA's size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def small_vit(image_size: int):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=1, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def load_vit(spec: str):
    """A ViT classifier with a fresh 10-class head, or one clear line saying why not."""
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(spec, num_labels=10, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise PrunekitError(f"cannot load ViT {spec!r}: not a local directory with an image classifier, and the "
                            f"Hugging Face Hub could not provide it ({str(e).splitlines()[0]})") from None


def batches(images, labels, size: int, shuffle: bool = False, seed: int = 0) -> list[dict]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(labels))
    return [{"pixel_values": images[i], "labels": labels[i]} for i in order.split(size)]


def train(model, optimizer, images, labels, epochs: int, batch_size: int, seed: int) -> None:
    model.train()
    for epoch in range(epochs):
        for batch in batches(images, labels, batch_size, shuffle=True, seed=seed + epoch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    right = sum(int((model(pixel_values=b["pixel_values"]).logits.argmax(-1) == b["labels"]).sum())
                for b in batches(images, labels, 256))
    return right / len(labels)


def masked_share(model) -> float:
    """Share of the masked layers' weights that their masks prune (SPT's LoRA deltas are masked too)."""
    found = prunekit.masks(model).values()
    return sum(int((~keep).sum()) for keep in found) / sum(keep.numel() for keep in found)


def spt(model, images, labels, args) -> int:
    """SPT on the pruned model; returns how many numbers it trained."""
    sensitivity = batches(images, labels, 32, shuffle=True, seed=args.seed)[:4]  # 128 training samples
    tuned = prunekit.tuning.prepare(model, "spt", batches=sensitivity, rank=args.spt_rank, per_sample=False,
                                    progress=False)
    train(model, tuned.optimizer(lr=args.lr), images, labels, args.spt_epochs, args.batch_size, args.seed)
    return tuned.trainable_count()


def main(argv=None) -> dict:
    args = parse(argv)
    for name, value in (("sparsity", args.sparsity), ("structured", args.structured)):
        if not 0 < value < 1:
            raise PrunekitError(f"--{name} must be a share of the weights in (0, 1), got {value}")
    prunekit.importance.ESTIMATORS.create(args.importance)  # an unknown name fails before any training
    torch.manual_seed(args.seed)
    if args.model is None:
        size, model = args.image_size or 16, small_vit(args.image_size or 16)
        epochs = 40 if args.epochs is None else args.epochs
    else:
        model = load_vit(args.model)
        size, epochs = args.image_size or model.config.image_size, 3 if args.epochs is None else args.epochs
    (train_x, train_y), (test_x, test_y) = data.digits(size, model.config.num_channels, seed=args.seed)
    print(f"digits: {len(train_y)} training and {len(test_y)} held-out images of {size}x{size}")

    clock = time.perf_counter()
    train(model, torch.optim.AdamW(model.parameters(), lr=args.lr), train_x, train_y, epochs, args.batch_size,
          args.seed)
    results = {"dense": {"accuracy": accuracy(model, test_x, test_y), "params": model.num_parameters(),
                         "sparsity": 0.0, "seconds": time.perf_counter() - clock}}
    calibration = batches(train_x, train_y, 64)[:4]

    for kind in ("unstructured", "structured"):
        pruned = copy.deepcopy(model)
        clock = time.perf_counter()
        budget = args.sparsity if kind == "unstructured" else prunekit.Budget(sparsity=args.structured,
                                                                               granularity="structured")
        report = prunekit.prune(pruned, budget, importance=args.importance, calibration=calibration, progress=False)
        results[kind] = {"accuracy": accuracy(pruned, test_x, test_y), "params": pruned.num_parameters(),
                         "sparsity": report.sparsity, "seconds": time.perf_counter() - clock, "report": report}
        clock = time.perf_counter()
        trained = spt(pruned, train_x, train_y, args)
        results[f"{kind} + SPT"] = {"accuracy": accuracy(pruned, test_x, test_y), "params": results[kind]["params"],
                                    "sparsity": masked_share(pruned) if kind == "unstructured" else report.sparsity,
                                    "seconds": time.perf_counter() - clock, "trained": trained,
                                    "pruned_nonzero": prunekit.pruned_nonzero(pruned), "model": pruned}
    results["dense"]["model"] = model

    print(f"\n{'':22}{'held-out acc':>13}{'params':>10}{'sparsity':>10}{'SPT trains':>11}{'seconds':>9}")
    for name, r in results.items():
        trained = f"{r['trained']:,}" if "trained" in r else ""
        print(f"{name:22}{r['accuracy']:13.1%}{r['params']:10,}{r['sparsity']:10.1%}{trained:>11}{r['seconds']:9.1f}")
    print(f"\nchance is 10.0%. params: the model's own (structured pruning removes some; SPT's LoRA factors come on "
          f"top); sparsity: of the blocks' Linear weights; pruned entries nonzero after SPT: "
          f"{results['unstructured + SPT']['pruned_nonzero']}")
    return results


if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:], prog="prune_vit.py"))
