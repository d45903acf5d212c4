"""PruneReport: what was pruned, layer by layer; prints as a table, saves as JSON."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .budget import parse_block
from .errors import PrunekitError


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]  # [out, in]
    target: float  # sparsity the allocator asked for
    achieved: float  # fraction of this layer's weights pruned
    pruned: int
    seconds: float  # time to choose this layer's mask (and reconstruct)
    score: float | None = None  # the allocator's layer score, if it used one
    block: int | None = None  # index of the block the layer belongs to
    flops_per_weight: float | None = None  # rows the layer processes per calibration batch, under a flops budget

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class StructureRow:
    """What structured pruning removed from one structure (an attention module's heads, an MLP's channels)."""

    name: str
    kind: str  # "heads" or "channels"
    unit: str  # "head", "KV group", "query head per KV group", "channel", "filter"
    block: int | None
    units: int  # before
    removed: int
    target: float  # the allocator's sparsity for it
    unit_weights: int  # targeted weights one unit removes
    unit_flops: float | None = None  # and FLOPs (weights x rows), under a flops budget
    detail: str = ""  # which heads, how many KV groups


@dataclass
class PruneReport:
    model: str
    importance: str
    allocator: str
    granularity: str
    requested: float  # the budget's sparsity: the fraction of the targeted weights (or FLOPs) to remove
    layers: list[LayerRow]
    metric: str = "params"  # what `requested` is a fraction of: "params" or "flops"
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds ("total" included)
    calibration: dict[str, int] = field(default_factory=dict)  # batches, tokens
    measured: list | None = None  # the allocator's measurements per layer, for Allocator.reuse
    structures: list[StructureRow] = field(default_factory=list)  # structured pruning: per head set / channel group
    size: dict = field(default_factory=dict)  # structured: model params and MACs before and after, how it reloads
    permuted: dict[str, float] = field(default_factory=dict)  # N:M permutation: group -> importance kept after/before
    notes: list[str] = field(default_factory=list)  # structured: the configuration that ran, and why where it differs

    @property
    def total(self) -> int:
        return sum(row.numel for row in self.layers)

    @property
    def pruned(self) -> int:
        return sum(row.pruned for row in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all targeted weights."""
        return self.pruned / self.total

    @property
    def flops_sparsity(self) -> float | None:
        """Achieved fraction of the targeted FLOPs removed, when FLOPs per weight were measured."""
        if any(row.flops_per_weight is None for row in self.layers):
            return None
        return (sum(row.pruned * row.flops_per_weight for row in self.layers)
                / sum(row.numel * row.flops_per_weight for row in self.layers))

    @property
    def unit(self) -> int:
        """Weights per pruning unit: a tile's area under a block granularity, else 1."""
        block = parse_block(self.granularity)
        return block[0] * block[1] if block else 1

    @property
    def exact(self) -> bool:
        """Budget met to the unit (a weight, or a whole tile for a block granularity): the pruned count equals the
        request rounded to a whole unit, or for a flops budget the removed FLOPs are within one unit's FLOPs per
        layer of the request."""
        if self.structures:  # whole heads and channels: within one unit (of round_to channels) per structure
            slack = sum(r.unit_flops if self.metric == "flops" else r.unit_weights for r in self.structures)
            if self.metric == "flops":
                total = sum(row.numel * row.flops_per_weight for row in self.layers)
                return abs(self.flops_sparsity - self.requested) * total <= slack
            return abs(self.pruned - self.requested * self.total) <= slack
        if self.metric == "flops" and self.flops_sparsity is not None:
            slack = sum(row.flops_per_weight for row in self.layers) * self.unit
            total = sum(row.numel * row.flops_per_weight for row in self.layers)
            return abs(self.flops_sparsity - self.requested) * total <= slack
        return self.pruned == self._requested_count()

    def _requested_count(self) -> int:
        return round(self.requested * self.total / self.unit) * self.unit

    def summary(self) -> str:
        off = self.pruned - self._requested_count()
        unit = "weight" if self.unit == 1 else f"{self.granularity[len('block'):]} tile"
        c = self.calibration
        data = "" if not c else f", calibration {c['batches']} batches / " + (
            f"{c['tokens']:,} tokens" if c.get("tokens") or "samples" not in c else f"{c['samples']:,} samples")
        if self.metric == "flops":
            achieved = self.flops_sparsity
            budget = (f"FLOPs removed {achieved:.4%} (requested {self.requested:.4%}, "
                      + (f"within one {unit} per layer" if self.exact else f"NOT within one {unit} per layer") + ")"
                      if achieved is not None else f"FLOPs removed: requested {self.requested:.4%}")
        elif self.structures:
            budget = f"requested {self.requested:.4%}, " + ("within one unit per structure" if self.exact
                                                            else "NOT within one unit per structure")
        else:
            budget = (f"requested {self.requested:.4%}, "
                      + (f"exact to the {unit}" if off == 0 else f"off by {off:+,} weights"))
        text = (f"{self.model}: {self.importance} + {self.allocator}, {self.granularity}{data}\n"
                f"pruned {self.pruned:,} of {self.total:,} targeted weights in {len(self.layers)} layers: "
                f"{self.sparsity:.4%} ({budget})"
                + (f" in {self.seconds['total']:.1f} s" if "total" in self.seconds else ""))
        if self.size:
            (p0, p1), (m0, m1) = self.size["params"], self.size["macs"]
            text += (f"\nmodel: {p0:,} -> {p1:,} parameters ({p1 / p0:.2%}), {m0:,} -> {m1:,} MACs per sample "
                     f"({m1 / m0:.2%}); reloads with {self.size['reload']}")
        text += "".join(f"\n{note}" for note in self.notes)
        if self.permuted:
            gains = sorted(self.permuted.values())
            text += (f"\nchannels permuted in {len(gains)} groups before N:M masking: importance kept x{gains[0]:.4f} "
                     f"to x{gains[-1]:.4f} (median x{gains[len(gains) // 2]:.4f})")
        return text

    def table(self) -> str:
        if self.structures:
            return self.structure_table()
        with_score = any(row.score is not None for row in self.layers)
        head = ["layer", "shape", "target", "achieved", "pruned", "seconds"] + (["score"] if with_score else [])
        body = [[row.name, f"{row.shape[0]}x{row.shape[1]}", f"{row.target:.4f}", f"{row.achieved:.4f}",
                 f"{row.pruned:,}", f"{row.seconds:.3f}"] + ([f"{row.score:.4g}"] if with_score else [])
                for row in self.layers]
        return _columns(head, body)

    def structure_table(self) -> str:
        """Per block, what structured pruning removed."""
        head = ["block", "structure", "unit", "kept", "removed", "target", "weights removed"]
        body = [["-" if r.block is None else str(r.block), r.name, r.unit, f"{r.units - r.removed}/{r.units}",
                 r.detail or str(r.removed), f"{r.target:.4f}", f"{r.removed * r.unit_weights:,}"]
                for r in self.structures]
        return _columns(head, body)

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "flops_sparsity": self.flops_sparsity,
                "pruned": self.pruned, "total": self.total, "exact": self.exact}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        known = {k: data[k] for k in ("model", "importance", "allocator", "granularity", "requested", "seconds",
                                      "calibration", "metric", "measured", "permuted", "notes") if k in data}
        rows = [LayerRow(**{**row, "shape": tuple(row["shape"])}) for row in data["layers"]]
        structures = [StructureRow(**row) for row in data.get("structures", [])]
        return cls(layers=rows, structures=structures, size=data.get("size", {}), **known)

    @classmethod
    def load(cls, path: str | Path) -> "PruneReport":
        """From a report JSON, or from a directory written by save_pruned."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dict(json.loads((path / "prunekit.json").read_text())["report"])
        return cls.from_dict(json.loads(path.read_text()))


def _columns(head: list[str], body: list[list[str]]) -> str:
    """A plain-text table, the first column left-aligned."""
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PrunekitError("plots need matplotlib: pip install matplotlib (or prunekit[plot])") from None
    return plt


def plot_sparsity(reports: dict[str, PruneReport], path: str | Path) -> Path:
    """PNG of the per-layer sparsity each report chose (one line per report, e.g. one per allocator), and below it
    the mean sparsity of each block, the reports side by side."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), constrained_layout=True)
    width = 0.8 / len(reports)
    for k, (label, report) in enumerate(reports.items()):
        top.plot(range(len(report.layers)), [row.achieved for row in report.layers], lw=1, marker=".", ms=3,
                 label=f"{label} ({report.sparsity:.1%})")
        per_block = defaultdict(list)
        for row in report.layers:
            if row.block is not None:
                per_block[row.block].append((row.pruned, row.numel))
        blocks = sorted(per_block)
        bottom.bar([b + (k - (len(reports) - 1) / 2) * width for b in blocks],
                   [sum(p for p, _ in per_block[b]) / sum(n for _, n in per_block[b]) for b in blocks],
                   width=width, label=label)
    first = next(iter(reports.values()))
    starts = [i for i, row in enumerate(first.layers) if i and row.block != first.layers[i - 1].block]
    for x in starts:
        top.axvline(x - 0.5, color="0.85", lw=0.5, zorder=0)
    top.set(xlabel="layer (in order; grey lines separate blocks)", ylabel="sparsity", xlim=(-1, len(first.layers)),
            title=f"{first.model}: per-layer sparsity")
    bottom.set(xlabel="block", ylabel="sparsity of the block", title="per block")
    bottom.set_xticks(blocks)
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- quality against sparsity

