"""Forward hooks: the one way prunekit removes the hooks it adds (`removing`), and those that feed layer inputs to
their statistics (`hooked`)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .stats import LayerStats


@contextlib.contextmanager
def removing(handles: list) -> Iterator[list]:
    """Context: the hooks whose handles (torch's RemovableHandle) are in the list, which may grow inside, are all
    removed on leaving, by an exception too."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class Stop(Exception):
    """Cuts a forward short once nothing after this point is needed."""


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module's input as rows over its weight's columns: a 2-D convolution's input patches (im2col: [positions,
    in x kh x kw], in the order of weight.reshape(out, -1)), which makes it a Linear on every patch; anything else's
    input as it is (features last)."""
    if not isinstance(module, nn.Conv2d):
        return x
    if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(f"input statistics of a convolution need groups=1, zero padding given as numbers; got "
                         f"groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}")
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [N, C*k*k, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def record(stats: dict[nn.Module, LayerStats], seen: dict, module: nn.Module, x: torch.Tensor,
           mask: torch.Tensor | None) -> None:
    """Adds module's input x (padding tokens removed) to its LayerStats.

    `seen` holds the inputs of the current forward (kept alive, so their ids stay unique). Modules called with
    the very same input tensor (q, k and v; gate and up) end up sharing one LayerStats, updated once.
    """
    first = seen.get(id(x))
    if first is None:
        seen[id(x)] = (x, module)
    elif stats[module] is stats[first[1]]:
        return
    elif stats[module].count == 0:
        stats[module] = stats[first[1]]
        return
    x = input_rows(module, x)
    stats[module].update((x[mask] if mask is not None and x.shape[:-1] == mask.shape else x).detach())


@contextlib.contextmanager
def hooked(stats: dict[nn.Module, LayerStats], mask_of: Callable[[], torch.Tensor | None],
           stop_after_all: bool = False):
    """Records each hooked module's input into `stats` during the forwards run inside (see `record`).

    Yields a function to call before each forward. With stop_after_all, a forward is cut short (raising Stop)
    as soon as every hooked module has received its input: nothing after it is needed for statistics.
    """
    seen: dict = {}
    fired: set[nn.Module] = set()

    def pre_hook(module, args):
        record(stats, seen, module, args[0], mask_of())
        fired.add(module)
        if stop_after_all and len(fired) == len(stats):
            raise Stop

    def new_forward():
        seen.clear()
        fired.clear()

    with removing([module.register_forward_pre_hook(pre_hook) for module in stats]):
        yield new_forward
