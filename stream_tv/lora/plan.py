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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import AdapterError
from ..io.index import Checkpoint, TensorSpec
from .adapter import Adapter, LoraModule
from .model_facts import KeySlice
from .runtime import OpenMerge

PRECISIONS = ("exact-peft", "fp32")


@dataclass(frozen=True)
class Step:
    """One LoRA layer's contribution to one base tensor (its weight, or its bias).

    ``weight`` multiplies the module's scaling (``MergePlan.combine``). ``twice`` overrides
    whether PEFT rounds the delta to the weight dtype before adding it (Embedding does; so do
    ``target_parameters`` and MultiheadAttention). ``part`` says which part of an expert
    stack's delta the tensor holds (``None``: its rows are the experts). ``sub`` orders the
    steps of one module on one tensor (MultiheadAttention adds out_proj's delta twice).
    """

    module: LoraModule
    target: str  # "weight" | "bias"
    adapter: Adapter
    weight: float = 1.0
    adapter_index: int = 0
    twice: bool | None = None
    part: KeySlice | None = None
    sub: int = 0

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
        if self.twice is not None:
            return self.twice
        return self.kind == "embedding" and not self.dora

    @property
    def replaces_rows(self) -> bool:
        """Trainable tokens: rows written over, not added to."""
        return self.kind == "tokens"


def step_order(step: Step) -> tuple[int, int, int]:
    """PEFT's merge order of the steps on one tensor: module by module in model order (each
    module merging its adapters in order), which ``bind`` records as ``module.position``.
    Several modules touch one tensor only where weights are tied (an input embedding before
    its head, T5's encoder embedding before the decoder's)."""
    return (step.module.position, step.adapter_index, step.sub)


