"""Checks on inputs that several commands share, written once; headers only, no tensor data.

Each function raises a :class:`~stream_tv.errors.MismatchError` or
:class:`~stream_tv.errors.InputError` that names the tensors and the fix, or returns what
the command needs to go on.

>>> broadcast([0.5], 3, "scale", "task vector")
[0.5, 0.5, 0.5]
>>> broadcast([], 2, "scale", "task vector")
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import InputError, MismatchError
from .io.index import Checkpoint


def broadcast(values: Sequence[float] | None, n: int, what: str, per: str) -> list[float]:
    """One ``what`` per ``per`` (in order), or one for all, or 1.0 for all when none given."""
    if not values:
        return [1.0] * n
    out = [float(v) for v in values]
    if len(out) == 1 and n > 1:
        return out * n
    if len(out) != n:
        raise InputError(
            f"{len(out)} {what}s for {n} {per}s",
            hint=f"give one --{what} per {per}, in order, or one for all",
        )
    return out


def key_sets(
    base: Checkpoint, other: Checkpoint, *, allow_missing: bool, other_label: str
) -> tuple[list[str], list[str]]:
    """Names to process (in base order) and names present in one checkpoint only.

    A non-float tensor (an integer buffer) that only the base has is reported, not an error:
    ``transformers`` does not save non-persistent buffers, so fine-tuned checkpoints often
    lack one their base has.
    """
    only_base = [n for n in base.tensors if n not in other]
    only_other = [n for n in other.tensors if n not in base]
    float_only_base = [n for n in only_base if base[n].is_float]
    if (float_only_base or only_other) and not allow_missing:
        parts = []
        if float_only_base:
            parts.append(
                f"{len(float_only_base)} float tensor(s) only in the base "
                f"(e.g. {', '.join(float_only_base[:3])})"
            )
        if only_other:
            parts.append(
                f"{len(only_other)} only in the {other_label} (e.g. {', '.join(only_other[:3])})"
            )
        raise MismatchError(
            "the checkpoints do not have the same tensors: " + "; ".join(parts),
            where=f"{base.reference} vs {other.reference}",
            hint="pass --allow-missing to skip them (they are listed in the result)",
        )
    return [n for n in base.tensors if n in other], only_base + only_other


def subset(
    part: Checkpoint, whole: Checkpoint, *, what: str, whole_label: str, hint: str | None = None
) -> None:
    """Every tensor of ``part`` (a task vector) exists in ``whole`` (its base)."""
    extra = [n for n in part.tensors if n not in whole]
    if extra:
        raise MismatchError(
            f"{len(extra)} tensor(s) of {what} are not in {whole_label} "
            f"(e.g. {', '.join(extra[:3])})",
            where=part.reference,
            hint=hint,
        )


def shapes(a: Checkpoint, b: Checkpoint, names: Sequence[str]) -> None:
    """``names`` have the same shape in both checkpoints."""
    bad = [n for n in names if a[n].shape != b[n].shape]
    if bad:
        n = bad[0]
        raise MismatchError(
            f"shape mismatch for {len(bad)} tensor(s), e.g. {n!r}: "
            f"{list(a[n].shape)} in {a.reference} vs {list(b[n].shape)} in {b.reference}",
            hint="the two checkpoints are not the same architecture",
        )


def same_kind(a: Checkpoint, b: Checkpoint, names: Sequence[str]) -> None:
    """Each of ``names`` is floating point in both checkpoints, or in neither."""
    mixed = [n for n in names if a[n].is_float != b[n].is_float]
    if mixed:
        n = mixed[0]
        raise MismatchError(
            f"tensor {n!r} is {a[n].dtype_str} in {a.reference} and {b[n].dtype_str} in "
            f"{b.reference}: one is floating point, the other not"
        )


def floats(ckpt: Checkpoint, names: Sequence[str], *, also: Checkpoint | None = None) -> None:
    """Each of ``names`` is floating point in ``ckpt`` (and in ``also``)."""
    for c in (ckpt, also):
        if c is None:
            continue
        bad = [n for n in names if not c[n].is_float]
        if bad:
            raise MismatchError(
                f"tensor {bad[0]!r} is {c[bad[0]].dtype_str}, not floating point",
                where=c.reference,
                hint="task vectors hold float tensors only",
            )


# ---- provenance: what our own index says an input is --------------------------------------------

#: ``metadata["operation"]`` of our outputs -> what the output is.
_KIND_OF_OPERATION = {
    "extract": "task vector",
    "lora-delta": "task vector",
    "merge": "model",
    "apply": "model",
}


def recorded_kind(ckpt: Checkpoint) -> str | None:
    """``"model"`` or ``"task vector"`` when ``ckpt`` is a stream-tv output that says so."""
    operation = ckpt.metadata.get("operation")
    if not isinstance(operation, str) or "stream_tv_version" not in ckpt.metadata:
        return None
    return _KIND_OF_OPERATION.get(operation)


def provenance(ckpt: Checkpoint, *, expected: str, given_as: str) -> list[InputError]:
    """Doubts about ``ckpt`` given as ``given_as`` (e.g. ``"BASE"``) where a ``expected``
    (``"model"`` or ``"task vector"``) belongs: empty unless our own index says otherwise.

    The job driver refuses the first doubt unless ``RunOptions(force=True)``.
    """
    kind = recorded_kind(ckpt)
    if kind is None or kind == expected:
        return []
    operation = ckpt.metadata["operation"]
    if expected == "model":
        fix = (
            "a task vector is applied to its base: stream-tv apply BASE TV -o OUT; compare "
            "takes it as --task-vector"
        )
    else:
        fix = (
            "take its task vector first: stream-tv extract BASE MODEL -o TV (applying a whole "
            "model would add its weights to the base's)"
        )
    return [
        InputError(
            f"{given_as} is a {kind} (written by stream-tv {operation}, its index says so), "
            f"not a {expected}",
            where=ckpt.reference,
            hint=f"{fix}; --force uses it as given",
        )
    ]


def already_merged(base: Checkpoint, adapters: Sequence[tuple[str, Path]]) -> list[InputError]:
    """Doubts when ``base`` is a merge output whose index records one of ``adapters``
    (``(reference, directory)`` pairs) as merged in already: merging it again doubles it."""
    if recorded_kind(base) != "model" or base.metadata.get("operation") != "merge":
        return []
    recorded = base.metadata.get("adapters")
    if not isinstance(recorded, list):
        return []
    doubts = []
    for reference, directory in adapters:
        for r in recorded:
            if not isinstance(r, str):
                continue
            same = r == reference or Path(r).expanduser().resolve() == directory.resolve()
            if same:
                doubts.append(
                    InputError(
                        f"the base already has adapter {reference} merged in (written by "
                        "stream-tv merge, its index says so): merging it again doubles its "
                        "delta",
                        where=base.reference,
                        hint="merge into the original base; --force merges it again",
                    )
                )
                break
    return doubts
