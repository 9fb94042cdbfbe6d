"""The report of ``extract-lora``: how low-rank a fine-tune is, tensor by tensor.

For every factorised tensor ``T = finetuned - base`` (``m x n`` as stored) and its rank-``r``
LoRA ``L``:

- ``retained_energy`` = ``1 - ||T - L||_F^2 / ||T||_F^2``: the share of the fine-tune's squared
  change that the adapter keeps (1: all of it); ``relative_error`` = ``||T - L||_F / ||T||_F``
  (``sqrt(1 - energy)``); both exact for the factors computed, before their rounding to the
  adapter's dtype (bf16 factors move the energy by less than 1e-5);
- ``singular_values``: the leading ones of ``T`` (as the randomized SVD sees them);
- ``rank_for_energy``: the smallest ranks keeping 50/90/99% of ``||T||^2`` (``None``: more
  than the rank extracted); ``energy_by_rank``: the retained energy at every rank ``0..r``,
  the tensor's whole rank profile;
- ``parameters``: the adapter's, ``r (m + n)``, against ``m n`` of the tensor.

Summaries pool tensors by module (``model.layers.*.self_attn.q_proj``) and by layer
(``model.layers.3``): mean and minimum retained energy, and the *pooled* energy
``1 - sum ||T - L||^2 / sum ||T||^2`` (large tensors count more).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import format_size


@dataclass
class TensorFigures:
    """One factorised tensor's figures (see the module docstring)."""

    name: str  # checkpoint key
    module: str  # PEFT module path
    kind: str  # linear | conv1d | embedding
    group: str  # the module path with its layer index as "*"
    layer: str  # the module path up to its layer index ("" outside the layers)
    shape: list[int]
    rank: int
    retained_energy: float
    relative_error: float
    norm: float  # ||T||_F
    singular_values: list[float]
    rank_for_energy: dict[str, int | None]
    energy_by_rank: list[float]
    basis: int  # columns of the sketched basis
    power_iters: int

    @property
    def parameters(self) -> int:
        return self.rank * (self.shape[0] + math.prod(self.shape[1:]))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def summarize(figures: Iterable[TensorFigures]) -> dict[str, Any]:
    """Counts, ranks and energies of a group of tensors (mean, minimum and pooled energy).

    >>> a = TensorFigures("a", "a", "linear", "a", "", [4, 4], 1, 0.5, 0.7, 2.0, [], {}, [], 3, 2)
    >>> b = TensorFigures("b", "b", "linear", "b", "", [4, 4], 2, 1.0, 0.0, 1.0, [], {}, [], 3, 2)
    >>> s = summarize([a, b])
    >>> s["mean_retained_energy"], s["pooled_retained_energy"], s["min_retained_energy"]
    (0.75, 0.6, 0.5)
    """
    figs = list(figures)
    if not figs:
        return {"tensors": 0}
    total = sum(f.norm**2 for f in figs)
    lost = sum((1 - f.retained_energy) * f.norm**2 for f in figs)
    ranks = [f.rank for f in figs]
    return {
        "tensors": len(figs),
        "mean_rank": sum(ranks) / len(ranks),
        "min_rank": min(ranks),
        "max_rank": max(ranks),
        "mean_retained_energy": sum(f.retained_energy for f in figs) / len(figs),
        "min_retained_energy": min(f.retained_energy for f in figs),
        "pooled_retained_energy": 1 - lost / total if total > 0 else 1.0,
        "parameters": sum(f.parameters for f in figs),
        "tensor_parameters": sum(f.numel for f in figs),
    }


