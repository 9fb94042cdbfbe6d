"""Facts about a model from its own ``transformers`` definition, built on the meta device.

Every silent merge bug so far came from guessing a layer's kind or tying from names and
shapes. This module asks the model class itself: it builds the class named in the base's
``config.json`` (``architectures``) on the meta device, exactly as ``from_pretrained`` does
before it loads weights (no memory, no weights: a 70B Llama builds in under a second once
transformers has imported its modeling module), and reads, per module path as PEFT sees it
(``model.named_modules()``):

- the module's kind, by the ``isinstance`` checks PEFT's LoRA dispatcher makes
  (:data:`KINDS`), and its weight shape;
- which parameters are tied to which (``all_tied_weights_keys``: the class's
  ``_tied_weights_keys`` filtered by each (sub)config's ``tie_word_embeddings``);
- the dtype each parameter loads in (``_keep_in_fp32_modules`` applies to float16 loads,
  ``_keep_in_fp32_modules_strict`` to float16 and bfloat16, parameters the class creates in
  another dtype keep it);
- the parameters that are not a weight or bias of a layer PEFT can wrap (MoE experts' stacked
  weights, routers): what PEFT's ``target_parameters`` targets;
- with the base's tensor names: the checkpoint key -> parameter mapping the class applies on
  load (renamings such as ``block_sparse_moe.`` -> ``mlp.``, an added or dropped
  ``base_model_prefix`` such as GPT-2's ``transformer.``, per-expert tensors merged into one
  stacked parameter), the keys the class drops, the parameters the checkpoint lacks, and the
  names ``save_pretrained`` writes each parameter under.

Without ``transformers`` (``pip install stream-tv[transformers]``) or without a
``config.json`` there are no facts: :func:`read_model_facts` returns a falsy
:class:`NoFacts` with the reason, and a caller falls back to name/shape rules, refusing the
layouts shapes cannot settle (:func:`ambiguous_layouts`). A model that has a config but cannot
be built raises :class:`ModelDefinitionError`: the facts are never guessed.

Example (not run here)::

    facts = read_model_facts(load_checkpoint("path/to/gpt2-base"))
    if facts:
        facts.modules["transformer.h.0.attn.c_proj"].kind     # 'conv1d' (square, (in, out))
        facts.tied                                           # {'lm_head.weight': 'transformer.wte.weight'}
        facts.param_of_key["h.0.attn.c_proj.weight"]         # KeySlice('transformer.h.0.attn.c_proj.weight')
    else:
        print(facts.reason)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..errors import AdapterError, ModelDefinitionError
from ..io.index import Checkpoint, dtype_name, load_checkpoint
from . import facts_cache

CONFIG_NAME = "config.json"
MIN_TRANSFORMERS = (5, 0)

# Kinds, in the order PEFT's ``dispatch_default`` tests them (peft/tuners/lora/layer.py).
# subtle: "conv1d" is transformers' GPT-2 ``Conv1D`` (a linear layer whose weight is stored
# (in, out): PEFT forces fan_in_fan_out=True), as in the rest of stream_tv; torch's
# ``nn.Conv1d`` is "nn_conv1d".
KINDS = (
    "embedding",  # nn.Embedding
    "conv2d",  # nn.Conv2d
    "conv3d",  # nn.Conv3d
    "nn_conv1d",  # nn.Conv1d
    "multihead_attention",  # nn.MultiheadAttention
    "linear",  # nn.Linear (and subclasses)
    "conv1d",  # transformers.pytorch_utils.Conv1D
    "other",  # anything else with parameters: norms, routers, MoE expert stacks, ...
)


# --------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoFacts:
    """No model definition to read (falsy). ``reason`` says why, ``hint`` how to get one."""

    reason: str
    hint: str = ""

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class KeySlice:
    """Where one checkpoint tensor lands in a model parameter.

    ``param[expert]`` (when ``expert`` is set) narrowed along ``dim`` to ``[start, stop)``
    (when ``dim`` is set) is the checkpoint tensor. A plain (possibly renamed) key has neither.
    ``ops`` names the conversion applied on load (empty for a rename); ``exact`` is false when
    the conversion is not one of the understood ones (the slice fields are then unset and a
    caller must refuse the key rather than guess).

    >>> KeySlice("model.layers.0.mlp.experts.gate_up_proj", expert=1, dim=0, start=48, stop=96)
    KeySlice('model.layers.0.mlp.experts.gate_up_proj'[1, dim 0: 48..96])
    """

    param: str
    expert: int | None = None
    dim: int | None = None
    start: int | None = None
    stop: int | None = None
    ops: tuple[str, ...] = ()
    exact: bool = True

    def __repr__(self) -> str:
        where = ""
        if self.expert is not None:
            where += f"[{self.expert}"
        if self.dim is not None:
            where += (", " if where else "[") + f"dim {self.dim}: {self.start}..{self.stop}"
        where += "]" if where else ""
        extra = "" if self.exact else f", ops={list(self.ops)}, exact=False"
        return f"KeySlice({self.param!r}{where}{extra})"

    @property
    def renamed_only(self) -> bool:
        return not self.ops


@dataclass(frozen=True)
class ParamFact:
    """One parameter (or persistent buffer) of the model, by its name in the model.

    ``dtype`` is the dtype it has after ``from_pretrained(..., dtype=<facts.dtype>)``;
    ``bare`` says it is not the weight/bias of a layer PEFT wraps as a module (its module is
    of kind ``"other"``: a router, a stacked expert tensor, a norm); ``tied_to`` names the
    parameter it is tied to (this one is the tie *target*, absent from saved checkpoints).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    module: str
    attr: str
    bare: bool
    buffer: bool = False
    tied_to: str | None = None

    def __repr__(self) -> str:
        tie = f", tied_to={self.tied_to!r}" if self.tied_to else ""
        return f"ParamFact({self.name!r}, {list(self.shape)}, {dtype_name(self.dtype)}{tie})"


