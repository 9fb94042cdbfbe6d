"""``stream-tv verify``: is an output directory a finished, sound checkpoint, and (given its
inputs) exactly the one its command writes?

Three levels, reading the output once:

1. structure, from headers only (:func:`stream_tv.io.layout.read_layout`);
2. content: each shard's crc32 against the checksum the writer recorded in the index
   (``metadata["stream_tv_checksums"]``), and NaN/Inf counts per tensor;
3. recomputation, when inputs are given: the operation recorded in
   ``metadata["operation"]`` is planned again from the inputs by the command's own planner
   (``plan_extract``, ``plan_merge``, ...), and the job runs with a comparing sink in place
   of the writer: every byte it would write is compared with the output's, and the same
   pass feeds the checksums and NaN/Inf counts. Exact by default; ``atol`` allows a
   tolerance (e.g. for an output written on another device).

Library code returns a :class:`VerifyResult` listing the problems; ``cli.py`` prints them
and exits with ``EXIT_VERIFY_FAILED``.
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

from .. import engine, ops
from ..errors import InputError, ReferenceNotFoundError
from ..io.checksum import crc32
from ..io.index import DTYPES, TensorSpec
from ..io.layout import Layout, parse_crc, read_layout
from ..io.writer import file_crc
from ..jobs import CONFIG_NAME, Job, execute
from ..lora import Adapter
from ..options import RunOptions
from ..refs import open_checkpoint
from ..units import format_size
from .apply import replan_apply
from .extract import plan_extract
from .merge import plan_lora_delta, plan_merge, recorded_layouts


@dataclass
class VerifyInputs:
    """The inputs given to ``verify`` for a recomputation (references, as for the commands)."""

    base: str | None = None
    finetuned: str | None = None
    task_vectors: Sequence[str] = ()
    adapters: Sequence[str] = ()

    @property
    def given(self) -> bool:
        return bool(self.base or self.finetuned or self.task_vectors or self.adapters)


@dataclass
class VerifyResult:
    """What ``verify`` found; ``ok`` when ``problems`` is empty."""

    output: Path
    operation: str | None = None
    tensors: int = 0
    shards: int = 0
    bytes_checked: int = 0
    checksums_checked: int = 0
    recomputed_from: str | None = None  # what the recomputation was made from, if one ran
    problems: list[str] = field(default_factory=list)
    differences: dict[str, float] = field(default_factory=dict)  # tensor -> max abs diff
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> NaN/Inf count
    nonfinite_from_inputs: dict[str, int] = field(default_factory=dict)  # recomputed the same
    unchecked: list[str] = field(default_factory=list)  # what could not be checked
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
        if self.unchecked:
            parts.append("not checked: " + ", ".join(self.unchecked))
        return f"ok: {self.output}: " + "; ".join(parts) + f" [{self.seconds:.1f} s]"

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["output"] = str(self.output)
        d["ok"] = self.ok
        return d


def verify_output(
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    task_vectors: Sequence[str | os.PathLike] = (),
    adapters: str | os.PathLike | Sequence[str | os.PathLike] = (),
    atol: float = 0.0,
    structure_only: bool = False,
    options: RunOptions | None = None,
) -> VerifyResult:
    """Check that ``out`` is a complete, sound checkpoint; recompute it when inputs are given.

    An output whose index records no checksums (not written by stream-tv, or rewritten)
    cannot have its bytes checked: that is a problem unless a recomputation checked every
    tensor, or ``structure_only`` accepts the structure checks alone.

    Raises :class:`~stream_tv.errors.InputError` for unusable arguments (no such directory,
    inputs that do not fit the recorded operation); everything wrong with the output itself
    is listed in ``VerifyResult.problems``.
    """
    t0 = time.perf_counter()
    options = options or RunOptions(progress=False)
    out = Path(out)
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    given = VerifyInputs(
        base=_opt(base),
        finetuned=_opt(finetuned),
        task_vectors=[os.fspath(t) for t in task_vectors],
        adapters=[os.fspath(a) for a in adapters],
    )
    if not out.exists():
        raise ReferenceNotFoundError("no such file or directory", where=str(out))
    result = VerifyResult(output=out)
    layout = read_layout(out, result.problems)
    operation = layout.metadata.get("operation")
    result.operation = operation if isinstance(operation, str) else None
    result.shards = len(layout.files)
    result.tensors = sum(len(specs) for specs in layout.files.values())
    result.bytes_checked = sum(s.nbytes for specs in layout.files.values() for s in specs.values())
    checker = _Checker(layout, atol)
    if given.given:
        job, label = _replan(given, layout, result.operation)
        result.recomputed_from = label
        _check_config(job, layout.root, result.problems)
        tasks = checker.expect(job.tasks, result.problems)
        replay = Job("verify", tasks, lambda o: o, checks=job.checks, description=job.command)
        execute(replay, options, sink=checker)
    if layout.complete or layout.files:
        execute(checker.scan_job(), options)
    checker.report(result)
    if layout.files and not layout.checksums and not checker.covers_everything():
        result.unchecked.append("shard bytes (the index records no checksums)")
        if not structure_only:
            result.problems.append(
                "the index records no checksums (metadata.stream_tv_checksums), so the shard "
                "bytes could not be checked against what was written: pass the inputs to "
                "recompute it, or --structure-only to accept the structure checks alone"
            )
    result.seconds = time.perf_counter() - t0
    return result


def _check_config(job: Job, root: Path, problems: list[str]) -> None:
    """The output's config.json is the base's with the job's updates (``merge`` unties)."""
    out = job.output
    src = out.side_files_from / CONFIG_NAME if out and out.side_files_from else None
    if src is None or not src.is_file():
        return
    name = (out.side_files or {}).get(CONFIG_NAME, CONFIG_NAME)  # extract: base_config.json
    if out.side_files is not None and CONFIG_NAME not in out.side_files:
        return  # the command does not copy it
    dst = root / name
    if not dst.is_file():
        problems.append(
            f"{name}: missing (the base has a {CONFIG_NAME}, and the command copies it)"
        )
        return
    try:
        want, got = json.loads(src.read_text()), json.loads(dst.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        problems.append(f"{name}: cannot be read: {e}")
        return
    want.update(out.config_updates)
    if got != want:
        changed = sorted(k for k in {*want, *got} if want.get(k) != got.get(k))
        problems.append(
            f"{name} differs from what the command writes (the base's"
            + (f" with {dict(out.config_updates)}" if out.config_updates else "")
            + f"): {', '.join(changed[:5])}"
        )


def _opt(x: str | os.PathLike | None) -> str | None:
    return None if x is None else os.fspath(x)


# ---- re-planning the recorded operation ---------------------------------------------------------


def _replan(given: VerifyInputs, layout: Layout, operation: str | None) -> tuple[Job, str]:
    """The job the recorded operation runs on the given inputs, and what it is made from."""
    if operation is None:
        raise InputError(
            "the index records no metadata.operation, so verify cannot tell how to recompute it",
            where=str(layout.root),
            hint="verify without inputs checks structure, checksums and NaN/Inf",
        )
    replan = _REPLANNERS.get(operation)
    if replan is None:
        raise InputError(
            f"verify cannot recompute a {operation!r} output",
            where=str(layout.root),
            hint=f"recomputable: {', '.join(sorted(_REPLANNERS))}; verify without inputs checks "
            "structure, checksums and NaN/Inf",
        )
    output = {n: s for specs in layout.files.values() for n, s in specs.items()}
    return replan(given, layout.metadata, output, layout.root)


def _require(given: VerifyInputs, operation: str, needed: Sequence[str], usage: str) -> None:
    present = {
        "base": given.base is not None,
        "finetuned": given.finetuned is not None,
        "task_vectors": bool(given.task_vectors),
        "adapters": bool(given.adapters),
    }
    wrong = [k for k, v in present.items() if v and k not in needed]
    lacking = [k for k in needed if not present[k]]
    if wrong or lacking:
        flags = {"adapters": "--adapter", "task_vectors": "--task-vector"}
        hint = f"pass {usage}"
        if wrong:
            hint += "; not " + ", ".join(flags.get(w, "--" + w) for w in wrong)
        raise InputError(
            f"this output was written by {operation!r}, which verify recomputes from {usage}",
            hint=hint,
        )


def _recorded(metadata: Mapping[str, object], key: str) -> list[str]:
    value = metadata.get(key)
    return [str(v) for v in value] if isinstance(value, list) else []


def _numbers(metadata: Mapping[str, object], key: str) -> list[float]:
    value = metadata.get(key)
    if not (
        isinstance(value, list)
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in value)
    ):
        raise InputError(
            f"the index records no usable {key} ({value!r})", hint="was it written by stream-tv?"
        )
    return [float(v) for v in value]


