"""`prunekit prune|eval|generate|report`: the pipeline on the command line, with the protocol's data as defaults."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .errors import PrunekitError


def load_model(spec: str | None, offloaded: bool = False, sparse: bool | None = None):
    """(model, tokenizer) from a Hugging Face id or directory, a pruned directory, a .gguf file, or None for the
    bundled SmolLM2. offloaded: a local directory whose blocks stay on disk until used (prunekit.load_offloaded).
    sparse: how a compressed pruned directory's layers come back (load_pruned's sparse)."""
    from . import data, io

    if offloaded:
        if spec is None or not Path(spec).is_dir():
            raise PrunekitError(f"--offload reads a local model directory with safetensors weights; got "
                                f"{'the bundled SmolLM2 (GGUF)' if spec is None else repr(spec)}")
        from transformers import AutoTokenizer

        from .offload import load_offloaded

        return load_offloaded(spec), AutoTokenizer.from_pretrained(spec)
    if spec is None:
        return data.load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return data.load_gguf(path)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        if (path / io.MANIFEST).is_file():
            return io.load_pruned(path, sparse=sparse if io.is_compressed(path) else None).eval(), tokenizer
        return AutoModelForCausalLM.from_pretrained(spec).eval(), tokenizer
    except (OSError, ValueError) as e:
        if isinstance(e, PrunekitError):
            raise
        where = "a directory without a loadable model" if path.is_dir() else "not a local directory, and the " \
            "Hugging Face Hub could not provide it"
        raise PrunekitError(f"cannot load model {spec!r}: {where} ({str(e).splitlines()[0]})") from None


def _budget(args):
    from .budget import Budget

    base = Budget.coerce(args.budget)
    if base.nm and args.granularity != "unstructured":
        raise PrunekitError(f"--budget {args.budget} is already a granularity; leave out --granularity "
                            f"{args.granularity}")
    return Budget(sparsity=None if base.nm else base.sparsity, granularity=base.granularity if base.nm else
                  args.granularity, min_layer_sparsity=args.min_layer_sparsity,
                  max_layer_sparsity=args.max_layer_sparsity, include=args.include, exclude=args.exclude,
                  heads=args.heads, round_to=args.round_to, refit=args.refit)


def cmd_prune(args) -> None:
    import prunekit

    from . import data
    from .evaluate import perplexity

    budget = _budget(args)  # a bad budget fails before the model loads
    if args.importance is not None:
        prunekit.importance.ESTIMATORS.create(args.importance)
    prunekit.allocation.ALLOCATORS.create(args.allocator)
    if args.offload and not args.out:
        raise PrunekitError("--offload keeps the pruned blocks on disk until they are saved; pass --out DIR")
    if not args.out and not args.no_save:  # the whole job would run and its result be thrown away
        raise PrunekitError("pass --out DIR to save the pruned model, or --no-save to only print the report")
    model, tokenizer = load_model(args.model, args.offload)
    windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len) if args.eval_windows else None
    before = perplexity(model, windows) if windows is not None else None
    calibration = data.calibration_windows(tokenizer, args.calibration_windows, args.seq_len, args.seed)
    report = prunekit.prune(model, budget, importance=args.importance, allocator=args.allocator,
                            calibration=calibration, order=args.order, device=args.device, permute=args.permute)
    after = perplexity(model, windows) if windows is not None else None
    print(report)
    if before is not None:
        print(f"\nperplexity on {args.eval_windows} x {args.seq_len} Wikipedia eval tokens: dense {before:.3f} -> "
              f"pruned {after:.3f} ({after / before:.3f}x)")
    if args.out:
        evaluation = None if before is None else {"perplexity": after, "dense_perplexity": before,
                                                  "eval_windows": args.eval_windows, "seq_len": args.seq_len}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = prunekit.save_pruned(model, args.out, report, tokenizer, evaluation=evaluation)
        for w in caught:
            print(f"note: {w.message}")
        print(f"saved to {out}; load with prunekit.load_pruned({str(out)!r})")


def cmd_eval(args) -> None:
    from . import data
    from .evaluate import perplexity

    model, tokenizer = load_model(args.model, args.offload)
    windows = data.eval_windows(tokenizer, args.eval_windows, args.seq_len)
    print(f"perplexity on {args.eval_windows} x {args.seq_len} Wikipedia eval tokens: {perplexity(model, windows):.3f}")


def cmd_generate(args) -> None:
    import torch

    import prunekit

    from .generate import generate

    if args.max_new_tokens < 1:
        raise PrunekitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, sparse=not args.dense)
    if args.dense:
        prunekit.kernels.revert(model)
    elif prunekit.masks(model):  # a directory saved dense: its masked layers compressed now
        prunekit.kernels.convert(model)
    layers = [m for m in model.modules() if isinstance(m, prunekit.kernels.SPARSE_MODULES)]
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    print(f"generating {args.max_new_tokens} tokens on {torch.get_num_threads()} thread(s); "
          f"{len(layers)} compressed layers (CPU kernels: {prunekit.kernels.cpu.isa()})", file=sys.stderr)
    result = generate(model, ids, args.max_new_tokens)
    print(args.prompt + tokenizer.decode(result.tokens, skip_special_tokens=True))
    print(f"\n{result.summary()}; process peak RSS {_peak_rss_mib():.0f} MiB")


def _peak_rss_mib() -> float:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def cmd_report(args) -> None:
    import json

    from . import io
    from .report import PruneReport, evaluation_points, plot_quality, plot_sparsity

    reports, points = {}, []
    for spec in args.dirs:
        path = Path(spec)
        if not path.exists():
            raise PrunekitError(f"{spec} does not exist; give directories written by prunekit prune --out, or report "
                                f"JSONs")
        if path.is_dir() and not (path / io.MANIFEST).is_file():
            raise PrunekitError(f"{spec} is not a pruned model directory (it has no {io.MANIFEST})")
        saved = json.loads((path / io.MANIFEST if path.is_dir() else path).read_text())
        if path.is_file() and isinstance(saved.get("results"), list):
            raise PrunekitError(f"{spec} is a benchmark result, not a report; plot it with python "
                                f"benchmarks/plot_quality.py {spec} --out DIR")
        report = PruneReport.from_dict(saved["report"] if path.is_dir() else saved)
        reports[path.name] = report
        points += evaluation_points(report, saved.get("evaluation") or {})
    for name, report in reports.items():
        print(f"== {name}\n{report}\n" if len(reports) > 1 else report)
    plots = Path(args.plots) if args.plots else None
    if plots is None and args.plot is None and reports and Path(args.dirs[0]).is_dir():
        plots = Path(args.dirs[0])  # by default beside the first model
    written = []
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    if reports and (plots or args.plot):
        written.append(("per-layer sparsity", plot_sparsity(reports, args.plot or plots / "sparsity.png")))
    if points and plots:
        written.append(("quality against sparsity", plot_quality(points, plots / "quality.png")))
    for what, path in written:
        print(f"{what} plot: {path}")


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default."""