@dataclass(frozen=True)
class ModuleFact:
    """One module that owns parameters, by its path in ``model.named_modules()``.

    ``kind`` is one of :data:`KINDS`; ``cls`` the module's qualified class name;
    ``weight_shape`` the shape of its ``weight`` as the model stores it (a Conv1D's is
    ``(in, out)``), ``None`` without one; ``params`` its direct parameters' full names;
    ``aliases`` other paths under which the same module object is reachable (PEFT only sees the
    first path, ``named_modules()`` removes duplicates).
    """

    path: str
    kind: str
    cls: str
    weight_shape: tuple[int, ...] | None
    bias_shape: tuple[int, ...] | None
    params: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    transposed: bool = False  # ``is_transposed``: a 3-D expert stack stored (E, in, out)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether PEFT merges ``B @ A`` transposed (it forces this for ``Conv1D`` only)."""
        return self.kind == "conv1d"

    def __repr__(self) -> str:
        shape = list(self.weight_shape) if self.weight_shape is not None else None
        return f"ModuleFact({self.path!r}, {self.kind}, weight={shape})"


@dataclass(frozen=True)
class TiePair:
    """``target`` is tied to ``source`` (model parameter names) and what the checkpoint holds.

    ``status``: ``"source"`` (only the source is stored: the usual tied checkpoint),
    ``"target"`` (only the target is stored: transformers ties the other way, the stored tensor
    feeds both), ``"both"`` (both stored: transformers ties them **only if the two tensors are
    equal**, else it keeps them apart and warns; the values decide, not the config),
    ``"neither"`` (the checkpoint is incomplete), ``"unknown"`` (no checkpoint given).
    """

    target: str
    source: str
    status: str = "unknown"


