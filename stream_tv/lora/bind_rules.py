"""Binding without the model definition: the base's own names, shapes and ``config.json``.

Used when ``transformers`` is not installed or the base has no ``config.json`` naming its class
(see :mod:`.bind`). The output keeps the base's tensor names and dtypes. What names and shapes
settle is merged; what they do not is refused with the way to settle it:

- a square weight fits a Linear ``(out, in)`` and a GPT-2 ``Conv1D`` ``(in, out)`` alike.
  transformers names its Conv1D modules ``c_attn``, ``q_attn``, ``c_proj``, ``c_fc`` only
  (:data:`CONV1D_MODULE_NAMES`) and uses them only in :data:`CONV1D_MODEL_TYPES`: another name
  is a Linear, and one of those names is a Conv1D when ``config.json`` is one of those model
  types and nothing else (no sub-model, no custom code). Anything else is refused
  (``--fan-in-fan-out`` / ``--no-fan-in-fan-out`` settle it, or the model definition);
- a ``modules_to_save`` copy of a tied head or embedding (PEFT unties them), and a config that
  ties a head the file also stores (transformers compares the two), need the model definition;
- ``target_parameters`` (which parameter a nested wrapper targets, how the checkpoint stores
  experts) and MultiheadAttention need it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..io.index import Checkpoint
from .adapter import Adapter, LoraModule, SavedTensor
from .bind import check_factors, check_magnitude, complaint, layout_of, plan_of, read_config
from .keys import base_key_for, input_embedding_key, is_output_head, top_prefixes
from .model_facts import NoFacts, ambiguous_layout_error
from .plan import MergePlan, Step, TensorMerge, step_order

# transformers models whose attention/MLP layers are ``Conv1D`` (weights stored (in, out)),
# and the attribute names those layers have (tests check both against transformers' source).
CONV1D_MODEL_TYPES = frozenset(
    {
        "gpt2",
        "openai-gpt",
        "imagegpt",
        "decision_transformer",
        "clvp",
        "clvp_encoder",
        "clvp_decoder",
    }
)
CONV1D_MODULE_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
NEEDS_FACTS_HINT = (
    "install the model definition (pip install 'stream-tv[transformers]') and keep the base's "
    "config.json next to its weights"
)


def model_types(config: Mapping[str, Any]) -> set[str]:
    """Every ``model_type`` in a config, its sub-models' included.

    >>> sorted(model_types({"model_type": "encoder-decoder", "decoder": {"model_type": "gpt2"}}))
    ['encoder-decoder', 'gpt2']
    """
    out = set()
    if isinstance(config.get("model_type"), str):
        out.add(config["model_type"])
    for v in config.values():
        if isinstance(v, dict):
            out |= model_types(v)
    return out


def tie_setting(config: Mapping[str, Any]) -> bool | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return None


def square_layout(name: str, config: Mapping[str, Any], layouts) -> tuple[str, str] | str:
    """``(kind, how)`` of a square linear module, or the reason nothing settles it."""
    given = layout_of(layouts, name)
    if given is not None:
        return ("conv1d", "--fan-in-fan-out") if given else ("linear", "--no-fan-in-fan-out")
    if config.get("auto_map"):
        return "config.json uses custom modeling code (auto_map), whose layers are unknown"
    last = name.rpartition(".")[2]
    if last not in CONV1D_MODULE_NAMES:
        return "linear", "name (transformers' Conv1D layers are c_attn/q_attn/c_proj/c_fc)"
    top, types = config.get("model_type"), model_types(config)
    if top in CONV1D_MODEL_TYPES and types == {top}:
        return "conv1d", f"model_type={top}"
    if not types:
        return "there is no config.json to say which model this is"
    return f"config.json has model types {sorted(types)}: {last} may be a Linear or a Conv1D"


class RulesBinder:
    """Binding one adapter to one base from names, shapes and config.json."""

    def __init__(
        self, adapter: Adapter, base: Checkpoint, config, nofacts: NoFacts, layouts: Mapping
    ):
        self.adapter, self.base, self.layouts = adapter, base, layouts
        self.bad = complaint(adapter)
        self.config = config if config is not None else (read_config(base) or {})
        self.basis = f"name rules ({nofacts.reason})"
        self.tie = tie_setting(self.config)
        self.keys = base.tensors.keys()
        self.prefixes = top_prefixes(self.keys)
        self.embed_key = input_embedding_key(self.keys)
        self.ambiguous: dict[str, str] = {}

    def plan(self) -> MergePlan:
        a = self.adapter
        if a.config.target_parameters:
            raise self.bad(
                f"target_parameters {list(a.config.target_parameters)}: which parameter each "
                "nested LoRA wrapper targets, and how the checkpoint stores experts, come from "
                f"the model definition, which is not available: {self.basis}",
                NEEDS_FACTS_HINT,
            )
        nested = next((m.name for m in a.modules if ".base_layer." in m.name), None)
        if nested is not None:
            raise self.bad(
                f"LoRA module {nested!r} sits inside another PEFT layer (MultiheadAttention's "
                f"out_proj); its merge needs the model definition: {self.basis}",
                NEEDS_FACTS_HINT,
            )
        pending = [
            (m, *self.resolve(m.name, "weight", f"LoRA module {m.name!r}")) for m in a.modules
        ]
        bound = [self.module(m, key, tied) for m, key, tied in pending]
        if self.ambiguous:
            why = "; ".join([*sorted(set(self.ambiguous.values())), self.basis])
            raise ambiguous_layout_error(self.ambiguous, where=a.reference, why=why)
        saved = [self.saved(s) for s in a.saved]
        self.check_ties(bound, saved)
        merges = build_merges(a, self.base, bound, saved, self.bad)
        return plan_of(a, self.base, merges, bound, basis=self.basis)

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
                    f"{module}.weight nor as an input embedding named like "
                    "embed_tokens/wte/word_embeddings (the name rules' guess of a tied head; "
                    f"{self.basis})",
                    NEEDS_FACTS_HINT,
                )
            return self.embed_key, True
        sample = ", ".join(sorted(self.keys)[:3])
        raise self.bad(
            f"{what} targets {module!r}, but the base has no tensor {module}.{param} "
            f"(nor without/with a top prefix; base keys look like {sample}, ...)",
            "check that the adapter belongs to this base model",
        )

    def module(self, m: LoraModule, key: str, tied: bool) -> LoraModule:
        """``m`` bound to base tensor ``key``: its kind decided, its shapes checked."""
        spec, bad = self.base[key], self.bad
        if not spec.is_float:
            raise bad(
                f"LoRA module {m.name!r}: base tensor {key!r} has dtype {spec.dtype_str}",
                "quantised bases cannot be merged exactly; use an unquantised base",
            )
        position = 1 if is_output_head(m.name) else 0
        if m.kind == "tokens":
            return self.tokens(m, key, position)
        kind, layout = m.kind, "shape"
        if m.kind == "linear":
            out_in, in_out = (m.out_features, m.in_features), (m.in_features, m.out_features)
            if spec.shape == in_out and (out_in != in_out or tied):
                kind = "conv1d"
            elif spec.shape == out_in and out_in == in_out and not tied:
                settled = square_layout(m.name, self.config, self.layouts)
                if isinstance(settled, str):
                    self.ambiguous[m.name] = settled
                else:
                    kind, layout = settled
        check_factors(m, kind, spec.shape, key, bad)
        check_magnitude(m, kind, bad)
        bias_key = self._bias(m) if m.lora_bias else None
        return replace(
            m, kind=kind, base_key=key, bias_key=bias_key, layout=layout, position=position
        )

    def tokens(self, m: LoraModule, key: str, position: int) -> LoraModule:
        indices = token_indices(self.adapter, m.name, self.bad)
        shape = self.base[key].shape
        if len(shape) != 2 or shape[1] != m.in_features or max(indices, default=0) >= shape[0]:
            raise self.bad(
                f"trainable tokens of {m.name!r}: {len(indices)} rows of {m.in_features} for "
                f"token ids up to {max(indices, default=0)}, but {key!r} is {list(shape)}",
                "check that the adapter belongs to this base model",
            )
        return replace(m, base_key=key, layout="adapter", position=position, indices=indices)

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
        key, tied = self.resolve(s.module, s.param, f"saved tensor {s.key!r}")
        if tied and not s.base_copy:
            raise self.bad(
                f"saved tensor {s.key!r} is a trained copy (modules_to_save) of {s.module!r}, "
                f"which the base ties to {key!r}: PEFT unties them (writes both tensors and "
                f"tie_word_embeddings=false), which needs the model definition: {self.basis}",
                NEEDS_FACTS_HINT,
            )
        if self.base[key].shape != s.spec.shape:
            raise self.bad(
                f"saved tensor {s.key!r} has shape {list(s.spec.shape)}, but it replaces base "
                f"tensor {key!r} of shape {list(self.base[key].shape)}",
                "a resized vocabulary needs the resized base model",
            )
        return replace(s, base_key=key)

    def check_ties(self, bound: list[LoraModule], saved: list[SavedTensor]) -> None:
        """Refuse what only the model definition can tell about tied embeddings."""
        heads = [k for k in self.keys if is_output_head(k.rpartition(".")[0])]
        touched = {m.base_key for m in bound} | {s.base_key for s in saved}
        copies = [s for s in saved if not s.base_copy and s.base_key == self.embed_key]
        if self.tie is not False and not heads and copies:
            raise self.bad(
                f"saved tensor {copies[0].key!r} (modules_to_save) replaces the input embedding "
                "of a model whose head is tied to it: PEFT unties them, which needs the model "
                f"definition: {self.basis}",
                NEEDS_FACTS_HINT,
            )
        if self.tie is True and heads and self.embed_key and touched & {*heads, self.embed_key}:
            raise self.bad(
                f"config.json ties the head to {self.embed_key!r}, but the base also stores "
                f"{heads[0]!r}: transformers ties them only if the two are equal, which decides "
                f"where the adapter merges; that needs the model definition: {self.basis}",
                NEEDS_FACTS_HINT,
            )


def token_indices(adapter: Adapter, module: str, bad) -> tuple[int, ...]:
    """The token ids of ``module``'s trainable tokens, from ``trainable_token_indices``."""
    given = adapter.config.trainable_tokens
    matches = [k for k in given if k and (module == k or module.endswith("." + k))]
    if not matches and "" in given:
        matches = [""]
    if len(matches) != 1:
        raise bad(
            f"trainable tokens of {module!r}: adapter_config.json's trainable_token_indices "
            f"({dict(given) or None}) name "
            + ("no" if not matches else "several")
            + " token lists for it",
            "the config and the weights come from different adapters",
        )
    return given[matches[0]]


