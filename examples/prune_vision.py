"""Prune a pretrained CNN structurally: EfficientNet-Lite0 with its ImageNet-1k weights loses 30% of its MACs as
whole filters, its kept weights are refit, and it is measured against its dense self.

    python examples/prune_vision.py                                   # LRP, 30% of MACs, refit
    python examples/prune_vision.py --macs 0.5 --importance structural_hessian

Everything runs on real weights and images that ship in pip packages (prunekit.data; nothing downloads):

1. EfficientNet-Lite0 (prunekit.data.load_efficientnet_lite0: depthwise-separable blocks, batch norm, residual
   adds) and views of foolbox's 20 ImageNet photographs and 40 CIFAR test images (prunekit.data.image_views:
   continuous crops of 30-100% of the shorter side, flips): 128 calibration views (seed 0) and --views held-out
   evaluation views (seed 1, disjoint).
2. Every filter group of the MBConv blocks (an expansion's filters with their batch norm, depthwise filters and the
   projection's inputs, coupled through Torch-Pruning's dependency graph) is scored by --importance: LRP with
   its CNN rule (alpha-beta) by default, the best measured in benchmarks/results/vision.md; gradient importances
   use the KL divergence from the dense model's predictions as their loss (distillation: no labels needed).
3. Filters go until the whole model's MACs fall by --macs (the budget over the blocks' convolutions that means
   that), the same share of every block (the uniform allocator); then the least-squares refit of the layers that
   read removed channels and the batch norms' statistics re-estimated on the calibration views.
4. Reported before and after: MACs and parameters, top-1 agreement, top-5 overlap and KL divergence against the
   dense model on the held-out views, top-1 on the 20 labelled photographs, and images per second (batch 32, the
   median of 5 rounds that time the dense and the pruned model back to back).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import prunekit
from prunekit import data
from prunekit.cli import run
from prunekit.errors import PrunekitError
from prunekit.evaluate import agreement, logits

LOSS_BASED = ("fisher", "structural_hessian", "hutchinson", "zeroth_order")  # importances that take a loss


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--macs", type=float, default=0.3, help="share of the model's MACs to remove (default 0.3)")
    parser.add_argument("--importance", default="lrp", help="channel importance (default: lrp, alpha-beta rule)")
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="skip the least-squares refit")
    parser.add_argument("--calibration", type=int, default=128, help="calibration views (default 128)")
    parser.add_argument("--views", type=int, default=1000, help="held-out evaluation views (default 1000)")
    return parser.parse_args(argv)


def conv_macs(model, example) -> tuple[int, int]:
    """(MACs of every Conv2d and Linear of the model, MACs of those inside its blocks) for one image."""
    found = {}

    def count(module, args, out):
        found[module] = out.numel() // out.shape[1] * module.weight.numel()

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    inside = {m for m in model.blocks.modules()}
    return sum(found.values()), sum(n for m, n in found.items() if m in inside)


def images_per_second(models: dict, images: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Per model, images per second on one batch: the median of `rounds`, the models timed back to back in every
    round, so that a busy moment of a shared machine slows all of them."""
    seconds = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(images)  # warm up
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                seconds[name].append(time.perf_counter() - start)
    return {name: len(images) / statistics.median(s) for name, s in seconds.items()}


def measure(model, dense_logits, views, labelled, labels) -> dict:
    found = agreement(dense_logits, logits(model, views))
    found["labelled top-1"] = float((logits(model, labelled).argmax(1) == labels).float().mean())
    found["params"] = sum(p.numel() for p in model.parameters())
    found["MACs"] = conv_macs(model, views[:1])[0]
    return found


def main(argv=None) -> dict:
    args = parse(argv)
    if not 0 < args.macs < 1:
        raise PrunekitError(f"--macs is the share of MACs to remove, in (0, 1); got {args.macs}")
    if args.calibration < 1 or args.views < 32:
        raise PrunekitError(f"need --calibration >= 1 and --views >= 32; got {args.calibration} and {args.views}")
    model = data.load_efficientnet_lite0()
    photos = data.imagenet_photos()[0] + list(data.cifar_images("cifar10")[0]) + list(data.cifar_images("cifar100")[0])
    calibration = data.image_views(photos, args.calibration, seed=0)
    views = data.image_views(photos, args.views, seed=1)
    labelled, labels = data.imagenet_images()
    dense_logits = logits(model, views)
    results = {"dense": measure(model, dense_logits, views, labelled, labels)}

    batches = [{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)]
    teacher = {id(b["input"]): F.softmax(logits(model, b["input"]), -1) for b in batches}

    def distillation(pruned, batch):  # KL(dense || pruned) on a calibration batch
        x = batch["input"]
        target = teacher.get(id(x))
        if target is None:  # a single sample of a batch
            target = F.softmax(logits(model, x), -1)
        return F.kl_div(F.log_softmax(pruned(x), -1), target, reduction="batchmean")

    options = {"rule": "alpha_beta"} if args.importance == "lrp" else \
        {"loss": distillation} if args.importance in LOSS_BASED else {}
    importance = prunekit.importance.ESTIMATORS.create(args.importance, **options)
    total, blocks = conv_macs(model, calibration[:1])
    if args.macs * total >= blocks:
        raise PrunekitError(f"the blocks hold {blocks / total:.0%} of the MACs; --macs must be below that")
    budget = prunekit.Budget(flops=1 - args.macs * total / blocks, granularity="structured", refit=args.refit)
    pruned = data.load_efficientnet_lite0()
    clock = time.perf_counter()
    report = prunekit.prune(pruned, budget, importance=importance, calibration=batches)
    seconds = time.perf_counter() - clock
    print(report)
    results["pruned"] = measure(pruned, dense_logits, views, labelled, labels)
    for name, speed in images_per_second({"dense": model, "pruned": pruned}, views[:32]).items():
        results[name]["images/s"] = speed

    print(f"\nEfficientNet-Lite0, {args.macs:.0%} of MACs removed with {args.importance}"
          f"{' and refit' if args.refit else ''} in {seconds:.0f} s; {args.views} held-out views")
    print(f"{'':8}{'MACs (M)':>10}{'params':>11}{'top-1 agr.':>12}{'top-5 ovl.':>12}{'KL':>8}{'labelled':>10}"
          f"{'images/s':>10}")
    for name, r in results.items():
        print(f"{name:8}{r['MACs'] / 1e6:10.1f}{r['params']:11,}{r['top1_agreement']:12.3f}{r['top5_overlap']:12.3f}"
              f"{r['kl']:8.3f}{r['labelled top-1']:10.0%}{r['images/s']:10.1f}")
    results["seconds"], results["model"] = seconds, pruned
    return results


if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:], prog="prune_vision.py"))
