"""PruneReport: what was pruned, layer by layer; prints as a table, saves as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]  # [out, in]
    target: float  # sparsity the allocator asked for
    achieved: float  # fraction of this layer's weights pruned
    pruned: int
    seconds: float  # time to choose this layer's mask (and reconstruct)
    score: float | None = None  # the allocator's layer score, if it used one

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class PruneReport:
    model: str
    importance: str
    allocator: str
    granularity: str
    requested: float  # the budget's sparsity over the targeted weights
    layers: list[LayerRow]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds ("total" included)
    calibration: dict[str, int] = field(default_factory=dict)  # batches, tokens

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
    def exact(self) -> bool:
        """True when the pruned count equals the request rounded to a whole weight."""
        return self.pruned == round(self.requested * self.total)

    def summary(self) -> str:
        off = self.pruned - round(self.requested * self.total)
        data = (f", calibration {self.calibration['batches']} batches / {self.calibration['tokens']:,} tokens"
                if self.calibration else "")
        return (f"{self.model}: {self.importance} + {self.allocator}, {self.granularity}{data}\n"
                f"pruned {self.pruned:,} of {self.total:,} targeted weights in {len(self.layers)} layers: "
                f"{self.sparsity:.4%} (requested {self.requested:.4%}, "
                + ("exact to the weight" if off == 0 else f"off by {off:+,} weights") + ")"
                + (f" in {self.seconds['total']:.1f} s" if "total" in self.seconds else ""))

    def table(self) -> str:
        with_score = any(row.score is not None for row in self.layers)
        head = ["layer", "shape", "target", "achieved", "pruned", "seconds"] + (["score"] if with_score else [])
        body = [[row.name, f"{row.shape[0]}x{row.shape[1]}", f"{row.target:.4f}", f"{row.achieved:.4f}",
                 f"{row.pruned:,}", f"{row.seconds:.3f}"] + ([f"{row.score:.4g}"] if with_score else [])
                for row in self.layers]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "pruned": self.pruned, "total": self.total,
                "exact": self.exact}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        known = {k: data[k] for k in ("model", "importance", "allocator", "granularity", "requested", "seconds",
                                      "calibration")}
        rows = [LayerRow(**{**row, "shape": tuple(row["shape"])}) for row in data["layers"]]
        return cls(layers=rows, **known)

    @classmethod
    def load(cls, path: str | Path) -> "PruneReport":
        """From a report JSON, or from a directory written by save_pruned."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dict(json.loads((path / "prunekit.json").read_text())["report"])
        return cls.from_dict(json.loads(path.read_text()))
