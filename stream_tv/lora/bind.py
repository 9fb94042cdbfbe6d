"""Binding an adapter to a base: adapter modules -> base tensors, checked from headers.

:func:`bind_adapter` maps each module of an :class:`~stream_tv.lora.adapter.Adapter` onto the
base's tensors and checks everything that headers can tell (keys, shapes, layouts, ties)
before any tensor byte is read. The result is an immutable
:class:`~stream_tv.lora.plan.MergePlan` with one :class:`~stream_tv.lora.plan.TensorMerge`
per base tensor the adapter touches.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError
from ..io.index import MAX_INDEX_BYTES, Checkpoint, read_json
from .adapter import Adapter, LoraModule, SavedTensor
from .keys import base_key_for, input_embedding_key, is_output_head, top_prefixes
from .plan import MergePlan, Step, TensorMerge, step_order

# transformers models whose attention/MLP layers are ``Conv1D`` (weights stored (in, out)),
# and the module names that are Conv1D in them.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULE_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def _read_model_config(base: Checkpoint | None) -> dict[str, Any]:
    if base is None or base.root is None:
        return {}
    path = Path(base.root) / "config.json"
    if not os.path.lexists(path):
        return {}
    data, _ = read_json(path, what="config.json", limit=MAX_INDEX_BYTES)
    return data if isinstance(data, dict) else {}


def _tie_setting(config: dict[str, Any]) -> bool | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return None


def bind_adapter(
    adapter: Adapter, base: Checkpoint | None, config: dict[str, Any] | None = None
) -> MergePlan:
    """Map ``adapter`` onto ``base`` and validate it from headers (``Adapter.bind``)."""
    if base is None:
        return _bind_without_base(adapter, _Binder.complaint(adapter))
    binder = _Binder(adapter, base, config)
    pending = [
        (m, *binder.resolve(m.name, "weight", f"LoRA module {m.name!r}")) for m in adapter.modules
    ]
    binder.note_layouts(pending)
    bound = [binder.module(m, key, tied) for m, key, tied in pending]
    saved = [binder.saved(s) for s in adapter.saved]
    merges = _build_merges(adapter, base, bound, saved, binder.bad)
    return MergePlan(
        base=base,
        merges=merges,
        untouched=[k for k in base.tensors if k not in merges],
        adapters=[(adapter, 1.0)],
        modules=bound,
    )


class _Binder:
    """What binding one adapter to one base needs: the base's keys, config and tying."""

    def __init__(self, adapter: Adapter, base: Checkpoint, config: dict[str, Any] | None):
        self.adapter, self.base = adapter, base
        self.bad = self.complaint(adapter)
        model_config = config if config is not None else _read_model_config(base)
        self.model_type = str(model_config.get("model_type") or "").lower()
        self.tie = _tie_setting(model_config)
        self.keys = base.tensors.keys()
        self.prefixes = top_prefixes(self.keys)
        self.embed_key = input_embedding_key(self.keys)
        self.conv1d_seen = self.linear_seen = False

    @staticmethod
    def complaint(adapter: Adapter):
        def bad(message: str, hint: str | None = None) -> AdapterError:
            return AdapterError(message, where=adapter.reference, hint=hint)

        return bad

    def resolve(self, module: str, param: str, what: str) -> tuple[str, bool]:
        """The base tensor of ``<module>.<param>``, and whether it is a tied head's."""
        key = base_key_for(module, param, self.keys, prefixes=self.prefixes)
        if key is not None:
            return key, False
        if param == "weight" and is_output_head(module):
            if self.tie is False:
                raise self.bad(
                    f"{what} targets {module!r}, but the base has no {module}.weight and its "
                    "config.json says tie_word_embeddings=false",
                    "the base checkpoint is incomplete, or belongs to another model",
                )
            if self.embed_key is None:
                raise self.bad(
                    f"{what} targets {module!r}, which the base has neither as "
                    f"{module}.weight nor as a tied input embedding",
                    "check that the adapter belongs to this base model",
                )
            return self.embed_key, True
        sample = ", ".join(sorted(self.keys)[:3])
        raise self.bad(
            f"{what} targets {module!r}, but the base has no tensor {module}.{param} "
            f"(nor without/with a top prefix; base keys look like {sample}, ...)",
            "check that the adapter belongs to this base model",
        )

    def note_layouts(self, pending: list[tuple[LoraModule, str, bool]]) -> None:
        """Layouts of non-square linear modules, as evidence for square ones."""
        for m, key, _ in pending:
            if m.kind == "linear" and m.in_features != m.out_features:
                shape = self.base[key].shape
                self.conv1d_seen |= shape == (m.in_features, m.out_features)
                self.linear_seen |= shape == (m.out_features, m.in_features)

    def module(self, m: LoraModule, key: str, tied: bool) -> LoraModule:
        """``m`` bound to base tensor ``key``: its kind decided, its shapes checked."""
        spec, bad = self.base[key], self.bad
        if not spec.is_float:
            raise bad(
                f"LoRA module {m.name!r}: base tensor {key!r} has dtype {spec.dtype_str}",
                "quantised bases cannot be merged exactly; use an unquantised base",
            )
        kind, layout = m.kind, "shape"
        if m.kind == "linear":
            kind, layout = _linear_layout(
                m,
                spec,
                self.model_type,
                self.adapter.config,
                self.conv1d_seen,
                self.linear_seen,
                tied,
                bad,
            )
        elif m.kind == "embedding" and spec.shape != (m.in_features, m.out_features):
            raise bad(
                f"Embedding LoRA {m.name!r}: A {list(m.specs['A'].shape)} and B "
                f"{list(m.specs['B'].shape)} need a base weight [vocab={m.in_features}, "
                f"dim={m.out_features}], but {key!r} is {list(spec.shape)}",
                "a resized vocabulary needs the resized base (or its copy in the adapter)",
            )
        elif m.kind == "conv2d":
            a = m.specs["A"].shape
            want = (m.out_features, m.in_features, a[2], a[3])
            if spec.shape != want:
                raise bad(
                    f"Conv2d LoRA {m.name!r} needs a base weight {list(want)}, but {key!r} is "
                    f"{list(spec.shape)}"
                )
        if m.dora:
            mag = m.specs["magnitude"].shape
            want = (1, m.out_features, 1, 1) if kind == "conv2d" else (m.out_features,)
            if tuple(mag) != want:
                raise bad(
                    f"DoRA module {m.name!r}: lora_magnitude_vector is {list(mag)}, expected "
                    f"{list(want)}"
                )
        bias_key = self._bias(m) if m.lora_bias else None
        return replace(m, kind=kind, base_key=key, bias_key=bias_key, layout=layout)

    def _bias(self, m: LoraModule) -> str:
        key = base_key_for(m.name, "bias", self.keys, prefixes=self.prefixes)
        if key is None:
            raise self.bad(
                f"LoRA module {m.name!r} has lora_bias, but the base has no {m.name}.bias",
                "PEFT cannot merge lora_bias into a layer without bias either",
            )
        if self.base[key].shape != (m.out_features,):
            raise self.bad(
                f"LoRA module {m.name!r}: base bias {key!r} is "
                f"{list(self.base[key].shape)}, lora_B.bias is [{m.out_features}]"
            )
        return key

    def saved(self, s: SavedTensor) -> SavedTensor:
        """A full tensor saved in the adapter, bound to the base tensor it replaces."""
        key, _ = self.resolve(s.module, s.param, f"saved tensor {s.key!r}")
        if self.base[key].shape != s.spec.shape:
            raise self.bad(
                f"saved tensor {s.key!r} has shape {list(s.spec.shape)}, but it replaces base "
                f"tensor {key!r} of shape {list(self.base[key].shape)}",
                "a resized vocabulary needs the resized base model",
            )
        return replace(s, base_key=key)


