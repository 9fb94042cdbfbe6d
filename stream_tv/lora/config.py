r"""``adapter_config.json`` -> :class:`AdapterConfig`: per-module rank, alpha, scaling, flags.

Only what changes the merged weights is interpreted; every field that would make the merge
differ from the standard LoRA formula is refused with the field named. The rules follow the
installed PEFT (``peft/tuners/lora/config.py``, ``model.py``, ``utils/other.py``):

- ``r`` and ``lora_alpha`` per module come from ``rank_pattern`` / ``alpha_pattern``: a pattern
  ``K`` applies to a module path ``m`` when ``re.match(rf"(.*\.)?({K})$", m)``; the first
  matching key, in the file's order, wins; otherwise the global value. Matching is bounded in
  time (see :class:`PatternMatcher`): a key that backtracks catastrophically is refused, named.
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
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import AdapterError
from ..io.index import FileIdentity, brief, check_depth, read_json

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real ones are a few kB
# CPU seconds a rank_pattern / alpha_pattern key may spend matching one module name, and all
# of them (ordinary keys take microseconds; a 47k-module MoE model needs a few ms per key)
PATTERN_MATCH_LIMIT_S = 0.1
PATTERN_BUDGET_S = 2.0

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
    # adapter_config.json as read (path, size, mtime, sha256), for a resume fingerprint
    source: FileIdentity | None = field(default=None, repr=False, compare=False)
    _rank_keys: PatternMatcher = field(init=False, repr=False, compare=False)
    _alpha_keys: PatternMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        matchers = {
            "_rank_keys": PatternMatcher(self.rank_pattern, field="rank_pattern", where=self.where),
            "_alpha_keys": PatternMatcher(
                self.alpha_pattern, field="alpha_pattern", where=self.where
            ),
        }
        for name, matcher in matchers.items():
            object.__setattr__(self, name, matcher)  # frozen: built once, here

    def rank_for(self, module: str) -> int:
        """``r`` of one module: the first ``rank_pattern`` key matching ``module``, else ``r``."""
        key = self._rank_keys.key_for(module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` of one module, through ``alpha_pattern`` like :meth:`rank_for`."""
        key = self._alpha_keys.key_for(module)
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
    Time-bounded like :class:`PatternMatcher` (a fresh budget per call).

    >>> pattern_key({"q_proj": 4, "layers.1.v_proj": 2}, "model.layers.1.v_proj")
    'layers.1.v_proj'
    >>> pattern_key({"proj": 4}, "model.layers.1.v_proj") is None
    True
    >>> pattern_key({r"layers\\.[01]\\..*proj": 4}, "model.layers.1.v_proj")
    'layers\\\\.[01]\\\\..*proj'
    """
    return PatternMatcher(patterns).key_for(module)


class _PatternTimeout(Exception):
    """Raised by the CPU timer's signal handler inside ``re.match``."""


def _on_timer(signum: int, frame: Any) -> None:
    raise _PatternTimeout


# The same rule in a bare child interpreter, for calls from threads other than the main one
# (only the main thread runs signal handlers). Reads {"keys", "left", "module"} on stdin;
# prints {"found": i or null, "spent": [...]} or {"timeout": i, "spent": [...]}.
_CHILD = r"""
import json, re, signal, sys
class T(Exception): pass
def on(*a): raise T
signal.signal(signal.SIGVTALRM, on)
q = json.load(sys.stdin)
out = {"found": None, "spent": [0.0] * len(q["keys"])}
for i, (key, left) in enumerate(zip(q["keys"], q["left"])):
    signal.setitimer(signal.ITIMER_VIRTUAL, left)
    try:
        try:
            m = re.match(r"(.*\.)?(" + key + r")$", q["module"])
        finally:
            rest = signal.setitimer(signal.ITIMER_VIRTUAL, 0)[0]
            out["spent"][i] = left - rest if rest else left
    except T:
        out["timeout"] = i
        break
    if m:
        out["found"] = i
        break
print(json.dumps(out))
"""


