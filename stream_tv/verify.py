"""``stream-tv verify``: is an output directory a finished, sound checkpoint, and (given its
inputs) exactly the one its command writes?

Three levels, reading the output once:

1. structure, from headers only: the index parses; every shard it names exists, with a valid
   header holding every tensor the ``weight_map`` puts there and no other; ``total_size``
   matches; no journal or temporary file of an unfinished run is left;
2. content, one streaming pass: each shard's crc32 against the checksum the writer recorded
   in the index (``metadata["stream_tv_checksums"]``), and NaN/Inf counts per tensor;
3. recomputation, in the same pass, when inputs are given: the operation recorded in
   ``metadata["operation"]`` builds, from the inputs, the very engine tasks that wrote the
   output (``api._subtract_task``, ``api._apply_task``, ...), and every chunk they compute
   is compared with the output's bytes. Exact by default; ``atol`` allows a tolerance (e.g.
   for an output written on another device).

Library code returns a :class:`VerifyResult` listing the problems; ``cli.py`` prints them
and exits with ``EXIT_VERIFY_FAILED``. Adding an operation = registering a builder:

>>> @register_recompute("example")                      # doctest: +SKIP
... def _example(given, output, metadata): ...
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import engine
from .errors import CorruptCheckpointError, InputError, ReferenceNotFoundError, StreamTVError
from .io.index import INDEX_NAME, TensorSpec, read_header
from .io.writer import CHECKSUMS_KEY, STATE_DIR, STATE_FILE, format_size

_SHARD_GLOB = "model-*-of-*.safetensors"


@dataclass
class VerifyInputs:
    """The inputs given to ``verify`` for a recomputation (references, as for the commands)."""

    base: str | None = None
    finetuned: str | None = None
    task_vectors: Sequence[str] = ()
    adapter: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.base or self.finetuned or self.task_vectors or self.adapter)


@dataclass
class Recomputation:
    """What a builder returns: the tasks that write each output tensor from the inputs."""

    label: str  # "base + finetuned", for the summary
    tasks: dict[str, engine.Task]  # output tensor name -> the task writing it (``task.out``)
    problems: list[str] = field(default_factory=list)  # e.g. tensors the output should hold


# operation (``metadata["operation"]``) -> builder(inputs, output specs, index metadata)
Builder = Callable[[VerifyInputs, Mapping[str, TensorSpec], Mapping[str, object]], Recomputation]
RECOMPUTE: dict[str, Builder] = {}


def register_recompute(operation: str) -> Callable[[Builder], Builder]:
    """Register the recomputation of outputs whose index says ``"operation": operation``."""

    def decorate(fn: Builder) -> Builder:
        RECOMPUTE[operation] = fn
        return fn

    return decorate


@dataclass
class VerifyResult:
    """What ``verify`` found; ``ok`` when ``problems`` is empty."""

    output: Path
    operation: str | None = None
    tensors: int = 0
    shards: int = 0
    bytes_checked: int = 0
    checksums_checked: int = 0
    recomputed_from: str | None = None  # label of the recomputation, if one ran
    problems: list[str] = field(default_factory=list)
    differences: dict[str, float] = field(default_factory=dict)  # tensor -> max abs diff
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> NaN/Inf count
    nonfinite_from_inputs: dict[str, int] = field(default_factory=dict)  # recomputed the same
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for a successful verification."""
        parts = [
            f"{self.tensors} tensors in {self.shards} shard(s), {format_size(self.bytes_checked)}",
            "index and headers agree",
        ]
        if self.checksums_checked:
            parts.append(f"{self.checksums_checked} crc32 checksum(s) match")
        if self.nonfinite_from_inputs:
            n = sum(self.nonfinite_from_inputs.values())
            parts.append(f"{n} NaN/Inf value(s), all coming from the inputs")
        else:
            parts.append("no NaN/Inf")
        if self.recomputed_from:
            parts.append(f"identical to a recomputation from {self.recomputed_from}")
        return f"ok: {self.output}: " + "; ".join(parts) + f" [{self.seconds:.1f} s]"

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["output"] = str(self.output)
        d["ok"] = self.ok
        return d