def _linear_layout(m, spec, model_type, cfg, conv1d_seen, linear_seen, tied, bad):
    out_in, in_out = (m.out_features, m.in_features), (m.in_features, m.out_features)
    if spec.shape not in (out_in, in_out):
        raise bad(
            f"LoRA module {m.name!r}: A {list(m.specs['A'].shape)} and B "
            f"{list(m.specs['B'].shape)} give a delta [{m.out_features}, {m.in_features}], but "
            f"base tensor {m.base_key or spec.name!r} is {list(spec.shape)}",
            "check that the adapter belongs to this base model",
        )
    if out_in != in_out or tied:
        return ("linear", "shape") if spec.shape == out_in else ("conv1d", "shape")
    # Square weight: the shape cannot tell. PEFT decides by the layer class.
    last = m.name.rpartition(".")[2]
    if model_type:
        is_conv1d = model_type in CONV1D_MODEL_TYPES and last in CONV1D_MODULE_NAMES
        return ("conv1d" if is_conv1d else "linear"), f"model_type={model_type}"
    if conv1d_seen != linear_seen:
        return ("conv1d" if conv1d_seen else "linear"), "other modules of the adapter"
    return ("conv1d" if cfg.fan_in_fan_out else "linear"), "adapter fan_in_fan_out"


