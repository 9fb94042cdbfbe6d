"""``extract-lora``: a fine-tune's task vector compressed into a PEFT LoRA adapter, streamed.

For every Linear / GPT-2 Conv1D / Embedding weight that changed, ``T = finetuned - base`` is
factorised by the randomized SVD of :class:`~stream_tv.lowrank.StreamedSVD`: one engine task
per tensor, ``2 + 2q`` passes over its rows (``q = power_iters``), ``T`` formed chunk by
chunk and never whole, the sketch held by the task's session on the compute device. The
task's ``finish`` picks the rank (``rank``, or the smallest keeping ``energy`` of
``||T||^2``, capped by ``max_rank``), turns the factors into PEFT's ``lora_A`` / ``lora_B``
(scaling 1: ``lora_alpha = r``, per-module ranks in ``rank_pattern`` / ``alpha_pattern``) and
spools them (:class:`~stream_tv.lora.adapter_out.AdapterOutput`); tensors a LoRA cannot hold
(norms, a layer's bias) are saved whole, through the same engine. Which tensor is which layer
comes from the base's model definition (:mod:`stream_tv.lora.extract_targets`).

Before that, a scan (the first MiB of each tensor, then the whole of those still equal)
finds the tensors equal in both models: they cost nothing more and are left out.

Example (not run here)::

    import stream_tv
    r = stream_tv.extract_lora("base/", "finetuned/", "adapter/", rank=16)
    r.report.factorised[0].retained_energy
    stream_tv.extract_lora("base/", "finetuned/", None, energy=0.9, max_rank=64, dry_run=True)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__, engine, ops, validate
from ..errors import InputError, MismatchError
from ..io.index import Checkpoint, TensorSpec, dtype_name
from ..io.outdir import check_output_file, write_file
from ..io.writer import OutTensor
from ..jobs import Job, Outcome, check_output, run_job
from ..lora.adapter_out import AdapterOutput
from ..lora.bind import read_config
from ..lora.extract_targets import (
    Extraction,
    Role,
    Targets,
    classify,
    decide,
    layer_of,
    lora_keys,
    peft_matches,
)
from ..lora.model_facts import read_model_facts
from ..lowrank import StreamedSVD, lora_rank_config, peft_lora_tensors, tensor_seed
from ..options import RunOptions
from ..refs import open_checkpoint
from ..report.extract_lora import ExtractLoraReport, TensorFigures

DEFAULT_RANK = 16
DEFAULT_MAX_RANK = 64  # with --energy
SCAN_PREFIX_BYTES = 1 << 20


@dataclass(frozen=True)
class LowRankSettings:
    """How each tensor is factorised; checked when made.

    Exactly one of ``rank`` (one rank for all) and ``energy`` (per tensor the smallest rank
    keeping that fraction of ``||T||_F^2``, at most ``max_rank``, default 64); neither gives
    ``rank=16``. ``power_iters``, ``oversample``, ``seed``: see
    :class:`~stream_tv.lowrank.StreamedSVD` (oversample ``None``: ``max(64, 2 * rank)``).
    ``dtype``: of the factors (default: the fine-tuned tensor's).
    """

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    power_iters: int = 2
    oversample: int | None = None
    seed: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise InputError("give a rank or an energy, not both", hint="--rank R or --energy E")
        if self.rank is None and self.energy is None:
            object.__setattr__(self, "rank", DEFAULT_RANK)
        if self.rank is not None:
            if self.max_rank is not None:
                raise InputError(
                    "max_rank caps an energy selection", hint="--energy E --max-rank N"
                )
            if not isinstance(self.rank, int) or self.rank < 1:
                raise InputError(f"rank must be an integer of at least 1, got {self.rank}")
        elif not 0.0 < self.energy <= 1.0:
            raise InputError(
                f"energy must be in (0, 1], got {self.energy}",
                hint="a fraction of the task vector's squared norm, e.g. --energy 0.9",
            )
        if self.max_rank is not None and self.max_rank < 1:
            raise InputError(f"max_rank must be at least 1, got {self.max_rank}")
        if self.power_iters < 0 or (self.oversample is not None and self.oversample < 0):
            raise InputError("power_iters and oversample must be >= 0")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise InputError(f"the factors' dtype must be a float type, not {self.dtype}")

    @property
    def cap(self) -> int:
        """The largest rank any tensor may get: the sketch is sized for it."""
        return self.rank if self.rank is not None else (self.max_rank or DEFAULT_MAX_RANK)

    def describe(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "energy": self.energy,
            "max_rank": None if self.rank is not None else self.cap,
            "power_iters": self.power_iters,
            "oversample": self.oversample,
            "seed": self.seed,
            "dtype": dtype_name(self.dtype) if self.dtype is not None else None,
        }


@dataclass
class ExtractLoraResult:
    """What ``extract_lora`` did: the adapter (``None`` for a dry run) and its report."""

    output: Path | None
    report: ExtractLoraReport
    config: dict[str, Any] | None  # adapter_config.json as written
    bytes_written: int
    bytes_read: int
    seconds: float


def extract_lora(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    target_modules: Sequence[str] = (),
    embeddings: str = "lora",
    other: str = "full",
    power_iters: int = 2,
    oversample: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    report: str | os.PathLike | None = None,
    dry_run: bool = False,
    options: RunOptions | None = None,
) -> ExtractLoraResult:
    """Write ``finetuned - base`` as a PEFT LoRA adapter in ``out`` (see the module docstring).

    ``target_modules``: regexes on module paths (PEFT's ``rank_pattern`` rule) choosing the
    Linear / Conv1D layers to factorise (default all); ``embeddings``: Embedding layers and
    the output head as a LoRA (``"lora"``), saved whole (``"full"``) or left out (``"skip"``);
    ``other``: changed tensors a LoRA cannot hold (norms, biases) saved whole (``"full"``) or
    left out (``"skip"``). ``report``: a JSON file for the report, checked before any data is
    read. ``dry_run``: the report only, no adapter (``out`` may be ``None``). Everything that
    headers can tell is checked first; the adapter is never half-written.
    """
    t0 = time.perf_counter()
    options = options or RunOptions()
    settings = LowRankSettings(rank, energy, max_rank, power_iters, oversample, seed, dtype)
    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    targets = targets_of(b, f, target_modules=target_modules, embeddings=embeddings, other=other)
    names = list(targets.roles) + [n for n in targets.non_float if n in f]
    scan = plan_change_scan(b, f, names, prefix_bytes=SCAN_PREFIX_BYTES)
    scan.doubts = [  # refused before any data is read, unless --force
        *validate.provenance(b, expected="model", given_as="BASE"),
        *validate.provenance(f, expected="model", given_as="FINETUNED"),
    ]
    if not dry_run:
        if out is None:
            raise InputError("no output directory given", hint="-o ADAPTER, or --dry-run")
        check_output(Path(out), scan.inputs)  # before the scan reads any data
    if report is not None:
        check_output_file(Path(report), scan.inputs, flag="--report")
    changed, scanned = changed_tensors(b, f, names, scan, options)
    ext = decide(targets, changed)
    job = plan_extract_lora(b, f, None if dry_run else Path(out), targets, ext, settings)
    result = run_job(job, options)
    result.bytes_read += scanned
    result.seconds = result.report.seconds = time.perf_counter() - t0
    result.report.bytes_read = result.bytes_read
    if report is not None:
        write_file(Path(report), result.report.to_json().encode())
    return result


def targets_of(b: Checkpoint, f: Checkpoint, **choices: Any) -> Targets:
    """The role of every tensor (headers and the base's model definition only)."""
    names, _ = validate.key_sets(b, f, allow_missing=False, other_label="fine-tuned model")
    validate.shapes(b, f, names)
    validate.same_kind(b, f, names)
    facts = read_model_facts(b, config=read_config(b))
    if not facts:
        raise InputError(
            "extract-lora needs the base's model definition to tell Linear, Conv1D and "
            f"Embedding layers apart (never guessed from names): {facts.reason}",
            where=b.reference,
            hint=facts.hint or "keep the base model's config.json next to its weights",
        )
    return classify(b, facts, **choices)


# ---- the scan: which tensors changed --------------------------------------------------------


def changed_tensors(
    b: Checkpoint, f: Checkpoint, names: Sequence[str], scan: Job, options: RunOptions
) -> tuple[set[str], int]:
    """The names whose bytes differ between the models, and the bytes read to tell: ``scan``
    (:func:`plan_change_scan` of the first MiB of each tensor: a changed tensor almost always
    shows it there) first, then the whole of those still equal."""
    heads, nbytes = run_job(scan, options)
    rest = [n for n in names if n not in heads and b[n].nbytes > SCAN_PREFIX_BYTES]
    if not rest:
        return heads, nbytes
    more, more_bytes = run_job(plan_change_scan(b, f, rest), options)
    return heads | more, nbytes + more_bytes


def plan_change_scan(
    b: Checkpoint, f: Checkpoint, names: Sequence[str], *, prefix_bytes: int | None = None
) -> Job[tuple[set[str], int]]:
    """The job finding which of ``names`` differ (in their first ``prefix_bytes``, if given),
    and the bytes it read."""
    differs = {n for n in names if b[n].dtype != f[n].dtype}  # every value is another one

    def task(name: str) -> engine.Task:
        x, y = b[name], f[name]
        if prefix_bytes is not None:
            x, y = head_of(x, prefix_bytes), head_of(y, prefix_bytes)

        def compute(chunk: engine.Chunk) -> None:
            if name not in differs and not ops.equal(*chunk.inputs):
                differs.add(name)

        return engine.Task(name, [x, y], compute, min_rows=1)

    return Job(
        "scan",
        [task(n) for n in names if n not in differs],
        lambda outcome: (set(differs), outcome.bytes_read),
        sources=[b, f],
        description="scanning",
    )


def head_of(spec: TensorSpec, nbytes: int) -> TensorSpec:
    """The first rows (elements of a 1-D tensor) of ``spec`` within ``nbytes``, at least one."""
    if spec.nbytes <= nbytes or not spec.shape:
        return spec
    row_bytes = spec.row_numel * spec.itemsize
    rows = max(1, nbytes // max(row_bytes, 1))
    shape = (rows, *spec.shape[1:]) if len(spec.shape) >= 2 else (rows,)
    return replace(spec, shape=shape, end=spec.start + rows * row_bytes)


# ---- the job ----------------------------------------------------------------------------------


def plan_extract_lora(
    b: Checkpoint,
    f: Checkpoint,
    out: Path | None,
    targets: Targets,
    ext: Extraction,
    settings: LowRankSettings,
) -> Job[ExtractLoraResult]:
    """The job factorising ``ext.lora`` and saving ``ext.saved`` into an adapter at ``out``
    (``None``: a dry run, the report only)."""
    if not ext.lora:
        raise MismatchError(
            "no Linear, Conv1D or Embedding weight changed between the models, so there is "
            "nothing for a LoRA to hold"
            + (
                f" ({len(ext.left_out)} changed tensor(s) are left out by the options)"
                if ext.left_out
                else ""
            ),
            where=f"{b.reference} vs {f.reference}",
            hint="check --target-modules and --embeddings; stream-tv extract writes any change",
        )
    order = {k: i for i, k in enumerate(b.tensors)}
    saving = sorted(set(ext.saved.values()), key=order.__getitem__) if out else []
    expected = [OutTensor(k, f[k].dtype, f[k].shape) for k in saving]
    output = None
    if out is not None:
        estimate = sum(settings.cap * (b[r.key].rows + b[r.key].row_numel) for r in ext.lora)
        estimate = estimate * 8 + sum(f[k].nbytes for k in ext.saved.values())
        build = _builder(b, f, targets, ext, settings)
        output = AdapterOutput(out, build, expected=expected, estimate=estimate)
    tasks = [svd_task(r, b[r.key], f[r.key], settings, output) for r in ext.lora]
    tasks += [copy_task(f[t.name]) for t in expected]
    tasks.sort(key=lambda t: order[t.name])

    def result(outcome: Outcome) -> ExtractLoraResult:
        rep = _report(b, f, out, targets, ext, settings, outcome)
        cfg = output.config if output is not None else None
        written = output.bytes_written if output is not None else 0
        rep.adapter_bytes = written
        return ExtractLoraResult(out, rep, cfg, written, outcome.bytes_read, outcome.seconds)

    return Job("extract-lora", tasks, result, sources=[b, f], files=output)


def svd_task(
    role: Role, b: TensorSpec, f: TensorSpec, s: LowRankSettings, output: AdapterOutput | None
) -> engine.Task:
    """One tensor's streamed randomized SVD; ``finish`` spools its factors and returns its
    :class:`TensorFigures`."""
    rows, cols = b.shape[0], math.prod(b.shape[1:])
    work = torch.float64 if torch.float64 in (b.dtype, f.dtype) else torch.float32

    def make(device: torch.device | None = None) -> StreamedSVD:
        return StreamedSVD(
            rows,
            cols,
            rank=s.cap,
            oversample=s.oversample,
            power_iters=s.power_iters,
            seed=tensor_seed(s.seed, role.key),
            device=device,
            dtype=work,
            name=role.key,
        )

    held: dict[str, StreamedSVD] = {}

    @contextlib.contextmanager
    def session(device: torch.device):
        held["svd"] = make(device)
        try:
            yield held["svd"]
        except BaseException:
            held.clear()  # nothing stays loaded after an error
            raise

    def compute(chunk: engine.Chunk) -> None:
        base_rows, ft_rows = chunk.inputs
        t = ft_rows.to(work) - base_rows.to(work)
        chunk.state.update(t, chunk.start, chunk.stop, chunk.pass_index)

    def finish() -> TensorFigures:
        res = held.pop("svd").result()
        r = 0 if res.total_energy <= 0 else _select(res, s)
        if r > 0 and output is not None:
            u, sv, v = res.factors(r)
            dtype = s.dtype or f.dtype
            tensors = peft_lora_tensors(role.kind, u, sv, v, weight_shape=b.shape, dtype=dtype)
            for suffix, x in zip("AB", tensors.values(), strict=True):
                output.put(f"{role.key}#{suffix}", x)
        return _figures(role, list(b.shape), res, r)

    return engine.Task(
        role.key,
        [b, f],
        compute,
        passes=make().passes,
        work_row_bytes=cols * work.itemsize * 3,
        session=session,
        finish=finish,
    )


def _select(res, s: LowRankSettings) -> int:
    if s.rank is not None:
        return res.select_rank(rank=s.rank)
    return res.select_rank(energy=s.energy, max_rank=s.cap)


def _figures(role: Role, shape: list[int], res, r: int) -> TensorFigures:
    figs = res.summary(r)
    group, layer = layer_of(role.module)
    return TensorFigures(
        name=role.key,
        module=role.module,
        kind=role.kind,
        group=group,
        layer=layer,
        shape=shape,
        rank=r,
        retained_energy=figs["retained_energy"],
        relative_error=figs["relative_error"],
        norm=figs["norm"],
        singular_values=figs["singular_values"],
        rank_for_energy=figs["rank_for_energy"],
        energy_by_rank=res.energies[: res.rank + 1],
        basis=figs["basis"],
        power_iters=figs["power_iters"],
    )


def copy_task(f: TensorSpec) -> engine.Task:
    """A tensor saved whole: the fine-tuned bytes, streamed into the adapter's spool."""

    def compute(chunk: engine.Chunk) -> torch.Tensor:
        return chunk.out.copy_(chunk.inputs[0])

    return engine.Task(f.name, [f], compute, out=OutTensor(f.name, f.dtype, f.shape), min_rows=1)


# ---- the adapter's layout and config, and the report ---------------------------------------------


def _builder(b, f, targets: Targets, ext: Extraction, settings: LowRankSettings):
    """``build(stats)`` for :class:`AdapterOutput`: layout, config, metadata."""

    def build(stats) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
        layout: dict[str, str] = {}
        ranks: dict[str, int] = {}
        kinds = set()
        for r in ext.lora:
            rank = stats.results[r.key].rank
            if rank == 0:
                continue
            a, bk = lora_keys(r.module, r.kind)
            layout[a], layout[bk] = f"{r.key}#A", f"{r.key}#B"
            ranks[r.module] = rank
            kinds.add(r.kind)
        if not ranks:
            raise MismatchError(
                "every factorised difference is zero (only signed zeros differ): no LoRA to write"
            )
        layout.update(ext.saved)
        config = adapter_config(
            b.reference, targets, ext, ranks, conv1d=kinds - {"embedding"} == {"conv1d"}
        )
        meta = {"stream_tv_version": __version__, "operation": "extract-lora"}
        meta.update(base=b.reference, finetuned=f.reference)
        meta.update({k: str(v) for k, v in settings.describe().items() if v is not None})
        return layout, config, meta

    return build


def adapter_config(
    base_ref: str, targets: Targets, ext: Extraction, ranks: dict[str, int], *, conv1d: bool
) -> dict[str, Any]:
    """``adapter_config.json``: scaling 1 for every module, full module names, and a check that
    PEFT's name matching selects exactly these modules (else a regex / a refusal)."""
    facts = targets.facts
    names = list(ranks)
    target: list[str] | str = names
    if peft_matches(names, facts, suffix_dot=True):
        target = "(" + "|".join(re.escape(n) for n in names) + ")"  # PEFT: re.fullmatch
    saving = ext.modules_to_save
    clash = peft_matches(saving, facts, suffix_dot=False)
    clash.update({m: [n] for m in saving for n in names if re.match(rf"(^|.*\.){m}($|\..*)", n)})
    if clash:
        m, extra = next(iter(clash.items()))
        raise MismatchError(
            f"modules_to_save entry {m!r} would also select {extra[:3]} in PEFT (it matches "
            "names by their end), so the adapter cannot say which module it saves",
            hint="--other skip / --embeddings skip leave such modules out",
        )
    arch = facts.architecture
    task_type = (
        "CAUSAL_LM"
        if arch.endswith("ForCausalLM")
        else "SEQ_2_SEQ_LM"
        if arch.endswith("ForConditionalGeneration") and "T5" in arch
        else None
    )
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_ref,
        "revision": None,
        **lora_rank_config(ranks),
        "target_modules": target,
        "modules_to_save": saving or None,
        "bias": "lora_only" if ext.biases else "none",
        "lora_bias": False,
        "use_dora": False,
        "fan_in_fan_out": conv1d,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _report(b, f, out, targets: Targets, ext: Extraction, settings, outcome: Outcome):
    facts = targets.facts
    saved = []
    for m, roles in ext.modules.items():
        why = _why_whole(facts, m, roles)
        for r in roles:
            tied = f"; saved under {', '.join(r.tied)} too (tied)" if r.tied else ""
            saved.append({"name": r.key, "module": m, "why": why + tied})
    saved += [
        {"name": r.key, "module": r.module, "why": "bias of a LoRA layer"} for r in ext.biases
    ]
    return ExtractLoraReport(
        base=b.reference,
        finetuned=f.reference,
        adapter=str(out) if out is not None else None,
        settings=settings.describe(),
        basis=f"the model definition ({facts.architecture}, transformers "
        f"{facts.transformers_version})",
        tensors=[outcome.stats.results[r.key] for r in ext.lora],
        saved=saved,
        left_out=dict(ext.left_out),
        unchanged=list(ext.unchanged),
        notes=[
            f"{r.module} is tied to {', '.join(_module_of(t) for t in r.tied)}: its LoRA reaches "
            "the tied module only once merged (merge_and_unload, stream-tv merge), as PEFT warns; "
            "--embeddings full saves them whole instead"
            for r in ext.lora
            if r.tied
        ],
        bytes_read=outcome.bytes_read,
        seconds=outcome.seconds,
    )


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _why_whole(facts, module: str, roles: list[Role]) -> str:
    if any(r.role == "bias" for r in roles):
        return "its bias changed, its weight did not"
    kind = roles[0].kind
    if kind in ("linear", "conv1d", "embedding"):
        return "--embeddings full"
    fact = facts.modules.get(module)
    cls = fact.cls.rpartition(".")[2] if fact is not None else kind
    return f"{cls}: not a Linear, Conv1D or Embedding"