def bind_without_base(adapter: Adapter, layouts: Mapping[str, bool]) -> MergePlan:
    """The adapter's own deltas under ``<module>.weight`` (``lora-delta`` without a base).

    # subtle: with no base there is no weight to tell a GPT-2 Conv1D from a Linear: the
    # layout comes from --fan-in-fan-out patterns, else from adapter_config.json's
    # fan_in_fan_out, which PEFT saves as the last layer left it (``layout="adapter"``).
    """
    bad = complaint(adapter)
    if adapter.saved:
        raise bad(
            f"the adapter saves full tensors (e.g. {adapter.saved[0].key!r}); their delta "
            "needs the base",
            "pass the base model (--base)",
        )
    if adapter.config.target_parameters:
        raise bad("target_parameters: the experts' layout needs the base", "pass --base")
    bound = []
    for m in adapter.modules:
        if m.dora or m.kind == "tokens":
            what = "DoRA module" if m.dora else "trainable tokens of"
            raise bad(
                f"{what} {m.name!r}: its delta depends on the base weights",
                "pass the base model (--base)",
            )
        kind, layout = m.kind, "adapter fan_in_fan_out"
        if kind == "linear":
            given = layout_of(layouts, m.name)
            conv1d = adapter.config.fan_in_fan_out if given is None else given
            kind = "conv1d" if conv1d else "linear"
            layout = layout if given is None else "--fan-in-fan-out patterns"
        bias_key = f"{m.name}.bias" if m.lora_bias else None
        bound.append(
            replace(m, kind=kind, base_key=f"{m.name}.weight", bias_key=bias_key, layout=layout)
        )
    merges = build_merges(adapter, None, bound, [], bad)
    return plan_of(adapter, None, merges, bound, basis="the adapter alone (no base)")