@dataclass(frozen=True)
class ModelFacts:
    """What ``transformers`` itself says about a base model; see the module docstring.

    Mappings are read-only. ``modules`` and ``params`` use the model's names (what PEFT's
    adapter keys use, after ``base_model.model.``); ``param_of_key`` maps the checkpoint's
    names onto them. The checkpoint fields are empty when no checkpoint was given.
    """

    architecture: str
    model_type: str
    transformers_version: str
    dtype: torch.dtype
    dtype_source: str
    base_model_prefix: str
    modules: Mapping[str, ModuleFact]
    params: Mapping[str, ParamFact]
    tied: Mapping[str, str]  # target -> source
    tie_word_embeddings: Mapping[str, bool | None]  # (sub)model path ("" = top) -> config value
    keep_in_fp32: frozenset[str]
    keep_in_fp32_strict: frozenset[str]
    input_embeddings: str | None
    output_embeddings: str | None
    conversions: tuple[str, ...]  # repr of each transform the class registers for loading
    # with a checkpoint:
    ties: tuple[TiePair, ...] = ()
    param_of_key: Mapping[str, KeySlice] = field(default_factory=lambda: MappingProxyType({}))
    keys_of_param: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    unexpected_keys: tuple[str, ...] = ()  # checkpoint keys the class drops on load
    missing_params: tuple[str, ...] = ()  # params neither in the checkpoint nor tied to one
    saved_as: Mapping[str, tuple[str, ...] | None] = field(
        default_factory=lambda: MappingProxyType({})
    )
    conversions_used: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"ModelFacts({self.architecture}, model_type={self.model_type!r}, "
            f"dtype={dtype_name(self.dtype)}, modules={len(self.modules)}, "
            f"params={len(self.params)}, tied={dict(self.tied)})"
        )

    # ---- questions a binding asks -------------------------------------------------------

    def module(self, path: str) -> ModuleFact:
        """The module at ``path`` (a PEFT module name); raises ``KeyError`` with close names."""
        try:
            return self.modules[path]
        except KeyError:
            tail = path.rpartition(".")[2]
            close = [p for p in self.modules if p.endswith("." + tail) or p == tail][:3]
            raise KeyError(
                f"{path!r} is not a module of {self.architecture} (close: {close})"
            ) from None

    def kind_of(self, path: str) -> str:
        return self.module(path).kind

    def tied_source(self, param: str) -> str | None:
        """The parameter ``param`` is tied to (``None`` if it is not a tie target)."""
        return self.tied.get(param)

    def tie_group(self, param: str) -> tuple[str, ...]:
        """Every parameter sharing storage with ``param`` once tied, source first."""
        source = self.tied.get(param, param)
        targets = sorted(t for t, s in self.tied.items() if s == source)
        return (source, *targets) if targets or param == source else (param,)

    def stored_as(self, param: str) -> tuple[str, ...]:
        """The checkpoint keys whose data ``param`` holds after loading, following ties.

        A tie target the checkpoint lacks (status ``"source"``) holds its source's data; a
        source the checkpoint lacks (``"target"``) holds the target's. With ``"both"`` each
        keeps its own keys here, and the two are one tensor only if their values are equal
        (compare them before relying on either).
        """
        own = self.keys_of_param.get(param, ())
        if own:
            return own
        for pair in self.ties:
            if pair.target == param and pair.status == "source":
                return self.keys_of_param.get(pair.source, ())
            if pair.source == param and pair.status == "target":
                return self.keys_of_param.get(pair.target, ())
        return ()

    def dtype_of(self, param: str) -> torch.dtype:
        return self.params[param].dtype

    @property
    def target_parameters(self) -> tuple[str, ...]:
        """Parameters PEFT can only reach through ``target_parameters`` (``bare`` ones, 2-D/3-D)."""
        return tuple(
            n for n, p in self.params.items() if p.bare and not p.buffer and len(p.shape) in (2, 3)
        )

    def modules_of_kind(self, *kinds: str) -> list[str]:
        bad = set(kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown kinds {sorted(bad)}; kinds are {KINDS}")
        return [p for p, m in self.modules.items() if m.kind in kinds]


# --------------------------------------------------------------------------------------
# Reading the facts
# --------------------------------------------------------------------------------------


def transformers_install() -> tuple[facts_cache.TransformersInstall | None, str | None]:
    """The transformers that would read the facts, found without importing it (``import
    transformers`` alone costs half an ``import torch``), or ``(None, reason)``."""
    install = facts_cache.installed_transformers()
    if install is None:
        return None, "transformers is not installed"
    if tuple(int(x) for x in re.findall(r"\d+", install.version)[:2]) < MIN_TRANSFORMERS:
        return None, (
            f"transformers {install.version} is older than "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))}: its tied-weight and conversion rules "
            "differ from the ones PEFT 0.21 merges with"
        )
    return install, None


