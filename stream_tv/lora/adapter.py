"""A PEFT LoRA adapter on disk, and its merge plan onto a base checkpoint.

``Adapter.load(ref)`` reads ``adapter_config.json`` and the header of
``adapter_model.safetensors`` (no tensor data) and describes every adapted module.
``adapter.bind(base)`` maps each module onto the base's tensors and checks everything that
headers can tell (keys, shapes, layouts, ties) before any tensor byte is read. The result,
a :class:`MergePlan`, holds one :class:`TensorMerge` per base tensor the adapter touches;
an engine streams each such tensor in row chunks through ``merge_rows`` (or ``delta_rows``).

Example (not run here)::

    adapter = Adapter.load("path/to/adapter")
    plan = adapter.bind(open_checkpoint("path/to/base"))
    tm = plan.merges["model.layers.0.self_attn.q_proj.weight"]
    tm.load("cpu")
    out = torch.empty_like(w)
    for start in range(0, tm.rows, 64):
        stop = min(start + 64, tm.rows)
        tm.merge_rows(w[start:stop], start, stop, out[start:stop])

Several adapters: ``MergePlan.combine([(plan_a, 0.7), (plan_b, 0.3)])``. A weight multiplies
an adapter's ``scaling``, exactly like PEFT's ``set_scale``/``scale_layer``. With
``precision="exact-peft"`` the adapters are applied one after the other with a rounding to the
weight dtype after each, which is what PEFT's ``merge_and_unload()`` does with several active
adapters (each layer merges them in order); ``precision="fp32"`` adds all deltas in float32
and rounds once, closer to ``base + sum(w_i * delta_i)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, StreamTVError
from ..io.index import Checkpoint, TensorSpec, read_header
from . import delta as D
from .config import CONFIG_NAME, AdapterConfig, load_config
from .keys import (
    base_key_for,
    input_embedding_key,
    is_output_head,
    parse_adapter_key,
    top_prefixes,
)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "*.json"]
PRECISIONS = ("exact-peft", "fp32")

# transformers models whose attention/MLP layers are ``Conv1D`` (weights stored (in, out)),
# and the module names that are Conv1D in them.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULE_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})

KINDS = ("linear", "conv1d", "embedding", "conv2d")


# --------------------------------------------------------------------------------------
# Adapter: what is on disk
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter.

    ``kind`` is ``"linear"``, ``"embedding"`` or ``"conv2d"`` from the adapter alone; after
    :meth:`Adapter.bind` a linear module stored ``(in, out)`` in the base (transformers'
    ``Conv1D``, GPT-2) has kind ``"conv1d"``. ``keys`` maps ``A``, ``B`` (``lora_A``/``lora_B``
    or ``lora_embedding_A``/``_B``), ``magnitude`` (DoRA) and ``bias`` (``lora_B.bias``) to
    adapter tensor names; ``base_key`` (and ``bias_key`` with ``lora_bias``) are set by
    ``bind``, with ``layout`` saying how a square weight's layout was decided.
    """

    name: str
    kind: str
    rank: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int
    dora: bool
    lora_bias: bool
    rslora: bool
    keys: dict[str, str]
    specs: dict[str, TensorSpec] = field(repr=False)
    base_key: str | None = None
    bias_key: str | None = None
    layout: str | None = None  # how the kind was decided at bind time

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind == "conv1d"


@dataclass(frozen=True)
class SavedTensor:
    """A full tensor saved in the adapter file, which replaces a base tensor.

    ``modules_to_save`` copies (``lm_head.weight``), embeddings PEFT saved with the adapter
    (``embed_tokens.base_layer.weight``), biases trained with ``bias="all"/"lora_only"``.
    """

    key: str  # adapter tensor name
    module: str
    param: str
    spec: TensorSpec = field(repr=False)
    base_key: str | None = None

    @property
    def base_copy(self) -> bool:
        """A copy of a base layer PEFT saved alongside (``...base_layer.weight``), as opposed
        to a trained ``modules_to_save`` module or bias."""
        return ".base_layer." in self.key


