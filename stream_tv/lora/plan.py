"""A merge plan: per base tensor an immutable :class:`TensorMerge`; no tensor data here.

:func:`stream_tv.lora.bind.bind_adapter` builds a :class:`MergePlan` from an adapter and the
headers of its base. Each :class:`TensorMerge` says how one base tensor changes: an
optional replacement (a full tensor saved in the adapter), then LoRA :class:`Step` s in
PEFT's order. To stream rows through it, open it on a device; the runtime object holds the
loaded factors (and DoRA's norm accumulator) and is released when the block ends::

    with tm.open("cpu") as rt:
        for start, stop in ranges:
            rt.merge_rows(w[start:stop], start, stop, out[start:stop])

Several adapters: ``MergePlan.combine([(plan_a, 0.7), (plan_b, 0.3)])``. A weight multiplies
an adapter's ``scaling``, exactly like PEFT's ``set_scale``/``scale_layer``. With
``precision="exact-peft"`` the adapters are applied one after the other with a rounding to the
weight dtype after each, which is what PEFT's ``merge_and_unload()`` does with several active
adapters (each layer merges them in order); ``precision="fp32"`` adds all deltas in float32
and rounds once, closer to ``base + sum(w_i * delta_i)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import AdapterError
from ..io.index import Checkpoint, TensorSpec
from .adapter import Adapter, LoraModule
from .keys import is_output_head
from .runtime import OpenMerge

PRECISIONS = ("exact-peft", "fp32")


@dataclass(frozen=True)
class Step:
    """One LoRA layer's contribution to one base tensor (its weight, or its bias).

    ``weight`` multiplies the module's scaling (``MergePlan.combine``).
    """

    module: LoraModule
    target: str  # "weight" | "bias"
    adapter: Adapter
    weight: float = 1.0
    adapter_index: int = 0

    def __repr__(self) -> str:
        w = "" if self.weight == 1.0 else f", weight={self.weight}"
        return f"Step({self.module.name!r}, {self.kind}, {self.target}{w})"

    def with_weight(self, weight: float, adapter_index: int) -> Step:
        return replace(self, weight=self.weight * weight, adapter_index=adapter_index)

    @property
    def kind(self) -> str:
        return "bias" if self.target == "bias" else self.module.kind

    @property
    def scaling(self) -> float:
        """``weight * lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), evaluated left to right as
        PEFT's ``set_scale`` does, so that a weighted merge has PEFT's bits too."""
        m = self.module
        if self.weight == 1.0:
            return m.scaling
        return self.weight * m.alpha / (math.sqrt(m.rank) if m.rslora else m.rank)

    @property
    def dora(self) -> bool:
        return self.module.dora and self.target == "weight"

    @property
    def two_pass(self) -> bool:
        """DoRA normalising over stored rows (Embedding, Conv1D): needs every row first."""
        return self.dora and self.kind in ("embedding", "conv1d")

    @property
    def rounds_twice(self) -> bool:
        return self.kind == "embedding" and not self.dora


def step_order(step: Step) -> tuple[int, int]:
    """PEFT's merge order of the steps on one tensor.

    PEFT merges module by module in model order; the only tensors that several modules
    touch are tied embeddings, where the input embedding comes first and the head last.
    """
    return (1 if is_output_head(step.module.name) else 0, step.adapter_index)


@dataclass(frozen=True, eq=False)
class TensorMerge:
    """How one base tensor changes: an optional replacement, then LoRA steps in PEFT order.

    Rows are dim 0 of the tensor as stored (for a 1-D bias, its elements). The engine reads
    ``merge_inputs`` in aligned row chunks and streams them through ``open(device)``'s
    ``merge_rows`` (after a ``prepass`` over all chunks, in order, when ``passes == 2``).
    """

    key: str
    spec: TensorSpec | None  # the base tensor (None when planning deltas without a base)
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype: the base tensor's
    replacement: TensorSpec | None = None
    replacement_is_base_copy: bool = False
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        two = [s.module.name for s in self.steps if s.two_pass]
        if len(two) > 1:
            raise AdapterError(
                f"{self.key!r}: several DoRA layers normalising over its rows "
                f"({', '.join(two)}) would need more than two passes",
                hint="merge these adapters one at a time",
            )

    def __repr__(self) -> str:
        rep = f", replacement={self.replacement.name!r}" if self.replacement else ""
        return f"TensorMerge({self.key!r}, steps={list(self.steps)}{rep}, passes={self.passes})"

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def passes(self) -> int:
        return 2 if any(s.two_pass for s in self.steps) else 1

    @property
    def merge_inputs(self) -> list[TensorSpec]:
        """What ``merge_rows`` reads as ``w_rows``: the replacement if any, else the base."""
        src = self.replacement if self.replacement is not None else self.spec
        return [src] if src is not None else []

    @property
    def needs_base(self) -> bool:
        """Whether ``delta_rows`` needs ``w_rows``: DoRA's delta depends on the weights."""
        return any(s.dora for s in self.steps)

    @property
    def rounds_more_than_once(self) -> bool:
        """Whether ``exact-peft`` and ``fp32`` can differ: Embedding, DoRA after other steps,
        several steps on the tensor, or a replacement cast to another dtype."""
        return (
            len(self.steps) > 1
            or any(s.rounds_twice for s in self.steps)
            or (self.replacement is not None and self.replacement.dtype != self.dtype)
        )

    def check(self, precision: str) -> None:
        """Refuse what ``precision`` cannot reproduce; call before streaming anything."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if precision != "exact-peft":
            return
        seen: set[str] = set()
        for s in self.steps:
            if s.dora and s.module.name in seen:
                raise AdapterError(
                    f"{self.key!r}: DoRA layer {s.module.name!r} of a later adapter follows "
                    "another adapter on the same module; PEFT unmerges and re-merges the "
                    "earlier ones to find its base, which is not reproduced",
                    hint="merge with --precision fp32 (precision='fp32'), or put the DoRA "
                    "adapter first",
                )
            seen.add(s.module.name)

    @contextlib.contextmanager
    def open(self, device: torch.device | str = "cpu") -> Iterator[OpenMerge]:
        """The runtime of this merge on ``device`` (factors loaded as float32), released
        when the block ends."""
        rt = OpenMerge(self, torch.device(device))
        try:
            yield rt
        finally:
            rt.close()


@dataclass(frozen=True)
class MergePlan:
    """Per base tensor the adapter(s) touch, a :class:`TensorMerge`; and the untouched keys.

    ``merges`` is in base order (file, then data order); ``untouched`` lists the base tensors
    to copy unchanged. ``modules`` are the bound module records (``base_key`` set).
    """

    base: Checkpoint | None
    merges: dict[str, TensorMerge]
    untouched: list[str]
    adapters: list[tuple[Adapter, float]]
    modules: list[LoraModule] = field(default_factory=list)

    def __iter__(self) -> Iterator[TensorMerge]:
        return iter(self.merges.values())

    def __len__(self) -> int:
        return len(self.merges)

    def check(self, precision: str = "exact-peft") -> None:
        """Everything ``precision`` cannot reproduce raises here, before any data is read."""
        for t in self.merges.values():
            t.check(precision)

    def targets(self) -> dict[str, str]:
        """Module path -> base tensor name, for every adapted module."""
        return {m.name: m.base_key for m in self.modules}

    @classmethod
    def combine(cls, items: Sequence[tuple[MergePlan, float]]) -> MergePlan:
        """Merge several adapters' plans on one base: ``base + sum(w_i * delta_i)``.

        Each weight multiplies its adapter's scaling. Steps on a tensor keep PEFT's order:
        module by module (input embedding before the head), adapters in the given order.
        Two adapters replacing the same tensor (``modules_to_save``) are refused.
        """
        if not items:
            raise ValueError("combine needs at least one plan")
        base = items[0][0].base
        for plan, _ in items[1:]:
            if plan.base is not base and (
                plan.base is None or base is None or plan.base.tensors.keys() != base.tensors.keys()
            ):
                raise AdapterError(
                    "adapters bound to different bases cannot be combined",
                    hint="bind every adapter to the same base checkpoint",
                )
        order = list(base.tensors) if base is not None else []
        for plan, _ in items:
            order += [k for k in plan.merges if k not in order]
        merges: dict[str, TensorMerge] = {}
        for key in order:
            parts = [
                (i, plan.merges[key], w) for i, (plan, w) in enumerate(items) if key in plan.merges
            ]
            if parts:
                merges[key] = _combined(key, parts, items)
        return cls(
            base=base,
            merges=merges,
            untouched=[k for k in (base.tensors if base is not None else []) if k not in merges],
            adapters=[(a, aw * w) for plan, w in items for a, aw in plan.adapters],
            modules=[m for plan, _ in items for m in plan.modules],
        )


def _combined(
    key: str,
    parts: list[tuple[int, TensorMerge, float]],
    items: Sequence[tuple[MergePlan, float]],
) -> TensorMerge:
    reps = [(i, t) for i, t, _ in parts if t.replacement is not None]
    if len(reps) > 1 and not all(t.replacement_is_base_copy for _, t in reps):
        names = [items[i][0].adapters[0][0].reference for i, _ in reps]
        raise AdapterError(
            f"{key!r} is replaced by saved tensors of several adapters ({', '.join(names)})",
            hint="PEFT activates one modules_to_save copy at a time; merge these "
            "adapters one at a time",
        )
    # Saved copies of a base layer: PEFT loads each adapter's copy into the same
    # parameter, so the last adapter's copy is the one merged into.
    steps = sorted((s.with_weight(w, i) for i, t, w in parts for s in t.steps), key=step_order)
    first = parts[0][1]
    return TensorMerge(
        key=key,
        spec=first.spec,
        shape=first.shape,
        dtype=first.dtype,
        replacement=reps[-1][1].replacement if reps else None,
        replacement_is_base_copy=reps[-1][1].replacement_is_base_copy if reps else False,
        steps=tuple(steps),
    )