def _recorded_dtype(metadata: Mapping[str, object]) -> torch.dtype | None:
    """The one dtype the command was asked for, or ``None`` (per-tensor defaults)."""
    text = metadata.get("dtype")
    if isinstance(text, str) and text in DTYPES:
        return DTYPES[text]
    return None


def _replan_extract(given, metadata, output, root) -> tuple[Job, str]:
    _require(given, "extract", ("base", "finetuned"), "--base BASE --finetuned FINETUNED")
    b, f = open_checkpoint(given.base), open_checkpoint(given.finetuned)
    job = plan_extract(
        b,
        f,
        root,
        dtype=_recorded_dtype(metadata),
        allow_missing=bool(_recorded(metadata, "missing")),
        skip=_recorded(metadata, "skipped_unchanged"),
    )
    return job, f"{b.reference} + {f.reference}"


def _replan_apply(given, metadata, output, root) -> tuple[Job, str]:
    usage = "--base BASE --task-vector INPUT [...] (every input given to apply, in order)"
    _require(given, "apply", ("base", "task_vectors"), usage)
    scales = _numbers(metadata, "scales")
    if len(scales) != len(given.task_vectors):
        raise InputError(
            f"the output was written from {len(scales)} input(s); {len(given.task_vectors)} given",
            hint="pass every input (task vector, model or adapter) as --task-vector, in the "
            "order given to apply",
        )
    b = open_checkpoint(given.base)
    # apply writes float tensors in --dtype when given, else in the base's dtype: the
    # output's float tensors say which.
    out_dtypes = {
        output[n].dtype for n in output if n in b and b[n].is_float and output[n].is_float
    }
    dtype = out_dtypes.pop() if len(out_dtypes) == 1 else None
    refs = list(given.task_vectors)
    job = replan_apply(b, refs, metadata, root, scales=scales, dtype=dtype)
    method = metadata.get("method") or "task_arithmetic"
    label = f"{b.reference} + " + " + ".join(
        f"{s:g} x {r}" for s, r in zip(scales, refs, strict=True)
    )
    return job, label if method == "task_arithmetic" else f"{method} of {label}"


