"""The command line end to end on a tiny random Llama that uses SmolLM2's real tokenizer and Wikipedia text."""
import subprocess

import pytest
import torch

import prunekit
from conftest import tiny_lm_dir
from prunekit.cli import main
from prunekit.importance import ESTIMATORS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("tiny-lm"))


SMALL = ["--calibration-windows", "4", "--seq-len", "32", "--eval-windows", "2"]


def test_prune_eval_report(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--budget", "0.5", "--importance", "sparsegpt", "--allocator", "owl",
                 "--out", str(out)] + SMALL) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "exact to the weight" in printed
    assert "dense" in printed and "-> pruned" in printed and "saved to" in printed
    model = prunekit.load_pruned(out)
    assert len(prunekit.masks(model)) == 14
    report = prunekit.PruneReport.load(out)
    assert report.exact and report.importance.startswith("SparseGPT") and report.allocator.startswith("OWL")

    assert main(["eval", str(out), "--eval-windows", "2", "--seq-len", "32"]) == 0
    assert "perplexity on 2 x 32" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert report.summary() in capsys.readouterr().out


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "dense-saved"])
def test_generate_prints_the_text_its_speed_and_size(model_dir, tmp_path, capsys, compressed):
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--budget", "0.5", "--importance", "magnitude", "--out", str(out)]
                + SMALL) == 0
    if not compressed:  # a directory saved dense: generate compresses its layers itself
        from transformers import AutoTokenizer

        prunekit.save_pruned(prunekit.load_pruned(out), tmp_path / "dense", tokenizer=AutoTokenizer.from_pretrained(out),
                             compressed=False)
        out = tmp_path / "dense"
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The city of Paris", "--max-new-tokens", "5", "--threads", "1"]) == 0
    sparse = capsys.readouterr()
    assert "14 compressed layers" in sparse.err
    text, stats = sparse.out.strip().rsplit("\n\n", 1)
    assert text.startswith("The city of Paris") and "5 new tokens at" in stats and "tokens/s" in stats
    assert main(["generate", str(out), "--prompt", "The city of Paris", "--max-new-tokens", "5", "--dense"]) == 0
    dense = capsys.readouterr()
    assert "0 compressed layers" in dense.err and dense.out.strip().rsplit("\n\n", 1)[0] == text  # same tokens
    size = lambda stats: float(stats.split("weights resident ")[1].split(" MiB")[0])  # noqa: E731
    assert size(stats) < size(dense.out)
    assert main(["generate", str(out), "--prompt", "x", "--max-new-tokens", "0"]) == 2


def test_two_four_from_the_command_line(model_dir, capsys):
    assert main(["prune", str(model_dir), "--budget", "2:4", "--importance", "magnitude", "--no-save"] + SMALL) == 0
    assert "2:4" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--importance", "nope"], "unknown importance 'nope'; known: " + ", ".join(ESTIMATORS.names())),
    (["--budget", "1.5"], "sparsity must be a number in (0, 1)"),
    (["--budget", "2:4", "--max-layer-sparsity", "0.9"], "floors and caps do not apply"),
])
def test_errors_are_one_clear_line(model_dir, capsys, argv, message):
    assert main(["prune", str(model_dir), "--no-save"] + argv + SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("prunekit: error:")


def test_a_model_that_is_not_there(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "missing-model"), "--no-save"] + SMALL) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_the_installed_console_script(model_dir, tmp_path):
    out = tmp_path / "pruned"
    main(["prune", str(model_dir), "--importance", "magnitude", "--out", str(out)] + SMALL)
    result = subprocess.run(["prunekit", "report", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and "exact to the weight" in result.stdout


def test_the_example_script(model_dir, tmp_path):
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "prune_llm.py"
    result = subprocess.run([sys.executable, str(script), str(model_dir), "--importance", "sparsegpt",
                             "--budget", "2:4", "--rank", "2", "--calibration-windows", "4", "--eval-windows", "2",
                             "--seq-len", "32", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "50.0%" in result.stdout
    assert prunekit.PruneReport.load(tmp_path / "out").exact


def test_report_plots_several_allocators_side_by_side(model_dir, tmp_path, capsys):
    dirs = []
    for allocator in ("uniform", "owl", "dp"):
        dirs.append(str(tmp_path / allocator))
        assert main(["prune", str(model_dir), "--budget", "0.6", "--allocator", allocator, "--out", dirs[-1]]
                    + SMALL) == 0
    png = tmp_path / "sparsity.png"
    assert main(["report", *dirs, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert all(f"== {name}" in printed for name in ("uniform", "owl", "dp"))


def test_structured_from_the_command_line(model_dir, tmp_path, capsys):
    import transformers

    out = tmp_path / "small"
    assert main(["prune", str(model_dir), "--budget", "0.3", "--granularity", "structured", "--importance",
                 "magnitude", "--out", str(out)] + SMALL) == 0
    assert "structured" in capsys.readouterr().out
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    small = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers reloads the smaller model

    def targeted(model):
        return sum(m.weight.numel() for n, m in model.named_modules() if ".layers." in n and n.endswith("_proj"))

    removed = 1 - targeted(small) / targeted(dense)
    report = prunekit.PruneReport.load(out)
    assert removed == pytest.approx(report.sparsity, abs=1e-9)
    # within one unit per structure of each layer: a query head per KV group (8 rows of q, 8 columns of o, 32 wide,
    # times 2 groups) and one MLP channel (3 x 32), over a layer's 9216 targeted weights
    assert abs(removed - 0.3) <= (2 * 2 * 8 * 32 + 3 * 32) / 9216
    x = torch.randint(0, dense.config.vocab_size, (1, 8))
    assert small(x).logits.shape == dense(x).logits.shape


def test_granularity_and_an_n_m_budget_conflict(model_dir, capsys):
    assert main(["prune", str(model_dir), "--budget", "2:4", "--granularity", "block"] + SMALL) == 2
    assert "leave out --granularity" in capsys.readouterr().err


def test_prune_without_out_says_so_before_any_work(model_dir, capsys, monkeypatch):
    """Issue 26: without --out the whole job ran and its result was thrown away without a word."""
    from prunekit import cli

    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    assert main(["prune", str(model_dir)] + SMALL) == 2
    assert "pass --out DIR to save the pruned model, or --no-save" in capsys.readouterr().err


def test_prune_help_lists_the_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ESTIMATORS.names() + ["uniform", "owl", "dp"]:
        assert name in text, name
    assert "(default: admm for N:M budgets, wanda otherwise)" in text and "(default: uniform)" in text
    assert "(default: 64)" in text