class PatternMatcher:
    """PEFT's ``get_pattern_key`` over the keys of a ``rank_pattern`` / ``alpha_pattern``,
    with the time it may take bounded.

    The rule is PEFT's, run by the same engine: key ``K`` matches module ``m`` when
    ``re.match(rf"(.*\\.)?({K})$", m)``; the first matching key in the file's order wins.
    ``re`` cannot be given a timeout, but it checks for signals while it backtracks: a CPU
    timer (``ITIMER_VIRTUAL``) interrupts it. Each key may spend :data:`PATTERN_MATCH_LIMIT_S`
    CPU seconds on one module and :data:`PATTERN_BUDGET_S` on all of them; a key that
    backtracks catastrophically, such as ``([a-z_.0-9]|[a-z_.0-9])*!``, on which PEFT itself
    would hang, is refused, named, within ``PATTERN_MATCH_LIMIT_S``. Results are cached per
    module.

    # subtle: only the main thread runs signal handlers. Called from another thread (or while
    # the process already uses a virtual timer), the match runs in a bare child interpreter
    # (``python -I -S``, ~20 ms per module) under the same timer.

    # subtle: the ``regex`` module has a timeout, but it expands counted repeats when it
    # compiles (``a{1000000}`` takes 2 s and 270 MB; ``((a{1000}){1000}){1000}`` exhausts
    # memory) and its Unicode classes differ from ``re``'s; ``re`` compiles both instantly.

    >>> m = PatternMatcher({"q_proj": 4, r"layers\\.1\\..*": 2})
    >>> m.key_for("model.layers.1.self_attn.q_proj"), m.key_for("model.layers.1.mlp.up_proj")
    ('q_proj', 'layers\\\\.1\\\\..*')
    """

    def __init__(
        self,
        patterns: Mapping[str, Any],
        *,
        field: str = "rank_pattern",
        where: str | None = None,
        limit: float = PATTERN_MATCH_LIMIT_S,
        budget: float = PATTERN_BUDGET_S,
    ) -> None:
        self.field, self.where, self.limit, self.budget = field, where, limit, budget
        self._compiled: dict[str, re.Pattern[str]] = {}
        for key in patterns:
            try:
                self._compiled[key] = re.compile(rf"(.*\.)?({key})$")
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise self._bad(f"key {brief(key)} is not a valid regular expression ({e})") from e
        self._spent = dict.fromkeys(self._compiled, 0.0)
        self._cache: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def _bad(self, message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(
            f"{CONFIG_NAME} field {self.field!r}: {message}", where=self.where, hint=hint
        )

    def key_for(self, module: str) -> str | None:
        """The first key matching ``module``, or None."""
        if not self._compiled:
            return None
        with self._lock:
            if module not in self._cache:
                in_main = threading.current_thread() is threading.main_thread()
                timer_free = hasattr(signal, "setitimer") and not any(
                    signal.getitimer(signal.ITIMER_VIRTUAL)
                )
                match = self._match_here if in_main and timer_free else self._match_in_child
                self._cache[module] = match(module)
            return self._cache[module]

    def _match_here(self, module: str) -> str | None:
        previous = signal.signal(signal.SIGVTALRM, _on_timer)
        try:
            for key, compiled in self._compiled.items():
                left = min(self.limit, self.budget - self._spent[key])
                if left <= 0:
                    raise self._too_slow(key, module)
                signal.setitimer(signal.ITIMER_VIRTUAL, left)
                try:
                    try:
                        matched = compiled.match(module) is not None
                    finally:
                        rest = signal.setitimer(signal.ITIMER_VIRTUAL, 0)[0]
                        self._spent[key] += left - rest if rest else left
                except _PatternTimeout:
                    raise self._too_slow(key, module) from None
                if matched:
                    return key
            return None
        finally:
            signal.signal(signal.SIGVTALRM, previous)

    def _match_in_child(self, module: str) -> str | None:
        keys = list(self._compiled)
        left = [max(min(self.limit, self.budget - self._spent[k]), 1e-6) for k in keys]
        query = json.dumps({"keys": keys, "left": left, "module": module})
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _CHILD],
                input=query,
                capture_output=True,
                text=True,
                timeout=sum(left) + 10,  # CPU bounds inside; this one is for a stuck child
                check=True,
            )
            answer = json.loads(done.stdout)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise self._bad(
                f"matching its keys against module {brief(module)} in a helper process "
                f"failed ({type(e).__name__}: {str(e)[:200]})",
                "call stream_tv from the main thread, where no helper is needed",
            ) from e
        for key, spent in zip(keys, answer["spent"], strict=True):
            self._spent[key] += spent
        if "timeout" in answer:
            raise self._too_slow(keys[answer["timeout"]], module)
        return None if answer["found"] is None else keys[answer["found"]]

    def _too_slow(self, key: str, module: str) -> AdapterError:
        return self._bad(
            f"key {brief(key)} takes too long to match module names (over {self.limit} s of CPU "
            f"for {brief(module)}, or {self.budget} s for all): it backtracks catastrophically, "
            "and PEFT would hang on it too",
            "rewrite the pattern without nested or overlapping repetition, "
            "e.g. `(a|a)*` as `a*`, or list the module names",
        )