def _replan_merge(given, metadata, output, root) -> tuple[Job, str]:
    _require(given, "merge", ("base", "adapters"), "--base BASE --adapter ADAPTER")
    recorded = _recorded(metadata, "adapters")
    if recorded and len(recorded) != len(given.adapters):
        raise InputError(
            f"the output merges {len(recorded)} adapter(s); {len(given.adapters)} given",
            hint="pass every --adapter, in the order given to merge",
        )
    weights = _numbers(metadata, "weights") if "weights" in metadata else None
    b = open_checkpoint(given.base)
    ads = [Adapter.load(a) for a in given.adapters]
    precision = str(metadata.get("precision") or "exact-peft")
    layouts = recorded_layouts(metadata)
    job = plan_merge(b, ads, root, weights=weights, precision=precision, layouts=layouts)
    return job, f"{b.reference} + " + " + ".join(a.reference for a in ads)


def _replan_lora_delta(given, metadata, output, root) -> tuple[Job, str]:
    had_base = bool(metadata.get("base"))
    usage = "--adapter ADAPTER" + (" --base BASE" if had_base else "")
    _require(given, "lora-delta", ("adapters", "base") if had_base else ("adapters",), usage)
    if len(given.adapters) != 1:
        raise InputError("a lora-delta output comes from one adapter", hint=f"pass {usage}")
    ad = Adapter.load(given.adapters[0])
    b = open_checkpoint(given.base) if given.base is not None else None
    weight = _numbers({"weight": [metadata.get("weight", 1.0)]}, "weight")[0]
    dtype = _recorded_dtype(metadata) or torch.float32
    layouts = recorded_layouts(metadata)
    job = plan_lora_delta(ad, root, base=b, dtype=dtype, weight=weight, layouts=layouts)
    return job, ad.reference