OFFLOAD_HELP = ("keep each block's weights on disk until it is used (a local safetensors directory): memory for one "
                "block instead of the whole model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def protocol(p, eval_default):
        p.add_argument("--eval-windows", type=int, default=eval_default, help="eval windows (0 skips evaluation)")
        p.add_argument("--seq-len", type=int, default=512, help="tokens per window")

    from .allocation import ALLOCATORS
    from .importance import ESTIMATORS

    estimators, allocators = ", ".join(ESTIMATORS.names()), ", ".join(ALLOCATORS.names())
    p = sub.add_parser("prune", help="prune a causal LM and save it", formatter_class=Defaults)
    p.add_argument("model", nargs="?", help="Hugging Face id or directory, or a .gguf file (default: bundled SmolLM2)")
    p.add_argument("--budget", default="0.5", help="fraction of weights to remove (0.5), or N:M ('2:4')")
    p.add_argument("--granularity", default="unstructured",
                   help="unstructured, block / blockRxC (whole tiles, e.g. block64x64), or structured (removes heads "
                        "and MLP channels: a smaller model)")
    p.add_argument("--heads", default="auto", choices=["auto", "kv", "query", "none"],
                   help="structured: which attention units go (kv: whole KV groups; query: query heads within groups)")
    p.add_argument("--round-to", type=int, help="structured: keep a multiple of this many channels per layer")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="structured: refit the kept columns of the layers reading removed channels by least squares "
                        "(default: wherever those layers allow it)")
    p.add_argument("--importance", metavar="NAME",
                   help=f"how weights are scored: {estimators} (default: admm for N:M budgets, wanda otherwise)")
    p.add_argument("--allocator", default="uniform", metavar="NAME",
                   help=f"how the budget is shared between layers: {allocators}")
    p.add_argument("--min-layer-sparsity", type=float, default=0.0, help="floor of any layer's sparsity")
    p.add_argument("--max-layer-sparsity", type=float, default=1.0, help="cap of any layer's sparsity")
    p.add_argument("--include", help="regex of layers to prune (default: every Linear in the repeated blocks)")
    p.add_argument("--exclude", help="regex of layers to leave alone")
    p.add_argument("--order", default="layer", choices=["layer", "block"],
                   help="layer: calibrate each layer with the earlier ones pruned, one pass per block; "
                        "block: the reference scheme, two passes per block, less memory")
    p.add_argument("--permute", action="store_true",
                   help="N:M budgets: reorder each MLP's hidden channels first so the groups keep more (RIA)")
    p.add_argument("--calibration-windows", type=int, default=64, help="Wikipedia training windows to calibrate on")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    p.add_argument("--device", help="run each block here during calibration, e.g. cuda")
    p.add_argument("--offload", action="store_true", help=OFFLOAD_HELP + "; needs --out")
    p.add_argument("--out", help="directory to save the pruned model in (or --no-save)")
    p.add_argument("--no-save", action="store_true", help="only print the report and perplexities; keep nothing")
    protocol(p, 32)
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("eval", help="perplexity on the Wikipedia eval split (docs/protocol.md)", formatter_class=Defaults)
    p.add_argument("model", nargs="?", help="pruned directory, Hugging Face id or directory (default: bundled SmolLM2)")
    p.add_argument("--offload", action="store_true", help=OFFLOAD_HELP)
    protocol(p, 32)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="greedy text from a model, with tokens per second and its resident size",
                       formatter_class=Defaults)
    p.add_argument("model", nargs="?", help="pruned directory, Hugging Face id or directory (default: bundled SmolLM2)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--dense", action="store_true",
                   help="run a pruned model's layers dense (masked), to compare with its compressed layers")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("report", help="print the per-layer report of saved pruned models, and plot them")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="directories written by prunekit prune --out (with the evaluation they recorded, plotted "
                        "against sparsity), or report JSONs")
    p.add_argument("--plots", metavar="OUT", help="directory for the PNGs: sparsity.png (per layer, every DIR side "
                                                  "by side) and quality.png (perplexity or accuracy against sparsity); "
                                                  "default: the first DIR")
    p.add_argument("--plot", metavar="PNG", help="write the per-layer sparsity plot to this file instead")
    p.set_defaults(run=cmd_report)

    args = parser.parse_args(argv)
    start = time.perf_counter()
    code = run(args.run, args)
    if code == 0:
        print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return code


def run(function, *args, prog: str = "prunekit") -> int:
    """function(*args), with prunekit's input errors printed as one line ("prog: error: ...") and exit status 2;
    0 when it returns. The examples run their main through it too."""
    try:
        function(*args)
    except PrunekitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
