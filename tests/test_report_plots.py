"""`prunekit report`: the per-layer tables of saved models and PNG plots of per-layer sparsity and of quality against
sparsity, from pruned directories (with their recorded evaluations) and from benchmark results."""
import json
import sys
from pathlib import Path

import pytest

import prunekit
from conftest import calibration_for, tiny
from prunekit.cli import main
from prunekit.report import QualityPoint, benchmark_points, evaluation_points

PNG = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"


def saved_run(path: Path, sparsity: float, allocator: str, perplexity: float) -> Path:
    model = tiny("llama")
    report = prunekit.prune(model, sparsity, allocator=allocator, calibration=calibration_for("llama"), progress=False)
    return prunekit.save_pruned(model, path, report, evaluation={"perplexity": perplexity, "dense_perplexity": 10.0})


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


def test_report_prints_tables_and_writes_both_plots_beside_the_first_model(tmp_path, capsys):
    dirs = [saved_run(tmp_path / f"{a}-{s}", s, a, p)
            for a, s, p in (("uniform", 0.5, 20.0), ("uniform", 0.7, 40.0), ("owl", 0.7, 35.0))]
    assert main(["report", *map(str, dirs)]) == 0
    printed = capsys.readouterr().out
    assert all(f"== {d.name}" in printed for d in dirs) and "model.layers.1.mlp.down_proj" in printed
    for name in ("sparsity.png", "quality.png"):
        png = dirs[0] / name
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000, name
        assert f"{png}" in printed
    report = prunekit.PruneReport.load(dirs[2])
    points = evaluation_points(report, {"perplexity": 35.0, "dense_perplexity": 10.0})
    assert [(p.series, p.sparsity, p.value, p.dense) for p in points] == [
        ("Wanda() + OWL(m=5, lam=0.08, per='block')", report.sparsity, 35.0, False), ("dense", 0.0, 10.0, True)]


def test_report_plots_benchmark_results(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["report", str(RESULTS / "llm_allocators.json"), "--plots", str(out)]) == 0
    assert (out / "quality.png").read_bytes()[:8] == PNG and not (out / "sparsity.png").exists()
    # the allocator benchmark's 24 rows: 2 estimators x 4 allocators at 3 sparsities
    rows = json.loads((RESULTS / "llm_allocators.json").read_text())["results"]
    points = benchmark_points(rows, "llm_allocators.json")
    assert len({p.series for p in points}) == 8 and {p.sparsity for p in points} == {0.6, 0.7, 0.8}


@pytest.mark.parametrize("argv,message", [
    (["report", "/no/such/dir"], "does not exist"),
    (["report", "."], "is not a pruned model directory"),
])
def test_report_refuses_what_it_cannot_read_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_plots_without_matplotlib_say_what_to_install(tmp_path, monkeypatch, capsys):
    run = saved_run(tmp_path / "run", 0.5, "uniform", 20.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    capsys.readouterr()  # what saving printed
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install matplotlib (or prunekit[plot])" in err[0]