@dataclass
class ExtractLoraReport:
    """Everything ``extract-lora`` found and did; ``to_json`` / ``render_terminal``."""

    base: str
    finetuned: str
    adapter: str | None  # None for --dry-run
    settings: dict[str, Any]
    basis: str  # where layer kinds came from
    tensors: list[TensorFigures] = field(default_factory=list)
    saved: list[dict[str, str]] = field(default_factory=list)  # saved whole: name, module, why
    left_out: dict[str, str] = field(default_factory=dict)  # changed, not in the adapter: why
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a user of the adapter must know
    adapter_bytes: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def factorised(self) -> list[TensorFigures]:
        """Tensors the adapter holds as a LoRA (rank >= 1)."""
        return [t for t in self.tensors if t.rank > 0]

    def by(self, attr: str) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[TensorFigures]] = {}
        for t in self.tensors:
            groups.setdefault(getattr(t, attr) or "(no layer)", []).append(t)
        return {k: summarize(v) for k, v in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        tensors = []
        for t in self.tensors:
            d = asdict(t)
            d["parameters"] = t.parameters
            tensors.append(d)
        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "adapter": self.adapter,
            "settings": self.settings,
            "layer_kinds_from": self.basis,
            "summary": summarize(self.tensors),
            "by_module": self.by("group"),
            "by_layer": self.by("layer"),
            "tensors": tensors,
            "saved_whole": self.saved,
            "left_out": self.left_out,
            "unchanged": self.unchanged,
            "notes": self.notes,
            "adapter_bytes": self.adapter_bytes,
            "bytes_read": self.bytes_read,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def render_terminal(self, *, worst: int = 5) -> str:
        """A few lines for people: per module, the worst tensors, what was saved or left out."""
        lines = [_table("module", self.by("group"))]
        layers = self.by("layer")
        if len(layers) > 1:
            lines.append(_table("layer", layers))
        if worst and self.tensors:
            lines.append(f"lowest retained energy (of {len(self.tensors)} tensors):")
            for t in sorted(self.tensors, key=lambda t: t.retained_energy)[:worst]:
                need = ", ".join(f"{k}: {_r(v)}" for k, v in t.rank_for_energy.items())
                lines.append(
                    f"  {t.name}  {'x'.join(map(str, t.shape))}  rank {t.rank}  energy "
                    f"{t.retained_energy:.4f}  rel. error {t.relative_error:.4f}  "
                    f"(ranks for {need})"
                )
        lines += self._lists()
        return "\n".join(lines)

    def _lists(self) -> list[str]:
        lines = []
        if self.saved:
            lines.append(f"saved whole (modules_to_save / bias): {len(self.saved)} tensor(s)")
            lines += [f"  {s['name']}: {s['why']}" for s in self.saved[:8]]
            if len(self.saved) > 8:
                lines.append(f"  ... and {len(self.saved) - 8} more (see --report)")
        if self.left_out:
            lines.append(f"changed but left out of the adapter: {len(self.left_out)} tensor(s)")
            lines += [f"  {k}: {why}" for k, why in list(self.left_out.items())[:8]]
            if len(self.left_out) > 8:
                lines.append(f"  ... and {len(self.left_out) - 8} more (see --report)")
        s = summarize(self.tensors)
        if s["tensors"]:
            ratio = s["tensor_parameters"] / max(s["parameters"], 1)
            lines.append(
                f"{s['tensors']} tensor(s) factorised: mean retained energy "
                f"{s['mean_retained_energy']:.4f} (pooled {s['pooled_retained_energy']:.4f}, "
                f"lowest {s['min_retained_energy']:.4f}); {s['parameters']:,} LoRA parameters "
                f"for {s['tensor_parameters']:,} ({ratio:.1f}x smaller)"
            )
        lines.append(f"{len(self.unchanged)} tensor(s) unchanged, left out")
        lines += [f"note: {n}" for n in self.notes]
        where = (
            f"-> {self.adapter} ({format_size(self.adapter_bytes)})"
            if self.adapter
            else "dry run: no adapter written"
        )
        lines.append(f"{where}  [{self.seconds:.1f} s, {format_size(self.bytes_read)} read]")
        return lines


def _r(v: int | None) -> str:
    return "more" if v is None else str(v)


def _table(what: str, groups: dict[str, dict[str, Any]]) -> str:
    width = max([len(what), *(len(k) for k in groups)])
    head = f"{what:<{width}}  tensors  rank        energy: mean   pooled   lowest"
    rows = [head]
    for k, s in groups.items():
        if not s["tensors"]:
            continue
        ranks = (
            f"{s['min_rank']}"
            if s["min_rank"] == s["max_rank"]
            else f"{s['min_rank']}-{s['max_rank']}"
        )
        rows.append(
            f"{k:<{width}}  {s['tensors']:>7}  {ranks:<10}  {s['mean_retained_energy']:>12.4f}"
            f"  {s['pooled_retained_energy']:>7.4f}  {s['min_retained_energy']:>7.4f}"
        )
    return "\n".join(rows)