def load_config(path: str | os.PathLike) -> AdapterConfig:
    """Read and validate ``adapter_config.json`` (a file, or a directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not os.path.exists(p):  # anything else there (a FIFO, a directory) is refused by read_json
        raise AdapterError(
            f"no {CONFIG_NAME}",
            where=str(p.parent),
            hint="an adapter directory holds adapter_config.json and adapter_model.safetensors, "
            "as written by `peft_model.save_pretrained(dir)`",
        )
    data, identity = read_json(
        p,
        what=CONFIG_NAME,
        limit=MAX_CONFIG_BYTES,
        error=AdapterError,
        hint="re-save the adapter with `peft_model.save_pretrained(dir)`",
    )
    return replace(parse_config(data, where=str(p)), source=identity)


def parse_config(data: Any, *, where: str | None = None) -> AdapterConfig:
    """Validate an ``adapter_config.json`` object; refuse what the merge cannot honour."""
    if not isinstance(data, dict):
        raise AdapterError(f"{CONFIG_NAME} is not a JSON object", where=where)
    check_depth(data, where=where or CONFIG_NAME, what=CONFIG_NAME, error=AdapterError)

    def bad(name: str, message: str, hint: str | None = None) -> AdapterError:
        return AdapterError(f"{CONFIG_NAME} field {name!r}: {message}", where=where, hint=hint)

    init = _refuse_variants(data, bad)
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


def _refuse_variants(data: dict, bad) -> bool | str:
    """Refuse a config whose merge is not base + LoRA (or DoRA); return ``init_lora_weights``."""
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
    return init


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _short(value: Any) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, str) else repr(value)
    except (ValueError, RecursionError):  # an int over the digit limit; nesting is checked
        text = brief(value)
    return text if len(text) <= 60 else text[:57] + "..."


# A rank is a tensor dimension (lora_A.shape[0]): a signed 64-bit integer.
_MAX_RANK = 2**63 - 1


def _positive_int(value: Any, name: str, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise bad(name, f"{_short(value)} is not a positive integer")
    if value > _MAX_RANK:
        raise bad(name, f"{_short(value)} is larger than any tensor dimension (2**63 - 1)")
    return value


def _number(value: Any, name: str, bad) -> float:
    """A finite int or float, kept as written (PEFT divides it as Python does).

    # subtle: JSON ``1e400`` parses as ``inf``; an integer of 400 digits parses exactly, but
    # ``alpha / r`` then raises OverflowError: both are refused here.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"{_short(value)} is not a finite number")
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise bad(name, f"{_short(value)} is not a finite number (a float64 holds up to 1.8e308)")
    return value


def _pattern(value: Any, name: str, bad, *, rank: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(name, f"{_short(value)} is not an object of pattern -> value")
    out = {}
    for key, v in value.items():
        out[key] = (
            _positive_int(v, f"{name}[{brief(key)}]", bad)
            if rank
            else _number(v, f"{name}[{brief(key)}]", bad)
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
