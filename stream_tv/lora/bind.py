"""Binding an adapter to a base: adapter modules -> base tensors, checked from headers.

:func:`bind_adapter` maps each module of an :class:`~stream_tv.lora.adapter.Adapter` onto the
base's tensors and checks everything headers can tell (keys, shapes, layouts, ties) before
any tensor byte is read. The result is an immutable :class:`~stream_tv.lora.plan.MergePlan`
with one :class:`~stream_tv.lora.plan.TensorMerge` per output tensor the adapter changes.

Where the facts come from, in this order:

1. **The model definition** (:mod:`.bind_facts`): when ``transformers`` is installed and the
   base has a ``config.json`` naming its class (or the adapter's ``auto_mapping`` does), the
   class is built on the meta device (:func:`~.model_facts.read_model_facts`) and each
   module's kind, layout, ties, load dtype and checkpoint names come from it, the way PEFT
   and transformers see them. The output is what PEFT's ``save_pretrained`` writes.
2. **Name and shape rules** (:mod:`.bind_rules`) otherwise: the base's own names and dtypes,
   a layout the shapes settle, and a refusal (saying how to settle it) wherever they do not.

``layouts`` (module pattern -> ``True`` for a GPT-2 ``Conv1D``, ``False`` for a Linear) settles
square layouts without the model definition (``--fan-in-fan-out`` / ``--no-fan-in-fan-out``);
with it, a pattern must agree with the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, ModelDefinitionError
from ..io.index import BASE_CONFIG_NAME, MAX_INDEX_BYTES, Checkpoint, TensorSpec, read_json
from .adapter import Adapter, LoraModule
from .config import pattern_key
from .model_facts import CONFIG_NAME, ModelFacts, NoFacts, read_model_facts, transformers_install
from .plan import MergePlan, Planned, TensorMerge

# Bytes compared per read when two stored tensors must be compared (tied weights).
COMPARE_CHUNK_BYTES = 64 << 20


def bind_adapter(
    adapter: Adapter,
    base: Checkpoint | None,
    config: dict[str, Any] | None = None,
    *,
    layouts: Mapping[str, bool] | None = None,
    stand_in: bool = False,
) -> MergePlan:
    """Map ``adapter`` onto ``base`` and validate it from headers (``Adapter.bind``).

    ``stand_in``: ``base`` only has the base's names and shapes (a task vector, for
    ``compare``): tensors may be missing and its values say nothing about ties."""
    from .bind_facts import FactsBinder
    from .bind_rules import RulesBinder, bind_without_base

    layouts = dict(layouts or {})
    if base is None:
        return bind_without_base(adapter, layouts)
    facts = facts_for(adapter, base, config)
    if facts:
        return FactsBinder(adapter, base, facts, layouts, stand_in=stand_in).plan()
    return RulesBinder(adapter, base, config, facts, layouts).plan()


def complaint(adapter: Adapter):
    """``bad(message, hint)``: an :class:`AdapterError` located at the adapter."""

    def bad(message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(message, where=adapter.reference, hint=hint)

    return bad


def read_config(base: Checkpoint | None) -> dict[str, Any] | None:
    """The base's ``config.json`` as a dict, or ``None`` when it has none (or no directory).

    A task vector written by ``extract`` keeps its base's config as ``base_config.json``
    (never ``config.json``: it must not load as a model); that one stands in for it.
    """
    if base is None or base.root is None:
        return None
    path = Path(base.root) / CONFIG_NAME
    if not os.path.lexists(path) and base.metadata.get("operation") == "extract":
        path = Path(base.root) / BASE_CONFIG_NAME
    if not os.path.lexists(path):
        return None
    # every failure (not JSON, nested too deep, a FIFO, too big) is one AdapterError
    data, _ = read_json(
        path,
        what=f"the base's {CONFIG_NAME}",
        limit=MAX_INDEX_BYTES,
        error=AdapterError,
        hint="repair it",
    )
    return data if isinstance(data, dict) else None


def peft_class(adapter: Adapter) -> str | None:
    """The transformers class PEFT wrapped, as the adapter records it (``auto_mapping``)."""
    mapping = adapter.config.raw.get("auto_mapping")
    if not isinstance(mapping, dict):
        return None
    cls, library = mapping.get("base_model_class"), str(mapping.get("parent_library") or "")
    return cls if isinstance(cls, str) and library.startswith("transformers.") else None


_FACTS_CACHE: dict[tuple, ModelFacts | NoFacts] = {}


def facts_for(
    adapter: Adapter, base: Checkpoint, config: dict[str, Any] | None = None
) -> ModelFacts | NoFacts:
    """The model facts of ``base`` for ``adapter`` (cached per base files and class), or
    :class:`NoFacts` saying why there are none. A config that names a class which cannot be
    built raises (:class:`~stream_tv.errors.ModelDefinitionError`): never guessed around."""
    install, why = transformers_install()
    if install is None:
        return NoFacts(why, "pip install 'stream-tv[transformers]'")
    config = config if config is not None else read_config(base)
    if config is None:
        return NoFacts("the base has no config.json", "put the base model's config.json next to it")
    if not config.get("model_type"):
        return NoFacts("config.json has no model_type", "it is not a transformers config")
    architecture = peft_class(adapter)
    if not config.get("architectures") and architecture is None:
        return NoFacts(
            "config.json names no architecture and the adapter no base_model_class",
            'add "architectures": ["<the transformers class>"] to config.json',
        )
    key = (
        tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in base.files),
        json.dumps(config, sort_keys=True, default=str),
        architecture,
    )
    if key not in _FACTS_CACHE:
        try:
            facts = read_model_facts(base, config=config, architecture=architecture)
        except ModelDefinitionError as e:
            if architecture is None or architecture in (config.get("architectures") or []):
                raise
            raise AdapterError(
                f"the adapter was trained on {architecture} (adapter_config.json auto_mapping), "
                f"but the base's config.json does not build one: {e.message}",
                where=adapter.reference,
                hint="check that the adapter belongs to this base model",
            ) from e
        if len(_FACTS_CACHE) > 16:
            _FACTS_CACHE.clear()
        _FACTS_CACHE[key] = facts
    return _FACTS_CACHE[key]


def layout_of(layouts: Mapping[str, bool], module: str) -> bool | None:
    """What ``--fan-in-fan-out`` / ``--no-fan-in-fan-out`` say about ``module`` (``True``:
    a Conv1D), matched like PEFT's ``rank_pattern``; ``None`` when no pattern matches."""
    key = pattern_key(layouts, module)
    return layouts[key] if key is not None else None


