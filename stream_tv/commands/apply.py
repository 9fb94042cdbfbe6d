"""``apply``: ``base + sum(scale_i * tau_i)``, or TIES, DARE, breadcrumbs, DELLA of the tau_i.

Each input is a task vector, a fine-tuned model of the base (its task vector taken on the fly)
or a PEFT LoRA adapter (its delta taken on the fly); :mod:`.apply_inputs` says how its kind is
read, :mod:`.apply_merge` how its rows are made and merged. ``task_arithmetic`` (the
default) adds in float32 (float64 if an input is float64) and rounds once to the base's dtype;
the other methods follow mergekit 0.1.5 (:mod:`stream_tv.merging`).

>>> import tempfile
>>> from safetensors.torch import load_file, save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, d / "base.safetensors")
>>> save_file({"w": torch.full((2, 2), 0.5)}, d / "tv.safetensors")
>>> r = apply_task_vectors(d / "base.safetensors", [d / "tv.safetensors"], d / "out",
...                        scales=[-1.0], options=RunOptions(progress=False))
>>> load_file(d / "out" / "model-00001-of-00001.safetensors")["w"].tolist()
[[0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, ops, validate
from ..errors import InputError, MismatchError
from ..io.index import MAX_INDEX_BYTES, Checkpoint, TensorSpec, read_json
from ..io.writer import OutTensor
from ..jobs import Job, Outcome, Output, WriteResult, run_job, written
from ..lora import Adapter
from ..merging import MergeSpec, merge_spec
from ..options import RunOptions
from ..refs import open_checkpoint
from .apply_inputs import (
    ADAPTER,
    FLAGS,
    KINDS,
    TV,
    Input,
    as_input,
    evidence,
    kind_doubts,
    kind_list,
    open_inputs,
)
from .apply_merge import bind_adapter, merged_task, task_arithmetic_factors, terms_of
from .extract import equality_check


@dataclass
class ApplyResult(WriteResult):
    scales: list[float] = field(default_factory=list)  # the weight of each input
    untouched: list[str] = field(default_factory=list)  # base tensors no input changes
    method: str = "task_arithmetic"
    parameters: dict[str, object] = field(default_factory=dict)  # the method's, defaults filled
    kinds: list[str] = field(default_factory=list)  # tv, finetuned or adapter, per input
    warnings: list[str] = field(default_factory=list)  # inputs whose kind their values doubt


def apply_task_vectors(
    base: str | os.PathLike,
    task_vectors: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    method: str = "task_arithmetic",
    density: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: bool | str | None = None,
    seed: int | None = None,
    kinds: Sequence[str] | None = None,
    layouts: Mapping[str, bool] | None = None,
    options: RunOptions | None = None,
) -> ApplyResult:
    """Write ``base`` plus the inputs' task vectors, merged by ``method``.

    ``task_vectors``: task vectors, fine-tuned models of ``base`` or PEFT LoRA adapters, in
    any mix; ``kinds`` (``auto``, ``tv``, ``finetuned``, ``adapter``; one per input or one for
    all) says what each is where no file does (:mod:`stream_tv.commands.apply_inputs`).
    ``scales`` are the methods' weights (one per input, or one for all). ``method``:
    ``task_arithmetic`` (default: ``base + sum(scale_i * tau_i)`` in float32, rounded once),
    ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
    ``della_linear`` with mergekit 0.1.5's parameters and defaults (``density``, ``gamma``,
    ``epsilon`` per input; ``lam`` is mergekit's ``lambda``; ``seed`` keys DARE/DELLA's
    masks). Every parameter is checked, and every header, before any data is read. A tensor
    missing from an input counts as zero; non-float base tensors are copied. The output is a
    model directory (config and tokenizer copied), in the base's dtype unless ``dtype``.
    """
    if not task_vectors:
        raise InputError("no input given", hint="stream-tv apply BASE INPUT [INPUT ...] -o OUT")
    options = options or RunOptions()
    n = len(task_vectors)
    given = kind_list(kinds, n)
    spec = merge_spec(
        method,
        n,
        weights=validate.broadcast(scales, n, "scale", "input"),
        density=_one_for_all(density),
        gamma=_one_for_all(gamma),
        epsilon=_one_for_all(epsilon),
        lam=lam,
        normalize=normalize,
        rescale=rescale,
        seed=seed,
    )
    b = open_checkpoint(base)
    inputs = open_inputs(task_vectors, given)
    job = plan_apply(
        b, inputs, Path(out), spec=spec, dtype=dtype, layouts=layouts, recheck=not options.force
    )
    return run_job(job, options)


def _one_for_all(value: float | Sequence[float] | None) -> float | Sequence[float] | None:
    """One value in a list applies to every input (as ``--scale`` does)."""
    if value is not None and not isinstance(value, (int, float)) and len(value) == 1:
        return value[0]
    return value


def plan_apply(
    b: Checkpoint,
    inputs: Sequence[Input | Checkpoint],
    out: Path,
    *,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    spec: MergeSpec | None = None,
    layouts: Mapping[str, bool] | None = None,
    recheck: bool = True,
) -> Job[ApplyResult]:
    """The job writing ``b`` plus the merged task vectors of ``inputs`` (a bare checkpoint
    is what its index records, else a task vector). ``spec`` (default: task arithmetic with
    ``scales``) holds the method and its weights. ``recheck``: refuse kinds the inputs'
    indexes or values contradict (``verify`` re-plans from kinds the output records)."""
    xs = [x if isinstance(x, Input) else as_input(x) for x in inputs]
    if spec is None:
        weights = validate.broadcast(scales, len(xs), "scale", "input")
        spec = merge_spec("task_arithmetic", len(xs), weights=weights)
    if spec.inputs != len(xs):
        raise InputError(f"a merge of {spec.inputs} inputs planned for {len(xs)} inputs")
    bound, checks = _check_inputs(b, xs, layouts)
    warnings: list[str] = []
    if recheck:
        checks += evidence(b, xs, warnings)
    linear = spec.method.name == "task_arithmetic"
    factors = task_arithmetic_factors(spec) if linear else list(spec.weights)
    tasks, untouched = [], []
    for n, base_spec in b.tensors.items():
        out_dtype = dtype if (dtype is not None and base_spec.is_float) else base_spec.dtype
        terms = terms_of(n, b, xs, bound)
        if all(t is None for t in terms):
            untouched.append(n)
        if not base_spec.is_float or all(t is None for t in terms):
            tasks.append(apply_task(n, base_spec, [], out_dtype))  # a copy
        elif linear and all(t is None or t.kind == TV for t in terms):
            tv_terms = [(t.spec, f) for t, f in zip(terms, factors, strict=True) if t is not None]
            tasks.append(apply_task(n, base_spec, tv_terms, out_dtype))  # today's apply
        elif base_spec.numel == 0:
            tasks.append(apply_task(n, base_spec, [], out_dtype))
        else:
            method = None if linear else spec
            tasks.append(merged_task(n, base_spec, terms, out_dtype, spec=method, factors=factors))
    provenance = _provenance(b, xs, spec, layouts)

    def result(outcome: Outcome) -> ApplyResult:
        return ApplyResult(
            **written(outcome),
            scales=list(spec.weights),
            untouched=untouched,
            method=spec.method.name,
            parameters=spec.parameters(),
            kinds=[FLAGS[x.kind] for x in xs],
            warnings=warnings,
        )

    doubts = validate.provenance(b, expected="model", given_as="BASE")
    if recheck:
        doubts += kind_doubts(xs)
    return Job(
        "apply",
        tasks,
        result,
        sources=[b, *(x.source for x in xs)],
        checks=checks,
        output=Output(
            out,
            "apply",
            provenance,
            side_files_from=b.root,
            config_updates=_dtype_updates(b, dtype),
        ),
        doubts=doubts,
        description="apply" if linear else f"apply ({spec.method.name})",
    )


def _check_inputs(
    b: Checkpoint, xs: Sequence[Input], layouts: Mapping[str, bool] | None
) -> tuple[dict[int, dict], list[engine.Task]]:
    """Every input fits the base, from headers: keys, shapes, float tensors; adapters bound.
    Returns the adapters' bindings and the checks a fine-tuned model's integer buffers need."""
    bound, checks = {}, []
    for i, x in enumerate(xs):
        if x.kind == ADAPTER:
            assert isinstance(x.source, Adapter)
            bound[i] = bind_adapter(x.source, b, i, layouts)
            continue
        c = x.source
        assert isinstance(c, Checkpoint)
        if x.kind == TV:
            validate.subset(
                c,
                b,
                what="the task vector",
                whole_label="the base",
                hint="was this task vector extracted from another base model?",
            )
            validate.shapes(b, c, list(c.tensors))
            validate.floats(c, list(c.tensors), also=b)
            continue
        names, missing = validate.key_sets(b, c, allow_missing=True, other_label="model")
        if [n for n in missing if n in c or b[n].is_float]:
            ex = ", ".join(missing[:3])
            raise MismatchError(
                f"INPUT {i + 1} (a fine-tuned model) and the base do not have the same float "
                f"tensors ({len(missing)} in one of them only, e.g. {ex})",
                where=c.reference,
                hint="is it a fine-tuned model of this base? A task vector of some tensors "
                "only is an input of --kind tv",
            )
        validate.shapes(b, c, names)
        validate.same_kind(b, c, names)
        refs = (b.reference, c.reference)
        checks += [equality_check(n, b[n], c[n], refs) for n in names if not b[n].is_float]
    return bound, checks


def _provenance(
    b: Checkpoint, xs: Sequence[Input], spec: MergeSpec, layouts: Mapping[str, bool] | None
) -> dict[str, object]:
    from .merge import layout_provenance  # merge.py imports this module

    return {
        "base": b.reference,
        "inputs": [x.reference for x in xs],
        "kinds": [FLAGS[x.kind] for x in xs],
        "scales": list(spec.weights),
        "method": spec.method.name,
        **spec.parameters(),
        **layout_provenance(layouts),
    }


def replan_apply(
    b: Checkpoint,
    references: Sequence[str],
    metadata: Mapping[str, object],
    out: Path,
    *,
    scales: Sequence[float],
    dtype: torch.dtype | None,
) -> Job[ApplyResult]:
    """The job an ``apply`` output's index records, on the given inputs (for ``verify``):
    the inputs taken as the kinds it records, the method with its recorded parameters."""
    from .merge import recorded_layouts

    recorded = metadata.get("kinds")
    kinds = list(recorded) if isinstance(recorded, list) else ["tv"] * len(references)
    if len(kinds) != len(references) or any(k not in FLAGS.values() for k in kinds):
        raise InputError(
            f"the index records input kinds {recorded!r} for {len(references)} input(s)",
            hint="pass every input given to apply, in order",
        )
    xs = [
        Input(
            r,
            KINDS[k],
            Adapter.load(r) if k == "adapter" else open_checkpoint(r),
            "the output's index",
        )
        for r, k in zip(references, kinds, strict=True)
    ]
    keys = {"density": "density", "gamma": "gamma", "epsilon": "epsilon", "lambda": "lam"}
    params = {arg: metadata[key] for key, arg in keys.items() if key in metadata}
    for key in ("normalize", "rescale", "seed"):
        if key in metadata:
            params[key] = metadata[key]
    method = str(metadata.get("method") or "task_arithmetic")
    spec = merge_spec(method, len(xs), weights=list(scales), **params)  # type: ignore[arg-type]
    return plan_apply(
        b, xs, out, spec=spec, dtype=dtype, layouts=recorded_layouts(metadata), recheck=False
    )


def _dtype_updates(b: Checkpoint, dtype: torch.dtype | None) -> dict[str, object]:
    """With ``--dtype``, the copied config.json says the dtype written (else
    ``from_pretrained(dtype="auto")`` would load float32 weights as the base's bfloat16)."""
    path = b.root / "config.json" if b.root is not None else None
    if dtype is None or path is None or not path.is_file():
        return {}
    config, _ = read_json(path, what="config.json", limit=MAX_INDEX_BYTES)
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(config, dict) and k in config]
    return dict.fromkeys(keys, str(dtype).removeprefix("torch."))


def apply_task(
    name: str, base: TensorSpec, terms: Sequence[tuple[TensorSpec, float]], dtype: torch.dtype
) -> engine.Task:
    """The task writing ``base + sum(scale * tv)`` for one tensor (a copy when no terms)."""
    specs = [base, *(t for t, _ in terms)]
    factors = [s for _, s in terms]
    compute: Callable[[engine.Chunk], torch.Tensor]
    if not terms:

        def compute(chunk: engine.Chunk) -> torch.Tensor:
            return chunk.out.copy_(ops.round_to(chunk.inputs[0], chunk.out.dtype))

        work = 0
    else:

        def compute(chunk: engine.Chunk) -> torch.Tensor:
            base_rows, *tv_rows = chunk.inputs
            return ops.add_scaled(
                base_rows, list(zip(tv_rows, factors, strict=True)), out=chunk.out
            )

        work = base.row_numel * 4 if dtype.itemsize < 4 else 0
    return engine.Task(
        name, specs, compute, out=OutTensor(name, dtype, base.shape), work_row_bytes=work
    )
