"""Quality against sparsity from benchmark results (benchmarks/results/*.json): one panel per file and metric, each
series' perplexity, accuracy, fidelity or recall@1 against its sparsity, dense values as reference lines. The rows'
fields are this directory's conventions, so their reading lives here; the drawing is prunekit.report.plot_quality,
which `prunekit report` also uses for pruned directories.

    python benchmarks/plot_quality.py benchmarks/results/llm_allocators.json --out plots/   # writes plots/quality.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.report import METRICS, QualityPoint, plot_quality

X = ("sparsity", "removed_share", "ratio")  # where a row says how much was pruned, first found wins
LABELS = ("tool", "part", "importance", "allocator", "method", "config")  # what names a row's series


def benchmark_points(rows: list[dict], source: str) -> list[QualityPoint]:
    """Points of a benchmark result's rows: each row with a sparsity (or removed share) and a metric, its series
    named by the row's tool/part/estimator/allocator/config (the config without its sparsity: "wanda-70-owl" ->
    "wanda-owl"); rows of config "dense" are reference values."""
    points = []
    for row in rows:
        metrics = [m for m in METRICS if isinstance(row.get(m), (int, float))]
        x = next((row[k] for k in X if isinstance(row.get(k), (int, float))), None)
        if row.get("config") == "dense":
            group = " ".join(str(row[k]) for k in ("tool", "part") if k in row)
            points += [QualityPoint(f"{group} dense".strip(), 0.0, m, float(row[m]), source, dense=True)
                       for m in metrics]
            continue
        if x is None:
            continue
        words = [str(row[k]) if k != "config" else
                 "-".join(w for w in str(row[k]).split("-") if not w.isdigit()) for k in LABELS if k in row]
        series = " ".join(w for w in words if w)
        points += [QualityPoint(series, float(x), m, float(row[m]), source) for m in metrics]
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmark result JSONs (a 'results' list of rows)")
    parser.add_argument("--out", type=Path, required=True, help="directory for quality.png")
    args = parser.parse_args(argv)
    points = []
    for path in args.results:
        rows = json.loads(path.read_text()).get("results")
        if not isinstance(rows, list):
            parser.error(f"{path} has no 'results' list of rows; is it a benchmark result?")
        points += benchmark_points(rows, path.name)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"quality against sparsity plot: {plot_quality(points, args.out / 'quality.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
