"""The comparison of one tensor, as the report stores it: categories and figures (no maths).

>>> t = TensorComparison("w", LORA_AND_CHANGED, 4, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0**-9,
...                      ulp_counts=[4, 0, 0], ulp_max=0)
>>> t.has_lora, t.changed, t.to_dict()["ulp_counts"], TensorComparison.from_dict(t.to_dict()) == t
(True, True, [4, 0, 0], True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stream_tv.errors import InputError

__all__ = [
    "CATEGORIES",
    "CHANGED_NOT_LORA",
    "LORA_AND_CHANGED",
    "LORA_UNCHANGED",
    "ROUNDING_ONLY",
    "UNCHANGED",
    "TensorComparison",
]

LORA_AND_CHANGED = "lora_and_changed"
LORA_UNCHANGED = "lora_unchanged"
CHANGED_NOT_LORA = "changed_not_lora"
ROUNDING_ONLY = "rounding_only"
UNCHANGED = "unchanged"
#: The coverage categories; every tensor falls in exactly one.
CATEGORIES = (LORA_AND_CHANGED, LORA_UNCHANGED, CHANGED_NOT_LORA, ROUNDING_ONLY, UNCHANGED)

_LORA_CATEGORIES = frozenset({LORA_AND_CHANGED, LORA_UNCHANGED})
_CHANGED_CATEGORIES = frozenset({LORA_AND_CHANGED, CHANGED_NOT_LORA, ROUNDING_ONLY})


@dataclass(frozen=True)
class TensorComparison:
    """The comparison of one tensor: exactly the per-tensor fields of the JSON report.

    ``None`` (JSON null) means "not measured": fields that need a LoRA delta (``cosine``,
    ``max_abs_diff``, ``mean_abs_diff``, ``relative_error``, ``lora_norm``,
    ``rounding_bound``, ``rounding_floor``, ``bit_exact_merge``) are ``None`` for tensors
    without one; ``cosine`` is ``None`` when either norm is 0, ``relative_error`` when
    ``tv_norm`` is 0; a figure is never NaN. The rounding fields need the fine-tuned values
    (and the ulp fields the base too) in every chunk; ``bit_exact_merge`` needs our merge.

    ``finetuned_dtype`` is ``F``'s dtype (``"bfloat16"``), where ``F`` was given: the unit of
    the ulp figures. ``ulp_counts`` is ``(n0, n1, more)``: elements of ``F`` at 0, 1 and 2 or more ulps (of
    ``F``'s dtype, :func:`stream_tv.floats.ulp_distance`) from the reference, which is the
    correctly rounded ``W + L`` for LoRA tensors and the correctly rounded ``W`` otherwise;
    ``n0 + n1 + more == numel``. ``ulp_max`` is the largest distance, ``None`` when one is
    unbounded (a NaN against a number). ``nonfinite`` counts the elements where ``T`` or
    ``L`` is NaN or infinite (those make the other figures null).
    """

    name: str
    category: str
    numel: int
    finetuned_dtype: str | None = field(default=None, kw_only=True)
    cosine: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    relative_error: float | None
    lora_norm: float | None
    tv_norm: float | None
    rounding_bound: float | None
    rounding_floor: float | None = None
    bit_exact_merge: float | None = None
    ulp_counts: tuple[int, int, int] | None = None
    ulp_max: int | None = None
    nonfinite: int = 0

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise InputError(
                f"unknown category {self.category!r}",
                where=self.name,
                hint=f"expected one of {', '.join(CATEGORIES)}",
            )
        if self.ulp_counts is not None:
            counts = tuple(int(c) for c in self.ulp_counts)
            if len(counts) != 3 or sum(counts) != self.numel or min(counts) < 0:
                raise InputError(
                    f"ulp_counts {list(counts)} are not three counts adding up to {self.numel}",
                    where=self.name,
                )
            object.__setattr__(self, "ulp_counts", counts)  # a JSON list reads back a tuple

    @property
    def has_lora(self) -> bool:
        """The adapter has a delta for this tensor."""
        return self.category in _LORA_CATEGORIES

    @property
    def changed(self) -> bool:
        """The task vector has a nonzero element (rounding-only tensors count as changed)."""
        return self.category in _CHANGED_CATEGORIES

    @property
    def rounding_only(self) -> bool:
        """Changed outside the adapter, and only by a dtype round trip of the base."""
        return self.category == ROUNDING_ONLY

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this tensor, fields in schema order (``ulp_counts`` a list)."""
        data = dataclasses.asdict(self)
        if self.ulp_counts is not None:
            data["ulp_counts"] = list(self.ulp_counts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorComparison:
        """Inverse of :meth:`to_dict`; raises :class:`InputError` on a missing field."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise InputError(
                f"tensor entry lacks {', '.join(missing)}",
                where=str(data.get("name", "<tensor>")),
                hint="is this a stream-tv compare report, schema_version 2?",
            )
        return cls(**{n: data[n] for n in names})
