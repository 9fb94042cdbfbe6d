"""What each ``apply`` input is: a task vector, a fine-tuned model of the base, or an adapter.

The kind is read from a fact, never guessed from a name:

1. a directory with ``adapter_config.json`` is a PEFT LoRA adapter (``--kind`` saying
   otherwise is refused);
2. a checkpoint whose index was written by stream-tv says what it is: ``extract`` and
   ``lora-delta`` outputs are task vectors, ``merge`` and ``apply`` outputs are models (a
   ``--kind`` that disagrees is refused unless ``--force``);
3. any other checkpoint is what ``--kind`` says, and a task vector without one (today's
   ``apply BASE TV``). Before anything is written, a few of its smallest tensors and the
   base's are read, and the kind is refused when their values say otherwise: a model of the
   base is much closer to the base than to zero (``||x - base|| < ||x|| / 2``), a task vector
   much closer to zero (``||x|| < ||x - base|| / 2``). Values that are neither (a model of
   another base of the same shapes, or a large task vector) are used as given, with a
   warning when the kind was not given. ``--force`` skips the check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, validate
from ..errors import InputError
from ..io.index import Checkpoint
from ..lora import Adapter
from ..lora.config import CONFIG_NAME as ADAPTER_CONFIG
from ..refs import open_checkpoint, resolve, split_hub_id

TV, FINETUNED, ADAPTER = "task vector", "fine-tuned model", "adapter"
KINDS = {"auto": None, "tv": TV, "finetuned": FINETUNED, "adapter": ADAPTER}
FLAGS = {TV: "tv", FINETUNED: "finetuned", ADAPTER: "adapter"}  # kind -> its --kind value
_RECORDED = {"task vector": TV, "model": FINETUNED}  # validate.recorded_kind -> kind
SAMPLE_ELEMENTS = 1 << 20  # read at least this many elements per input for the kind check


@dataclass
class Input:
    """One ``apply`` input: what it is and how that was decided."""

    reference: str
    kind: str  # TV, FINETUNED or ADAPTER
    source: Checkpoint | Adapter
    basis: str  # "adapter_config.json", "its index (stream-tv extract)", "--kind", "default"

    @property
    def from_fact(self) -> bool:
        """Whether a file says what it is (no values check needed)."""
        return self.basis not in ("--kind", "default")


def kind_list(kinds: Sequence[str] | None, n: int) -> list[str]:
    """One of ``auto``, ``tv``, ``finetuned``, ``adapter`` per input (or one for all).

    >>> kind_list(None, 2), kind_list(["tv"], 2)
    (['auto', 'auto'], ['tv', 'tv'])
    """
    given = [str(k) for k in kinds or ()]
    for k in given:
        if k not in KINDS:
            raise InputError(f"unknown input kind {k!r}", hint=f"use one of {', '.join(KINDS)}")
    if not given:
        return ["auto"] * n
    if len(given) == 1:
        return given * n
    if len(given) != n:
        raise InputError(
            f"{len(given)} kinds for {n} inputs",
            hint="give one --kind per input, in order, or one for all",
        )
    return given


def is_adapter(reference: str | os.PathLike) -> bool:
    """Whether ``reference`` is a PEFT adapter: its directory holds ``adapter_config.json``."""
    text = os.fspath(reference)
    path = Path(text).expanduser()
    if not os.path.lexists(path) and split_hub_id(text) is not None:
        path = resolve(text, patterns=["*.json"])  # a Hub id: its JSON files only
    if path.is_file():
        path = path.parent
    return (path / ADAPTER_CONFIG).is_file()


def open_inputs(references: Sequence[str | os.PathLike], kinds: Sequence[str]) -> list[Input]:
    """Open every input as what it is (see the module docstring); headers only."""
    out = []
    for i, (ref, given) in enumerate(zip(references, kinds, strict=True)):
        text = os.fspath(ref)
        adapter = given == "adapter" or is_adapter(text)
        if adapter and given in ("auto", "adapter"):
            out.append(Input(text, ADAPTER, Adapter.load(text), "adapter_config.json"))
            continue
        if adapter:
            raise InputError(
                f"INPUT {i + 1} is a PEFT LoRA adapter (it has {ADAPTER_CONFIG}), not a "
                f"{KINDS[given]}",
                where=text,
                hint="give --kind adapter (or auto) for it",
            )
        ckpt = open_checkpoint(text)
        out.append(as_input(ckpt) if given == "auto" else Input(text, KINDS[given], ckpt, "--kind"))
    return out


def as_input(ckpt: Checkpoint) -> Input:
    """A checkpoint given with no kind: what its index records, else a task vector."""
    recorded = validate.recorded_kind(ckpt)
    if recorded is None:
        return Input(ckpt.reference, TV, ckpt, "default")
    op = ckpt.metadata.get("operation")
    return Input(ckpt.reference, _RECORDED[recorded], ckpt, f"its index (stream-tv {op})")


def kind_doubts(inputs: Sequence[Input]) -> list[InputError]:
    """A ``--kind`` that our own index contradicts (refused unless ``--force``)."""
    doubts = []
    for i, x in enumerate(inputs):
        if not isinstance(x.source, Checkpoint) or x.basis != "--kind":
            continue
        recorded = validate.recorded_kind(x.source)
        if recorded is not None and _RECORDED[recorded] != x.kind:
            op = x.source.metadata.get("operation")
            doubts.append(
                InputError(
                    f"INPUT {i + 1} is a {_RECORDED[recorded]} (written by stream-tv {op}, its "
                    f"index says so), not a {x.kind}",
                    where=x.reference,
                    hint="drop --kind for it (auto reads its index); --force uses it as given",
                )
            )
    return doubts


# ---- the values check -----------------------------------------------------------------------


@dataclass
class KindEvidence:
    """Sums over a sample of one input's tensors: ``near = ||x - base||^2``,
    ``far = ||x||^2`` (float64), and the verdict once the last one is read."""

    index: int
    input: Input
    names: list[str]
    warnings: list[str]
    near: float = 0.0
    far: float = 0.0
    seen: set[str] = field(default_factory=set)

    def tasks(self, base: Checkpoint) -> list[engine.Task]:
        ckpt = self.input.source
        assert isinstance(ckpt, Checkpoint)
        return [self._task(n, base, ckpt) for n in self.names]

    def _task(self, name: str, base: Checkpoint, ckpt: Checkpoint) -> engine.Task:
        def compute(chunk: engine.Chunk) -> None:
            b, x = (t.to(torch.float64) for t in chunk.inputs)
            self.near += float(torch.sum((x - b) ** 2))
            self.far += float(torch.sum(x * x))

        def finish() -> None:
            self.seen.add(name)
            if len(self.seen) == len(self.names):
                self.verdict()

        return engine.Task(name, [base[name], ckpt[name]], compute, min_rows=1, finish=finish)

    def verdict(self) -> None:
        """Refuse a kind the values contradict; warn where they say nothing either way."""
        near, far = math.sqrt(self.near), math.sqrt(self.far)
        x, i = self.input, self.index + 1
        where = f"over its {len(self.names)} smallest tensor(s), ||x - base|| = {near:.3g} and ||x|| = {far:.3g}"
        if not math.isfinite(near + far) or near == far == 0:
            return
        model_like, tv_like = near < far / 2, far < near / 2
        if x.kind == TV and model_like:
            raise InputError(
                f"INPUT {i} looks like a fine-tuned model of the base, not a task vector "
                f"({where}: it is close to the base)",
                where=x.reference,
                hint="give --kind finetuned for it (its task vector is taken on the fly), or "
                "--force to add it as a task vector",
            )
        if x.kind == FINETUNED and tv_like:
            raise InputError(
                f"INPUT {i} looks like a task vector, not a fine-tuned model of the base "
                f"({where}: it is small next to the base)",
                where=x.reference,
                hint="give --kind tv for it, or --force to use it as a model",
            )
        if x.kind == FINETUNED and not model_like:
            self.warnings.append(
                f"INPUT {i} ({x.reference}) is far from the base for a fine-tune of it "
                f"({where}): is it a model of another base?"
            )
        elif x.kind == TV and not tv_like and x.basis == "default":
            self.warnings.append(
                f"INPUT {i} ({x.reference}) was used as a task vector (no {ADAPTER_CONFIG}, no "
                f"stream-tv index, no --kind), and its values do not say which it is ({where}): "
                "give --kind tv or --kind finetuned to say so"
            )


def evidence(base: Checkpoint, inputs: Sequence[Input], warnings: list[str]) -> list[engine.Task]:
    """The check tasks reading a sample of every input whose kind no file states."""
    tasks: list[engine.Task] = []
    for i, x in enumerate(inputs):
        if x.from_fact or not isinstance(x.source, Checkpoint):
            continue
        ckpt = x.source
        shared = [
            n
            for n in ckpt.tensors
            if n in base and ckpt[n].is_float and base[n].is_float and ckpt[n].numel > 0
        ]
        shared.sort(key=lambda n: (ckpt[n].numel, n))
        names, total = [], 0
        for n in shared:
            if total >= SAMPLE_ELEMENTS:
                break
            names.append(n)
            total += ckpt[n].numel
        if names:
            tasks += KindEvidence(i, x, names, warnings).tasks(base)
    return tasks
