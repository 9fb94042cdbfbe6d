"""Reading a model built on the meta device: the body of :func:`~.model_facts.read_model_facts`.

:func:`build_on_meta` builds the class under ``from_pretrained``'s own init contexts;
:func:`read_facts` walks it (modules in ``named_modules`` order, parameters with their load
dtypes, ties, embeddings) and, given a checkpoint, applies transformers' own key conversions
(:func:`checkpoint_facts`). Everything here runs transformers code; nothing reads tensor data.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..errors import ModelDefinitionError
from ..io.index import Checkpoint
from .model_facts import KeySlice, ModelFacts, ModuleFact, ParamFact, TiePair


def build_on_meta(cls, config, dtype: torch.dtype, where: str):
    """``cls(config)`` under the contexts ``from_pretrained`` uses: meta device, ``dtype``,
    no tying yet (transformers ties after loading, when it knows which keys are present)."""
    import copy

    from transformers.utils.generic import ContextManagers

    config = copy.deepcopy(config)
    config.dtype = dtype
    for sub in getattr(config, "sub_configs", {}) or {}:
        if (sub_config := getattr(config, sub, None)) is not None:
            sub_config.dtype = dtype
    try:
        contexts = cls.get_init_context(dtype, False, False, None)
    except TypeError:  # a transformers whose signature changed: the essential part
        contexts = [torch.device("meta")]
    try:
        with ContextManagers(contexts):
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - the class's own failure is the reason
        raise ModelDefinitionError(
            f"{cls.__name__} cannot be built from config.json on the meta device: "
            f"{type(e).__name__}: {e}",
            where=where,
            hint="check the config; merge with name rules instead if the class needs more",
        ) from e
    # subtle: a few classes create a parameter with a legacy constructor that ignores the
    # default device (Wav2Vec2's masked_spec_embed: torch.Tensor(n)); from_pretrained has the
    # same, and such parameters are small: only shapes and dtypes are read here.
    return model


def module_kind(module) -> str:
    """The kind of ``module`` by PEFT's dispatch order (:data:`KINDS`)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    # PEFT's dispatch_default order (peft/tuners/lora/layer.py)
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    if isinstance(module, nn.Conv1d):
        return "nn_conv1d"
    if isinstance(module, nn.MultiheadAttention):
        return "multihead_attention"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    return "other"


