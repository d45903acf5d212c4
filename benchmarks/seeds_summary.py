"""How far a perplexity comparison between prunekit and llm-compressor moves with the calibration sample: per-seed
perplexities of llm_quality.py runs (one JSON per seed, same configs) and, per config, the geometric mean over seeds
of each prunekit/llm-compressor ratio with its spread. Runs with --window-batch (same seed, same algorithm, only the
floating-point summation order changed) show the noise floor below that.

    python benchmarks/seeds_summary.py results/llm_quality.json results/llm_quality_seed1.json \
        results/llm_quality_seed2.json results/llm_quality_seed3.json --floor results/llm_quality_batch4.json \
        --out results/llm_quality_seeds.md
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TOOLS = ("prunekit", "prunekit-block", "llmcompressor")


def load(path: Path) -> tuple[str, dict]:
    doc = json.loads(path.read_text())
    rows = {(r["tool"], r["config"]): r["perplexity"] for r in doc["results"] if "perplexity" in r}
    return doc["protocol"]["calibration"], rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="llm_quality JSON results, one per calibration seed")
    parser.add_argument("--floor", nargs="*", type=Path, default=[], help="--window-batch runs of the first seed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [load(p) for p in args.runs]
    floors = [load(p) for p in args.floor]
    configs = sorted({c for _, rows in runs[1:] for _, c in rows})  # the configs the other seeds ran
    out = ["# Seeds: prunekit and llm-compressor over calibration samples", "",
           "Command: `python benchmarks/seeds_summary.py " + " ".join(map(str, args.runs))
           + (" --floor " + " ".join(map(str, args.floor)) if args.floor else "") + f" --out {args.out}`", "",
           (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
           "| config | calibration | " + " | ".join(TOOLS) + " | prunekit / llmc | block / llmc |",
           "|---|---|---|---|---|---|---|"]
    for config in configs:
        logs = {"prunekit": [], "prunekit-block": []}
        for calibration, rows in runs:
            ppl = {t: rows.get((t, config)) for t in TOOLS}
            cells = [f"{ppl[t]:.1f}" if ppl[t] else "-" for t in TOOLS]
            ratio = {t: ppl[t] / ppl["llmcompressor"] for t in logs if ppl[t] and ppl["llmcompressor"]}
            for tool, r in ratio.items():
                logs[tool].append(math.log(r))
            ratios = [f"{ratio[t]:.3f}" if t in ratio else "-" for t in logs]
            out.append(f"| {config} | {calibration} | " + " | ".join(cells + ratios) + " |")
        summary = [_geomean(logs[t]) for t in logs]
        out.append(f"| **{config}** | geometric mean over {len(runs)} seeds (x/÷ one s.d.) | | | | "
                   + " | ".join(summary) + " |")
        for calibration, rows in floors:
            cells = [f"{rows[(t, config)]:.1f}" if (t, config) in rows else "-" for t in TOOLS]
            out.append(f"| {config} | {calibration} | " + " | ".join(cells) + " | | |")
    args.out.write_text("\n".join(out) + "\n")
    print("\n".join(out))


def _geomean(logs: list[float]) -> str:
    if not logs:
        return "-"
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)) if len(logs) > 1 else 0.0
    return f"**{math.exp(mean):.3f}** (x/÷ {math.exp(sd):.2f})"


if __name__ == "__main__":
    main()
