"""Which kernel of cuda_ext/bsr_kernels.cuh runs a product, on what grid, and the parameters it takes.

Written once for every launcher (the compiled extension, CuPy's NVRTC module, the tests' CPU emulator), so the
kernel names, thread counts and grids here must match PK_KERNELS in bsr_kernels.cuh. `forward` is the planner's
guess; on a GPU the backend times the guess's `variants` once per batch-size bucket and runs the fastest
(native.Native.planned), so the thresholds below only decide where nothing was timed (PRUNEKIT_TUNE=0, the CPU
emulator) and which variants there are.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

import torch

SKINNY_ROWS = 16  # up to this many rows (one, where tensor cores take the dtype) the GEMV-like kernel
SKINNY_TILES = (1, 4, 16)  # rows per thread block of the skinny kernel
BT_ROWS, BT_TILE = 64, 16  # up to 64 rows (fp16/bf16): tensor cores on the transposed product, 16 rows a block
# The one-row and bt kernels can split each block row between 2 or 4 thread blocks by output feature (bsr_kernels.cuh,
# Skinny and Bt): the splits each has, by block size, and the thread blocks to aim for in all (about four a streaming
# multiprocessor on an H100/H200, 132 SMs; a 4096-wide layer has only 128 block rows of 32, 64 of 64).
SPLITS = {"skinny": {32: (2, 4), 64: (2, 4)}, "bt": {32: (2,), 64: (2, 4)}}
THREAD_BLOCKS = 512
TC_SMALL_ROWS = 1024  # up to this many rows, tc tiles of 128 rows (more thread blocks in flight), else 256
# tcw, tc's tile on Hopper's wgmma, takes 32- and 64-wide blocks in code built for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a).
# It is always among the variants there (so tuning picks it where it is faster); TC_WGMMA makes it the untuned plan.
TCW_BLOCKS = (32, 64)
TC_WGMMA = False
SIMT_ROWS = 64  # rows per thread block of the CUDA-core kernel


def tc_tile(rows: int) -> int:
    """Rows per thread block of the tc kernel (bsr_kernels.cuh, Tc), whose four warps each take a quarter of the rows
    across the whole block width: 256 (64 x 64 warp tiles on 64-wide blocks) once there are enough rows to fill the
    GPU with such tiles, 128 below."""
    return 128 if rows <= TC_SMALL_ROWS else 256


# PkParams, field by field: nine pointers, then six 64-bit integers (bsr_kernels.cuh, PK_PARAM_DECL).
PARAMS = ("x", "values", "row_ptr", "col_idx", "perm", "row_idx", "bias", "out", "grad", "M", "N", "K", "ldx", "ldo",
          "ldg")
_POINTERS = 9
_PACK = struct.Struct("<" + "Q" * _POINTERS + "q" * (len(PARAMS) - _POINTERS))

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Launch:
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    tile: int = 0  # rows of the product per thread block (forward kernels; grid[1] = ceil(rows / tile))
    split: int = 1  # thread blocks per block row (forward kernels; grid[0] = block rows x split)

    def for_rows(self, rows: int) -> "Launch":
        """This forward launch for `rows` rows (another row count of its bucket): as many tiles of rows."""
        return dataclasses.replace(self, grid=(self.grid[0], -(-rows // self.tile), 1))


def bucket(rows: int) -> int:
    """rows rounded up to a power of two: every threshold below is one, so a bucket always gets the same kernel."""
    return 1 << max(0, int(rows) - 1).bit_length()


def tensor_cores(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """WMMA takes fp16 from sm_70 and bf16 from sm_80; fp32 stays exact on CUDA cores."""
    return (dtype == torch.float16 and capability >= (7, 0)) or (dtype == torch.bfloat16 and capability >= (8, 0))


def mma_sync(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """mma.sync m16n8k16 with ldmatrix and cp.async (the tc kernel): fp16 and bf16 from sm_80."""
    return dtype in (torch.float16, torch.bfloat16) and capability >= (8, 0)


def split(kernel: str, block: int, thread_blocks: int) -> int:
    """Thread blocks per block row: the fewest of the kernel's splits that reach THREAD_BLOCKS in all (the grid
    without splitting has `thread_blocks`), else its largest."""
    splits = (1,) + SPLITS[kernel].get(block, ())
    return next((s for s in splits if thread_blocks * s >= THREAD_BLOCKS), splits[-1])


def _skinny(dt: str, block: int, block_rows: int, rows: int, ways: int) -> Launch:
    tile = next(t for t in SKINNY_TILES if rows <= t)
    threads = 512 if tile == 1 else 256  # 16 warps a block row at one row (bsr_kernels.cuh, Skinny)
    return Launch(f"pk_skinny_{dt}_b{block}_m{tile}" + (f"_s{ways}" if ways > 1 else ""),
                  (block_rows * ways, -(-rows // tile), 1), (threads, 1, 1), tile, ways)


def _bt(dt: str, block: int, block_rows: int, rows: int, ways: int) -> Launch:
    return Launch(f"pk_bt_{dt}_b{block}" + (f"_s{ways}" if ways > 1 else ""),
                  (block_rows * ways, -(-rows // BT_TILE), 1), (512, 1, 1), BT_TILE, ways)


def _tc(dt: str, block: int, block_rows: int, rows: int, tile: int, kind: str) -> Launch:
    return Launch(f"pk_tc_{dt}_b{block}_m{tile}_{kind}", (block_rows, -(-rows // tile), 1), (128, 1, 1), tile)


def _tcw(dt: str, block: int, block_rows: int, rows: int, tile: int) -> Launch:
    return Launch(f"pk_tcw_{dt}_b{block}_m{tile}", (block_rows, -(-rows // tile), 1), (128, 1, 1), tile)


def forward(rows: int, block_rows: int, block: int, dtype: torch.dtype, capability: tuple[int, int],
            transposed: bool = False, wgmma: bool = False) -> Launch:
    """y = x W^T (or, transposed, dX = dY W) for `rows` rows over `block_rows` block rows of the product. wgmma:
    the loaded kernels were built for sm_90a (Native.wgmma)."""
    dt = DTYPE_NAMES[dtype]
    tensor = tensor_cores(dtype, capability)
    if not transposed and (rows == 1 or (rows <= SKINNY_ROWS and not tensor)):
        ways = split("skinny", block, block_rows) if rows == 1 else 1  # (fp32's 4- and 16-row tiles have no splits)
        return _skinny(dt, block, block_rows, rows, ways)
    if not transposed and tensor and rows <= BT_ROWS:
        # (tiles of the bucket, not of the rows: one plan for every row count of a bucket)
        return _bt(dt, block, block_rows, rows, split("bt", block, block_rows * -(-bucket(rows) // BT_TILE)))
    kind = "t" if transposed else "n"
    if TC_WGMMA and wgmma and mma_sync(dtype, capability) and not transposed and block in TCW_BLOCKS:
        return _tcw(dt, block, block_rows, rows, tc_tile(rows))
    if mma_sync(dtype, capability):
        return _tc(dt, block, block_rows, rows, tc_tile(rows), kind)
    return Launch(f"pk_simt_{dt}_b{block}_{kind}", (block_rows, -(-rows // SIMT_ROWS), 1), (256, 1, 1), SIMT_ROWS)


def variants(rows: int, block_rows: int, block: int, dtype: torch.dtype, capability: tuple[int, int],
             wgmma: bool = False) -> list[Launch]:
    """Every launch that computes the forward `forward` plans, the planned one first: its kernel whole and split in
    each way it can be (skinny at one row, bt), or tc with either tile, and tcw with either where the loaded kernels
    have wgmma: what a GPU backend times to pick its kernel (Native.planned), and the benchmarks show. Every row
    count of a bucket gets the same launches in the same order."""
    planned = forward(rows, block_rows, block, dtype, capability, wgmma=wgmma)
    dt, family = DTYPE_NAMES[dtype], planned.name.split("_")[1]
    if family == "skinny" and rows == 1:
        others = [_skinny(dt, block, block_rows, rows, ways) for ways in (1,) + SPLITS["skinny"].get(block, ())]
    elif family == "bt":
        others = [_bt(dt, block, block_rows, rows, ways) for ways in (1,) + SPLITS["bt"].get(block, ())]
    elif family in ("tc", "tcw"):
        others = [_tc(dt, block, block_rows, rows, tile, "n") for tile in (128, 256)]
        if wgmma and block in TCW_BLOCKS:
            others += [_tcw(dt, block, block_rows, rows, tile) for tile in (128, 256)]
    else:
        others = []
    return [planned] + [v for v in others if v.name != planned.name]


def grad_values(nnzb: int, block: int, dtype: torch.dtype, capability: tuple[int, int]) -> Launch:
    """dV of every stored block: one thread block each."""
    dt = DTYPE_NAMES[dtype]
    if tensor_cores(dtype, capability):
        return Launch(f"pk_dw_tc_{dt}_b{block}", (nnzb, 1, 1), (128, 1, 1))
    return Launch(f"pk_dw_simt_{dt}_b{block}", (nnzb, 1, 1), (256, 1, 1))


def pack(**fields) -> bytes:
    """PkParams as bytes; pointers are data_ptr() ints (0 for none), missing fields are 0."""
    unknown = set(fields) - set(PARAMS)
    if unknown:
        raise TypeError(f"unknown PkParams fields {sorted(unknown)}")
    return _PACK.pack(*(int(fields.get(name, 0)) for name in PARAMS))


def unpack(raw: bytes) -> tuple[int, ...]:
    """The fields back, in order (what a launcher taking separate arguments passes)."""
    return _PACK.unpack(raw)