def _bind_without_base(adapter: Adapter, bad) -> MergePlan:
    if adapter.saved:
        raise bad(
            f"the adapter saves full tensors (e.g. {adapter.saved[0].key!r}); their delta "
            "needs the base",
            "pass the base model (--base)",
        )
    bound = []
    for m in adapter.modules:
        if m.dora:
            raise bad(
                f"DoRA module {m.name!r}: its delta depends on the base weights",
                "pass the base model (--base)",
            )
        kind = m.kind
        if kind == "linear" and adapter.config.fan_in_fan_out:
            kind = "conv1d"
        bias_key = f"{m.name}.bias" if m.lora_bias else None
        bound.append(
            replace(m, kind=kind, base_key=f"{m.name}.weight", bias_key=bias_key, layout="adapter")
        )
    merges = _build_merges(adapter, None, bound, [], bad)
    return MergePlan(
        base=None, merges=merges, untouched=[], adapters=[(adapter, 1.0)], modules=bound
    )


def _build_merges(adapter, base, bound, saved, bad) -> dict[str, TensorMerge]:
    steps: dict[str, list[Step]] = {}
    for m in bound:
        steps.setdefault(m.base_key, []).append(Step(m, "weight", adapter))
        if m.lora_bias:
            steps.setdefault(m.bias_key, []).append(Step(m, "bias", adapter))
    replacements: dict[str, SavedTensor] = {}
    for s in sorted(saved, key=lambda s: is_output_head(s.module)):
        prev = replacements.get(s.base_key)
        if prev is not None and (prev.spec.shape, prev.spec.dtype) != (s.spec.shape, s.spec.dtype):
            raise bad(
                f"saved tensors {prev.key!r} and {s.key!r} both replace {s.base_key!r} "
                "(tied weights) but differ in dtype or shape"
            )
        replacements[s.base_key] = s  # the later module wins, as in PEFT's load order

    order = list(base.tensors) if base is not None else list(steps)
    merges: dict[str, TensorMerge] = {}
    for key in order:
        if key not in steps and key not in replacements:
            continue
        spec = base[key] if base is not None else None
        st = sorted(steps.get(key, []), key=step_order)
        if base is None:
            m = st[0].module
            shape = (m.out_features,) if st[0].target == "bias" else _delta_shape(m)
            dtype = torch.float32
        else:
            shape, dtype = spec.shape, spec.dtype
        rep = replacements.get(key)
        merges[key] = TensorMerge(
            key=key,
            spec=spec,
            shape=tuple(shape),
            dtype=dtype,
            replacement=rep.spec if rep is not None else None,
            replacement_is_base_copy=rep is not None and rep.base_copy,
            steps=tuple(st),
        )
    return merges


def _delta_shape(m: LoraModule) -> tuple[int, ...]:
    if m.kind == "conv1d":
        return (m.in_features, m.out_features)
    if m.kind == "embedding":
        return (m.in_features, m.out_features)
    if m.kind == "conv2d":
        a = m.specs["A"].shape
        return (m.out_features, m.in_features, a[2], a[3])
    return (m.out_features, m.in_features)
