"""Adapter key <-> base key mapping: pure string functions, no tensors.

PEFT saves an adapter's tensors under ``base_model.model.<module path>.<suffix>`` with the
adapter name (``default``) removed (``peft/utils/save_and_load.py``):

==============================  =======================================================
suffix                          meaning
==============================  =======================================================
``lora_A.weight``               A ``(r, in)``; Conv2d ``(r, in, kh, kw)``
``lora_B.weight``               B ``(out, r)``; Conv2d ``(out, r, 1, 1)``
``lora_B.bias``                 ``lora_bias=True``: added to the base bias
``lora_embedding_A`` / ``_B``   Embedding factors, no ``.weight``: A ``(r, vocab)``, B ``(dim, r)``
``lora_magnitude_vector``       DoRA magnitude (PEFT strips the ``.weight`` of the module)
``token_adapter.``              ``trainable_token_indices``: the new rows of those tokens
``trainable_tokens_delta``      ``(len(indices), dim)``, written over the embedding's rows
anything else                   a full tensor that replaces the base one: ``modules_to_save``
                                copies (``lm_head.weight``), saved embeddings
                                (``embed_tokens.base_layer.weight``), trained biases
==============================  =======================================================

>>> parse_adapter_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
AdapterKey(module='model.layers.0.self_attn.q_proj', part='lora_A', param=None)
>>> parse_adapter_key("base_model.model.model.embed_tokens.lora_embedding_B")
AdapterKey(module='model.embed_tokens', part='lora_embedding_B', param=None)
>>> parse_adapter_key("base_model.model.lm_head.base_layer.weight")
AdapterKey(module='lm_head', part='full', param='weight')
>>> base_key_for("transformer.h.0.attn.c_attn", "weight", {"h.0.attn.c_attn.weight"})
'h.0.attn.c_attn.weight'
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

PEFT_PREFIX = "base_model.model."

# suffix -> part, longest first so that "lora_B.bias" wins over a bare "bias".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_magnitude_vector.weight", "lora_magnitude_vector"),
    (".lora_magnitude_vector", "lora_magnitude_vector"),
    (".lora_embedding_A", "lora_embedding_A"),
    (".lora_embedding_B", "lora_embedding_B"),
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_B.bias", "lora_B_bias"),
    (".token_adapter.trainable_tokens_delta", "trainable_tokens_delta"),
)

LORA_PARTS = frozenset(part for _, part in _SUFFIXES)

# Names the output head of causal LMs goes by; a head missing from the base is tied.
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output")
# Suffixes of input embedding weights, most common first.
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)


class AdapterKey(NamedTuple):
    """One adapter tensor: the module it belongs to, what it is, and for a full tensor
    the parameter it replaces (``weight``/``bias``)."""

    module: str
    part: str  # one of LORA_PARTS, "full", or "unknown"
    param: str | None = None


def strip_peft_prefix(key: str) -> str:
    """Remove PEFT's ``base_model.model.`` prefix, if present (some writers omit it).

    >>> strip_peft_prefix("base_model.model.model.norm.weight")
    'model.norm.weight'
    >>> strip_peft_prefix("model.norm.weight")
    'model.norm.weight'
    """
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def parse_adapter_key(key: str) -> AdapterKey:
    """Split an adapter tensor name into ``(module path, part, param)``.

    >>> parse_adapter_key("transformer.h.0.attn.c_attn.lora_B.bias")
    AdapterKey(module='transformer.h.0.attn.c_attn', part='lora_B_bias', param=None)
    >>> parse_adapter_key("base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector")
    AdapterKey(module='model.layers.1.mlp.up_proj', part='lora_magnitude_vector', param=None)
    >>> parse_adapter_key("base_model.model.score.modules_to_save.default.weight")
    AdapterKey(module='score', part='full', param='weight')
    >>> parse_adapter_key("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta")
    AdapterKey(module='model.embed_tokens', part='trainable_tokens_delta', param=None)
    >>> parse_adapter_key("base_model.model.model.layers.0.mlp.lora_E")
    AdapterKey(module='model.layers.0.mlp', part='unknown', param='lora_E')
    """
    name = strip_peft_prefix(key)
    for suffix, part in _SUFFIXES:
        if name.endswith(suffix):
            return AdapterKey(name[: -len(suffix)], part, None)
    module, _, param = name.rpartition(".")
    if not module or param.startswith("lora_") or ".lora_" in f".{module}":
        return AdapterKey(module, "unknown", param)
    return AdapterKey(full_tensor_module(module), "full", param)


def full_tensor_module(module: str) -> str:
    """The base module a saved full tensor belongs to: drop PEFT wrapper levels.

    ``base_layer`` (the module a LoRA layer wraps), ``original_module`` and
    ``modules_to_save.<adapter>`` (a ``modules_to_save`` wrapper) are not part of the base.

    >>> full_tensor_module("model.embed_tokens.base_layer")
    'model.embed_tokens'
    >>> full_tensor_module("classifier.modules_to_save.default")
    'classifier'
    >>> full_tensor_module("model.layers.0.mlp.down_proj")
    'model.layers.0.mlp.down_proj'
    """
    parts = module.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in ("base_layer", "original_module"):
            i += 1
        elif parts[i] == "modules_to_save":
            i += 2  # the adapter name follows
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def base_key_candidates(module: str, param: str, top_prefixes: Iterable[str] = ()) -> list[str]:
    """Where ``<module>.<param>`` may live in a base checkpoint, most likely first.

    The module path is the one of the model PEFT wrapped (``LlamaForCausalLM``: ``model.…``,
    ``GPT2LMHeadModel``: ``transformer.…``). A base saved from the bare model class lacks
    that top prefix; a base saved from a wrapper may add one of ``top_prefixes``.

    >>> base_key_candidates("transformer.h.0.attn.c_attn", "weight", ["model"])
    ['transformer.h.0.attn.c_attn.weight', 'h.0.attn.c_attn.weight', 'model.transformer.h.0.attn.c_attn.weight']
    """
    key = f"{module}.{param}" if module else param
    out = [key]
    head, dot, rest = module.partition(".")
    if dot and rest:
        out.append(f"{rest}.{param}")
    for prefix in top_prefixes:
        candidate = f"{prefix}.{key}"
        if prefix and prefix != head and candidate not in out:
            out.append(candidate)
    return out


def top_prefixes(base_keys: Iterable[str]) -> list[str]:
    """First path components of a checkpoint's tensor names, sorted.

    >>> top_prefixes(["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"])
    ['lm_head', 'model']
    """
    return sorted({k.partition(".")[0] for k in base_keys if "." in k})


def base_key_for(
    module: str, param: str, base_keys: Collection[str], *, prefixes: Iterable[str] | None = None
) -> str | None:
    """The base tensor name of ``<module>.<param>``; ``None`` if no candidate exists.

    >>> keys = {"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}
    >>> base_key_for("model.layers.0.self_attn.q_proj", "weight", keys)
    'model.layers.0.self_attn.q_proj.weight'
    >>> base_key_for("layers.0.self_attn.q_proj", "weight", keys)
    'model.layers.0.self_attn.q_proj.weight'
    >>> base_key_for("model.layers.0.self_attn.k_proj", "weight", keys) is None
    True
    """
    pre = top_prefixes(base_keys) if prefixes is None else list(prefixes)
    for candidate in base_key_candidates(module, param, pre):
        if candidate in base_keys:
            return candidate
    return None


def is_output_head(module: str) -> bool:
    """Whether a module path names a causal LM's output head.

    >>> is_output_head("lm_head"), is_output_head("model.lm_head"), is_output_head("model.norm")
    (True, True, False)
    """
    return module.rpartition(".")[2] in OUTPUT_HEAD_NAMES


def input_embedding_key(base_keys: Collection[str]) -> str | None:
    """The input embedding weight of a checkpoint (the tied partner of a missing head).

    >>> input_embedding_key({"transformer.wte.weight", "transformer.wpe.weight"})
    'transformer.wte.weight'
    >>> input_embedding_key({"model.norm.weight"}) is None
    True
    """
    for suffix in INPUT_EMBEDDING_SUFFIXES:
        matches = sorted(k for k in base_keys if k == suffix or k.endswith("." + suffix))
        if matches:
            return min(matches, key=len)
    return None
