"""Bit packing of keep-masks, least significant bit first (numpy's bitorder="little"): a mask costs 1/32 of an fp32
weight. pack_bits packs a whole tensor as one stream (prunekit's masks file); pack_rows packs each row of a 2-D mask
on its own, padded to whole bytes (compressed-tensors' sparse-bitmask layout, which the CPU kernels read)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 entries per byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


_ONES = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)  # set bits of each byte value


def count_bits(packed: torch.Tensor) -> int:
    """How many bits of a packed uint8 tensor are set (its padding is zero)."""
    return int(_ONES.to(packed.device)[packed.long()].sum())


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[: torch.Size(shape).numel()].bool().view(shape)


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> uint8 [rows, ceil(cols / 8)]; the padding bits of each row are zero."""
    rows, cols = mask.shape
    return pack_bits(F.pad(mask.to(torch.uint8), (0, -cols % 8))).view(rows, -1)


def unpack_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, bytes] -> bool [rows, cols]."""
    rows, width = packed.shape
    return unpack_bits(packed.reshape(-1), (rows, width * 8))[:, :cols]
