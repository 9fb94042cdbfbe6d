"""Which tensors of a fine-tune an extracted LoRA adapter holds, and how, from the model itself.

``extract-lora`` compresses ``T = finetuned - base`` into a PEFT adapter. What an adapter can
hold depends on the layer, and the layer comes from the base's own ``transformers`` class
built on the meta device (:mod:`.model_facts`: the facts ``merge`` binds with), never from
names or shapes. Each stored tensor gets a *role*:

==================================  ========================================  ==================
tensor                              in the adapter                            chosen by
==================================  ========================================  ==================
weight of a Linear / GPT-2 Conv1D   ``lora_A`` / ``lora_B`` (``"lora"``)      ``--target-modules``
weight of an Embedding, the head    LoRA (``lora_embedding_A/B`` for an       ``--embeddings``
                                    Embedding), or its module whole
bias of a LoRA layer                saved whole, ``bias="lora_only"``         ``--other``
                                    (``"bias"``)
anything else (norms, convs, ...)   its module in ``modules_to_save``         ``--other``
                                    (``"module"``)
==================================  ========================================  ==================

or ``"excluded"`` (an option leaves it out) or ``"dropped"`` (the class drops it on load).
:func:`classify` does this from headers; after a scan says which tensors changed,
:func:`decide` picks what the adapter holds: tensors equal in both models are left out
whatever their role, and every changed tensor left out is listed with the reason.

Tied weights (a head tied to the input embedding): a LoRA on the stored tensor changes every
parameter sharing it, as PEFT's in-place merge does; a module saved whole is saved under every
tied module too (PEFT unties a ``modules_to_save`` module from the others).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import AdapterError, InputError, MismatchError
from ..io.index import Checkpoint
from .model_facts import ModelFacts

LORA_KINDS = ("linear", "conv1d", "embedding")  # model_facts kinds a LoRA factorises
EMBEDDINGS = ("lora", "full", "skip")
OTHERS = ("full", "skip")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Role:
    """What one stored tensor is to the adapter (see the module docstring)."""

    key: str  # the checkpoint tensor (same name in base and fine-tuned)
    role: str  # lora | bias | module | excluded | dropped
    module: str  # its module, by PEFT's path (model names); "" for a parameter of the root
    param: str  # the model parameter it loads into
    kind: str  # the module's kind (model_facts.KINDS); for lora: linear | conv1d | embedding
    reason: str = ""  # excluded / dropped: why
    tied: tuple[str, ...] = ()  # other parameters sharing this tensor once loaded
    pieces: bool = False  # one of several checkpoint tensors of one parameter (MoE experts)


@dataclass(frozen=True)
class Targets:
    """Every stored tensor's role, from headers (:func:`classify`)."""

    roles: dict[str, Role]  # float tensors, by checkpoint key, in the base's order
    non_float: list[str]  # integer buffers: must be equal in both models
    facts: ModelFacts

    def of(self, role: str) -> list[Role]:
        return [r for r in self.roles.values() if r.role == role]


@dataclass(frozen=True)
class Extraction:
    """What the adapter holds, once the changed tensors are known (:func:`decide`)."""

    lora: list[Role]  # changed weights to factorise
    biases: list[Role]  # changed biases of those layers, saved whole (bias="lora_only")
    modules: dict[str, list[Role]]  # modules_to_save: module -> its stored tensors
    left_out: dict[str, str]  # changed tensors the adapter does not hold, and why
    unchanged: list[str]  # equal in both models: nothing to hold
    saved: dict[str, str] = field(default_factory=dict)  # adapter key -> checkpoint key

    @property
    def modules_to_save(self) -> list[str]:
        """The modules PEFT replaces by saved copies (tied ones included), in model order."""
        out = dict.fromkeys(self.modules)
        for roles in self.modules.values():
            for r in roles:
                out.update(dict.fromkeys(_module_of(p) for p in r.tied))
        return list(out)


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def check_options(embeddings: str, other: str, target_modules: Sequence[str]) -> None:
    if embeddings not in EMBEDDINGS:
        raise InputError(
            f"embeddings {embeddings!r} is not one of {', '.join(EMBEDDINGS)}",
            hint="--embeddings lora|full|skip",
        )
    if other not in OTHERS:
        raise InputError(
            f"other {other!r} is not one of {', '.join(OTHERS)}", hint="--other full|skip"
        )
    for p in target_modules:
        try:
            re.compile(p)
        except re.error as e:
            raise InputError(f"--target-modules {p!r} is not a regular expression: {e}") from e


