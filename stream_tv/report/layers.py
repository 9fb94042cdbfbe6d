"""Where a tensor sits in a model: its layer stack, layer index and module kind (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["layer_of", "module_kinds"]

# The block containers of common architectures: model.layers.N (Llama, Mistral, Qwen),
# transformer.h.N (GPT-2), gpt_neox.layers.N, encoder.block.N (T5), blocks.N, ...
_LAYER = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?:layers|layer|h|blocks|block)\.(?P<index>\d+)\.")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """Split a tensor name into (stack prefix, layer index, module kind); None outside layers.

    >>> layer_of("model.layers.12.self_attn.q_proj.weight")
    ('model', 12, 'q_proj')
    >>> layer_of("transformer.h.3.attn.c_attn.weight")
    ('transformer', 3, 'c_attn')
    >>> layer_of("model.layers.0.self_attn.q_proj.bias")
    ('model', 0, 'q_proj.bias')
    >>> layer_of("model.embed_tokens.weight") is None
    True
    """
    match = _LAYER.match(name)
    if match is None:
        return None
    parts = name[match.end() :].split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    kind = parts[-1]
    if kind == "bias" and len(parts) > 1:
        kind = f"{parts[-2]}.bias"
    return match.group("prefix") or "", int(match.group("index")), kind


def module_kinds(names: Iterable[str]) -> dict[str, str]:
    """The module kind of every layer tensor, unique within its layer.

    ``layer_of``'s kind is the last name component; where two tensors of one layer share it
    (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``), those tensors are named by their path in
    the layer instead, in every layer, so that a plot series is one module.

    >>> module_kinds(["transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
    ...               "transformer.h.0.attn.c_attn.weight"])  # doctest: +NORMALIZE_WHITESPACE
    {'transformer.h.0.attn.c_proj.weight': 'attn.c_proj',
     'transformer.h.0.mlp.c_proj.weight': 'mlp.c_proj',
     'transformer.h.0.attn.c_attn.weight': 'c_attn'}
    """
    located = {n: loc for n in names if (loc := layer_of(n)) is not None}
    seen: dict[tuple[str, int, str], int] = {}
    for loc in located.values():
        seen[loc] = seen.get(loc, 0) + 1
    clashing = {loc[2] for loc, count in seen.items() if count > 1}
    kinds = {}
    for name, loc in located.items():
        if loc[2] in clashing:
            match = _LAYER.match(name)
            assert match is not None  # layer_of matched it
            kinds[name] = name[match.end() :].removesuffix(".weight")
        else:
            kinds[name] = loc[2]
    return kinds