def read_model_facts(
    base: Checkpoint | str | os.PathLike | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str = "auto",
    architecture: str | None = None,
) -> ModelFacts | NoFacts:
    """Facts about ``base`` from its ``transformers`` class, or :class:`NoFacts` (falsy).

    ``base`` is a :class:`Checkpoint` or a local directory (its ``config.json`` and, when there
    are any, its safetensors headers are read; no tensor data), or ``None`` with ``config``
    (the parsed ``config.json``) for facts without checkpoint mapping. ``dtype`` is the dtype
    the model is loaded in, as ``from_pretrained(dtype=...)`` takes it: ``"auto"`` (what PEFT
    users get by default in transformers 5) resolves like transformers does, from the config's
    ``dtype``/``torch_dtype`` and else from the first floating tensor of the first shard.
    ``architecture`` overrides the config's ``architectures[0]`` (the class PEFT wrapped).

    Returns :class:`NoFacts` when transformers (>= 5) is missing or there is no config; raises
    :class:`ModelDefinitionError` when there is a config whose class cannot be built.
    """
    install, why = transformers_install()
    checkpoint = _as_checkpoint(base)
    where = checkpoint.reference if checkpoint is not None else (str(base) if base else "config")
    if install is None:
        return NoFacts(why, "pip install 'stream-tv[transformers]'")
    if config is None:
        config = _read_config_json(checkpoint, base)
        if config is None:
            return NoFacts(
                f"{where}: no {CONFIG_NAME}",
                f"put the base model's {CONFIG_NAME} next to its safetensors files",
            )
    # the facts are a pure function of these inputs: read them once per model (facts_cache)
    key = facts_cache.cache_key(install, config, dtype, architecture, checkpoint)
    facts = facts_cache.load(key)
    if facts is None:
        import transformers as tf

        facts = _build_facts(tf, dict(config), checkpoint, dtype, architecture, where)
        facts_cache.store(key, facts)
    return facts


def _as_checkpoint(base) -> Checkpoint | None:
    if base is None or isinstance(base, Checkpoint):
        return base
    p = Path(base)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        return None
    return load_checkpoint(p)


def _read_config_json(checkpoint: Checkpoint | None, base) -> dict[str, Any] | None:
    root = checkpoint.root if checkpoint is not None else None
    if root is None and base is not None and not isinstance(base, Checkpoint):
        p = Path(base)
        root = p if p.is_dir() else p.parent
    if root is None:
        return None
    path = Path(root) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDefinitionError(
            f"cannot read {CONFIG_NAME}: {e}", where=str(path), hint="repair or replace the file"
        ) from e
    if not isinstance(data, dict):
        raise ModelDefinitionError(f"{CONFIG_NAME} is not a JSON object", where=str(path))
    return data


def _build_facts(tf, config_dict, checkpoint, dtype, architecture, where) -> ModelFacts:
    from transformers.utils import logging as tf_logging

    from .model_reading import build_on_meta, read_facts

    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        config = _make_config(tf, config_dict, where)
        cls = _model_class(tf, config, config_dict, architecture, where)
        load_dtype, dtype_source = _resolve_dtype(dtype, config, checkpoint, where)
        model = build_on_meta(cls, config, load_dtype, where)
        return read_facts(tf, model, cls, load_dtype, dtype_source, checkpoint, where)
    finally:
        tf_logging.set_verbosity(verbosity)


