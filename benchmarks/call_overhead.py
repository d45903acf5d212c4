"""What a compressed layer's forward costs on the host beyond its kernel. First BlockSparseLinear's: wall time per
eager call of the prunekit::bsr_linear operator alone and of the module around it (2-D and [batch, tokens, features]
input), beside torch's own nn.Linear. At one row on a GPU the kernel takes a few microseconds, so this host path
decides whether an eager sparse layer can beat cuBLAS at all.

    python benchmarks/call_overhead.py                  # the CPU, with a stand-in operator (host cost only)
    python benchmarks/call_overhead.py --device cuda    # a GPU, with the compiled extension

On the CPU the operator is a stand-in of the same schema, registered with torch.library (native.stand_in), that only
allocates its output: what it measures is the dispatcher's cost and the module's, no arithmetic. nn.Linear there is
64 x 64, so that its time is also nearly all host cost. On a GPU both are the real 4096 x 4096 bf16 layer at one
row (32x32 blocks, 70% pruned), each call queued behind the last and timed over many, as eager decoding runs them.

The CPU then times its own kernels' layers, BitmaskLinear and BlockSparseLinear on prunekit's CPU kernel, 64 x 64
fp32 at one row, beside nn.Linear of that size: host cost and about a microsecond of product, which a decoding model
pays a few hundred times per token. The best of --repeats rounds is reported. Written to
results/call_overhead_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import machine, versions  # noqa: E402

from prunekit.kernels import BitmaskLinear, backends  # noqa: E402
from prunekit.kernels.linear import BlockSparseLinear  # noqa: E402
from prunekit.kernels.native import Native, output_like, stand_in  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FEATURES, BLOCK, PRUNED = 4096, 32, 0.7


def standin_backend() -> Native:
    """A CPU Native whose operator does no work but allocate its output, as the real one does first; it counts its
    calls (standin_backend.calls)."""
    standin_backend.calls = 0

    def bsr_linear(*args):
        standin_backend.calls += 1
        return output_like(*args)

    standin_backend.library = stand_in("prunekit_standin", bsr_linear)  # (kept: the operator lives as long)
    native = Native("standin", launcher=None, device_type="cpu", capability=lambda device: (9, 0),
                    kernel_index=lambda name: 0, operator=torch.ops.prunekit_standin.bsr_linear)
    backends.register(native)
    return native


def per_call(fn, calls: int, device: torch.device) -> float:
    """Microseconds per call over `calls` calls queued back to back."""
    for _ in range(min(calls, 200)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def cpu_layers() -> dict:
    """{name: call} of the CPU kernels' layers and nn.Linear, 64 x 64 fp32 at one row ([1, 1, 64], as a model
    decodes), the compressed ones 70% pruned and set to the kernel."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64)
    keep = torch.rand(64, 64) >= PRUNED
    blocks = torch.eye(2, dtype=torch.bool).repeat_interleave(32, 0).repeat_interleave(32, 1)
    layers = {"nn.Linear 64x64": dense, "BitmaskLinear 64x64, 70%": BitmaskLinear.from_dense(dense, keep, "cpu"),
              "BlockSparseLinear 64x64, 32x32 blocks, 50%": BlockSparseLinear.from_dense(dense, blocks, 32, "cpu")}
    x = torch.randn(1, 1, 64)
    return {f"{name}, [1, 1, 64]": (lambda layer=layer: layer(x)) for name, layer in layers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    info = machine(device.type)
    backend = standin_backend() if device.type == "cpu" else backends.get("cuda_ext")

    torch.manual_seed(0)
    dense = torch.nn.Linear(FEATURES, FEATURES, dtype=torch.bfloat16)
    grid = FEATURES // BLOCK
    keep = (torch.rand(grid, grid) >= PRUNED).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    module = BlockSparseLinear.from_dense(dense, keep, BLOCK, backend=backend.name).to(device)
    reference = (dense if device.type == "cuda" else torch.nn.Linear(64, 64, dtype=torch.bfloat16)).to(device)
    x = torch.randn(1, FEATURES, dtype=torch.bfloat16, device=device)
    x3 = x.view(1, 1, FEATURES)
    x_ref = torch.randn(1, reference.in_features, dtype=torch.bfloat16, device=device)
    layout = module.layout
    with torch.no_grad():
        plan = backend.operator_plan(x, module.values, layout, module.bias)
        args_ = (x, module.values, layout.row_ptr, layout.col_idx, module.bias, FEATURES, *plan)
        calls = {"operator alone": lambda: backend.operator(*args_),
                 "BlockSparseLinear, [1, 4096]": lambda: module(x),
                 "BlockSparseLinear, [1, 1, 4096]": lambda: module(x3),
                 f"nn.Linear {reference.in_features}x{reference.out_features}, 2-D": lambda: reference(x_ref)}
        if device.type == "cpu":
            before = standin_backend.calls
            module(x)
            if standin_backend.calls != before + 1:
                raise SystemExit("BlockSparseLinear did not run the operator: this would time something else")
        def best_of(fns: dict) -> dict:
            return {name: min(per_call(fn, args.calls, device) for _ in range(args.repeats)) for name, fn in fns.items()}

        best, kernels = best_of(calls), best_of(cpu_layers() if device.type == "cpu" else {})
    for name, us in {**best, **kernels}.items():
        print(f"{name:34s} {us:7.2f} us", flush=True)

    command = "python " + shlex.join(["benchmarks/call_overhead.py"] + sys.argv[1:])
    result = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "versions": versions(), "calls": args.calls, "repeats": args.repeats,
              "operator": backend.name, "us_per_call": best, "cpu_kernel_layers_us_per_call": kernels,
              "note": args.note}
    out = args.out or RESULTS / f"call_overhead_{device.type}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    operator = best["operator alone"]
    lines = [f"# Host cost of a compressed layer's call ({device.type}, operator: {backend.name})", "",
             f"Command: `{command}`  ", f"Machine: {info.get('gpu', info['cpu'])}  ", f"Date: {result['date']}", "",
             "| call | us per call | beyond the operator |", "|---|---|---|"]
    lines += [f"| {name} | {us:.2f} | {us - operator:+.2f} |" for name, us in best.items()]
    lines += ["", "The layer is 4096 x 4096 bf16 with 32x32 blocks, 70% pruned, at one row"
              + (" (nn.Linear is the same layer, dense)." if device.type == "cuda" else
                 "; the operator is a stand-in that only allocates its output, and nn.Linear is 64 x 64, so every "
                 "time here is host cost.")]
    if kernels:
        linear = next(iter(kernels.values()))
        lines += ["", "The CPU kernels' layers at one row, 64 x 64 fp32 (host cost and about a microsecond of product):",
                  "", "| call | us per call | beyond nn.Linear |", "|---|---|---|"]
        lines += [f"| {name} | {us:.2f} | {us - linear:+.2f} |" for name, us in kernels.items()]
    lines += ["", args.note] if args.note else []
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