def verify_output(
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    task_vectors: Sequence[str | os.PathLike] = (),
    adapter: str | os.PathLike | None = None,
    atol: float = 0.0,
    device: str = "auto",
    chunk_size: int | str | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Check that ``out`` is a complete, sound checkpoint; recompute it when inputs are given.

    Raises :class:`~stream_tv.errors.InputError` for unusable arguments (no such directory,
    inputs that do not fit the recorded operation); everything wrong with the output itself
    is listed in ``VerifyResult.problems``.
    """
    from .api import RunOptions

    t0 = time.perf_counter()
    out = Path(out)
    given = VerifyInputs(
        base=_opt(base),
        finetuned=_opt(finetuned),
        task_vectors=[os.fspath(t) for t in task_vectors],
        adapter=_opt(adapter),
    )
    if not out.exists():
        raise ReferenceNotFoundError("no such file or directory", where=str(out))
    result = VerifyResult(output=out)
    layout = _structure(out, result.problems)
    result.operation = _str_or_none(layout.metadata.get("operation"))
    result.shards = len(layout.files)
    result.tensors = sum(len(specs) for specs in layout.files.values())

    recomputation = None
    if given.given:
        recomputation = _recomputation(given, layout, result.operation)
        result.problems.extend(recomputation.problems)
        result.recomputed_from = recomputation.label
    if layout.complete or layout.files:
        options = RunOptions(device=device, chunk_size=chunk_size)
        _stream(layout, recomputation, atol, options, progress, result)
    result.seconds = time.perf_counter() - t0
    return result


def _opt(x: str | os.PathLike | None) -> str | None:
    return None if x is None else os.fspath(x)


def _str_or_none(x: object) -> str | None:
    return x if isinstance(x, str) else None


# ---- 1. structure ---------------------------------------------------------------------------


@dataclass
class _Layout:
    root: Path
    files: dict[Path, dict[str, TensorSpec]]  # readable shard -> its header, data order
    header_bytes: dict[Path, int]  # shard -> bytes before its data (header incl. length)
    metadata: dict[str, object]
    checksums: dict[Path, str]  # shard -> "crc32:xxxxxxxx", as recorded
    complete: bool  # an index (or a single file) was found, so the output is finished


def _structure(out: Path, problems: list[str]) -> _Layout:
    if out.is_file():
        layout = _Layout(out.parent, {}, {}, {}, {}, complete=True)
        _add_file(layout, out, problems)
        return layout
    layout = _Layout(out, {}, {}, {}, {}, complete=False)
    if (out / STATE_DIR / STATE_FILE).exists():
        problems.append(
            f"{STATE_DIR}/{STATE_FILE} is present: the run writing this directory did not "
            "finish (rerun the same command to resume it)"
        )
    leftovers = sorted(
        p.name for p in out.iterdir() if p.name.startswith((".model-", f".{INDEX_NAME}"))
    )
    if leftovers:
        problems.append(f"temporary file(s) of an unfinished run: {', '.join(leftovers[:3])}")
    index = out / INDEX_NAME
    if not index.is_file():
        singles = sorted(p for p in out.glob("*.safetensors") if not p.name.startswith("."))
        if len(singles) == 1 and not (out / STATE_DIR / STATE_FILE).exists():
            layout.complete = True
            _add_file(layout, singles[0], problems)
        else:
            problems.append(f"no {INDEX_NAME}: not a finished output (the index is written last)")
        return layout
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(f"{INDEX_NAME} is not valid JSON ({e})")
        return layout
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{INDEX_NAME} has no weight_map of tensor name -> file")
        return layout
    layout.complete = True
    meta = data.get("metadata")
    layout.metadata = dict(meta) if isinstance(meta, dict) else {}
    by_file: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(name)
    listed_bytes = 0
    for fname in sorted(by_file):
        if Path(fname).is_absolute() or ".." in Path(fname).parts or "\0" in fname:
            problems.append(f"the index names a file outside the directory: {fname!r}")
            continue
        path = out / fname
        try:
            exists = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            problems.append(f"the index names an unusable file {fname[:80]!r}: {e.strerror}")
            continue
        if not exists:
            problems.append(f"shard {fname} is missing ({len(by_file[fname])} tensor(s) in it)")
            continue
        if not _add_file(layout, path, problems):
            continue
        specs = layout.files[path]
        missing = sorted(by_file[fname] - specs.keys())
        if missing:
            problems.append(
                f"{fname}: {len(missing)} tensor(s) of the index are not in its header "
                f"(e.g. {', '.join(missing[:3])})"
            )
        extra = sorted(specs.keys() - by_file[fname])
        if extra:
            problems.append(
                f"{fname}: {len(extra)} tensor(s) the index does not list "
                f"(e.g. {', '.join(extra[:3])})"
            )
        listed_bytes += sum(s.nbytes for n, s in specs.items() if n in by_file[fname])
    total = layout.metadata.get("total_size")
    if total is not None and len(layout.files) == len(by_file):
        if not isinstance(total, int) or isinstance(total, bool) or total != listed_bytes:
            problems.append(
                f"index metadata.total_size is {total!r}, the shards hold {listed_bytes} bytes"
            )
    stray = sorted(p.name for p in out.glob(_SHARD_GLOB) if p.name not in by_file)
    if stray:
        problems.append(f"shard file(s) the index does not name: {', '.join(stray[:3])}")
    recorded = layout.metadata.get(CHECKSUMS_KEY)
    if recorded is not None:
        if not isinstance(recorded, dict):
            problems.append(f"index metadata.{CHECKSUMS_KEY} is not a JSON object")
        else:
            for fname in sorted(by_file):
                value = recorded.get(fname)
                if not (isinstance(value, str) and _parse_crc(value) is not None):
                    problems.append(f"{fname}: no valid recorded checksum (found {value!r})")
                elif (out / fname) in layout.files:
                    layout.checksums[out / fname] = value
    return layout


def _add_file(layout: _Layout, path: Path, problems: list[str]) -> bool:
    try:
        specs = read_header(path)
    except (CorruptCheckpointError, ReferenceNotFoundError) as e:
        problems.append(f"{path.name}: {e.message}")
        return False
    layout.files[path] = specs
    starts = [s.start for s in specs.values()]
    layout.header_bytes[path] = min(starts) if starts else path.stat().st_size
    return True


def _parse_crc(text: str) -> int | None:
    kind, _, digits = text.partition(":")
    if kind != "crc32" or len(digits) != 8:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


# ---- 3. recomputation builders ------------------------------------------------------------


def _recomputation(given: VerifyInputs, layout: _Layout, operation: str | None) -> Recomputation:
    if operation is None:
        raise InputError(
            "the index records no metadata.operation, so verify cannot tell how to recompute it",
            where=str(layout.root),
            hint="verify without inputs checks structure, checksums and NaN/Inf",
        )
    builder = RECOMPUTE.get(operation)
    if builder is None:
        raise InputError(
            f"verify cannot recompute a {operation!r} output",
            where=str(layout.root),
            hint=f"recomputable: {', '.join(sorted(RECOMPUTE))}; verify without inputs checks "
            "structure, checksums and NaN/Inf",
        )
    output = {n: s for specs in layout.files.values() for n, s in specs.items()}
    return builder(given, output, layout.metadata)


def _require(given: VerifyInputs, operation: str, needed: Sequence[str], usage: str) -> None:
    present = {
        "base": given.base is not None,
        "finetuned": given.finetuned is not None,
        "task_vectors": bool(given.task_vectors),
        "adapter": given.adapter is not None,
    }
    wrong = [k for k, v in present.items() if v and k not in needed]
    lacking = [k for k in needed if not present[k]]
    if wrong or lacking:
        raise InputError(
            f"this output was written by {operation!r}, which verify recomputes from {usage}",
            hint=f"pass {usage}"
            + (f"; not {', '.join('--' + w.replace('_', '-') for w in wrong)}" if wrong else ""),
        )


def _recorded_list(metadata: Mapping[str, object], key: str) -> list[str]:
    value = metadata.get(key)
    return [str(v) for v in value] if isinstance(value, list) else []


@register_recompute("extract")
def _recompute_extract(
    given: VerifyInputs, output: Mapping[str, TensorSpec], metadata: Mapping[str, object]
) -> Recomputation:
    from .api import _subtract_task
    from .refs import open_checkpoint

    _require(given, "extract", ("base", "finetuned"), "--base BASE --finetuned FINETUNED")
    b, f = open_checkpoint(given.base), open_checkpoint(given.finetuned)
    problems: list[str] = []
    tasks: dict[str, engine.Task] = {}
    for name, spec in output.items():
        if name not in b or name not in f:
            problems.append(
                f"{name}: in the output but not in {'the base' if name not in b else 'the fine-tuned model'}"
            )
        elif b[name].shape != spec.shape or f[name].shape != spec.shape:
            problems.append(f"{name}: shape {list(spec.shape)} differs from the inputs'")
        else:
            tasks[name] = _subtract_task(name, b[name], f[name], spec.dtype)
    left_out = set(_recorded_list(metadata, "skipped_unchanged")) | set(
        _recorded_list(metadata, "missing")
    )
    expected = [n for n in b.tensors if n in f and b[n].is_float and f[n].is_float]
    absent = [n for n in expected if n not in output and n not in left_out]
    if absent:
        problems.append(
            f"{len(absent)} tensor(s) of the task vector are missing from the output "
            f"(e.g. {', '.join(absent[:3])})"
        )
    return Recomputation(f"{b.reference} + {f.reference}", tasks, problems)


@register_recompute("apply")
def _recompute_apply(
    given: VerifyInputs, output: Mapping[str, TensorSpec], metadata: Mapping[str, object]
) -> Recomputation:
    from .api import _apply_task
    from .refs import open_checkpoint

    _require(given, "apply", ("base", "task_vectors"), "--base BASE --task-vector TV [...]")
    scales = metadata.get("scales")
    if not (
        isinstance(scales, list)
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales)
    ):
        raise InputError(
            f"the index records no usable scales ({scales!r})", hint="was it written by apply?"
        )
    if len(scales) != len(given.task_vectors):
        raise InputError(
            f"the output was written from {len(scales)} task vector(s); "
            f"{len(given.task_vectors)} given",
            hint="pass every --task-vector, in the order given to apply",
        )
    b = open_checkpoint(given.base)
    tvs = [open_checkpoint(t) for t in given.task_vectors]
    problems: list[str] = []
    tasks: dict[str, engine.Task] = {}
    for name, spec in output.items():
        if name not in b:
            problems.append(f"{name}: in the output but not in the base")
            continue
        terms = [(tv[name], float(s)) for tv, s in zip(tvs, scales, strict=True) if name in tv]
        if any(t.shape != spec.shape for t, _ in terms) or b[name].shape != spec.shape:
            problems.append(f"{name}: shape {list(spec.shape)} differs from the inputs'")
            continue
        tasks[name] = _apply_task(name, b[name], terms, spec.dtype)
    absent = [n for n in b.tensors if n not in output]
    if absent:
        problems.append(
            f"{len(absent)} tensor(s) of the base are missing from the output "
            f"(e.g. {', '.join(absent[:3])})"
        )
    label = f"{b.reference} + " + " + ".join(
        f"{s:g} x {t.reference}" for s, t in zip(scales, tvs, strict=True)
    )
    return Recomputation(label, tasks, problems)


def _recompute_lora(operation: str) -> Builder:
    def build(
        given: VerifyInputs, output: Mapping[str, TensorSpec], metadata: Mapping[str, object]
    ) -> Recomputation:
        raise InputError(
            f"verify --adapter needs the LoRA merge (stream_tv.merge), which this version "
            f"lacks; cannot recompute a {operation!r} output",
            hint="verify without inputs still checks structure, checksums and NaN/Inf",
        )

    return build


for _op in ("merge", "lora-delta"):
    RECOMPUTE.setdefault(_op, _recompute_lora(_op))


# ---- 2 + 3. the streaming pass --------------------------------------------------------------


@dataclass
class _Tally:
    """Per output tensor, across its chunks."""

    max_diff: float = 0.0
    bits_differ: bool = False
    nonfinite: int = 0
    nonfinite_expected: int = 0  # where the recomputation holds the same bits
    error: str | None = None


def _stream(
    layout: _Layout,
    recomputation: Recomputation | None,
    atol: float,
    options,
    progress: bool,
    result: VerifyResult,
) -> None:
    crcs: dict[Path, int] = {}
    for path in layout.files:
        if path in layout.checksums:
            with open(path, "rb") as f:
                crcs[path] = zlib.crc32(f.read(layout.header_bytes[path]))
    tallies: dict[str, _Tally] = {}
    tasks = []
    for path, specs in layout.files.items():
        for name, spec in specs.items():
            expected = recomputation.tasks.get(name) if recomputation else None
            if expected is not None and (
                expected.out is None
                or expected.out.shape != spec.shape
                or expected.out.dtype != spec.dtype
            ):
                result.problems.append(
                    f"{name}: the output holds {spec.dtype_str} {list(spec.shape)}, the "
                    "recomputation gives another dtype or shape"
                )
                expected = None
            tally = tallies[name] = _Tally()
            tasks.append(_verify_task(spec, expected, tally, crcs if path in crcs else None, atol))
            result.bytes_checked += spec.nbytes

    engine.run(
        tasks,
        device=engine.resolve_device(options.device),
        chunk_bytes=options.chunk_bytes(),
        progress=progress,
        description="verify",
        on_nonfinite="ignore",
    )

    for path, crc in crcs.items():
        recorded = _parse_crc(layout.checksums[path])
        if crc != recorded:
            result.problems.append(
                f"{path.name}: crc32 is {crc:08x}, the index records {recorded:08x} "
                "(the file changed after it was written)"
            )
        else:
            result.checksums_checked += 1
    differing = []
    for name, t in tallies.items():
        if t.error:
            result.problems.append(f"{name}: recomputing failed: {t.error}")
        if t.bits_differ and (atol == 0 or t.max_diff > atol):
            result.differences[name] = t.max_diff
            differing.append(name)
        if t.nonfinite:
            if t.nonfinite == t.nonfinite_expected:
                result.nonfinite_from_inputs[name] = t.nonfinite
            else:
                result.nonfinite[name] = t.nonfinite
    if differing:
        shown = ", ".join(f"{n} (max abs diff {result.differences[n]:.3g})" for n in differing[:10])
        more = f" and {len(differing) - 10} more" if len(differing) > 10 else ""
        result.problems.append(
            f"{len(differing)} tensor(s) differ from the recomputation: {shown}{more} "
            "(an output written on another device, CPU vs CUDA, may differ in the last bit: "
            "pass the --device it was written on, or --atol)"
        )
    if result.nonfinite:
        shown = ", ".join(f"{n} ({c})" for n, c in list(result.nonfinite.items())[:10])
        hint = "" if recomputation else "; pass the inputs to check whether they hold them too"
        result.problems.append(f"NaN/Inf in {len(result.nonfinite)} tensor(s): {shown}{hint}")


def _verify_task(
    spec: TensorSpec,
    expected: engine.Task | None,
    tally: _Tally,
    crcs: dict[Path, int] | None,
    atol: float,
) -> engine.Task:
    """Stream ``spec`` (and the inputs of ``expected``, row-aligned) and compare."""
    passes = expected.passes if expected is not None else 1

    def compute(chunk: engine.Chunk) -> None:
        got, *inputs = chunk.inputs
        if chunk.pass_index != passes - 1:
            if expected is not None and tally.error is None:
                _run_expected(expected, chunk, inputs, None, tally)
            return None
        if crcs is not None:
            host = got if got.device.type == "cpu" else got.cpu()
            crcs[spec.file] = zlib.crc32(engine._bytes_of(host), crcs[spec.file])
        bad = None
        if spec.is_float and got.numel():
            bad = ~torch.isfinite(got)
            tally.nonfinite += int(bad.sum())
        if expected is None or tally.error is not None:
            return None
        want = torch.empty(got.shape, dtype=expected.out.dtype, device=chunk.device)
        want = _run_expected(expected, chunk, inputs, want, tally)
        if want is None:
            return None
        if _same_bits(got, want):
            if bad is not None:
                tally.nonfinite_expected += int(bad.sum())
            return None
        tally.bits_differ = True
        tally.max_diff = max(tally.max_diff, _max_abs_diff(got, want))
        if bad is not None:
            same = (got == want) | (torch.isnan(got) & torch.isnan(want))
            tally.nonfinite_expected += int((bad & same).sum())
        return None

    work = expected.work_row_bytes + expected.out_row_bytes * 3 if expected is not None else 0
    return engine.Task(
        spec.name,
        [spec, *(expected.inputs if expected is not None else ())],
        compute,
        passes=passes,
        min_rows=expected.min_rows if expected is not None else 1,
        work_row_bytes=work,
        start=expected.start if expected is not None else None,
    )


def _run_expected(
    task: engine.Task,
    chunk: engine.Chunk,
    inputs: list[torch.Tensor],
    out: torch.Tensor | None,
    tally: _Tally,
) -> torch.Tensor | None:
    inner = engine.Chunk(task, chunk.pass_index, chunk.start, chunk.stop, inputs, out, chunk.device)
    try:
        return task.compute(inner)
    except StreamTVError as e:
        tally.error = str(e)
        return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in float64; NaN against NaN counts as equal, NaN against a number as
    infinitely far; equal values with other bits (0.0 and -0.0) as 0."""
    if a.shape != b.shape:
        return math.inf
    if not (a.is_floating_point() or b.is_floating_point()):
        return float((a.long() - b.long()).abs().max()) if a.numel() else 0.0
    x, y = a.double(), b.double()
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    d = torch.where(same, torch.zeros_like(x), (x - y).abs().nan_to_num(nan=math.inf))
    return float(d.max()) if d.numel() else 0.0