def _make_config(tf, config_dict: dict[str, Any], where: str):
    from transformers import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if not model_type:
        raise ModelDefinitionError(
            f"{CONFIG_NAME} has no model_type", where=where, hint="it is not a transformers config"
        )
    if model_type not in CONFIG_MAPPING:
        hint = (
            "the model needs trust_remote_code (custom modeling code), which stream-tv does not "
            "run; merge with name rules instead"
            if config_dict.get("auto_map")
            else f"upgrade transformers (installed: {tf.__version__})"
        )
        raise ModelDefinitionError(
            f"transformers {tf.__version__} does not know model_type {model_type!r}",
            where=where,
            hint=hint,
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as e:  # noqa: BLE001 - any failure of the config class is reported
        raise ModelDefinitionError(
            f"{CONFIG_NAME} does not build a {CONFIG_MAPPING[model_type].__name__}: {e}",
            where=where,
            hint="check that config.json belongs to this model",
        ) from e


def _model_class(tf, config, config_dict, architecture, where):
    from transformers import PreTrainedModel

    names = [architecture] if architecture else list(config_dict.get("architectures") or [])
    if not names:
        raise ModelDefinitionError(
            f"{CONFIG_NAME} names no architectures, so the model class PEFT wrapped is unknown",
            where=where,
            hint='add e.g. "architectures": ["LlamaForCausalLM"] to config.json, or pass '
            "architecture=...",
        )
    if len(names) > 1:
        raise ModelDefinitionError(
            f"{CONFIG_NAME} names several architectures {names}",
            where=where,
            hint="pass architecture=... to choose the class the adapter was trained on",
        )
    name = names[0]
    cls = getattr(tf, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, PreTrainedModel):
        raise ModelDefinitionError(
            f"transformers {tf.__version__} has no model class {name!r}",
            where=where,
            hint="custom modeling code (trust_remote_code) is not run; upgrade transformers if "
            "the class is newer",
        )
    if not isinstance(config, cls.config_class):
        raise ModelDefinitionError(
            f"{name} takes a {cls.config_class.__name__}, but config.json builds a "
            f"{type(config).__name__}",
            where=where,
            hint="fix architectures or model_type in config.json",
        )
    return cls


def _resolve_dtype(dtype, config, checkpoint, where) -> tuple[torch.dtype, str]:
    """The dtype ``from_pretrained(dtype=dtype)`` loads in (transformers' ``_get_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    if dtype != "auto":
        value = getattr(torch, str(dtype), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype or 'auto', not {dtype!r}")
        return value, "given"
    cfg_dtype = getattr(config, "dtype", None)
    if cfg_dtype is not None:
        value = getattr(torch, cfg_dtype) if isinstance(cfg_dtype, str) else cfg_dtype
        return value, "config.json dtype"
    if checkpoint is None or not checkpoint.files:
        raise ModelDefinitionError(
            "config.json gives no dtype and there is no checkpoint to take it from",
            where=where,
            hint="pass dtype=... (the dtype the model is loaded in)",
        )
    # an index's "metadata" may name the dtype (transformers reads it before any shard)
    meta = checkpoint.metadata.get("dtype") if isinstance(checkpoint.metadata, dict) else None
    if isinstance(getattr(torch, str(meta), None), torch.dtype):
        return getattr(torch, str(meta)), "index metadata dtype"
    from transformers.modeling_utils import get_state_dict_dtype, load_state_dict

    # transformers reads the first shard of the sorted weight map (headers only on "meta")
    first = sorted(checkpoint.files, key=lambda p: p.name)[0]
    state = load_state_dict(str(first), map_location="meta")
    return get_state_dict_dtype(state), f"first floating tensor of {first.name}"


# --------------------------------------------------------------------------------------
# Without facts: which layouts shapes cannot settle
# --------------------------------------------------------------------------------------


def ambiguous_layouts(
    modules: Mapping[str, tuple[int, int]], base_shapes: Mapping[str, Sequence[int]]
) -> list[str]:
    """The modules whose layout (Linear ``(out, in)`` or Conv1D ``(in, out)``) no shape settles.

    ``modules`` maps a LoRA module path to ``(out_features, in_features)`` from its ``B`` and
    ``A``; ``base_shapes`` maps the same path to its base weight's shape. A 2-D base weight of
    shape ``(n, n)`` with ``out == in == n`` fits both layouts: without the model definition
    the transpose cannot be known, and guessing it silently corrupts the merge.

    >>> ambiguous_layouts({"h.0.attn.c_proj": (48, 48), "h.0.attn.c_attn": (144, 48)},
    ...                   {"h.0.attn.c_proj": (48, 48), "h.0.attn.c_attn": (48, 144)})
    ['h.0.attn.c_proj']
    """
    out = []
    for name, (out_f, in_f) in modules.items():
        shape = tuple(base_shapes.get(name, ()))
        if out_f == in_f and shape == (out_f, in_f):
            out.append(name)
    return sorted(out)


def ambiguous_layout_error(
    names: Iterable[str], *, where: str | None = None, why: str = ""
) -> AdapterError:
    """The refusal for :func:`ambiguous_layouts`: what, why, and the two ways to settle it."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else ""
    )
    return AdapterError(
        f"LoRA modules {shown} have square base weights: a Linear (out, in) and a GPT-2 "
        "Conv1D (in, out) fit equally, and PEFT transposes the delta only for a Conv1D"
        + (f" ({why})" if why else ""),
        where=where,
        hint="install the model definition (pip install 'stream-tv[transformers]', with the "
        "base's config.json next to it), or say it per module pattern: --fan-in-fan-out "
        "'PATTERN' for Conv1D modules, --no-fan-in-fan-out 'PATTERN' for Linear ones",
    )