METRICS = ("perplexity", "accuracy", "fidelity", "recall_at_1")  # what an evaluation may hold


@dataclass
class QualityPoint:
    series: str  # one line per series: an estimator + allocator, a tool's configuration
    sparsity: float
    metric: str  # one of METRICS
    value: float
    source: str  # where it came from ("pruned models", a benchmark's file): one panel per source and metric
    dense: bool = False  # the unpruned model's value, drawn as a reference line


def evaluation_points(report: PruneReport, evaluation: dict) -> list[QualityPoint]:
    """Points of a saved pruned model whose evaluation was recorded (prunekit prune --out, save_pruned(evaluation=)):
    its value at its sparsity, in the series of its estimator + allocator (+ granularity), and its dense value."""
    series = f"{report.importance} + {report.allocator}" + ("" if report.granularity == "unstructured"
                                                             else f", {report.granularity}")
    points = []
    for metric in METRICS:
        if isinstance(evaluation.get(metric), (int, float)):
            points.append(QualityPoint(series, report.sparsity, metric, float(evaluation[metric]), "pruned models"))
        if isinstance(evaluation.get(f"dense_{metric}"), (int, float)):
            points.append(QualityPoint("dense", 0.0, metric, float(evaluation[f"dense_{metric}"]), "pruned models",
                                       dense=True))
    return points


