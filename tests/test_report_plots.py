"""`prunekit report`: the per-layer tables of saved models and PNG plots of per-layer sparsity and of quality against
sparsity, from pruned directories (with their recorded evaluations)."""
import sys
from pathlib import Path

import pytest

import prunekit
from conftest import calibration_for, tiny
from prunekit.cli import main
from prunekit.report import evaluation_points

PNG = b"\x89PNG\r\n\x1a\n"
BENCHMARK_RESULT = Path(__file__).parents[1] / "benchmarks" / "results" / "llm_allocators.json"


def saved_run(path: Path, sparsity: float, allocator: str, perplexity: float) -> Path:
    model = tiny("llama")
    report = prunekit.prune(model, sparsity, allocator=allocator, calibration=calibration_for("llama"), progress=False)
    return prunekit.save_pruned(model, path, report, evaluation={"perplexity": perplexity, "dense_perplexity": 10.0})


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


@pytest.mark.parametrize("argv,message", [
    (["report", "/no/such/dir"], "does not exist"),
    (["report", "."], "is not a pruned model directory"),
    (["report", str(BENCHMARK_RESULT)], "benchmarks/plot_quality.py"),  # benchmarks/ reads its own results
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
