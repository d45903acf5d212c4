"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: each rank prunes and fine-tunes on its own
shard of the data (gloo, CPU) and saves what it ended with to OUT/rank<r>.pt for the test to compare.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT
"""
import gc
import sys

import torch
import torch.distributed as dist

import prunekit
from conftest import tiny
from prunekit.distributed import shard
from prunekit.tuning.sparse import selection

# (importance, allocator, budget, order): one process on all the data is the reference for each
PRUNE_CONFIGS = [("wanda", "uniform", 0.5, "layer"), ("sparsegpt", "owl", 0.6, "block"),
                 ("sparsegpt", "uniform", "2:4", "layer"), ("wanda", "dp", 0.5, "layer"),
                 ("admm", "uniform", "2:4", "block")]
STEPS = 4


def all_calibration() -> torch.Tensor:
    """16 windows: two batches of the runner's 8, one per rank."""
    return torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(5))


def all_batches() -> list[dict]:
    """STEPS steps x 2 ranks of [2, 16] token batches, step-major: batch 2k + r is rank r's batch of step k."""
    g = torch.Generator().manual_seed(6)
    out = []
    for _ in range(2 * STEPS):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def pruned_model():
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    return model


def state_of(tuned, model, optimizer) -> dict:
    """What must agree across ranks: weights, masks, selections and the optimizer's moments."""
    params = dict(model.named_parameters())
    return {
        "weights": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "masks": {n: m.clone() for n, m in prunekit.masks(model).items()},
        "selections": {n: selection(p).indices.clone() for n, p in params.items() if selection(p) is not None},
        "moments": {f"{i}.{k}": v.clone() for i, s in enumerate(optimizer.state.values())
                    for k, v in s.items() if isinstance(v, torch.Tensor)},
        "trainable": tuned.trainable_count(),
    }


def train(model, tuned, optimizer, batches, forward=None):
    forward = forward or model
    for step in range(STEPS):
        batch = batches[step]
        forward(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result = {"prune": {}, "tune": {}, "errors": {}}

    for importance, allocator, budget, order in PRUNE_CONFIGS:
        model = tiny("llama")
        report = prunekit.prune(model, budget, importance=importance, allocator=allocator, order=order,
                                calibration=shard(all_calibration()), distributed=True, progress=False)
        result["prune"][f"{importance}-{allocator}-{budget}-{order}"] = {
            "masks": prunekit.masks(model), "calibration": report.calibration, "exact": report.exact}

    # Ranks that disagree, or one whose data is refused, all stop before any weight changes.
    windows = shard(all_calibration())
    for name, budget, data in (("budget", 0.5 + 0.1 * rank, windows),
                               ("data", 0.5, windows.float() if rank else windows)):
        model = tiny("llama")
        try:
            prunekit.prune(model, budget, calibration=data, distributed=True, progress=False)
        except prunekit.PrunekitError as e:
            result["errors"][name] = (str(e), len(prunekit.masks(model)))

    mine = all_batches()[rank::2]  # this rank's batch of every step
    for method, options in (("lift", dict(rank=2, filter_rank=2, interval=3)),
                            ("lift-static", dict(rank=2, filter_rank=2, interval=0)),
                            ("spt", dict(rank=2, budget=600, batches=mine[:2])),
                            ("s2ft", dict(heads=0.5, channels=0.1))):
        model = pruned_model()
        torch.manual_seed(1)  # the same randomized-SVD draws as the single-process reference (rank 0's are used)
        tuned = prunekit.tuning.prepare(model, method.split("-")[0], distributed=True, **options)
        optimizer = tuned.optimizer(lr=1e-2)
        train(model, tuned, optimizer, mine)
        result["tune"][method] = state_of(tuned, model, optimizer)

    # A LoRA method inside DistributedDataParallel: DDP averages the adapters' gradients (IST switches blocks off, so
    # some adapters get none: find_unused_parameters), prunekit averages IST's suppression losses.
    model = pruned_model()
    tuned = prunekit.tuning.prepare(model, "ist", rank=2, interval=2, distributed=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = tuned.optimizer(lr=1e-2)
    train(model, tuned, optimizer, mine, forward=ddp)
    result["tune"]["ist-ddp"] = {**state_of(tuned, model, optimizer), "scores": tuned.scores.clone()}
    # Free DDP's reducer while the default group still holds the process group: were the reducer the group's last
    # owner, its destructor would join gloo's threads holding the GIL, which a gloo thread freeing a tensor waits
    # for (a deadlock seen once in the suite; pytorch/pytorch#56297).
    del ddp
    gc.collect()

    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
