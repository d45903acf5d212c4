"""benchmarks/block_kernels.py: a grid cut short (by a GPU lease's time limit) keeps every row it measured, and
--resume measures only the rest, on the same machine only. Run on the CPU with the grid shrunk to two points."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("block_kernels", BENCHMARKS / "block_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SHAPES", [(96, 128)])
    monkeypatch.setattr(module, "BLOCKS", (32,))
    monkeypatch.setattr(module, "SPARSITIES", (0.5, 0.9))
    monkeypatch.setattr(module, "copies_beyond_cache", lambda nbytes, device: 2)  # (a tiny weight would need thousands)
    yield module
    module.dispatch.forget()  # the grid's measurements stay out of other tests


def test_a_grid_cut_short_goes_on_from_its_rows_on_the_same_machine(bench, tmp_path, one_thread):
    args = ["--device", "cpu", "--rows", "1", "--out", str(tmp_path / "full")]
    bench.main(args)
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["complete"] and [r["sparsity"] for r in full["results"]] == [0.5, 0.9]
    assert all(r["copies"] == 2 for r in full["results"])  # each path went through two copies of its weights
    assert not list(tmp_path.glob("*.partial"))  # each save wrote aside, then renamed over the json

    cut = dict(full, complete=False, results=full["results"][:1])  # what a run killed after one row leaves
    cut["results"][0]["seconds"]["eager"]["dense"] = 123.0  # a mark: this row must be kept, not measured again
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    assert "Cut short: 1 rows" in bench.markdown(cut)
    bench.main(args[:-1] + [str(tmp_path / "resumed"), "--resume", str(tmp_path / "cut.json")])
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["complete"] and resumed["runs"] == 2 and len(resumed["results"]) == 2
    assert resumed["results"][0]["seconds"]["eager"]["dense"] == 123.0
    assert resumed["results"][1]["seconds"]["eager"]["dense"] < 1  # measured in the second run
    assert "Measured in 2 runs" in (tmp_path / "resumed.md").read_text()

    elsewhere = dict(cut, machine=dict(cut["machine"], gpu="NVIDIA H200"))
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    with pytest.raises(SystemExit, match="one table, one kind of machine"):
        bench.main(args + ["--resume", str(tmp_path / "elsewhere.json")])


def test_the_variant_table_marks_the_fastest_and_the_one_the_backend_tuned_to(bench, tmp_path, one_thread):
    bench.main(["--device", "cpu", "--rows", "1", "--out", str(tmp_path / "grid")])
    doc = json.loads((tmp_path / "grid.json").read_text())
    doc["results"][0].update(variants={"pk_tc_bf16_b32_m128_n": 30e-6, "pk_tcw_bf16_b32_m128": 20e-6},
                             tuned="pk_tcw_bf16_b32_m128")
    doc["results"][1].update(variants={"pk_bt_bf16_b32": 5e-6, "pk_bt_bf16_b32_s2": 6e-6}, tuned="pk_bt_bf16_b32_s2")
    table = bench.markdown(doc).split("Kernel variants")[1]
    assert "| 96x128 | 32 | 50% | 1 | tc_bf16_b32_m128_n 30.0, >tcw_bf16_b32_m128 20.0* |" in table
    assert "| 96x128 | 32 | 90% | 1 | bt_bf16_b32 5.0*, >bt_bf16_b32_s2 6.0 |" in table


def test_the_call_overhead_benchmark_times_the_module_through_the_operator(tmp_path):
    """benchmarks/call_overhead.py on the CPU: its stand-in operator is what the module runs (it checks), and every
    call is reported with its cost beyond the operator's; the CPU kernels' layers beside nn.Linear, beyond its."""
    import subprocess
    import sys

    out = tmp_path / "overhead"
    subprocess.run([sys.executable, str(BENCHMARKS / "call_overhead.py"), "--calls", "50", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    result = json.loads(out.with_suffix(".json").read_text())
    times = result["us_per_call"]
    assert list(times) == ["operator alone", "BlockSparseLinear, [1, 4096]", "BlockSparseLinear, [1, 1, 4096]",
                           "nn.Linear 64x64, 2-D"]
    assert all(0 < us < 1e4 for us in times.values())
    table = out.with_suffix(".md").read_text()
    assert f"| BlockSparseLinear, [1, 4096] | {times['BlockSparseLinear, [1, 4096]']:.2f} |" in table
    ours = result["cpu_kernel_layers_us_per_call"]
    assert list(ours) == ["nn.Linear 64x64, [1, 1, 64]", "BitmaskLinear 64x64, 70%, [1, 1, 64]",
                          "BlockSparseLinear 64x64, 32x32 blocks, 50%, [1, 1, 64]"]
    bitmask = ours["BitmaskLinear 64x64, 70%, [1, 1, 64]"]
    linear = ours["nn.Linear 64x64, [1, 1, 64]"]
    assert f"| BitmaskLinear 64x64, 70%, [1, 1, 64] | {bitmask:.2f} | {bitmask - linear:+.2f} |" in table


def test_each_auto_pick_is_credited_with_the_path_its_layer_runs(bench):
    """The keep_dense layer ("auto") runs a pick of dense as dense, and is held to the fastest path of the row; the
    default layer ("auto_lean") rebuilds its weight per call, so its pick of dense counts as "rebuilt", and it is
    held to the fastest path it can run, which dense itself is not."""
    row = {"seconds": {"graph": {"dense": 10e-6, "rebuilt": 14e-6, "cuda_ext": 12e-6, "module": 9e-6}},
           "auto": {"graph": "dense"}, "auto_lean": {"graph": "dense"}}
    assert bench.auto_speedup(row, "graph") == 1.0 and bench.auto_within(row, "graph") is True
    assert bench.picked(row, "graph", "auto_lean") == "rebuilt"
    assert bench.auto_speedup(row, "graph", "auto_lean") == pytest.approx(10 / 14)
    assert bench.auto_within(row, "graph", "auto_lean") is False  # 14 us where the kernel took 12
    row["auto_lean"]["graph"] = "cuda_ext"  # 12 us: 1.2x the dense model's 10, but dense is not the lean layer's
    assert bench.auto_within(row, "graph", "auto_lean") is True
    row["auto"]["graph"] = "cuda_ext"
    assert bench.auto_within(row, "graph") is False
    assert bench.targets(row, None) == {"auto graph": False, "lean auto graph": True}
    del row["auto_lean"]  # 2:4 rows: one layer, which keeps its dense copy
    assert bench.targets(row, None) == {"auto graph": False}
