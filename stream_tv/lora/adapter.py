"""A PEFT LoRA adapter on disk: its config and the header of its weights, no tensor data.

``Adapter.load(ref)`` reads ``adapter_config.json`` and the header of
``adapter_model.safetensors`` and describes every adapted module (:class:`LoraModule`) and
every full tensor saved with it (:class:`SavedTensor`). What those mean for a base model is
:mod:`stream_tv.lora.bind`'s business: ``adapter.bind(base)`` gives a
:class:`~stream_tv.lora.plan.MergePlan`.

Example (not run here)::

    adapter = Adapter.load("path/to/adapter")
    plan = adapter.bind(open_checkpoint("path/to/base"))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterError, StreamTVError
from ..io.index import Checkpoint, TensorSpec, check_finished, read_header
from .config import CONFIG_NAME, AdapterConfig, load_config
from .keys import parse_adapter_key

if TYPE_CHECKING:
    from .plan import MergePlan

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "*.json"]


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter.

    ``kind`` is the delta's maths. From the adapter alone: ``"linear"``, ``"embedding"``,
    ``"nn_conv1d"`` / ``"conv2d"`` / ``"conv3d"`` (torch convolutions, by the factors' rank)
    or ``"tokens"`` (``trainable_token_indices``). :meth:`Adapter.bind` settles the rest: a
    linear module stored ``(in, out)`` in the base (transformers' ``Conv1D``, GPT-2) becomes
    ``"conv1d"``, a LoRA on a 3-D ``nn.Parameter`` (``target_parameters``: MoE experts)
    ``"expert"``, on a 2-D one (a router) ``"param"``. ``keys`` maps ``A``, ``B``
    (``lora_A``/``lora_B`` or ``lora_embedding_A``/``_B``), ``magnitude`` (DoRA), ``bias``
    (``lora_B.bias``) and ``delta`` (trainable tokens) to adapter tensor names.

    Set by ``bind``: ``base_key`` (and ``bias_key`` with ``lora_bias``), ``layout`` (how the
    kind was decided), ``param`` (the model parameter it changes, when the model definition is
    known), ``position`` (its place in PEFT's merge order: model order), ``experts`` and
    ``transposed`` (an expert stack ``(E, in, out)``), ``indices`` (trainable tokens).
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
    param: str | None = None
    position: int = 0
    experts: int = 1
    transposed: bool = False
    indices: tuple[int, ...] = ()

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
        check_finished(path)
        weights = path / WEIGHTS_NAME
        # lexists, not is_file: a FIFO or a device there is refused by read_header as what
        # it is, not reported missing.
        if not os.path.lexists(weights):
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
        layouts: Mapping[str, bool] | None = None,
        stand_in: bool = False,
    ) -> MergePlan:
        """Map the adapter onto ``base`` and validate it from headers; see :class:`MergePlan`.

        With ``transformers`` installed and the base's ``config.json`` (``config``: that dict,
        read from the base directory when omitted) naming its class, every module's kind,
        layout, tying, dtype and the output's names come from the model definition
        (:mod:`stream_tv.lora.bind_facts`); otherwise from names and shapes, refusing what
        they cannot settle (:mod:`stream_tv.lora.bind_rules`). ``layouts`` maps module
        patterns to ``True`` (a GPT-2 Conv1D) or ``False`` (a Linear) for square weights the
        rules cannot settle. ``base=None`` plans the adapter's own deltas (``lora-delta``
        without a base): names are ``<module>.weight``; DoRA, trainable tokens and saved full
        tensors need a base and are refused. ``stand_in``: ``base`` is a task vector with the
        base's names and shapes (``compare``): tensors may be missing.
        """
        from .bind import bind_adapter

        return bind_adapter(self, base, config, layouts=layouts, stand_in=stand_in)


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
        if "trainable_tokens_delta" in p:
            modules.append(_tokens_module(name, p, tensors, bad))
        else:
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
    kind, in_f, out_f = _factor_shapes(name, emb, a_part, b_part, A.shape, B.shape, bad)
    r = A.shape[0]
    expected_r = config.rank_for(name)
    # subtle: a LoRA on an expert stack (target_parameters) has r * experts rows, and its r
    # comes from the parameter's name; bind checks it once it knows the parameter.
    if r != expected_r and not config.target_parameters:
        raise bad(
            f"module {name!r}: rank {r} in the weights, but adapter_config.json gives r="
            f"{expected_r} (field 'r' or 'rank_pattern')",
            "the config and the weights come from different adapters",
        )
    dora = "lora_magnitude_vector" in p
    has_bias = "lora_B_bias" in p
    _check_flags(name, dora, has_bias, kind, config, bad)
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


CONV_KINDS = {3: "nn_conv1d", 4: "conv2d", 5: "conv3d"}  # by the factors' number of dims


def _factor_shapes(name, emb, a_part, b_part, a, b, bad) -> tuple[str, int, int]:
    """The layer kind the factor shapes say, and its (in, out) features."""
    if emb:
        kind = "embedding"
        ok = len(a) == 2 and len(b) == 2 and a[0] == b[1]
    elif len(a) in CONV_KINDS:
        kind = CONV_KINDS[len(a)]
        ok = len(b) == len(a) and all(k == 1 for k in b[2:]) and a[0] == b[1]
    elif len(a) == 2:
        kind = "linear"
        ok = len(b) == 2 and a[0] == b[1]
    else:
        raise bad(
            f"module {name!r}: {a_part} has shape {list(a)}; LoRA factors have 2 dims (Linear, "
            "Conv1D, Embedding, parameters) or 3-5 (torch's Conv1d/Conv2d/Conv3d)"
        )
    if not ok:
        raise bad(
            f"module {name!r}: {a_part} {list(a)} and {b_part} {list(b)} do not "
            "form a rank-r product",
            "the adapter file is corrupt or was edited",
        )
    return kind, a[1], b[0]


def _check_flags(name, dora, has_bias, kind, config: AdapterConfig, bad) -> None:
    """DoRA and lora_bias tensors agree with the config."""
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


def _tokens_module(name, p: dict[str, str], tensors, bad) -> LoraModule:
    """``trainable_token_indices``: the rows written over an embedding (indices: at bind)."""
    if len(p) > 1:
        other = next(k for part, k in p.items() if part != "trainable_tokens_delta")
        raise bad(
            f"module {name!r} has trainable tokens and LoRA tensors ({other!r})",
            "PEFT does not combine both on one module",
        )
    key = p["trainable_tokens_delta"]
    shape = tensors[key].shape
    if len(shape) != 2:
        raise bad(f"{key!r} has shape {list(shape)}, expected [tokens, dim]")
    return LoraModule(
        name=name,
        kind="tokens",
        rank=0,
        alpha=0.0,
        scaling=1.0,
        in_features=shape[1],
        out_features=shape[0],
        dora=False,
        lora_bias=False,
        rslora=False,
        keys={"delta": key},
        specs={"delta": tensors[key]},
    )
