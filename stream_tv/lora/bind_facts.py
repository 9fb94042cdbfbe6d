"""Binding with the model definition: what PEFT and transformers do, read from the class.

:class:`FactsBinder` takes every fact from :class:`~.model_facts.ModelFacts` (the base's
transformers class built on the meta device), never from names or shapes:

- a module's kind and layout (a square GPT-2 ``Conv1D`` deep inside an encoder-decoder is a
  Conv1D), the parameter a ``target_parameters`` wrapper targets (nested wrappers: the
  module's first targeted parameter, in registration order, is the innermost), how an expert
  stack is laid out (``is_transposed``) and where each expert lives in the checkpoint;
- which parameters share storage once loaded (ties, as transformers applies them: a tie whose
  two tensors are both stored holds only if they are equal), and which ``modules_to_save``
  copy unties one (PEFT replaces the module by its trained copy);
- the output: per parameter, the names ``save_pretrained`` writes it under (legacy GPT-2
  ``h.0`` -> ``transformer.h.0``, Llava's transformers-4 names kept), in the dtype it loads in
  (T5's ``wo`` in float32 from a float16 base), tied parameters written once, keys the class
  drops left out; and ``tie_word_embeddings: false`` where PEFT's merge unties the head.

Steps on one tensor follow PEFT's merge order: module by module in ``named_modules`` order
(``module.position``), each module's adapters in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..io.index import Checkpoint, TensorSpec
from .adapter import Adapter, LoraModule, SavedTensor
from .bind import check_factors, check_magnitude, complaint, layout_of, plan_of, stored_equal
from .bind_rules import check_tokens, token_indices
from .model_facts import KeySlice, ModelFacts, ModuleFact
from .plan import MergePlan, Planned, Step, TensorMerge, step_order

MODEL = "model definition"
LAYER_KINDS = {  # adapter factor kind -> model module kinds PEFT wraps with that layer
    "linear": ("linear", "conv1d"),
    "embedding": ("embedding",),
    "nn_conv1d": ("nn_conv1d",),
    "conv2d": ("conv2d",),
    "conv3d": ("conv3d",),
}


@dataclass
class Storage:
    """One tensor of the merged model and the parameters sharing it (source first)."""

    members: list[str]
    data: str  # the parameter whose checkpoint keys hold its data
    steps: list[Step] = field(default_factory=list)
    replacement: SavedTensor | None = None
    copy: bool = False  # the replacement is a modules_to_save copy (its module is untied)


class FactsBinder:
    """Binding one adapter to one base with the base's :class:`ModelFacts`."""

    def __init__(
        self, adapter: Adapter, base: Checkpoint, facts: ModelFacts, layouts, *, stand_in=False
    ):
        self.a, self.base, self.f, self.layouts = adapter, base, facts, layouts
        self.stand_in = stand_in  # base: a task vector with the base's names (compare)
        self.cfg = adapter.config
        self.bad = complaint(adapter)
        self.position = {p: i for i, p in enumerate(facts.modules)}
        self.basis = f"the model definition ({facts.architecture}, transformers {facts.transformers_version})"
        self.dropped: dict[str, str] = {}

    def plan(self) -> MergePlan:
        self.check_checkpoint()
        storages = self.tie_storages()
        saved = sorted(self.a.saved, key=lambda s: self.position.get(s.module, -1))
        for s in saved:
            self.add_saved(storages, s)
        bound = []
        for m in self.a.modules:
            module, targets = self.module(m)
            bound.append(module)
            for param, step in targets:
                self.add_step(storages, param, step)
        outputs, merges = self.outputs(storages)
        return plan_of(
            self.a,
            self.base,
            merges,
            bound,
            outputs=outputs,
            dropped=self.dropped,
            config_updates=self.config_updates(storages),
            basis=self.basis,
        )

    # ---- the checkpoint as the class loads it ---------------------------------------------

    def check_checkpoint(self) -> None:
        f, where = self.f, self.base.reference
        inexact = [k for k, ks in f.param_of_key.items() if not ks.exact]
        if inexact:
            ks = f.param_of_key[inexact[0]]
            raise self.bad(
                f"{f.architecture} converts base tensors such as {inexact[0]!r} on load "
                f"({', '.join(ks.ops)} into {ks.param!r}), which stream-tv does not stream",
                "merge with PEFT itself, or save the base once with transformers 5",
            )
        if f.missing_params and not self.stand_in:
            raise self.bad(
                f"the base {where} lacks {len(f.missing_params)} parameter(s) of "
                f"{f.architecture} (e.g. {f.missing_params[0]!r}): transformers would "
                "initialise them, and stream-tv cannot write what it would",
                "check that the base checkpoint is complete",
            )
        for key, ks in f.param_of_key.items():
            want = f.params[ks.param].shape
            if ks.expert is None and ks.dim is None and self.base[key].shape != want:
                raise self.bad(
                    f"base tensor {key!r} is {list(self.base[key].shape)}, but "
                    f"{f.architecture}'s {ks.param} is {list(want)} (from config.json)",
                    "the config.json and the weights belong to different models",
                )
        for key in f.unexpected_keys:
            self.dropped[key] = f"{f.architecture} drops it on load, and PEFT's save omits it"

    def tie_storages(self) -> dict[str, Storage]:
        """Parameter -> its storage once loaded: tied parameters share one."""
        f = self.f
        storages = {p: Storage([p], p) for p in f.params}
        for pair in f.ties:
            if pair.status not in ("source", "target", "both"):
                continue
            if pair.status == "both" and self.stand_in:
                raise self.bad(
                    f"{pair.target} and {pair.source} are both stored: whether transformers ties "
                    "them depends on the base's values, which a task vector does not hold",
                    "pass --base too",
                )
            if pair.status == "both" and not self.both_equal(pair.target, pair.source):
                continue
            s, t = storages[pair.source], storages[pair.target]
            if s is not t:
                s.members += t.members
                for m in t.members:
                    storages[m] = s
        for s in {id(s): s for s in storages.values()}.values():
            with_keys = [m for m in s.members if f.keys_of_param.get(m)]
            s.data = s.members[0] if s.members[0] in with_keys or not with_keys else with_keys[0]
        return storages

    def both_equal(self, target: str, source: str) -> bool:
        """The config ties ``target`` to ``source`` and the base stores both: transformers
        ties them only if they are equal (``torch.equal`` once loaded)."""
        f = self.f
        kt, ks = f.keys_of_param[target], f.keys_of_param[source]
        if len(kt) != 1 or len(ks) != 1:
            return False
        equal = stored_equal(self.base[kt[0]], self.base[ks[0]], f.params[source].dtype)
        if equal:
            self.dropped[kt[0]] = (
                f"equal to {ks[0]!r}: transformers ties {target} to {source}, saved once"
            )
        return equal

    # ---- adapter modules -> parameters ---------------------------------------------------------

    def module(self, m: LoraModule) -> tuple[LoraModule, list[tuple[str, Step]]]:
        """``m`` bound (kind, parameter, position), and the steps it adds, by parameter."""
        if m.kind == "tokens":
            return self.tokens(m)
        owner, depth = m.name, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner.removesuffix(".base_layer"), depth + 1
        targets = self.param_targets(owner)
        if targets:
            return self.param_module(m, owner, depth, targets)
        if m.name.endswith(".base_layer.out_proj"):
            return self.mha_out_proj(m, m.name.removesuffix(".base_layer.out_proj"))
        fact = self.fact(m.name)
        self.check_rank(m, m.name)
        if fact.kind == "multihead_attention":
            return self.mha_in_proj(m, fact)
        return self.layer(m, fact)

    def fact(self, path: str) -> ModuleFact:
        f = self.f
        if path in f.modules:
            return f.modules[path]
        first = next((p for p, mf in f.modules.items() if path in mf.aliases), None)
        if first is not None:
            raise self.bad(
                f"LoRA module {path!r} is {first!r} of {f.architecture} under another path; "
                "PEFT names a shared module by its first path",
                "re-save the adapter with PEFT",
            )
        tail = path.rpartition(".")[2]
        close = [p for p in f.modules if p.endswith("." + tail)][:3]
        raise self.bad(
            f"LoRA module {path!r} is not a module of {f.architecture}"
            + (f" (modules named {tail!r}: {', '.join(close)})" if close else ""),
            "check that the adapter belongs to this base model",
        )

    def check_rank(self, m: LoraModule, name: str) -> None:
        want = self.cfg.rank_for(name)
        if m.specs["A"].shape[0] != want:
            raise self.bad(
                f"module {m.name!r}: rank {m.specs['A'].shape[0]} in the weights, but "
                f"adapter_config.json gives r={want} (field 'r' or 'rank_pattern')",
                "the config and the weights come from different adapters",
            )

    def shape(self, param: str) -> tuple[int, ...]:
        return tuple(self.f.params[param].shape)

    def bound(self, m: LoraModule, param: str, owner: str, **changes) -> LoraModule:
        keys = self.f.stored_as(param)
        if not keys:
            raise self.bad(f"{param!r} of {self.f.architecture} is not in the base checkpoint")
        spec = self.base[keys[0]]
        if not spec.is_float:
            raise self.bad(
                f"LoRA module {m.name!r}: base tensor {spec.name!r} has dtype {spec.dtype_str}",
                "quantised bases cannot be merged exactly; use an unquantised base",
            )
        return replace(
            m,
            base_key=keys[0],
            layout=MODEL,
            param=param,
            position=self.position[owner],
            **changes,
        )

    def layer(self, m: LoraModule, fact: ModuleFact) -> tuple[LoraModule, list]:
        """A Linear, GPT-2 Conv1D, Embedding or torch convolution layer."""
        kind, name = fact.kind, m.name
        if kind not in LAYER_KINDS.get(m.kind, ()):
            raise self.bad(
                f"LoRA module {name!r} has {m.kind} factors, but {self.f.architecture}'s "
                f"{name} is a {fact.cls.rpartition('.')[2]} ({kind})"
                + (": PEFT cannot wrap it with LoRA" if kind == "other" else ""),
                "check that the adapter belongs to this base model",
            )
        given = layout_of(self.layouts, name) if kind in ("linear", "conv1d") else None
        if given is not None and given != (kind == "conv1d"):
            raise self.bad(
                f"--{'' if given else 'no-'}fan-in-fan-out says {name!r} is "
                f"{'a Conv1D' if given else 'a Linear'}, but {self.f.architecture} defines it as "
                f"{fact.cls.rpartition('.')[2]}",
                "drop the pattern: with the model definition it is not needed",
            )
        param = f"{name}.weight"
        weight = self.shape(param)
        check_factors(m, kind, weight, param, self.bad)
        if kind == "conv3d" and weight[2:4] == (1, 1):
            raise self.bad(
                f"LoRA module {name!r}: a Conv3d with kernel {list(weight[2:])}: PEFT's merge "
                "takes its 1x1 Conv2d shortcut on it, which does not compute the delta",
                "merge with PEFT itself to see what it does",
            )
        check_magnitude(m, kind, self.bad)
        bias = f"{name}.bias"
        if m.lora_bias and bias not in self.f.params:
            raise self.bad(
                f"LoRA module {name!r} has lora_bias, but {self.f.architecture}'s {name} has "
                "no bias",
                "PEFT cannot merge lora_bias into a layer without bias either",
            )
        bias_key = self.f.stored_as(bias)[0] if m.lora_bias else None
        b = self.bound(m, param, name, kind=kind, bias_key=bias_key)
        steps = [(param, Step(b, "weight", self.a))]
        if m.lora_bias:
            steps.append((bias, Step(b, "bias", self.a)))
        return b, steps

    def mha_in_proj(self, m: LoraModule, fact: ModuleFact) -> tuple[LoraModule, list]:
        """nn.MultiheadAttention: its LoRA is on ``in_proj_weight``, rounded to the weight
        dtype before the add (PEFT's ``MultiheadAttention.merge``)."""
        param = f"{m.name}.in_proj_weight"
        if param not in self.f.params:
            raise self.bad(
                f"LoRA module {m.name!r}: a MultiheadAttention with separate q/k/v "
                "projections, which PEFT does not support",
                "check that the adapter belongs to this base model",
            )
        self.plain(m, "MultiheadAttention")
        check_factors(m, "linear", self.shape(param), param, self.bad)
        b = self.bound(m, param, m.name, kind="linear")
        return b, [(param, Step(b, "weight", self.a, twice=True))]

    def mha_out_proj(self, m: LoraModule, owner: str) -> tuple[LoraModule, list]:
        """MultiheadAttention's out_proj: PEFT adds its delta twice (``MultiheadAttention.merge``
        adds it rounded to the weight dtype, then merges the nested Linear, which adds it
        again), as its unmerged forward applies it twice: reproduced, so the merged model
        computes what the adapter computed."""
        if self.fact(owner).kind != "multihead_attention":
            self.fact(m.name)  # refuses: no such module
        param = f"{owner}.out_proj.weight"
        self.plain(m, "MultiheadAttention")
        check_factors(m, "linear", self.shape(param), param, self.bad)
        self.check_rank(m, owner)
        cfg = self.cfg
        b = self.bound(
            m,
            param,
            owner,
            kind="linear",
            alpha=cfg.alpha_for(owner),
            scaling=cfg.scaling_for(owner),
        )
        return b, [
            (param, Step(b, "weight", self.a, twice=True, sub=0)),
            (param, Step(b, "weight", self.a, twice=False, sub=1)),
        ]

    def plain(self, m: LoraModule, what: str) -> None:
        if m.kind != "linear" or m.dora or m.lora_bias:
            feature = "DoRA" if m.dora else "lora_bias" if m.lora_bias else f"{m.kind} factors"
            raise self.bad(
                f"LoRA module {m.name!r} ({what}) has {feature}, which PEFT does not support there",
                "check that the adapter belongs to this base model",
            )

    def param_targets(self, owner: str) -> list[str]:
        """The parameters of ``owner`` that ``target_parameters`` selects, in registration order
        (PEFT's matching: the full name, or a ``.``-bounded suffix of it)."""
        wanted = self.cfg.target_parameters
        fact = self.f.modules.get(owner)
        if not wanted or fact is None:
            return []
        return [
            p
            for p in fact.params
            if not self.f.params[p].buffer
            and (p in wanted or any(p.endswith("." + t) for t in wanted))
        ]

    def param_module(self, m, owner: str, depth: int, targets: list[str]):
        """A LoRA on an ``nn.Parameter`` (PEFT's ``ParamWrapper``): the ``depth``-th wrapper
        from the outside wraps the module's ``depth``-th targeted parameter from the last."""
        if depth >= len(targets):
            raise self.bad(
                f"LoRA module {m.name!r}: {len(targets)} parameter(s) of {owner!r} are targeted "
                f"({', '.join(targets)}), but the adapter nests {depth + 1} wrappers",
                "the config and the weights come from different adapters",
            )
        param = targets[len(targets) - 1 - depth]
        self.plain(m, "target_parameters")
        shape, fact = self.shape(param), self.f.modules[owner]
        if len(shape) == 3:
            experts, d1, d2 = shape
            out_f, in_f = (d2, d1) if fact.transposed else (d1, d2)
        elif len(shape) == 2:
            experts, (out_f, in_f) = 1, shape
        else:
            raise self.bad(f"{param!r} is {len(shape)}-D; PEFT targets 2-D and 3-D parameters")
        r = self.cfg.rank_for(param)
        a, b = tuple(m.specs["A"].shape), tuple(m.specs["B"].shape)
        if a != (r * experts, in_f) or b != (out_f, r * experts):
            raise self.bad(
                f"LoRA module {m.name!r} targets {param!r} {list(shape)} (r={r}, {experts} "
                f"expert(s)): it needs A [{r * experts}, {in_f}] and B [{out_f}, {r * experts}], "
                f"the adapter has A {list(a)} and B {list(b)}",
                "the config and the weights come from different adapters",
            )
        bound = self.bound(
            m,
            param,
            owner,
            kind="expert" if len(shape) == 3 else "param",
            rank=r,
            alpha=self.cfg.alpha_for(param),
            scaling=self.cfg.scaling_for(param),
            in_features=in_f,
            out_features=out_f,
            experts=experts,
            transposed=fact.transposed,
        )
        return bound, [(param, Step(bound, "weight", self.a, twice=True))]

    def tokens(self, m: LoraModule) -> tuple[LoraModule, list]:
        """``trainable_token_indices``: rows of an embedding written over (a tied head shares
        them: PEFT's tied token adapter writes the same rows into the same tensor)."""
        fact = self.fact(m.name)
        indices = token_indices(self.a, m.name, self.bad)
        if "" in self.cfg.trainable_tokens and len(self.cfg.trainable_tokens) == 1:
            if m.name != self.f.input_embeddings:
                raise self.bad(
                    f"trainable tokens saved for {m.name!r}, but a list of token ids targets "
                    f"the input embedding, {self.f.input_embeddings!r}",
                    "the config and the weights come from different adapters",
                )
        param = f"{m.name}.weight"
        shape = self.shape(param)
        ok = fact.kind in ("embedding", "linear") and len(shape) == 2
        if not ok or shape[1] != m.in_features or m.out_features != len(indices):
            raise self.bad(
                f"trainable tokens of {m.name!r}: {m.out_features} rows of {m.in_features} for "
                f"{len(indices)} token ids, but {param} is {list(shape)}",
                "check that the adapter belongs to this base model",
            )
        if max(indices, default=0) >= shape[0]:
            raise self.bad(f"trainable token id {max(indices)} is outside {param} {list(shape)}")
        b = self.bound(m, param, m.name, indices=indices)
        return b, [(param, Step(b, "weight", self.a))]

    # ---- storages: saved tensors and steps -------------------------------------------------

    def add_saved(self, storages: dict[str, Storage], s: SavedTensor) -> None:
        f, param = self.f, f"{s.module}.{s.param}"
        if param not in f.params:
            raise self.bad(
                f"saved tensor {s.key!r} replaces {param!r}, which is not a parameter of "
                f"{f.architecture}",
                "check that the adapter belongs to this base model",
            )
        if s.spec.shape != f.params[param].shape:
            raise self.bad(
                f"saved tensor {s.key!r} has shape {list(s.spec.shape)}, but {param} is "
                f"{list(f.params[param].shape)}",
                "a resized vocabulary needs the resized base model",
            )
        st = storages[param]
        copy = not s.base_copy and any(s.module.endswith(t) for t in self.cfg.modules_to_save)
        if copy:
            if len(st.members) > 1:
                if self.cfg.ensure_weight_tying:
                    raise self.bad(
                        f"modules_to_save {s.module!r} with ensure_weight_tying on a tied "
                        "parameter: not checked against PEFT",
                        "merge with PEFT itself",
                    )
                # PEFT's ModulesToSaveWrapper: the merged model's module is the trained copy,
                # its own tensor; the other parameters keep sharing the base one.
                st.members.remove(param)
                st = storages[param] = Storage([param], st.data)
            st.copy = True
        elif st.replacement is not None and (
            (st.replacement.spec.shape, st.replacement.spec.dtype) != (s.spec.shape, s.spec.dtype)
        ):
            raise self.bad(
                f"saved tensors {st.replacement.key!r} and {s.key!r} both replace {param!r} "
                "(tied weights) but differ in dtype or shape"
            )
        st.replacement = s  # a later module wins, as in PEFT's load order

    def add_step(self, storages: dict[str, Storage], param: str, step: Step) -> None:
        st = storages[param]
        if st.copy:
            raise self.bad(
                f"LoRA module {step.module.name!r} changes {param!r}, whose module is in "
                "modules_to_save",
                "the config and the weights come from different adapters",
            )
        st.steps.append(step)

    # ---- what save_pretrained writes -----------------------------------------------------------

    def outputs(self, storages: dict[str, Storage]):
        f, order = self.f, {k: i for i, k in enumerate(self.base.tensors)}
        rows: list[tuple[int, str, Planned, TensorMerge | None]] = []
        used: set[str] = set()
        for st in {id(s): s for s in storages.values()}.values():
            kept = [p for p in st.members if p not in f.tied] or [sorted(st.members)[-1]]
            if self.stand_in and not f.keys_of_param.get(st.data):
                continue  # a tensor the task vector leaves out
            for param in kept if len(st.members) > 1 else st.members:
                names = f.saved_as.get(param)
                if names is None:
                    raise self.bad(
                        f"{f.architecture} saves {param!r} together with other parameters "
                        "(a many-to-one conversion), which stream-tv does not stream",
                        "merge with PEFT itself",
                    )
                for name in names:
                    key, part = self.source(name, param, st, names)
                    used.add(key)
                    planned = Planned(name, self.base[key], f.params[param].dtype)
                    tm = self.merge(planned, part, st, key if st.data == param else None)
                    rows.append((order[key], name, planned, tm))
        rows.sort(key=lambda r: (r[0], r[1]))
        names = [r[1] for r in rows]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise self.bad(
                f"{f.architecture}'s save writes two parameters as {twice!r}",
                "merge with PEFT itself",
            )
        for key in self.base.tensors:
            if key not in used and key not in self.dropped:
                ks = f.param_of_key.get(key)
                self.dropped[key] = (
                    f"{ks.param} is tied to another parameter, saved once"
                    if ks is not None and ks.param in f.tied
                    else "not a tensor PEFT's save_pretrained writes"
                )
        outputs = tuple(r[2] for r in rows)
        return outputs, {r[1]: r[3] for r in rows if r[3] is not None}

    def source(self, name: str, param: str, st: Storage, names) -> tuple[str, KeySlice | None]:
        """The base tensor output ``name`` is written from, and the part of the parameter it
        holds (``None``: all of it)."""
        f = self.f
        keys = f.keys_of_param.get(st.data, ())
        if name in keys:
            ks = f.param_of_key[name]
            return name, ks if (ks.expert is not None or ks.dim is not None) else None
        if len(keys) == 1 and len(names) == 1:
            ks = f.param_of_key[keys[0]]
            if ks.renamed_only and ks.expert is None and ks.dim is None:
                return keys[0], None
        raise self.bad(
            f"cannot tell which base tensor {f.architecture}'s save writes as {name!r} "
            f"({param}; stored as {list(keys)})",
            "merge with PEFT itself",
        )

    def merge(
        self, out: Planned, part: KeySlice | None, st: Storage, base_name: str | None
    ) -> TensorMerge | None:
        if not st.steps and st.replacement is None:
            return None
        steps = []
        for s in st.steps:
            if part is not None and s.module.kind != "expert":
                raise self.bad(
                    f"LoRA module {s.module.name!r} changes {s.module.param!r}, which the base "
                    f"stores in pieces ({out.key!r} is one); only expert stacks are supported"
                )
            steps.append(replace(s, part=part) if part is not None else s)
        if st.replacement is not None and part is not None:
            raise self.bad(
                f"saved tensor {st.replacement.key!r} replaces a parameter the base stores in "
                "pieces, which is not supported"
            )
        steps.sort(key=step_order)
        check_tokens(out.key, steps, self.bad)
        rep: TensorSpec | None = st.replacement.spec if st.replacement is not None else None
        return TensorMerge(
            key=out.key,
            spec=out.spec,
            shape=tuple(out.spec.shape),
            dtype=out.dtype,
            replacement=rep,
            replacement_is_base_copy=st.replacement is not None and st.replacement.base_copy,
            steps=tuple(steps),
            base_name=base_name,
        )

    def config_updates(self, storages: dict[str, Storage]) -> dict[str, object]:
        """PEFT's merge sets ``tie_word_embeddings: false`` when the config ties the
        embeddings but the merged model's input and output embeddings are two tensors."""
        f = self.f
        if not f.tie_word_embeddings.get("") or not f.input_embeddings or not f.output_embeddings:
            return {}
        pi, po = f"{f.input_embeddings}.weight", f"{f.output_embeddings}.weight"
        if pi in storages and po in storages and storages[pi] is not storages[po]:
            return {"tie_word_embeddings": False}
        return {}