_Replanner = Callable[
    [VerifyInputs, Mapping[str, object], Mapping[str, TensorSpec], Path], tuple[Job, str]
]
_REPLANNERS: dict[str, _Replanner] = {
    "extract": _replan_extract,
    "apply": _replan_apply,
    "merge": _replan_merge,
    "lora-delta": _replan_lora_delta,
}


# ---- the comparison: a sink for the replanned job, and a scan of the rest -----------------------


@dataclass
class _Tally:
    """Per output tensor, across its chunks."""

    max_diff: float = 0.0
    bits_differ: bool = False
    nonfinite: int = 0
    nonfinite_expected: int = 0  # where the recomputation holds the same bits


@dataclass
class _Crc:
    """A shard's running crc32, valid while its bytes arrive in file order."""

    size: int
    crc: int
    position: int
    in_order: bool = True

    def update(self, offset: int, data: memoryview | bytes) -> None:
        if offset != self.position:
            self.in_order = False
        if self.in_order:
            self.crc = crc32(data, self.crc)
            self.position += len(data)


class _Checker:
    """Compares what a replanned job writes with the output's bytes (the engine's sink), and
    scans the output tensors no recomputation covered; keeps the per-tensor tallies."""

    def __init__(self, layout: Layout, atol: float):
        self.layout, self.atol = layout, atol
        self.specs = {n: s for specs in layout.files.values() for n, s in specs.items()}
        self.tallies = {n: _Tally() for n in self.specs}
        self.checked: set[str] = set()  # compared with a recomputation
        self.crcs: dict[Path, _Crc] = {}
        for path in layout.checksums:
            with open(path, "rb") as f:
                header = f.read(layout.header_bytes[path])
            self.crcs[path] = _Crc(path.stat().st_size, zlib.crc32(header), len(header))
        self._fds: dict[Path, int] = {}

    def expect(self, tasks: Sequence[engine.Task], problems: list[str]) -> list[engine.Task]:
        """The replanned tasks whose output the output holds as planned; the rest are
        problems."""
        keep = []
        planned = {t.out.name for t in tasks if t.out is not None}
        for t in tasks:
            spec = self.specs.get(t.out.name) if t.out is not None else None
            if t.out is None or spec is None:
                continue
            if (spec.dtype, spec.shape) != (t.out.dtype, tuple(t.out.shape)):
                problems.append(
                    f"{spec.name}: the output holds {spec.dtype_str} {list(spec.shape)}, the "
                    "recomputation gives another dtype or shape"
                )
                continue
            keep.append(t)
            self.checked.add(spec.name)
        problems += [
            f"{n}: in the output but not written by the recomputation"
            for n in self.specs
            if n not in planned
        ]
        absent = [n for n in planned if n not in self.specs]
        if absent:
            problems.append(
                f"{len(absent)} tensor(s) are missing from the output (e.g. {', '.join(absent[:3])})"
            )
        return keep

    def covers_everything(self) -> bool:
        """Every output tensor was compared with a recomputation."""
        return bool(self.specs) and self.checked == set(self.specs)

    # -- the sink -----------------------------------------------------------------------------

    def write(self, name: str, offset: int, data: memoryview) -> None:
        spec = self.specs[name]
        got = self._pread(spec.file, spec.start + offset, len(data))
        crc = self.crcs.get(spec.file)
        if crc is not None:
            crc.update(spec.start + offset, got)
        tally = self.tallies[name]
        if len(got) != len(data):  # the shard is shorter than its header says
            tally.bits_differ, tally.max_diff = True, math.inf
            return
        mine = _as_tensor(got, spec.dtype)
        bad = ~torch.isfinite(mine) if spec.is_float else None
        if bad is not None:
            tally.nonfinite += int(bad.sum())
        if got == data:
            if bad is not None:
                tally.nonfinite_expected += int(bad.sum())
            return
        want = _as_tensor(bytes(data), spec.dtype)
        tally.bits_differ = True
        tally.max_diff = max(tally.max_diff, _max_abs_diff(mine, want))
        if bad is not None:
            same = (mine == want) | (torch.isnan(mine) & torch.isnan(want))
            tally.nonfinite_expected += int((bad & same).sum())

    def abort(self) -> None:
        self._close()

    def _pread(self, path: Path, offset: int, n: int) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        parts, done = [], 0
        while done < n:
            piece = os.pread(fd, n - done, offset + done)
            if not piece:
                break  # truncated: the structure check has said so; the bytes differ
            parts.append(piece)
            done += len(piece)
        return b"".join(parts)

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the scan of what no recomputation covered ---------------------------------------------

    def scan_job(self) -> Job:
        """Read the output tensors not compared yet: their NaN/Inf and the checksums."""
        self._close()
        tasks = []
        for path, specs in self.layout.files.items():
            for name, spec in specs.items():
                if name not in self.checked:
                    tasks.append(self._scan_task(spec, self.crcs.get(path)))
        return Job("verify", tasks, lambda o: o)

    def _scan_task(self, spec: TensorSpec, crc: _Crc | None) -> engine.Task:
        tally = self.tallies[spec.name]
        row_bytes = spec.row_numel * spec.itemsize

        def compute(chunk: engine.Chunk) -> None:
            got = chunk.inputs[0]
            host = got if got.device.type == "cpu" else got.cpu()
            if crc is not None:
                crc.update(spec.start + chunk.start * row_bytes, engine.bytes_of(host))
            if spec.is_float and got.numel():
                tally.nonfinite += int((~torch.isfinite(got)).sum())

        return engine.Task(spec.name, [spec], compute, min_rows=1)

    # -- the verdict ---------------------------------------------------------------------------

    def report(self, result: VerifyResult) -> None:
        for path, crc in self.crcs.items():
            if not crc.in_order or crc.position != crc.size:
                crc.crc, crc.position, crc.in_order = file_crc(path), crc.size, True
            recorded = parse_crc(self.layout.checksums[path])
            if crc.crc != recorded:
                result.problems.append(
                    f"{path.name}: crc32 is {crc.crc:08x}, the index records {recorded:08x} "
                    "(the file changed after it was written)"
                )
            else:
                result.checksums_checked += 1
        differing = []
        for name, t in self.tallies.items():
            if t.bits_differ and (self.atol == 0 or t.max_diff > self.atol):
                result.differences[name] = t.max_diff
                differing.append(name)
            if t.nonfinite:
                if t.nonfinite == t.nonfinite_expected:
                    result.nonfinite_from_inputs[name] = t.nonfinite
                else:
                    result.nonfinite[name] = t.nonfinite
        if differing:
            shown = ", ".join(
                f"{n} (max abs diff {result.differences[n]:.3g})" for n in differing[:10]
            )
            more = f" and {len(differing) - 10} more" if len(differing) > 10 else ""
            result.problems.append(
                f"{len(differing)} tensor(s) differ from the recomputation: {shown}{more} "
                "(an output written on another device, CPU vs CUDA, may differ in the last bit: "
                "pass the --device it was written on, or --atol)"
            )
        if result.nonfinite:
            shown = ", ".join(f"{n} ({c})" for n, c in list(result.nonfinite.items())[:10])
            hint = "" if self.checked else "; pass the inputs to check whether they hold them too"
            result.problems.append(f"NaN/Inf in {len(result.nonfinite)} tensor(s): {shown}{hint}")


def _as_tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in float64; NaN against NaN counts as equal, NaN against a number as
    infinitely far; equal values with other bits (0.0 and -0.0) as 0."""
    if a.shape != b.shape:
        return math.inf
    if not (a.is_floating_point() or b.is_floating_point()):
        return float((a.long() - b.long()).abs().max()) if a.numel() else 0.0
    if ops.equal(a, b):
        return 0.0
    x, y = a.double(), b.double()
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    d = torch.where(same, torch.zeros_like(x), (x - y).abs().nan_to_num(nan=math.inf))
    return float(d.max()) if d.numel() else 0.0
