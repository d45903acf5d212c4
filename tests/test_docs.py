"""The documentation holds together: the mkdocs site builds strictly, every repository file the docs, README,
CHANGELOG, code, help texts, examples and benchmarks name exists, the generated benchmark page and README table
match the committed JSON results, and the README's test command is the one CI runs."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Text that names repository files: what a user reads (README, docs, CHANGELOG) and what the code says (docstrings,
# CLI help, comments) in the package, the examples and the benchmarks.
SOURCES = ["README.md", "CHANGELOG.md", "docs/*.md", "prunekit/**/*.py", "examples/*.py", "benchmarks/*.py"]
# A path from the repository root into one of its folders: docs/protocol.md, benchmarks/results/x.md, ...
PATH = re.compile(r"(?<![\w./~-])(?:docs|benchmarks|examples|prunekit|tests|cuda_ext|\.ci)/[\w./-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target


def sources() -> list[Path]:
    return sorted({path for pattern in SOURCES for path in ROOT.glob(pattern) if path.is_file()})


def references(path: Path) -> list[tuple[str, Path]]:
    """(as written, the file it points at) for every repository path and relative Markdown link in the file."""
    text = path.read_text()
    found = []
    for match in PATH.finditer(text):
        if text[match.end():match.end() + 1] in ("*", "<", "{"):  # a glob or a placeholder, not one file
            continue
        name = match.group().rstrip(".-")
        # a file (with its extension) or a folder (written with its slash); not prose such as "prunekit/llm-compressor"
        if re.search(r"\.\w+$", name) or name.endswith("/"):
            found.append((name, ROOT / name))
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            found.append((target, path.parent / target.split("#")[0]))
    return found


def test_every_named_repository_file_exists():
    checked, missing = 0, []
    for path in sources():
        for written, target in references(path):
            checked += 1
            if not target.exists():
                missing.append(f"{path.relative_to(ROOT)}: {written}")
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)
    assert checked > 100  # the scan reads what it should (a broken pattern would find nothing and pass)


def test_the_scan_sees_paths_links_and_skips_globs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See docs/protocol.md. Results: benchmarks/results/*.json, [x](../x.md#part), "
                    "[web](https://example.org), prunekit/kernels/csrc/sparse_cpu.cpp, tests/test_io.py::test_x, "
                    "tests/cuda_emu/, prunekit/llm-compressor ratios")
    assert [w for w, _ in references(page)] == ["docs/protocol.md", "prunekit/kernels/csrc/sparse_cpu.cpp",
                                                "tests/test_io.py", "tests/cuda_emu/", "../x.md#part"]
    assert references(page)[-1][1] == tmp_path / "../x.md"


def test_the_protocol_is_cited_where_it_lives():
    stale = [f"{path.relative_to(ROOT)}:{i}" for path in sources() + sorted(ROOT.glob("tests/*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"(?<!docs/)PROTOCOL\.md", line) and path.name != "test_docs.py"]
    assert not stale, "PROTOCOL.md is not in the repository; cite docs/protocol.md:\n" + "\n".join(stale)


def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "benchmarks" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_match_the_results():
    docs = make_docs()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs.benchmarks_page(), \
        "docs/benchmarks.md is out of date: run python benchmarks/make_docs.py"
    readme = (ROOT / "README.md").read_text()
    assert readme == docs.with_headline(readme), "the README's results table is out of date: run " \
                                                 "python benchmarks/make_docs.py"


def test_the_headline_table_is_computed_from_the_json():
    """Two figures of the README table against the JSON rows they come from, read here independently."""
    import json

    rows = json.loads((ROOT / "benchmarks/results/llm_quality.json").read_text())["results"]
    wanda = next(r for r in rows if (r["tool"], r["config"]) == ("prunekit", "wanda-50"))
    dense = next(r for r in rows if r["config"] == "dense")
    table = make_docs().headline()
    assert f"{wanda['perplexity']:.2f} in {round(wanda['seconds'])} s" in table
    assert f"dense {dense['perplexity']:.2f}" in table


def test_readme_is_short_and_runs_the_tests_as_ci_does():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme.splitlines()
    assert "<!-- prune_vision table -->" in readme


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "protocol" / "index.html").is_file()