@dataclass(frozen=True, eq=False)
class TensorMerge:
    """How one output tensor changes: an optional replacement, then LoRA steps in PEFT order.

    ``key`` is the name written (what PEFT's ``save_pretrained`` writes: for a base with legacy
    names or a renaming class it differs from the base tensor's); ``spec`` the base tensor read
    (``base_name`` its name when the output stands for it one to one: ``None`` for a head PEFT
    unties from the embedding it shared). ``dtype`` is the output dtype: the dtype the model
    loads the parameter in (float32 for modules transformers keeps in float32).

    Rows are dim 0 of the tensor as stored (for a 1-D bias, its elements). The engine reads
    ``merge_inputs`` in aligned row chunks and streams them through ``open(device)``'s
    ``merge_rows`` (after a ``prepass`` over all chunks, in order, when ``passes == 2``).
    """

    key: str
    spec: TensorSpec | None  # the base tensor (None when planning deltas without a base)
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    replacement: TensorSpec | None = None
    replacement_is_base_copy: bool = False
    steps: tuple[Step, ...] = ()
    base_name: str | None = None

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
    def work_dtype(self) -> torch.dtype:
        """The dtype PEFT holds the factors and computes the deltas in: float64 for a float64
        weight (the factors follow the weight's dtype), else float32 (PEFT upcasts)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def merge_inputs(self) -> list[TensorSpec]:
        """What ``merge_rows`` reads as ``w_rows``: the replacement if any, else the base."""
        src = self.replacement if self.replacement is not None else self.spec
        return [src] if src is not None else []

    @property
    def needs_base(self) -> bool:
        """Whether ``delta_rows`` needs ``w_rows``: DoRA's delta depends on the weights, and
        trainable tokens replace rows."""
        return any(s.dora or s.replaces_rows for s in self.steps)

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
        for i, s in enumerate(self.steps):
            earlier = [e for e in self.steps[:i] if e.module.name == s.module.name]
            if s.dora and earlier:
                _check_dora_after(self.key, s, earlier, precision)
            if s.two_pass and self.work_dtype == torch.float64 and precision == "exact-peft":
                # subtle: in float32 torch's norm over the stored rows is a sequential sum
                # (SquaresAccumulator); in float64 it reduces in another order, not reproduced.
                raise AdapterError(
                    f"{self.key!r}: DoRA layer {s.module.name!r} on a float64 Embedding/Conv1D: "
                    "PEFT's float64 norm over all rows sums in an order stream-tv does not "
                    "reproduce (it differs in the last bits)",
                    hint="merge with --precision fp32 (precision='fp32'): the same norm, "
                    "correctly summed",
                )

    @contextlib.contextmanager
    def open(self, device: torch.device | str = "cpu") -> Iterator[OpenMerge]:
        """The runtime of this merge on ``device`` (factors loaded as float32), released
        when the block ends."""
        rt = OpenMerge(self, torch.device(device))
        try:
            yield rt
        finally:
            rt.close()


def _check_dora_after(key: str, s: Step, earlier: list[Step], precision: str) -> None:
    """A DoRA layer after other layers of the same module (several adapters).

    PEFT computes its norm on the module's weight with the module's merged adapters
    unmerged (``_unmerged_base_weight``), then merges them back: reproduced for plain LoRA
    layers before a row-wise (Linear, Conv2d) DoRA layer. ``fp32`` takes the weight before
    the module's first layer.
    """
    if s.two_pass:
        why, hint = "its norm runs over all rows of an Embedding/Conv1D", ""
    elif precision == "exact-peft" and any(e.dora or e.replaces_rows for e in earlier):
        why = "PEFT unmerges a DoRA layer by dividing by its magnitude, which is not reproduced"
        hint = "merge with --precision fp32 (precision='fp32'), "
    else:
        return
    raise AdapterError(
        f"{key!r}: DoRA layer {s.module.name!r} of a later adapter follows another adapter on "
        f"the same module; PEFT unmerges the earlier ones to find its base and merges them "
        f"back, reproduced only for plain LoRA layers before a Linear/Conv2d DoRA layer ({why})",
        hint=hint + "put the DoRA adapter first, or merge the adapters one at a time",
    )


@dataclass(frozen=True)
class Planned:
    """One tensor of the output: its name, the base tensor it is read from, its dtype."""

    key: str
    spec: TensorSpec
    dtype: torch.dtype


@dataclass(frozen=True)
class MergePlan:
    """What merging the adapter(s) into the base writes, tensor by tensor.

    ``outputs`` lists every output tensor in order (what PEFT's ``save_pretrained`` writes:
    tensors the class drops or that stay tied are absent, see ``dropped``); ``merges`` holds a
    :class:`TensorMerge` for the outputs the adapter(s) change, the others are copies of their
    base tensor (cast to their dtype). ``config_updates`` are the ``config.json`` values PEFT's
    merge changes (``tie_word_embeddings`` when it unties the head). ``modules`` are the bound
    module records; ``basis`` says where the modules' kinds and ties came from.
    """

    base: Checkpoint | None
    merges: dict[str, TensorMerge]
    adapters: list[tuple[Adapter, float]]
    modules: list[LoraModule] = field(default_factory=list)
    outputs: tuple[Planned, ...] = ()
    dropped: Mapping[str, str] = field(default_factory=dict)  # base key -> why it is not written
    config_updates: Mapping[str, object] = field(default_factory=dict)
    basis: str = ""

    def __iter__(self) -> Iterator[TensorMerge]:
        return iter(self.merges.values())

    def __len__(self) -> int:
        return len(self.merges)

    @property
    def untouched(self) -> list[str]:
        """Output tensors written as copies of their base tensor."""
        return [o.key for o in self.outputs if o.key not in self.merges]

    def check(self, precision: str = "exact-peft") -> None:
        """Everything ``precision`` cannot reproduce raises here, before any data is read."""
        for t in self.merges.values():
            t.check(precision)

    def targets(self) -> dict[str, str]:
        """Module path -> base tensor name, for every adapted module."""
        return {m.name: m.base_key for m in self.modules}

    def by_base_name(self) -> dict[str, TensorMerge]:
        """The merges by the base tensor each stands for (``lora-delta`` and ``compare`` name
        tensors as the base does); outputs without one keep their own name."""
        return {t.base_name or t.key: t for t in self.merges.values()}

    @classmethod
    def combine(cls, items: Sequence[tuple[MergePlan, float]]) -> MergePlan:
        """Merge several adapters' plans on one base: ``base + sum(w_i * delta_i)``.

        Each weight multiplies its adapter's scaling. Steps on a tensor keep PEFT's order:
        module by module (input embedding before the head), adapters in the given order.
        Two adapters replacing the same tensor (``modules_to_save``), or writing different
        tensors (one unties a head), are refused.
        """
        if not items:
            raise ValueError("combine needs at least one plan")
        first = items[0][0]
        base = first.base
        for plan, _ in items[1:]:
            if plan.base is not base and (
                plan.base is None or base is None or plan.base.tensors.keys() != base.tensors.keys()
            ):
                raise AdapterError(
                    "adapters bound to different bases cannot be combined",
                    hint="bind every adapter to the same base checkpoint",
                )
            if [o.key for o in plan.outputs] != [o.key for o in first.outputs] or dict(
                plan.config_updates
            ) != dict(first.config_updates):
                raise AdapterError(
                    "these adapters change which tensors the merged model has (one unties a "
                    "tied head with modules_to_save, or renames differ)",
                    hint="merge these adapters one at a time",
                )
        order = [o.key for o in first.outputs]
        for plan, _ in items:
            order += [k for k in plan.merges if k not in order]
        merges: dict[str, TensorMerge] = {}
        for key in order:
            parts = [
                (i, plan.merges[key], w) for i, (plan, w) in enumerate(items) if key in plan.merges
            ]
            if parts:
                merges[key] = _combined(key, parts, items)
        outputs = first.outputs or tuple(
            Planned(t.key, t.spec, t.dtype) for t in merges.values() if t.spec is not None
        )
        return cls(
            base=base,
            merges=merges,
            adapters=[(a, aw * w) for plan, w in items for a, aw in plan.adapters],
            modules=[m for plan, _ in items for m in plan.modules],
            outputs=outputs,
            dropped=first.dropped,
            config_updates=first.config_updates,
            basis=first.basis,
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
        base_name=first.base_name,
    )
