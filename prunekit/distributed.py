"""Several ranks, one result: calibration shards whose statistics add up, and data-parallel fine-tuning whose ranks
stay identical (torch.distributed, any backend: gloo on CPUs, NCCL on GPUs).

Calibration: `prunekit.prune(model, budget, ..., calibration=my_shard, distributed=True)` on every rank. Each rank
runs the block-by-block pass on its own shard; before a layer is pruned, its statistics (LayerStats: sums and a token
count) are all-reduced, so every rank prunes from the statistics of all the data and ends with the masks that one
process would choose given every shard, concatenated in rank order (`shard` cuts data that way). What an allocator
measures on "the first samples" (DP's curves, ECoFLaP's scores, FLOPs rows) comes from rank 0; OWL reads the reduced
statistics. Estimators that gather on the whole model (gradients, relevance) run on one rank only, for now.

Fine-tuning: `prunekit.tuning.prepare(model, method, distributed=True, ...)` on every rank, then a loop over each
rank's own batches. The method's optimizer averages every gradient it is about to use over the ranks, in one
all-reduce per step: the selected entries of a sparse method (what trains, not the dense gradient of its weights),
LoRA factors, S2FT's slices. Selections are taken from rank 0 (LIFT's randomized SVD, S2FT's units), SPT's
sensitivities summed over every rank's samples and IST's suppression losses averaged, so masks, selections and
optimizer state stay identical on every rank. No DistributedDataParallel wrapper is needed (for a sparse method it
would all-reduce the selected weights' dense gradients); a LoRA method may still run inside one.

Every rank must make the same calls in the same order (same model, budget, estimator, allocator, method options);
prune checks that they agree, and that every rank's input passed validation, before any weight changes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import PrunekitError


class Group:
    """The ranks of a torch.distributed process group (None: the default, every rank)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Adds each tensor over the ranks, in place (one all-reduce per dtype and device)."""
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for same in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            self.dist.all_reduce(flat, group=self.group)
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view_as(t))

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Averages each tensor over the ranks, in place."""
        self.sum_(tensors)
        for t in tensors:
            t.div_(self.world)

    def sum_number(self, value: float | int) -> float | int:
        t = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64)
        self.dist.all_reduce(t, group=self.group)
        return t.item()

    def _root(self) -> int:
        """The global rank of this group's rank 0: broadcasts name their source globally."""
        return self.dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors (same shapes on every rank), in place."""
        for t in tensors:
            self.dist.broadcast(t, src=self._root(), group=self.group)

    def broadcast(self, obj):
        """Rank 0's object (pickled), on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=self._root(), group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        found = [None] * self.world
        self.dist.all_gather_object(found, obj, group=self.group)
        return found

    def agree(self, what: str, value) -> None:
        """Raises on every rank if the ranks hold different values of `what`."""
        _same(what, self.gather(value))

    def settle(self, error: BaseException | None, plan=None) -> None:
        """In one collective: every rank raises if any rank failed its checks (so none goes on to a collective the
        failed one never reaches), or if the ranks' plans differ."""
        found = self.gather((None if error is None else f"{type(error).__name__}: {error}", plan))
        if error is not None:
            raise error
        failed = [(r, message) for r, (message, _) in enumerate(found) if message is not None]
        if failed:
            rank, message = failed[0]
            raise PrunekitError(f"rank {rank} refused its input, so every rank stops before any weight changes: "
                                f"{message}")
        _same("the plan (targets, budget, importance, allocator, order)", [p for _, p in found])


def _same(what: str, values: list) -> None:
    """Raises if the ranks' values (in rank order) differ, naming the first rank that differs from rank 0."""
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise PrunekitError(f"ranks disagree on {what}: rank 0 has {_short(values[0])}, rank {differ[0]} has "
                            f"{_short(values[differ[0]])}; every rank must make the same call")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def group_of(distributed) -> Group | None:
    """distributed=False/None: no group; True: the default process group; or a torch.distributed ProcessGroup."""
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, Group):
        return distributed
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise PrunekitError("distributed=True needs torch.distributed initialised on every rank: call "
                            "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
                            "environment it reads)")
    return Group(None if distributed is True else distributed)


def shard(calibration, rank: int | None = None, world: int | None = None):
    """This rank's contiguous share of calibration data: rows of a [N, L] tensor of token windows (in whole batches of
    the runner's size where N allows, so the ranks' batches concatenate to one process's), or items of a list.

    Ranks 0..world-1 get shares in order whose concatenation is the data; rank/world default to torch.distributed's.
    """
    if rank is None or world is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise PrunekitError("shard() needs rank and world, or torch.distributed initialised")
        rank, world = dist.get_rank(), dist.get_world_size()
    if not 0 <= rank < world:
        raise PrunekitError(f"rank must lie in [0, {world}), got {rank}")
    if isinstance(calibration, torch.Tensor):
        from .calibration.inputs import WINDOW_BATCH

        unit = WINDOW_BATCH if calibration.shape[0] >= WINDOW_BATCH * world else 1
        batches = (calibration.shape[0] + unit - 1) // unit
        if batches < world:
            raise PrunekitError(f"{calibration.shape[0]} calibration windows cannot give each of {world} ranks one")
        lo, hi = batches * rank // world * unit, batches * (rank + 1) // world * unit
        return calibration[lo:hi]
    items = list(calibration)
    if len(items) < world:
        raise PrunekitError(f"{len(items)} calibration batches cannot give each of {world} ranks one")
    return items[len(items) * rank // world:len(items) * (rank + 1) // world]
