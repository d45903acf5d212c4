"""prunekit's import graph, read from the source with ast (imports at module level and inside functions alike): no
module imports itself back through others, and no module imports from a layer above its own.

The layers follow the flow prune() runs: plain data first (masks, budgets, targets, reports), then calibration (the
block runner and the statistics every estimator is fed), importance, allocation (which may score with an
estimator), what acts on a pruned model (kernels, structured pruning, offloading and the checkpoint format), saving
and loading, prune() itself, the public face, and last what is built on all of it (fine-tuning, the command line).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prunekit"

# Lowest first. A module belongs to the longest entry that names it or a package above it ("" is prunekit/__init__
# alone); it may import from its own layer and those below.
LAYERS = [
    ["version", "errors", "registry", "bits"],
    ["masks", "budget", "targets", "masking", "report", "vision"],
    ["calibration", "distributed"],
    ["importance"],
    ["allocation"],
    ["kernels", "checkpoint", "compressed", "offload", "structured"],
    ["io"],
    ["api"],
    ["", "evaluate", "generate", "data"],
    ["tuning", "cli"],
]
EXTENSIONS = {"prunekit._cuda_ext", "prunekit.kernels._sparse_cpu"}  # compiled modules, imported by the kernels


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["prunekit", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The prunekit modules that module `name` imports: `from . import x` names module x where one exists, else
    the package it is taken from."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known.keys() | EXTENSIONS else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and target not in EXTENSIONS:
                target = target.rpartition(".")[0]  # `import prunekit.kernels.cpu as c` -> that module
            if target.startswith("prunekit") and target not in EXTENSIONS and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    relative = name[len("prunekit."):] if name != "prunekit" else ""
    matches = [(len(entry), i) for i, entries in enumerate(LAYERS) for entry in entries
               if relative == entry or (entry and relative.startswith(entry + "."))]
    assert matches, f"{name} is in no layer of LAYERS; add it where it belongs"
    return max(matches)[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_imports_of_every_kind():
    edges = graph()
    assert "prunekit.errors" in edges["prunekit.budget"]  # from .errors import ...
    assert "prunekit.calibration.runner" in edges["prunekit.calibration"]  # from .runner import ... in an __init__
    assert "prunekit.importance.base" in edges["prunekit.structured.units"]  # from ..importance.base import ...
    assert "prunekit.kernels.convert" in edges["prunekit.io"]  # inside a function
    assert "prunekit.kernels.launch" in edges["prunekit.kernels.native"]  # from . import launch as plan
    assert not {"prunekit._cuda_ext", "prunekit.kernels._sparse_cpu"} & set().union(*edges.values())
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # the seams this graph keeps closed: the runner below offloading, estimators below allocators
    assert layer("prunekit.calibration.runner") < layer("prunekit.offload") < layer("prunekit.io")
    assert layer("prunekit.importance.mask_sparsity") < layer("prunekit.allocation.ecoflap")


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    edges = graph()
    for name in edges:
        layer(name)  # every module has its place
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, targets in sorted(edges.items()) for target in sorted(targets) if layer(target) > layer(name)]
    assert upward == []