def plot_quality(points: list[QualityPoint], path: str | Path) -> Path:
    """PNG with one panel per source and metric: each series' value against its sparsity (perplexity on a log
    scale), dense values as dashed reference lines."""
    if not any(not p.dense for p in points):
        raise PrunekitError("nothing to plot against sparsity: give pruned directories saved with an evaluation "
                            "(prunekit prune --out DIR measures one)")
    plt = _pyplot()
    panels = list(dict.fromkeys((p.source, p.metric) for p in points if not p.dense))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), constrained_layout=True, squeeze=False)
    for ax, (source, metric) in zip(axes[:, 0], panels):
        mine = [p for p in points if p.source == source and p.metric == metric]
        series = list(dict.fromkeys(p.series for p in mine if not p.dense))
        colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10")
        for k, name in enumerate(series):
            xy = sorted({(p.sparsity, p.value) for p in mine if p.series == name})
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", ms=4, lw=1.2, label=name,
                    color=colors(k % colors.N), ls="-" if len(xy) > 1 else "none")
        for k, (name, value) in enumerate(dict.fromkeys((p.series, p.value) for p in mine if p.dense)):
            ax.axhline(value, color="0.4", ls=(0, (4, 2 + 2 * k)), lw=1, label=f"{name} ({value:.4g})")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set(xlabel="sparsity of the targeted weights", ylabel=metric.replace("_at_", "@"),
               title=f"{metric.replace('_at_', '@')} against sparsity: {source}")
        xs = [p.sparsity for p in mine if not p.dense]
        pad = max(0.05, (max(xs) - min(xs)) * 0.05)  # whole-percent ticks even for one sparsity
        ax.set_xlim(max(0.0, min(xs) - pad), min(1.0, max(xs) + pad))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        ax.grid(True, which="major", color="0.9")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(series) // 16)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
