"""What the text renderings call things, one table per comparison mode.

A report compares ``L`` with ``T``; what ``L`` is depends on the mode ``compare`` ran in
(:data:`MODES`). Every phrase that differs between the modes lives here, so a renderer never
branches on the mode to pick its words.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODES", "WORDING", "Wording"]

#: ``adapter``: L is a LoRA adapter's delta, T = finetuned - base (or a task vector);
#: ``task_vectors``: L is the first of two task vectors, T the second;
#: ``none``: base and finetuned only, no L.
MODES = ("adapter", "task_vectors", "none")


@dataclass(frozen=True)
class Wording:
    """The phrases of one mode. ``{n}``, ``{changed}`` and ``{verb}`` are filled in."""

    title: str  # Markdown title
    subject: str  # "<subject> on N of M changed tensors"
    zero: str  # T is all zero
    no_l: str  # L covers none of the changed tensors
    departing_noun: str  # "<N> <noun>s depart from it"
    outside: str  # tensors changed where L is zero or absent
    outside_title: str  # table of those tensors
    outside_by_rounding: bool  # the outside clause says which changed only by rounding
    l_unchanged: str  # "<N tensors> ...": L is given and T is zero
    l_unchanged_needs_nonzero_l: bool  # count only those whose L is nonzero
    plot_l: str  # what L is, in the plot's title


WORDING = {
    "adapter": Wording(
        title="# LoRA delta vs task vector",
        subject="LoRA explains the task vector",
        zero="The task vector is zero",
        no_l="The adapter has no delta for any of {changed} changed tensors",
        departing_noun="LoRA tensor",
        outside="{n} changed outside the adapter",
        outside_title="Changed outside the adapter",
        outside_by_rounding=True,
        l_unchanged="with a LoRA delta {verb} unchanged in the model",
        l_unchanged_needs_nonzero_l=False,
        plot_l="LoRA delta L",
    ),
    "task_vectors": Wording(
        title="# Task vector vs task vector",
        subject="The first task vector explains the second",
        zero="The second task vector is zero",
        no_l="The first task vector has none of the {changed} changed tensors of the second",
        departing_noun="tensor",
        outside="{n} changed only in the second task vector",
        outside_title="Changed only in the second task vector",
        outside_by_rounding=False,
        l_unchanged="changed in the first {verb} zero in the second",
        l_unchanged_needs_nonzero_l=True,
        plot_l="the first task vector L",
    ),
    "none": Wording(
        title="# LoRA delta vs task vector",
        subject="LoRA explains the task vector",
        zero="The task vector is zero",
        no_l="The adapter has no delta for any of {changed} changed tensors",
        departing_noun="LoRA tensor",
        outside="{n} changed outside the adapter",
        outside_title="Changed tensors",
        outside_by_rounding=True,
        l_unchanged="with a LoRA delta {verb} unchanged in the model",
        l_unchanged_needs_nonzero_l=False,
        plot_l="LoRA delta L",
    ),
}