class Adapter:
    """A PEFT LoRA adapter: config, adapted modules and saved tensors, from headers only."""

    def __init__(
        self,
        path: Path,
        config: AdapterConfig,
        tensors: dict[str, TensorSpec],
        *,
        reference: str | None = None,
    ):
        self.path = path
        self.reference = reference or str(path)
        self.config = config
        self.tensors = tensors
        self.modules, self.saved = _describe(config, tensors, str(self.weights_file))

    def __repr__(self) -> str:
        return (
            f"Adapter({self.reference!r}, modules={len(self.modules)}, "
            f"saved={len(self.saved)}, r={self.config.r}, alpha={self.config.lora_alpha})"
        )

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME

    @classmethod
    def load(cls, reference: str | os.PathLike) -> Adapter:
        """Read an adapter directory (or Hub id): config and header, no tensor data."""
        from ..refs import resolve

        text = os.fspath(reference)
        path = resolve(text, patterns=ADAPTER_PATTERNS)
        if path.is_file():
            path = path.parent
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            if (path / PICKLE_NAME).is_file():
                raise AdapterError(
                    f"{PICKLE_NAME} is a pickle; only {WEIGHTS_NAME} is read",
                    where=str(path),
                    hint="convert it once: `PeftModel.from_pretrained(base, dir)"
                    ".save_pretrained(dir, safe_serialization=True)`, or "
                    "`safetensors.torch.save_file(torch.load(f, weights_only=True), "
                    f"dir + '/{WEIGHTS_NAME}')`",
                )
            raise AdapterError(
                f"no {WEIGHTS_NAME}",
                where=str(path),
                hint="an adapter directory holds adapter_config.json and "
                "adapter_model.safetensors, as written by `peft_model.save_pretrained(dir)`",
            )
        config = load_config(path / CONFIG_NAME)
        try:
            tensors = read_header(weights)
        except StreamTVError as e:
            raise AdapterError(e.message, where=e.where, hint=e.hint) from e
        return cls(path, config, tensors, reference=text)

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def module(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def bind(
        self,
        base: Checkpoint | None,
        *,
        config: dict[str, Any] | None = None,
    ) -> MergePlan:
        """Map the adapter onto ``base`` and validate it from headers; see :class:`MergePlan`.

        ``config`` is the base's ``config.json`` (read from the base directory when omitted):
        ``model_type`` decides the layout of square GPT-2 ``Conv1D`` weights and
        ``tie_word_embeddings`` whether a head LoRA merges into the input embedding.
        ``base=None`` plans the adapter's own deltas (``lora-delta`` without a base): names are
        ``<module>.weight``, layouts come from ``fan_in_fan_out``; DoRA and saved full tensors
        need a base and are refused.
        """
        return _bind(self, base, config)


def _describe(
    config: AdapterConfig, tensors: dict[str, TensorSpec], where: str
) -> tuple[list[LoraModule], list[SavedTensor]]:
    def bad(message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(message, where=where, hint=hint)

    parts: dict[str, dict[str, str]] = {}
    saved: list[SavedTensor] = []
    for key, spec in tensors.items():
        ak = parse_adapter_key(key)
        if ak.part == "unknown":
            hint = (
                "keys must not contain the adapter name; re-save with PEFT"
                if any(f".{p}." in key for p in ("lora_A", "lora_B"))
                else "only LoRA/DoRA tensors (lora_A, lora_B, lora_embedding_A/B, "
                "lora_magnitude_vector) and full tensors can be merged"
            )
            raise bad(f"adapter tensor {key!r} is not a LoRA tensor this tool understands", hint)
        if not spec.is_float:
            raise bad(f"adapter tensor {key!r} has dtype {spec.dtype_str}, not a float type")
        if ak.part == "full":
            saved.append(SavedTensor(key, ak.module, ak.param or "weight", spec))
            continue
        slot = parts.setdefault(ak.module, {})
        if ak.part in slot:
            raise bad(f"module {ak.module!r} has two {ak.part} tensors: {slot[ak.part]!r}, {key!r}")
        slot[ak.part] = key

    modules = []
    for name, p in parts.items():
        modules.append(_module(name, p, tensors, config, bad))
    if not modules and not saved:
        raise bad("the adapter file holds no tensors")
    return modules, saved


def _module(name, p: dict[str, str], tensors, config: AdapterConfig, bad) -> LoraModule:
    emb = "lora_embedding_A" in p or "lora_embedding_B" in p
    lin = "lora_A" in p or "lora_B" in p
    if emb and lin:
        raise bad(f"module {name!r} has both lora_A/B and lora_embedding_A/B tensors")
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
    for part in (a_part, b_part):
        if part not in p:
            other = p.get(b_part if part == a_part else a_part) or next(iter(p.values()))
            raise bad(
                f"module {name!r} has no {part} tensor (found {other!r})",
                "the adapter file is incomplete; re-save it with PEFT",
            )
    A, B = tensors[p[a_part]], tensors[p[b_part]]
    if emb:
        kind = "embedding"
        ok = len(A.shape) == 2 and len(B.shape) == 2 and A.shape[0] == B.shape[1]
        in_f, out_f = (A.shape[1], B.shape[0]) if ok else (0, 0)
    elif len(A.shape) == 4:
        kind = "conv2d"
        ok = len(B.shape) == 4 and B.shape[2:] == (1, 1) and A.shape[0] == B.shape[1]
        in_f, out_f = (A.shape[1], B.shape[0]) if ok else (0, 0)
    elif len(A.shape) == 2:
        kind = "linear"
        ok = len(B.shape) == 2 and A.shape[0] == B.shape[1]
        in_f, out_f = (A.shape[1], B.shape[0]) if ok else (0, 0)
    else:
        raise bad(
            f"module {name!r}: {a_part} has shape {list(A.shape)}; only Linear, Conv1D, "
            "Embedding and Conv2d LoRA layers are supported (not Conv1d/Conv3d)"
        )
    if not ok:
        raise bad(
            f"module {name!r}: {a_part} {list(A.shape)} and {b_part} {list(B.shape)} do not "
            "form a rank-r product",
            "the adapter file is corrupt or was edited",
        )
    r = A.shape[0]
    expected_r = config.rank_for(name)
    if r != expected_r:
        raise bad(
            f"module {name!r}: rank {r} in the weights, but adapter_config.json gives r="
            f"{expected_r} (field 'r' or 'rank_pattern')",
            "the config and the weights come from different adapters",
        )
    dora = "lora_magnitude_vector" in p
    if dora != config.use_dora:
        if dora:
            raise bad(
                f"module {name!r} has a lora_magnitude_vector but use_dora is false",
                "set use_dora in adapter_config.json, or remove the DoRA tensors",
            )
        raise bad(
            f"module {name!r} has no lora_magnitude_vector but use_dora is true",
            "the DoRA magnitude was not saved; re-save the adapter with PEFT",
        )
    has_bias = "lora_B_bias" in p
    if has_bias != config.lora_bias:
        raise bad(
            f"module {name!r}: "
            + (
                "has a lora_B.bias but lora_bias is false"
                if has_bias
                else "lora_bias is true but there is no lora_B.bias"
            ),
            "the config and the weights disagree; re-save the adapter with PEFT",
        )
    if has_bias and kind == "embedding":
        raise bad(f"module {name!r}: lora_bias on an Embedding (PEFT does not support it)")
    if has_bias and tuple(tensors[p["lora_B_bias"]].shape) != (out_f,):
        raise bad(
            f"module {name!r}: lora_B.bias has shape {list(tensors[p['lora_B_bias']].shape)}, "
            f"expected [{out_f}]"
        )
    keys = {"A": p[a_part], "B": p[b_part]}
    if dora:
        keys["magnitude"] = p["lora_magnitude_vector"]
    if has_bias:
        keys["bias"] = p["lora_B_bias"]
    return LoraModule(
        name=name,
        kind=kind,
        rank=r,
        alpha=config.alpha_for(name),
        scaling=config.scaling_for(name),
        in_features=in_f,
        out_features=out_f,
        dora=dora,
        lora_bias=has_bias,
        rslora=config.use_rslora,
        keys=keys,
        specs={k: tensors[v] for k, v in keys.items()},
    )


# --------------------------------------------------------------------------------------
# bind: adapter + base headers -> MergePlan
# --------------------------------------------------------------------------------------


def _read_model_config(base: Checkpoint | None) -> dict[str, Any]:
    if base is None or base.root is None:
        return {}
    path = Path(base.root) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _tie_setting(config: dict[str, Any]) -> bool | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            return bool(c["tie_word_embeddings"])
    return None


def _bind(adapter: Adapter, base: Checkpoint | None, config: dict[str, Any] | None) -> MergePlan:
    where = adapter.reference

    def bad(message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(message, where=where, hint=hint)

    if base is None:
        return _bind_without_base(adapter, bad)

    model_config = config if config is not None else _read_model_config(base)
    model_type = str(model_config.get("model_type") or "").lower()
    tie = _tie_setting(model_config)
    base_keys = base.tensors.keys()
    prefixes = top_prefixes(base_keys)
    embed_key = input_embedding_key(base_keys)

    def resolve(module: str, param: str, what: str) -> tuple[str, bool]:
        key = base_key_for(module, param, base_keys, prefixes=prefixes)
        if key is not None:
            return key, False
        if param == "weight" and is_output_head(module):
            if tie is False:
                raise bad(
                    f"{what} targets {module!r}, but the base has no {module}.weight and its "
                    "config.json says tie_word_embeddings=false",
                    "the base checkpoint is incomplete, or belongs to another model",
                )
            if embed_key is None:
                raise bad(
                    f"{what} targets {module!r}, which the base has neither as "
                    f"{module}.weight nor as a tied input embedding",
                    "check that the adapter belongs to this base model",
                )
            return embed_key, True
        sample = ", ".join(sorted(base_keys)[:3])
        raise bad(
            f"{what} targets {module!r}, but the base has no tensor {module}.{param} "
            f"(nor without/with a top prefix; base keys look like {sample}, ...)",
            "check that the adapter belongs to this base model",
        )

    # Pass 1: layouts of non-square linear modules, as evidence for square ones.
    bound: list[LoraModule] = []
    conv1d_seen = linear_seen = False
    pending: list[tuple[LoraModule, str, bool]] = []
    for m in adapter.modules:
        key, tied = resolve(m.name, "weight", f"LoRA module {m.name!r}")
        pending.append((m, key, tied))
        if m.kind == "linear" and m.in_features != m.out_features:
            shape = base[key].shape
            conv1d_seen |= shape == (m.in_features, m.out_features)
            linear_seen |= shape == (m.out_features, m.in_features)

    for m, key, tied in pending:
        spec = base[key]
        if not spec.is_float:
            raise bad(
                f"LoRA module {m.name!r}: base tensor {key!r} has dtype {spec.dtype_str}",
                "quantised bases cannot be merged exactly; use an unquantised base",
            )
        kind, layout = m.kind, "shape"
        if m.kind == "linear":
            kind, layout = _linear_layout(
                m, spec, model_type, adapter.config, conv1d_seen, linear_seen, tied, bad
            )
        elif m.kind == "embedding":
            if spec.shape != (m.in_features, m.out_features):
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
        bias_key = None
        if m.lora_bias:
            bias_key = base_key_for(m.name, "bias", base_keys, prefixes=prefixes)
            if bias_key is None:
                raise bad(
                    f"LoRA module {m.name!r} has lora_bias, but the base has no {m.name}.bias",
                    "PEFT cannot merge lora_bias into a layer without bias either",
                )
            if base[bias_key].shape != (m.out_features,):
                raise bad(
                    f"LoRA module {m.name!r}: base bias {bias_key!r} is "
                    f"{list(base[bias_key].shape)}, lora_B.bias is [{m.out_features}]"
                )
        bound.append(replace(m, kind=kind, base_key=key, bias_key=bias_key, layout=layout))

    saved: list[SavedTensor] = []
    for s in adapter.saved:
        key, _ = resolve(s.module, s.param, f"saved tensor {s.key!r}")
        if base[key].shape != s.spec.shape:
            raise bad(
                f"saved tensor {s.key!r} has shape {list(s.spec.shape)}, but it replaces base "
                f"tensor {key!r} of shape {list(base[key].shape)}",
                "a resized vocabulary needs the resized base model",
            )
        saved.append(replace(s, base_key=key))

    merges = _build_merges(adapter, base, bound, saved, bad)
    return MergePlan(
        base=base,
        merges=merges,
        untouched=[k for k in base.tensors if k not in merges],
        adapters=[(adapter, 1.0)],
        modules=bound,
    )


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


def _step_order(step: Step) -> tuple[int, int]:
    # PEFT merges module by module in model order; the only tensors that several modules
    # touch are tied embeddings, where the input embedding comes first and the head last.
    return (1 if is_output_head(step.module.name) else 0, step.adapter_index)


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
        st = sorted(steps.get(key, []), key=_step_order)
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
            steps=st,
        )
        merges[key].validate()
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


# --------------------------------------------------------------------------------------
# Step: one module's contribution to one base tensor
# --------------------------------------------------------------------------------------


class Step:
    """One LoRA layer's contribution to one base tensor (its weight, or its bias).

    ``weight`` multiplies the module's scaling (``MergePlan.combine``).
    """

    def __init__(
        self,
        module: LoraModule,
        target: str,
        adapter: Adapter,
        weight: float = 1.0,
        adapter_index: int = 0,
    ):
        self.module = module
        self.target = target  # "weight" | "bias"
        self.adapter = adapter
        self.weight = weight
        self.adapter_index = adapter_index
        self.t: dict[str, torch.Tensor] = {}
        self.cache: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        w = "" if self.weight == 1.0 else f", weight={self.weight}"
        return f"Step({self.module.name!r}, {self.kind}, {self.target}{w})"

    def with_weight(self, weight: float, adapter_index: int) -> Step:
        return Step(self.module, self.target, self.adapter, self.weight * weight, adapter_index)

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

    def load(self, device, handle) -> None:
        if self.t:
            return
        for name, key in self.module.keys.items():
            self.t[name] = handle(key).to(device=device, dtype=torch.float32)

    def unload(self) -> None:
        self.t.clear()
        self.cache.clear()

    def delta(self, start: int, stop: int, dtype=torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` of this step's low-rank delta (with scaling), in ``dtype``.

        float32 reproduces PEFT's bits; float64 is a reference-quality product.
        """
        t = self.t
        s = self.scaling
        if self.target == "bias":
            return t["bias"][start:stop].to(dtype) * s
        A, B = t["A"], t["B"]
        if dtype != torch.float32:
            A, B = A.to(dtype), B.to(dtype)
            cache = None
        else:
            cache = self.cache
        kind = self.module.kind
        if kind == "linear":
            return D.linear_delta_rows(A, B, s, start, stop)
        if kind == "conv1d":
            return D.linear_delta_rows(A, B, s, start, stop, fan_in_fan_out=True)
        if kind == "embedding":
            return D.embedding_delta_rows(A, B, s, start, stop)
        return D.conv2d_delta_rows(A, B, s, start, stop, cache=cache)

    def magnitude(self, start: int | None = None, stop: int | None = None, dtype=torch.float32):
        m = self.t["magnitude"].reshape(-1).to(dtype)
        return m if start is None else m[start:stop]


# --------------------------------------------------------------------------------------
# TensorMerge: everything the engine needs for one output tensor
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class TensorMerge:
    """How one base tensor changes: an optional replacement, then LoRA steps in PEFT order.

    Rows are dim 0 of the tensor as stored (for a 1-D bias, its elements). The engine reads
    ``merge_inputs`` in aligned row chunks and calls, for each chunk, ``merge_rows`` (after a
    ``prepass`` over all chunks, in order, when ``passes == 2``).
    """

    key: str
    spec: TensorSpec | None  # the base tensor (None when planning deltas without a base)
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype: the base tensor's
    replacement: TensorSpec | None = None
    replacement_is_base_copy: bool = False
    steps: list[Step] = field(default_factory=list)
    _acc: D.SquaresAccumulator | None = field(default=None, repr=False)
    _device: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        rep = f", replacement={self.replacement.name!r}" if self.replacement else ""
        return f"TensorMerge({self.key!r}, steps={self.steps}{rep}, passes={self.passes})"

    # ---- description -------------------------------------------------------------------

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

    def validate(self) -> None:
        two = [i for i, s in enumerate(self.steps) if s.two_pass]
        if len(two) > 1:
            names = ", ".join(self.steps[i].module.name for i in two)
            raise AdapterError(
                f"{self.key!r}: several DoRA layers normalising over its rows ({names}) would "
                "need more than two passes",
                hint="merge these adapters one at a time",
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
                    hint="merge with --precision fp32 (precision='fp32'), or put the DoRA adapter first",
                )
            seen.add(s.module.name)

    # ---- factors -------------------------------------------------------------------------

    def load(self, device="cpu") -> None:
        """Load the small factors (A, B, magnitude, bias) to ``device`` as float32, once."""
        if all(s.t for s in self.steps):
            return
        from safetensors import safe_open

        device = torch.device(device)
        self._device = device
        by_file: dict[Path, list[Step]] = {}
        for s in self.steps:
            by_file.setdefault(s.adapter.weights_file, []).append(s)
        for path, steps in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for s in steps:
                    s.load(device, f.get_tensor)

    def unload(self) -> None:
        for s in self.steps:
            s.unload()
        self._acc = None

    # ---- streaming -----------------------------------------------------------------------

    def _source(self, w_rows: torch.Tensor) -> torch.Tensor:
        # A replacement is copied into the base parameter (PEFT's load_state_dict): cast.
        return w_rows if w_rows.dtype == self.dtype else w_rows.to(self.dtype)

    def _apply(self, x: torch.Tensor, steps, start, stop, exact: bool, norms=None):
        """Apply ``steps`` to rows ``x`` (weight dtype); float32 state when not ``exact``."""
        cur = x if exact else x.to(_acc_dtype(self.dtype))
        for s in steps:
            d = s.delta(start, stop)
            if s.dora:
                v = cur + d
                if s.two_pass:
                    norm = norms if norms is not None else self._norm()
                    new = D.dora_merge_rows(cur, d, s.magnitude(), norm, along_rows=False)
                else:
                    norm = D.dora_row_norm(v)
                    new = D.dora_merge_rows(cur, d, s.magnitude(start, stop), norm, along_rows=True)
                cur = new.to(self.dtype) if exact else new
            elif exact:
                out = torch.empty(cur.shape, dtype=self.dtype, device=cur.device)
                if s.rounds_twice:
                    cur = D.add_rounding_twice(cur, d, out)
                else:
                    cur = D.add_rounding_once(cur, d, out)
            else:
                cur = cur + d
        return cur

    def _norm(self) -> torch.Tensor:
        if self._acc is None or self._acc.rows_seen != self.rows:
            seen = 0 if self._acc is None else self._acc.rows_seen
            raise RuntimeError(
                f"{self.key}: the DoRA prepass saw {seen} of {self.rows} rows; run it over all "
                "rows, in order, before merge_rows/delta_rows"
            )
        return self._acc.norm()

    def prepass(
        self, w_rows: torch.Tensor, start: int, stop: int, *, precision: str = "exact-peft"
    ) -> None:
        """Pass 1 of 2: accumulate DoRA's column norms. Chunks must come in row order."""
        k = next((i for i, s in enumerate(self.steps) if s.two_pass), None)
        if k is None:
            return
        if start == 0:
            self._acc = D.SquaresAccumulator(self.shape[1], device=w_rows.device)
        if self._acc is None:
            raise RuntimeError(f"{self.key}: the DoRA prepass must start at row 0")
        x = self._source(w_rows)
        step = self.steps[k]
        cur = self._apply(x, self.steps[:k], start, stop, precision == "exact-peft")
        v = cur + step.delta(start, stop)
        v64 = cur.double() + step.delta(start, stop, torch.float64)
        self._acc.update(v, start, stop, v64)

    def merge_rows(
        self,
        w_rows: torch.Tensor,
        start: int,
        stop: int,
        out: torch.Tensor,
        *,
        precision: str = "exact-peft",
    ) -> torch.Tensor:
        """Merged rows ``[start, stop)`` written into ``out`` (the output dtype) and returned.

        ``w_rows`` are the rows of ``merge_inputs[0]`` (the replacement if any, else the base).
        ``exact-peft`` rounds where PEFT rounds; ``fp32`` keeps the running weight in float32
        through all steps and rounds once.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        x = self._source(w_rows)
        if not self.steps:
            out.copy_(x)
            return out
        exact = precision == "exact-peft"
        if exact and len(self.steps) == 1 and not self.steps[0].dora:
            s = self.steps[0]
            d = s.delta(start, stop)
            if s.rounds_twice:
                return D.add_rounding_twice(x, d, out)
            return D.add_rounding_once(x, d, out)
        out.copy_(self._apply(x, self.steps, start, stop, exact))
        return out

    def delta_rows(
        self,
        start: int,
        stop: int,
        *,
        w_rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The LoRA layers' effective delta on rows ``[start, stop)``, unrounded, in ``dtype``.

        Plain LoRA: ``sum(scaling * B @ A)`` (float32: PEFT's own delta bits; float64: a
        reference product); ``w_rows`` is not needed. DoRA (:attr:`needs_base`) needs the rows
        the steps apply to (``w_rows``: the replacement if any, else the base) and, for
        Embedding/Conv1D, the prepass: its delta is ``m / ||W + D|| * (W + D) - W``. A saved
        replacement is not included: a replaced tensor's total change is
        ``replacement - base + delta_rows(...)``.
        """
        shape = (stop - start, *self.shape[1:])
        cur = None
        if self.needs_base:
            if w_rows is None:
                raise ValueError(f"{self.key}: a DoRA delta needs the weight rows (w_rows)")
            cur = self._source(w_rows).to(dtype)
        total = None
        for s in self.steps:
            d = s.delta(start, stop, dtype)
            if s.dora:
                if s.two_pass:
                    self._norm()  # raises unless the prepass saw every row
                    norm = self._acc.norm() if dtype == torch.float32 else self._acc.norm64()
                    new = D.dora_merge_rows(
                        cur, d, s.magnitude(dtype=dtype), norm.to(dtype), along_rows=False
                    )
                else:
                    v = cur + d
                    norm = (
                        D.dora_row_norm(v)
                        if dtype == torch.float32
                        else torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
                    )
                    new = D.dora_merge_rows(
                        cur, d, s.magnitude(start, stop, dtype), norm, along_rows=True
                    )
                d = new - cur
            if cur is not None:
                cur = cur + d
            total = d if total is None else total + d
        if total is None:
            device = w_rows.device if w_rows is not None else self._device
            total = torch.zeros(shape, dtype=dtype, device=device)
        return total.reshape(shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# MergePlan
# --------------------------------------------------------------------------------------


@dataclass
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

    @property
    def passes(self) -> int:
        return max((t.passes for t in self.merges.values()), default=1)

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
        merges: dict[str, TensorMerge] = {}
        order = list(base.tensors) if base is not None else []
        for plan, _ in items:
            order += [k for k in plan.merges if k not in order]
        for key in order:
            parts = [
                (i, plan.merges[key], w) for i, (plan, w) in enumerate(items) if key in plan.merges
            ]
            if not parts:
                continue
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
            steps = [s.with_weight(w, i) for i, t, w in parts for s in t.steps]
            steps.sort(key=_step_order)
            first = parts[0][1]
            tm = TensorMerge(
                key=key,
                spec=first.spec,
                shape=first.shape,
                dtype=first.dtype,
                replacement=reps[-1][1].replacement if reps else None,
                replacement_is_base_copy=reps[-1][1].replacement_is_base_copy if reps else False,
                steps=steps,
            )
            tm.validate()
            merges[key] = tm
        return cls(
            base=base,
            merges=merges,
            untouched=[k for k in (base.tensors if base is not None else []) if k not in merges],
            adapters=[(a, aw * w) for plan, w in items for a, aw in plan.adapters],
            modules=[m for plan, _ in items for m in plan.modules],
        )