def classify(
    base: Checkpoint,
    facts: ModelFacts,
    *,
    target_modules: Sequence[str] = (),
    embeddings: str = "lora",
    other: str = "full",
) -> Targets:
    """The role of every tensor of ``base`` (headers and the model definition only).

    ``target_modules``: regexes; a Linear / Conv1D layer is factorised when one matches the
    end of its path at a ``.`` (PEFT's ``rank_pattern`` rule: ``q_proj``,
    ``layers\\.[0-3]\\..*``); default all. Embedding layers and the output head follow
    ``embeddings``; everything else ``other``.
    """
    check_options(embeddings, other, target_modules)
    _check_facts(base, facts)
    patterns = [re.compile(rf"(.*\.)?({p})$") for p in target_modules]
    heads = {facts.output_embeddings} if facts.output_embeddings else set()
    roles: dict[str, Role] = {}
    non_float: list[str] = []
    weights: dict[str, Role] = {}  # module -> its weight's role, for its bias
    pending = []
    for key, spec in base.tensors.items():
        if not spec.is_float:
            non_float.append(key)
            continue
        ks = facts.param_of_key.get(key)
        if key in facts.unexpected_keys or ks is None:
            roles[key] = Role(key, "dropped", "", "", "", reason=f"{facts.architecture} drops it")
            continue
        p = facts.params[ks.param]
        pieces = ks.expert is not None or ks.dim is not None
        tied = tuple(x for x in facts.tie_group(p.name) if x != p.name)
        mha = _mha_ancestor(facts, p.module)
        fact = facts.modules.get(p.module)
        kind = "multihead_attention" if mha else (fact.kind if fact else "other")
        module = mha or p.module
        if p.buffer:
            role = Role(key, "excluded", module, p.name, kind, "a buffer, not a parameter")
        elif kind in LORA_KINDS and p.attr == "weight" and not pieces:
            embedding = kind == "embedding" or module in heads
            role = _weight_role(key, module, p.name, kind, embedding, patterns, embeddings)
            weights[module] = role
        else:
            pending.append((key, module, p.name, kind, p.attr, pieces))
            continue
        roles[key] = _with(role, tied=tied)
    for key, module, param, kind, attr, pieces in pending:
        w = weights.get(module)
        if w is not None and attr == "bias" and kind in LORA_KINDS:
            role = _bias_role(key, module, param, kind, w, other)
        elif other == "skip":
            role = Role(key, "excluded", module, param, kind, "--other skip")
        else:
            role = Role(key, "module", module, param, kind, pieces=pieces)
        roles[key] = _with(role, tied=tuple(x for x in facts.tie_group(param) if x != param))
    roles = {k: roles[k] for k in base.tensors if k in roles}  # base order
    _check_ties(facts, roles)
    return Targets(roles, non_float, facts)


def _with(role: Role, **changes) -> Role:
    from dataclasses import replace

    return replace(role, **changes)


def _weight_role(key, module, param, kind, embedding, patterns, embeddings) -> Role:
    if embedding:
        if embeddings == "skip":
            return Role(key, "excluded", module, param, kind, "--embeddings skip")
        if embeddings == "full":
            return Role(key, "module", module, param, kind)
        return Role(key, "lora", module, param, kind)
    if patterns and not any(p.match(module) for p in patterns):
        return Role(key, "excluded", module, param, kind, "not matched by --target-modules")
    return Role(key, "lora", module, param, kind)


def _bias_role(key, module, param, kind, weight: Role, other: str) -> Role:
    """A Linear's bias follows its weight: saved whole beside a LoRA (``--other``), or in
    the module saved whole, or left out with it."""
    if weight.role == "lora":
        if other == "skip":
            return Role(key, "excluded", module, param, kind, "--other skip")
        return Role(key, "bias", module, param, kind)
    if weight.role == "module":
        return Role(key, "module", module, param, kind)
    return Role(key, "excluded", module, param, kind, weight.reason)


