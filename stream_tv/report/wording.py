"""What the text renderings and the plot call things, one table per comparison mode.

A report compares ``L`` with ``T``; what ``L`` is depends on the mode ``compare`` ran in
(:data:`MODES`). Every phrase that differs between the modes lives here, so a renderer never
branches on the mode to pick its words.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_tv.stats import (
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
)

__all__ = ["MODES", "WORDING", "Wording"]

#: ``adapter``: L is a LoRA adapter's delta, T = finetuned - base (or a task vector);
#: ``task_vectors``: L is the first of two task vectors, T the second;
#: ``none``: base and finetuned only, no L.
MODES = ("adapter", "task_vectors", "none")


@dataclass(frozen=True)
class Wording:
    """The phrases of one mode. ``{n}``, ``{changed}`` and ``{verb}`` are filled in."""

    title: str  # Markdown title
    subject: str  # "<subject> on N of M changed tensors" (verdict by cosine)
    zero: str  # T is all zero
    no_l: str  # L covers none of the changed tensors
    l_tensors: str  # "<N> <l_tensors>s depart from it": tensors with L
    outside: str  # tensors changed where L is zero or absent
    outside_title: str  # table of those tensors
    outside_by_rounding: bool  # the outside clause says which changed only by rounding
    l_unchanged: str  # "<N tensors> ...": L is given and T is zero
    l_unchanged_needs_nonzero_l: bool  # count only those whose L is nonzero
    summary_intro: str  # what the Markdown summary is over
    summary_count: str  # the summary's first row
    covers: str  # "<covers> X% of the N changed tensors."
    l_column: str  # per-layer table: tensors with L
    meaning: dict[str, str]  # category -> what it means here
    l_name: str  # what L is, in the plot's titles
    t_name: str  # what T is, in the plot's titles
    outside_panel: str  # the plot's panel of tensors changed without L
    plot_title: str  # the plot's title, before the headline


_ADAPTER_MEANING = {
    LORA_AND_CHANGED: "LoRA delta, tensor changed",
    LORA_UNCHANGED: "LoRA delta, tensor not changed",
    CHANGED_NOT_LORA: "changed, no LoRA delta",
    ROUNDING_ONLY: "changed only by dtype rounding",
    UNCHANGED: "no LoRA delta, not changed",
}

WORDING = {
    "adapter": Wording(
        title="# LoRA delta vs task vector",
        subject="LoRA explains the task vector",
        zero="The task vector is zero",
        no_l="The adapter has no delta for any of {changed} changed tensors",
        l_tensors="LoRA tensor",
        outside="{n} changed outside the adapter",
        outside_title="Changed outside the adapter",
        outside_by_rounding=True,
        l_unchanged="with a LoRA delta {verb} unchanged in the model",
        l_unchanged_needs_nonzero_l=False,
        summary_intro=(
            "Verdicts and ulps over the tensors with a LoRA delta; the other figures over "
            "those that also have a nonzero task vector. `L` is the LoRA delta, `T` the task "
            "vector, `F` the fine-tuned tensor, `W` the base."
        ),
        summary_count="tensors (LoRA delta and task vector)",
        covers="LoRA covers",
        l_column="LoRA",
        meaning=_ADAPTER_MEANING,
        l_name="LoRA delta L",
        t_name="task vector T",
        outside_panel="Tensors without a LoRA delta that changed, per layer",
        plot_title="LoRA delta vs task vector",
    ),
    "task_vectors": Wording(
        title="# Task vector vs task vector",
        subject="The first task vector explains the second",
        zero="The second task vector is zero",
        no_l="The first task vector has none of the {changed} changed tensors of the second",
        l_tensors="tensor",
        outside="{n} changed only in the second task vector",
        outside_title="Changed only in the second task vector",
        outside_by_rounding=False,
        l_unchanged="changed in the first {verb} zero in the second",
        l_unchanged_needs_nonzero_l=True,
        summary_intro=(
            "Over the tensors nonzero in both task vectors; `L` is the first task vector, "
            "`T` the second."
        ),
        summary_count="tensors (in both task vectors)",
        covers="The first task vector covers",
        l_column="in first",
        meaning={
            LORA_AND_CHANGED: "in the first, nonzero in the second",
            LORA_UNCHANGED: "in the first, zero in the second",
            CHANGED_NOT_LORA: "nonzero only in the second",
            ROUNDING_ONLY: "nonzero only in the second, by dtype rounding",
            UNCHANGED: "zero in the second, absent from the first",
        },
        l_name="first task vector L",
        t_name="second task vector T",
        outside_panel="Tensors only the second task vector changes, per layer",
        plot_title="Task vector vs task vector",
    ),
    "none": Wording(
        title="# Task vector: what changed",
        subject="",
        zero="The task vector is zero",
        no_l="",
        l_tensors="",
        outside="{n} changed",
        outside_title="Changed tensors",
        outside_by_rounding=True,
        l_unchanged="",
        l_unchanged_needs_nonzero_l=False,
        summary_intro="No adapter given: what changed between base and fine-tuned model.",
        summary_count="tensors",
        covers="",
        l_column="LoRA",
        meaning={
            **_ADAPTER_MEANING,
            CHANGED_NOT_LORA: "changed",
            UNCHANGED: "not changed",
        },
        l_name="L",
        t_name="task vector T",
        outside_panel="Changed tensors, per layer",
        plot_title="Task vector (no adapter)",
    ),
}