def build_merges(adapter, base, bound, saved, bad) -> dict[str, TensorMerge]:
    """One :class:`TensorMerge` per base tensor the modules or saved tensors change."""
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
        st = sorted(steps.get(key, []), key=step_order)
        check_tokens(key, st, bad)
        if base is None:
            spec, m = None, st[0].module
            shape = (m.out_features,) if st[0].target == "bias" else delta_shape(m)
            dtype = torch.float32
        else:
            spec = base[key]
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
            base_name=key,
        )
    return merges


def check_tokens(key: str, steps: list[Step], bad) -> None:
    """Trainable tokens share a tensor with no other layer (PEFT wraps a module with one)."""
    if any(s.replaces_rows for s in steps) and len(steps) > 1:
        raise bad(
            f"{key!r}: trainable tokens and LoRA layers ({', '.join(s.module.name for s in steps)})"
            " change one tensor; their merge order is not checked against PEFT",
            "merge these adapters one at a time",
        )


def delta_shape(m: LoraModule) -> tuple[int, ...]:
    if m.kind in ("conv1d", "embedding"):
        return (m.in_features, m.out_features)
    if m.kind in ("nn_conv1d", "conv2d", "conv3d"):
        return (m.out_features, *m.specs["A"].shape[1:])
    return (m.out_features, m.in_features)