def stored_equal(a: TensorSpec, b: TensorSpec, dtype: torch.dtype) -> bool:
    """Whether two stored tensors are equal once loaded in ``dtype`` (``torch.equal``, as
    transformers decides whether to tie them), read in bounded chunks.

    # subtle: the one place where binding reads tensor data: a config that ties two weights
    # the checkpoint both stores makes transformers compare them, and the answer decides which
    # tensors the merged model has.
    """
    from ..io.reader import Reader

    if a.shape != b.shape:
        return False
    row_bytes = max(a.row_numel * max(a.itemsize, b.itemsize), 1)
    step = max(1, COMPARE_CHUNK_BYTES // row_bytes)
    with Reader() as r:
        for start in range(0, a.rows, step):
            stop = min(a.rows, start + step)
            x = r.read_rows(a, start, stop).to(dtype)
            y = r.read_rows(b, start, stop).to(dtype)
            if not torch.equal(x, y):
                return False
    return True


def check_factors(m: LoraModule, kind: str, weight: tuple[int, ...], key: str, bad) -> None:
    """The factors of ``m`` fit a base weight of shape ``weight`` for a layer of ``kind``."""
    a, b = m.specs["A"].shape, m.specs["B"].shape
    shapes = f"A {list(a)} and B {list(b)}"
    if kind == "linear" and weight != (m.out_features, m.in_features):
        want = f"[{m.out_features}, {m.in_features}] (out, in)"
    elif kind == "conv1d" and weight != (m.in_features, m.out_features):
        want = f"[{m.in_features}, {m.out_features}] (in, out: a GPT-2 Conv1D)"
    elif kind == "embedding" and weight != (m.in_features, m.out_features):
        want = f"[vocab={m.in_features}, dim={m.out_features}]"
    elif kind in ("nn_conv1d", "conv2d", "conv3d") and weight != (m.out_features, *a[1:]):
        grouped = len(weight) == len(a) and weight[1] and a[1] % weight[1] == 0
        if grouped and weight[0] == m.out_features and tuple(weight[2:]) == tuple(a[2:]):
            raise bad(
                f"LoRA module {m.name!r}: {key!r} is a grouped convolution "
                f"(groups={a[1] // weight[1]}); PEFT cannot merge LoRA into one "
                "(its merge raises NotImplementedError)",
                "merge without this module, or keep the adapter unmerged",
            )
        want = str([m.out_features, *a[1:]])
    else:
        return
    raise bad(
        f"LoRA module {m.name!r}: {shapes} need a base weight {want}, but {key!r} is "
        f"{list(weight)}",
        "a resized vocabulary needs the resized base (or its copy in the adapter)"
        if kind == "embedding"
        else "check that the adapter belongs to this base model",
    )


def check_magnitude(m: LoraModule, kind: str, bad) -> None:
    """A DoRA module's magnitude has PEFT's shape for its kind."""
    if not m.dora:
        return
    mag = tuple(m.specs["magnitude"].shape)
    ndim = len(m.specs["A"].shape)
    conv = kind in ("nn_conv1d", "conv2d", "conv3d")
    want = (1, m.out_features, *([1] * (ndim - 2))) if conv else (m.out_features,)
    if mag != want:
        raise bad(
            f"DoRA module {m.name!r}: lora_magnitude_vector is {list(mag)}, expected {list(want)}"
        )


def plan_of(
    adapter: Adapter,
    base: Checkpoint | None,
    merges: dict[str, TensorMerge],
    modules: list[LoraModule],
    *,
    outputs: tuple[Planned, ...] | None = None,
    dropped: Mapping[str, str] | None = None,
    config_updates: Mapping[str, object] | None = None,
    basis: str = "",
) -> MergePlan:
    """The :class:`MergePlan`; ``outputs`` default to the base's tensors as they are."""
    if outputs is None:
        outputs = tuple(Planned(k, s, s.dtype) for k, s in base.tensors.items()) if base else ()
    return MergePlan(
        base=base,
        merges=merges,
        adapters=[(adapter, 1.0)],
        modules=modules,
        outputs=outputs,
        dropped=dict(dropped or {}),
        config_updates=dict(config_updates or {}),
        basis=basis,
    )
