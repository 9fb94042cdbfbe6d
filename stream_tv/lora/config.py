r"""``adapter_config.json`` -> :class:`AdapterConfig`: per-module rank, alpha, scaling, flags.

Only what changes the merged weights is interpreted; every field that would make the merge
differ from the standard LoRA formula is refused with the field named. The rules follow the
installed PEFT (``peft/tuners/lora/config.py``, ``model.py``, ``utils/other.py``):

- ``r`` and ``lora_alpha`` per module come from ``rank_pattern`` / ``alpha_pattern``: a pattern
  ``K`` applies to a module path ``m`` when ``re.match(rf"(.*\.)?({K})$", m)``; the first
  matching key, in the file's order, wins; otherwise the global value.
- ``scaling = lora_alpha / r``, or ``lora_alpha / math.sqrt(r)`` with ``use_rslora``.

>>> cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
...                     "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.0.self_attn.q_proj": 2}})
>>> cfg.rank_for("model.layers.0.self_attn.q_proj"), cfg.alpha_for("model.layers.0.self_attn.q_proj")
(4, 2)
>>> cfg.scaling_for("model.layers.1.self_attn.q_proj"), cfg.scaling_for("model.layers.1.mlp.up_proj")
(4.0, 2.0)
>>> cfg.alpha_for("model.layers.10.self_attn.q_proj")  # no "." boundary before "0"
16
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import AdapterError

CONFIG_NAME = "adapter_config.json"

# init_lora_weights values that only decide how A and B start; the saved factors are what
# is merged. (``"eva"`` zeroes B at init and takes A from activations; loading a saved EVA
# adapter overwrites both, and the base is not touched.)
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}

# init_lora_weights values that rewrite the base weights when the adapter is created (PEFT
# redoes it on load: the merge is base' + B @ A where base' depends on an SVD/quantisation
# of the base) or that select a LoRA variant with another merge formula.
_REWRITING_INITS = {
    "pissa": "PiSSA subtracts the adapter's principal components from the base at load time",
    "olora": "OLoRA subtracts a QR-derived update from the base at load time",
    "corda": "CorDA subtracts the adapter's components from the base at load time",
    "loftq": "LoftQ replaces the base with a quantised one at load time",
    "lora_ga": "LoRA-GA subtracts a gradient-derived update from the base at load time",
    "mica": "MiCA is a LoRA variant whose merge is not the standard formula",
}
_REWRITE_HINT = (
    "save it as a plain LoRA adapter first: `peft_model.save_pretrained(dir, "
    "path_initial_model_for_weight_conversion=<dir of the adapter as initialised>)` converts "
    "PiSSA/OLoRA/CorDA adapters; or merge with PEFT itself"
)

# Fields that, when set (truthy), select a LoRA variant or a layout whose merge differs from
# ``W + scaling * B @ A`` (or DoRA). Each maps to the reason given to the user.
_REFUSED_WHEN_SET = {
    "use_qalora": "QA-LoRA pools the input features; its merge is not the standard formula",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "layer_replication": "layer replication builds new layers that share base weights",
    "alora_invocation_tokens": "aLoRA activates only after invocation tokens; it cannot be merged",
    "arrow_config": "Arrow routing mixes experts per token; it cannot be merged",
    "velora_config": "VeLoRA is not supported yet",
    "monteclora_config": "MonteCLoRA samples its factors; it is not supported",
    "use_bdlora": "BD-LoRA (block-diagonal factors) is not supported yet",
    "kasa_config": "KaSA rewrites the base with an SVD truncation; it is not supported",
}

# Fields that do not change the merged weights (or are checked through the weights file).
_HARMLESS = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
}
_INTERPRETED = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "use_dora",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
}


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that decide the merged weights.

    ``raw`` keeps the whole JSON object for display. Use :meth:`rank_for`,
    :meth:`alpha_for` and :meth:`scaling_for` for per-module values.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    lora_bias: bool = False
    bias: str = "none"
    use_dora: bool = False
    init_lora_weights: bool | str = True
    ensure_weight_tying: bool = False
    target_parameters: tuple[str, ...] = ()  # LoRA on nn.Parameters (MoE experts, routers)
    # trainable_token_indices: module name -> token ids ("" = the input embedding)
    trainable_tokens: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    where: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def rank_for(self, module: str) -> int:
        """``r`` of one module: the first ``rank_pattern`` key matching ``module``, else ``r``."""
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` of one module, through ``alpha_pattern`` like :meth:`rank_for`."""
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), exactly as PEFT computes it."""
        return scaling(self.alpha_for(module), self.rank_for(module), rslora=self.use_rslora)


def scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """PEFT's ``update_layer``: ``lora_alpha / math.sqrt(r)`` or ``lora_alpha / r``.

    >>> scaling(16, 8), scaling(16, 4, rslora=True)
    (2.0, 8.0)
    """
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` as PEFT's ``get_pattern_key``.

    A key matches when the module path ends with it at a ``.`` boundary (the key is a regex).

    >>> pattern_key({"q_proj": 4, "layers.1.v_proj": 2}, "model.layers.1.v_proj")
    'layers.1.v_proj'
    >>> pattern_key({"proj": 4}, "model.layers.1.v_proj") is None
    True
    >>> pattern_key({r"layers\\.[01]\\..*proj": 4}, "model.layers.1.v_proj")
    'layers\\\\.[01]\\\\..*proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def load_config(path: str | os.PathLike) -> AdapterConfig:
    """Read and validate ``adapter_config.json`` (a file, or a directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise AdapterError(
            f"no {CONFIG_NAME}",
            where=str(p.parent),
            hint="an adapter directory holds adapter_config.json and adapter_model.safetensors, "
            "as written by `peft_model.save_pretrained(dir)`",
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(
            f"{CONFIG_NAME} is not valid JSON ({e})",
            where=str(p),
            hint="re-save the adapter with `peft_model.save_pretrained(dir)`",
        ) from e
    return parse_config(data, where=str(p))


def parse_config(data: Any, *, where: str | None = None) -> AdapterConfig:
    """Validate an ``adapter_config.json`` object; refuse what the merge cannot honour."""
    if not isinstance(data, dict):
        raise AdapterError(f"{CONFIG_NAME} is not a JSON object", where=where)

    def bad(name: str, message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(f"{CONFIG_NAME} field {name!r}: {message}", where=where, hint=hint)

    peft_type = data.get("peft_type")
    if peft_type is None:
        raise bad("peft_type", "missing", 'a LoRA adapter has "peft_type": "LORA"')
    if str(peft_type).upper() != "LORA":
        raise bad(
            "peft_type",
            f"{peft_type!r} is not LORA",
            "only LoRA adapters (including DoRA and rsLoRA) can be merged",
        )

    init = data.get("init_lora_weights", True)
    if isinstance(init, str):
        lowered = init.lower()
        reason = next((v for k, v in _REWRITING_INITS.items() if lowered.startswith(k)), None)
        if reason is not None:
            raise bad("init_lora_weights", f"{init!r}: {reason}", _REWRITE_HINT)
        if lowered not in _PLAIN_INITS:
            raise bad("init_lora_weights", f"unknown initialisation {init!r}")
    elif not isinstance(init, bool):
        raise bad("init_lora_weights", f"{init!r} is neither a boolean nor a method name")

    for name, reason in _REFUSED_WHEN_SET.items():
        value = data.get(name)
        if _is_set(value):
            raise bad(name, f"is set ({_short(value)}): {reason}", "merge it with PEFT itself")

    unknown = sorted(k for k in data if k not in _HARMLESS | _INTERPRETED | set(_REFUSED_WHEN_SET))
    for name in unknown:
        if _is_set(data[name]):
            raise bad(
                name,
                f"unknown field set to {_short(data[name])}; it may change the merge",
                "this adapter comes from a newer PEFT; check what the field does, "
                "or merge with PEFT itself",
            )

    if _is_set(data.get("use_dora")) and _is_set(data.get("lora_bias")):
        raise bad(
            "lora_bias",
            "is set together with use_dora; PEFT does not support DoRA with lora_bias",
            "re-train without one of them",
        )

    r = _positive_int(data.get("r", 8), "r", bad)
    alpha = _number(data.get("lora_alpha", 8), "lora_alpha", bad)
    rank_pattern = _pattern(data.get("rank_pattern"), "rank_pattern", bad, rank=True)
    alpha_pattern = _pattern(data.get("alpha_pattern"), "alpha_pattern", bad, rank=False)

    bias = data.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise bad("bias", f"{bias!r} is not one of 'none', 'all', 'lora_only'")

    target = data.get("target_modules")
    if isinstance(target, list):
        target = tuple(str(t) for t in target)
    elif target is not None and not isinstance(target, str):
        raise bad("target_modules", f"{_short(target)} is neither a list nor a regex string")
    to_save = data.get("modules_to_save") or ()
    if isinstance(to_save, str):
        to_save = (to_save,)
    if not isinstance(to_save, (list, tuple)):
        raise bad("modules_to_save", f"{_short(to_save)} is not a list of module names")

    return AdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern=MappingProxyType(rank_pattern),
        alpha_pattern=MappingProxyType(alpha_pattern),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        target_modules=target,
        modules_to_save=tuple(str(m) for m in to_save),
        lora_bias=bool(data.get("lora_bias", False)),
        bias=bias,
        use_dora=bool(data.get("use_dora", False)),
        init_lora_weights=init,
        ensure_weight_tying=bool(data.get("ensure_weight_tying", False)),
        target_parameters=_names(data.get("target_parameters"), "target_parameters", bad),
        trainable_tokens=MappingProxyType(_tokens(data.get("trainable_token_indices"), bad)),
        peft_type="LORA",
        base_model_name_or_path=data.get("base_model_name_or_path"),
        where=where,
        raw=MappingProxyType(dict(data)),
    )


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(value: Any, name: str, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise bad(name, f"{_short(value)} is not a positive integer")
    return value


def _number(value: Any, name: str, bad) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{_short(value)} is not a finite number")
    return value


def _pattern(value: Any, name: str, bad, *, rank: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(name, f"{_short(value)} is not an object of pattern -> value")
    out = {}
    for key, v in value.items():
        try:
            re.compile(key)
        except re.error as e:
            raise bad(name, f"key {key!r} is not a valid regular expression ({e})") from e
        out[key] = (
            _positive_int(v, f"{name}[{key!r}]", bad)
            if rank
            else _number(v, f"{name}[{key!r}]", bad)
        )
    return out


def _names(value: Any, name: str, bad) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad(name, f"{_short(value)} is not a list of parameter names")
    return tuple(value)


def _tokens(value: Any, bad) -> dict[str, tuple[int, ...]]:
    """``trainable_token_indices``: a list (the input embedding, key ``""``) or an object of
    module name -> token ids."""
    name = "trainable_token_indices"
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else [("", value)]
    out = {}
    for module, ids in items:
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise bad(name, f"{_short(ids)} is not a list of token ids")
        if len(set(ids)) != len(ids):
            raise bad(name, f"{_short(ids)} repeats a token id; PEFT's merge is undefined then")
        out[str(module)] = tuple(ids)
    return out