def _mha_ancestor(facts: ModelFacts, module: str) -> str | None:
    """The nn.MultiheadAttention holding ``module`` (its out_proj is no plain Linear: the
    attention reads the weight directly), or ``None``."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        m = facts.modules.get(path)
        if m is not None and m.kind == "multihead_attention":
            return path
    return None


def _check_facts(base: Checkpoint, facts: ModelFacts) -> None:
    where = base.reference
    inexact = [k for k, ks in facts.param_of_key.items() if not ks.exact]
    if inexact:
        ks = facts.param_of_key[inexact[0]]
        raise AdapterError(
            f"{facts.architecture} converts base tensors such as {inexact[0]!r} on load "
            f"({', '.join(ks.ops)} into {ks.param!r}), which stream-tv does not stream",
            where=where,
            hint="save the base once with transformers 5 (save_pretrained) and extract from that",
        )
    if facts.missing_params:
        raise AdapterError(
            f"the base lacks {len(facts.missing_params)} parameter(s) of {facts.architecture} "
            f"(e.g. {facts.missing_params[0]!r}): transformers would initialise them at random",
            where=where,
            hint="check that the base checkpoint is complete",
        )


def _check_ties(facts: ModelFacts, roles: Mapping[str, Role]) -> None:
    """Ties whose two tensors are both stored (or only the target is): transformers decides
    from the values; not handled here."""
    for pair in facts.ties:
        if pair.status not in ("both", "target"):
            continue
        keys = [
            *facts.keys_of_param.get(pair.target, ()),
            *facts.keys_of_param.get(pair.source, ()),
        ]
        if any(k in roles and roles[k].role not in ("excluded", "dropped") for k in keys):
            stored = "both are stored" if pair.status == "both" else "only the tied copy is stored"
            raise AdapterError(
                f"{facts.architecture} ties {pair.target} to {pair.source}, and {stored}: "
                "extract-lora does not handle such a checkpoint",
                where=", ".join(keys),
                hint="--embeddings skip leaves them out",
            )


# ---- after the scan: what the adapter holds ------------------------------------------------


def decide(targets: Targets, changed: Iterable[str]) -> Extraction:
    """What the adapter holds once ``changed`` (the keys whose bytes differ) is known.

    Raises where a changed tensor cannot be held as its role says: a non-float tensor, a
    parameter of the root module or one stored in pieces (``modules_to_save`` names a module
    and saves a parameter whole), a MultiheadAttention (not checked against PEFT).
    """
    changed = set(changed)
    bad_ints = [k for k in targets.non_float if k in changed]
    if bad_ints:
        raise MismatchError(
            f"non-float tensor {bad_ints[0]!r} differs between the models: an adapter cannot "
            "hold it",
            hint="are these the same architecture?",
        )
    roles = targets.roles
    lora = [r for r in roles.values() if r.role == "lora" and r.key in changed]
    with_lora = {r.module for r in lora}
    modules: dict[str, list[Role]] = {}
    biases, left_out = [], {}
    for r in roles.values():
        if r.key not in changed:
            continue
        if r.role in ("excluded", "dropped"):
            left_out[r.key] = r.reason
        elif r.role == "bias" and r.module in with_lora:
            biases.append(r)
        elif r.role in ("bias", "module"):  # a bias whose weight is unchanged: the layer whole
            modules.setdefault(r.module, [])
    for m in modules:
        modules[m] = [r for r in roles.values() if r.module == m and r.role != "dropped"]
        _check_saved_module(targets.facts, m, modules[m])
    by_model = {p: i for i, p in enumerate(targets.facts.modules)}
    modules = dict(sorted(modules.items(), key=lambda kv: by_model.get(kv[0], -1)))
    ext = Extraction(
        lora=lora,
        biases=biases,
        modules=modules,
        left_out=left_out,
        unchanged=[k for k in roles if k not in changed],
    )
    ext.saved.update(_saved_keys(ext))
    return ext


def _check_saved_module(facts: ModelFacts, module: str, roles: list[Role]) -> None:
    first = roles[0]
    if not module:
        raise AdapterError(
            f"{first.key!r} changed, and is a parameter of the model itself, not of a module: "
            "modules_to_save cannot name it",
            hint="--other skip leaves it out (listed)",
        )
    if any(r.pieces for r in roles):
        raise AdapterError(
            f"{first.key!r} changed, and {facts.architecture} stacks it with other checkpoint "
            f"tensors into one parameter ({first.param}): saving {module!r} whole is not "
            "supported",
            hint="--other skip leaves it out (listed)",
        )
    if first.kind == "multihead_attention":
        raise AdapterError(
            f"{first.key!r} changed, and belongs to the nn.MultiheadAttention {module!r}: "
            "saving it whole is not checked against PEFT",
            hint="--other skip leaves it out (listed)",
        )


def _saved_keys(ext: Extraction) -> dict[str, str]:
    """Adapter key -> checkpoint key of every tensor saved whole, as PEFT's
    ``save_pretrained`` names them (a LoRA layer's bias: ``<module>.base_layer.bias``)."""
    out = {}
    for roles in ext.modules.values():
        for r in roles:
            for param in (r.param, *r.tied):
                out[PEFT_PREFIX + param] = r.key
    for r in ext.biases:
        out[f"{PEFT_PREFIX}{r.module}.base_layer.bias"] = r.key
    return out


def lora_keys(module: str, kind: str) -> tuple[str, str]:
    """The adapter keys of a module's two factors.

    >>> lora_keys("model.embed_tokens", "embedding")
    ('base_model.model.model.embed_tokens.lora_embedding_A', 'base_model.model.model.embed_tokens.lora_embedding_B')
    """
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def peft_matches(
    names: Sequence[str], facts: ModelFacts, *, suffix_dot: bool
) -> dict[str, list[str]]:
    """For each of ``names`` (full module paths), the other module paths PEFT would also match:
    ``target_modules`` entries match a path ending with ``"." + name``, ``modules_to_save``
    ones any path ending with ``name`` (``suffix_dot=False``)."""
    paths = [p for m in facts.modules.values() for p in (m.path, *m.aliases)]
    out = {}
    for n in names:
        tail = "." + n if suffix_dot else n
        extra = [p for p in paths if p != n and p.endswith(tail)]
        if extra:
            out[n] = extra
    return out


def layer_of(module: str) -> tuple[str, str]:
    """``(group, layer)``: the module's path with its first index replaced by ``*``, and the
    path up to that index ("" when it has none), for the report's summaries.

    >>> layer_of("model.layers.3.self_attn.q_proj")
    ('model.layers.*.self_attn.q_proj', 'model.layers.3')
    >>> layer_of("model.embed_tokens")
    ('model.embed_tokens', '')
    """
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join([*parts[:i], "*", *parts[i + 1 :]]), ".".join(parts[: i + 1])
    return module, ""
