"""benchmarks/plot_quality.py: benchmark result rows read as series against sparsity, and plotted with
prunekit.report.plot_quality."""
import importlib.util
import json
from pathlib import Path

from prunekit.report import QualityPoint

PNG = b"\x89PNG\r\n\x1a\n"
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"


spec = importlib.util.spec_from_file_location("plot_quality", BENCHMARKS / "plot_quality.py")
plot_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_quality)
benchmark_points = plot_quality.benchmark_points


def test_benchmark_rows_become_series_against_sparsity():
    rows = [{"tool": "prunekit", "config": "dense", "perplexity": 14.0},
            {"tool": "prunekit", "config": "wanda-50", "sparsity": 0.5, "perplexity": 35.0},
            {"tool": "prunekit", "config": "wanda-70-owl", "sparsity": 0.7, "perplexity": 600.0},
            {"tool": "prunekit", "config": "wanda-2:4", "sparsity": 0.5, "perplexity": 130.0},
            {"part": "encoder", "config": "fisher", "ratio": 0.3, "removed_share": 0.31, "fidelity": 0.8,
             "recall_at_1": 0.6},
            {"method": "lora", "perplexity": 12.0}]  # no sparsity: not a point
    assert benchmark_points(rows, "b.json") == [
        QualityPoint("prunekit dense", 0.0, "perplexity", 14.0, "b.json", dense=True),
        QualityPoint("prunekit wanda", 0.5, "perplexity", 35.0, "b.json"),
        QualityPoint("prunekit wanda-owl", 0.7, "perplexity", 600.0, "b.json"),
        QualityPoint("prunekit wanda-2:4", 0.5, "perplexity", 130.0, "b.json"),
        QualityPoint("encoder fisher", 0.31, "fidelity", 0.8, "b.json"),  # the removed share, not the ratio asked
        QualityPoint("encoder fisher", 0.31, "recall_at_1", 0.6, "b.json")]


def test_benchmark_results_plot_against_sparsity(tmp_path, capsys):
    out = tmp_path / "plots"
    assert plot_quality.main([str(RESULTS / "llm_allocators.json"), "--out", str(out)]) == 0
    assert (out / "quality.png").read_bytes()[:8] == PNG and not (out / "sparsity.png").exists()
    # the allocator benchmark: Wanda and SparseGPT with 4 allocators at 3 sparsities, ADMM with DP at 70% and 80%
    rows = json.loads((RESULTS / "llm_allocators.json").read_text())["results"]
    points = benchmark_points(rows, "llm_allocators.json")
    assert len(points) == len(rows) == 26
    assert len({p.series for p in points}) == 9 and {p.sparsity for p in points} == {0.6, 0.7, 0.8}