def read_facts(tf, model, cls, dtype, dtype_source, checkpoint, where) -> ModelFacts:
    """The :class:`ModelFacts` of ``model`` (built by :func:`build_on_meta`), with the
    checkpoint mapping when ``checkpoint`` is given."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    first_path = {id(mod): path for path, mod in reversed(list(_all_modules(model)))}
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    modules, params = _modules_and_params(model, dtype, tied)
    transforms = get_model_conversion_mapping(model)
    facts = dict(
        architecture=cls.__name__,
        model_type=str(model.config.model_type),
        transformers_version=tf.__version__,
        dtype=dtype,
        dtype_source=dtype_source,
        base_model_prefix=str(model.base_model_prefix or ""),
        modules=MappingProxyType(modules),
        params=MappingProxyType(params),
        tied=MappingProxyType(tied),
        tie_word_embeddings=MappingProxyType(_tie_settings(model)),
        keep_in_fp32=frozenset(model._keep_in_fp32_modules or ()),
        keep_in_fp32_strict=frozenset(model._keep_in_fp32_modules_strict or ()),
        input_embeddings=_embedding_path(model.get_input_embeddings, first_path),
        output_embeddings=_embedding_path(model.get_output_embeddings, first_path),
        conversions=tuple(repr(t) for t in transforms),
    )
    if checkpoint is not None:
        facts.update(checkpoint_facts(model, transforms, checkpoint, params, tied, where))
    return ModelFacts(**facts)


def _all_modules(model):
    return model.named_modules(remove_duplicate=False)


def _modules_and_params(model, dtype, tied) -> tuple[dict[str, ModuleFact], dict[str, ParamFact]]:
    """Per module path (``named_modules`` order, PEFT's) its :class:`ModuleFact`, and per
    parameter or persistent buffer its :class:`ParamFact`."""
    from transformers.core_model_loading import build_glob_alternation

    aliases: dict[int, list[str]] = {}
    for path, mod in _all_modules(model):
        aliases.setdefault(id(mod), []).append(path)
    # dtype plan: transformers matches these patterns with re.search on parameter names
    plan = model._get_dtype_plan(dtype)
    plan_re = build_glob_alternation(list(plan))[0] if plan else None
    state_keys = set(model.state_dict().keys())
    params: dict[str, ParamFact] = {}
    modules: dict[str, ModuleFact] = {}
    for path, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        bufs = [
            (n, b)
            for n, b in mod.named_buffers(recurse=False)
            if (f"{path}.{n}" if path else n) in state_keys
        ]
        if not own and not bufs:
            continue
        kind = module_kind(mod)
        names = []
        for attr, p in own + bufs:
            full = f"{path}.{attr}" if path else attr
            # transformers casts each loaded tensor to fp32 where the dtype plan matches, else
            # to the dtype of the empty parameter (built under `dtype`; a class may create
            # some in another dtype, and integer buffers keep theirs)
            fp32 = plan_re is not None and plan_re.search(full) is not None
            params[full] = ParamFact(
                name=full,
                shape=tuple(p.shape),
                dtype=torch.float32 if fp32 else p.dtype,
                module=path,
                attr=attr,
                bare=(kind == "other")
                or (attr not in ("weight", "bias") and kind != "multihead_attention"),
                buffer=not isinstance(p, torch.nn.Parameter),
                tied_to=tied.get(full),
            )
            names.append(full)
        modules[path] = _module_fact(path, mod, kind, names, aliases[id(mod)][1:])
    return modules, params


def _module_fact(path: str, mod, kind: str, names: list[str], aliases: list[str]) -> ModuleFact:
    weight = getattr(mod, "weight", None)
    bias = getattr(mod, "bias", None)
    return ModuleFact(
        path=path,
        kind=kind,
        cls=f"{type(mod).__module__}.{type(mod).__qualname__}",
        weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else None,
        bias_shape=tuple(bias.shape) if isinstance(bias, torch.Tensor) else None,
        params=tuple(names),
        aliases=tuple(aliases),
        transposed=bool(getattr(mod, "is_transposed", False)),
    )


def _tie_settings(model) -> dict[str, bool | None]:
    """``tie_word_embeddings`` of each (sub)model's config, by module path."""
    from transformers import PreTrainedModel

    return {
        path: getattr(sub.config, "tie_word_embeddings", None)
        for path, sub in model.named_modules()
        if isinstance(sub, PreTrainedModel)
    }


def _embedding_path(getter, first_path: dict[int, str]) -> str | None:
    try:
        m = getter()
    except (NotImplementedError, AttributeError):
        return None
    return first_path.get(id(m)) if m is not None else None


# --------------------------------------------------------------------------------------
# Checkpoint key <-> parameter, as from_pretrained and save_pretrained apply them
# --------------------------------------------------------------------------------------


def checkpoint_facts(model, transforms, checkpoint: Checkpoint, params, tied, where) -> dict:
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_sd = model.state_dict()
    prefix = model.base_model_prefix

    plain: dict[str, str] = {}
    converted: dict[str, list[tuple[str, str]]] = {}  # param -> [(pattern, key)], load order
    unexpected: list[str] = []
    # subtle: transformers renames keys in dot_natural_key order, and a converter collects its
    # tensors (e.g. one per expert) in that order: the order is the stacking order.
    for key in sorted(checkpoint.tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
        if renamed not in meta_sd:
            unexpected.append(key)
        elif pattern is None:
            plain[key] = renamed
        else:
            converted.setdefault(renamed, []).append((pattern, key))

    param_of_key: dict[str, KeySlice] = {k: KeySlice(p) for k, p in plain.items()}
    for param, items in converted.items():
        conv = by_pattern[items[0][0]]
        param_of_key.update(_converter_slices(param, conv, items, checkpoint, params))

    keys_of_param: dict[str, list[str]] = {}
    for key, ks in param_of_key.items():
        keys_of_param.setdefault(ks.param, []).append(key)

    present = set(keys_of_param)
    ties = []
    for target, source in tied.items():
        t, s = target in present, source in present
        status = {(False, True): "source", (True, False): "target", (True, True): "both"}.get(
            (t, s), "neither"
        )
        ties.append(TiePair(target, source, status))
    satisfied = {p.target for p in ties if p.status == "source"} | {
        p.source for p in ties if p.status == "target"
    }
    missing = tuple(n for n in meta_sd if n not in present and n not in satisfied)

    used = [t for t in transforms if t.was_used()]
    saved_as = _saved_names(model, used, meta_sd, where)
    return dict(
        ties=tuple(ties),
        param_of_key=MappingProxyType(param_of_key),
        keys_of_param=MappingProxyType({k: tuple(v) for k, v in keys_of_param.items()}),
        unexpected_keys=tuple(unexpected),
        missing_params=missing,
        saved_as=MappingProxyType(saved_as),
        conversions_used=tuple(repr(t) for t in used),
    )


def _op_names(conv) -> tuple[str, ...]:
    out = []
    for op in conv.operations:
        dim = getattr(op, "dim", None)
        out.append(f"{type(op).__name__}(dim={dim})" if dim is not None else type(op).__name__)
    return tuple(out)


def _converter_slices(param, conv, items, checkpoint, params) -> dict[str, KeySlice]:
    """Per checkpoint key, its place in ``param``, for the conversions MoE checkpoints use:
    ``MergeModulelist(dim=0)`` (stack one tensor per expert) optionally followed by
    ``Concatenate(dim=d)`` (join the stacks of several patterns, in ``source_patterns`` order,
    along ``d``). Any other chain is described (``exact=False``), not interpreted."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = _op_names(conv)
    kinds = [type(op) for op in conv.operations]
    by_pattern: dict[str, list[str]] = {}
    for pattern, key in items:
        by_pattern.setdefault(pattern, []).append(key)
    patterns = [p for p in conv.source_patterns if p in by_pattern]
    stack_ok = kinds and kinds[0] is MergeModulelist and conv.operations[0].dim == 0
    if stack_ok and len(kinds) == 1 and len(patterns) == 1:
        return {
            k: KeySlice(param, expert=i, ops=ops) for i, k in enumerate(by_pattern[patterns[0]])
        }
    if stack_ok and len(kinds) == 2 and kinds[1] is Concatenate and conv.operations[1].dim >= 1:
        dim = conv.operations[1].dim - 1  # in the per-expert tensor
        out: dict[str, KeySlice] = {}
        start = 0
        for pattern in patterns:
            keys = by_pattern[pattern]
            size = checkpoint[keys[0]].shape[dim]
            for i, k in enumerate(keys):
                out[k] = KeySlice(param, expert=i, dim=dim, start=start, stop=start + size, ops=ops)
            start += size
        expected = params[param].shape[dim + 1] if param in params else None
        if expected == start:
            return out
    return {k: KeySlice(param, ops=ops, exact=False) for _, k in items}


def _saved_names(model, used, meta_sd, where) -> dict[str, tuple[str, ...] | None]:
    """Names ``save_pretrained`` writes each parameter under (``revert_weight_conversion`` with
    the transforms that matched on load), parameter by parameter; ``None`` where a reverse
    conversion needs several parameters at once (the names are then not per parameter)."""
    from transformers.core_model_loading import revert_weight_conversion

    saved: dict[str, tuple[str, ...] | None] = {}
    previous = getattr(model, "_weight_conversions", None)
    model._weight_conversions = used
    try:
        for name, tensor in meta_sd.items():
            try:
                out = revert_weight_conversion(model, {name: tensor})
                saved[name] = tuple(out)
            except Exception:  # noqa: BLE001 - a many-to-one reverse conversion
                saved[name] = None
    finally:
        model._weight_conversions = previous
    return saved
