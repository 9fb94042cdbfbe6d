"""A :class:`~stream_tv.lora.plan.TensorMerge` opened on a device: loaded factors, DoRA state.

``tm.open(device)`` yields an :class:`OpenMerge`; rows of the base tensor (or of its
replacement) stream through it in chunks:

- ``merge_rows``: the merged rows, rounded where PEFT rounds (``exact-peft``) or once
  (``fp32``);
- ``delta_rows``: the layers' effective delta, unrounded, in the work dtype (PEFT's own delta
  bits) or float64 (a reference);
- ``prepass``: pass 1 of 2 for DoRA layers that normalise over stored rows (Embedding,
  Conv1D): their column norms need every row before the first merged row.

All three run the same step loop, :meth:`OpenMerge.apply_steps`. The factors are freed when
the ``with`` block ends. The work dtype is ``tm.work_dtype``: float64 for float64 weights
(PEFT's factors follow the weight dtype), else float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import memory
from . import delta as D

if TYPE_CHECKING:
    from .plan import Step, TensorMerge

_MODES = ("exact-peft", "fp32", "delta")


class OpenMerge:
    """The runtime of one tensor's merge: factors on ``device`` in the work dtype, DoRA norms."""

    def __init__(self, tm: TensorMerge, device: torch.device):
        self.tm = tm
        self.device = device
        self.work = tm.work_dtype
        self.factors: list[dict[str, torch.Tensor]] = _load_factors(tm.steps, device, self.work)
        self._caches: list[dict[str, torch.Tensor]] = [{} for _ in tm.steps]
        # (step, dtype) -> factors A, B in a dtype other than the work dtype
        self._converted: dict[
            tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor, float]
        ] = {}
        self._acc: D.SquaresAccumulator | None = None
        # steps of a module that a later DoRA step of the same module unmerges
        self._unmerged = [
            [j for j in range(i) if tm.steps[j].module.name == s.module.name] if s.dora else []
            for i, s in enumerate(tm.steps)
        ]

    def __repr__(self) -> str:
        return f"OpenMerge({self.tm.key!r}, device={self.device})"

    def close(self) -> None:
        self.factors = []
        self._caches = []
        self._converted = {}
        self._acc = None

    # ---- the three entry points -----------------------------------------------------------

    def prepass(
        self, w_rows: torch.Tensor, start: int, stop: int, *, precision: str = "exact-peft"
    ) -> None:
        """Pass 1 of 2: accumulate DoRA's column norms. Chunks must come in row order."""
        k = next((i for i, s in enumerate(self.tm.steps) if s.two_pass), None)
        if k is None:
            return
        if start == 0:
            self._acc = D.SquaresAccumulator(
                self.tm.shape[1], device=w_rows.device, dtype=self.work
            )
        if self._acc is None:
            raise RuntimeError(f"{self.tm.key}: the DoRA prepass must start at row 0")
        cur, _ = self.apply_steps(self._source(w_rows), start, stop, mode=precision, upto=k)
        v = cur + self._delta(k, start, stop, self.work)
        v64 = cur.double() + self._delta(k, start, stop, torch.float64)
        self._acc.update(v, start, stop, v64)

    def merge_rows(
        self,
        w_rows: torch.Tensor,
        start: int,
        stop: int,
        out: torch.Tensor,
        *,
        precision: str = "exact-peft",
    ) -> torch.Tensor:
        """Merged rows ``[start, stop)`` written into ``out`` (the output dtype) and returned.

        ``w_rows`` are the rows of ``merge_inputs[0]`` (the replacement if any, else the base).
        ``exact-peft`` rounds where PEFT rounds; ``fp32`` keeps the running weight in float32
        (float64 for float64 weights) through all steps and rounds once.
        """
        if precision not in ("exact-peft", "fp32"):
            raise ValueError(f"precision must be exact-peft or fp32, not {precision!r}")
        x = self._source(w_rows)
        steps = self.tm.steps
        if (
            precision == "exact-peft"
            and len(steps) == 1
            and not (steps[0].dora or steps[0].replaces_rows)
        ):
            # The common case: one rounding straight into ``out``, no temporary weight.
            d = self._delta(0, start, stop, self.work, "merge_rows")  # added at once
            add = D.add_rounding_twice if steps[0].rounds_twice else D.add_rounding_once
            return add(x, d, out)
        cur, _ = self.apply_steps(x, start, stop, mode=precision)
        out.copy_(cur)
        return out

    def delta_rows(
        self,
        start: int,
        stop: int,
        *,
        w_rows: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        scratch: str | None = None,
    ) -> torch.Tensor:
        """The layers' effective delta on rows ``[start, stop)``, unrounded, in ``dtype``.
        ``scratch``: the caller's name for kept product buffers (:func:`memory.scratch`): the
        result is then valid until the caller's next call with that name.

        ``dtype`` defaults to the work dtype (PEFT's own delta bits); float64 gives a reference
        product. Plain LoRA: ``sum(scaling * B @ A)``; ``w_rows`` is not needed. DoRA and
        trainable tokens (``needs_base``) need the rows the steps apply to (``w_rows``: the
        replacement if any, else the base) and, for an Embedding/Conv1D DoRA layer, the
        prepass: its delta is ``m / ||W + D|| * (W + D) - W``. A saved replacement is not
        included: a replaced tensor's total change is ``replacement - base + delta_rows(...)``.
        """
        dtype = dtype or self.work
        cur = None
        if self.tm.needs_base:
            if w_rows is None:
                raise ValueError(
                    f"{self.tm.key}: a DoRA or trainable-token delta needs the weight rows (w_rows)"
                )
            cur = self._source(w_rows).to(dtype)
        _, total = self.apply_steps(cur, start, stop, mode="delta", dtype=dtype, scratch=scratch)
        shape = (stop - start, *self.tm.shape[1:])
        if total is None:
            device = w_rows.device if w_rows is not None else self.device
            return torch.zeros(shape, dtype=dtype, device=device)
        return total.reshape(shape)

    # ---- the step loop ----------------------------------------------------------------------

    def apply_steps(
        self,
        cur: torch.Tensor | None,
        start: int,
        stop: int,
        *,
        mode: str,
        dtype: torch.dtype | None = None,
        upto: int | None = None,
        scratch: str | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the first ``upto`` steps (all by default) on rows ``cur``.

        ``mode``: ``exact-peft`` rounds the running weight to the weight dtype after each
        step, as PEFT merges; ``fp32`` keeps it in the work dtype; ``delta`` keeps it in
        ``dtype`` (``cur`` may be ``None`` when no step needs the weights) and also returns the
        sum of the steps' effective deltas. Deltas are ``dtype`` (the work dtype outside
        ``delta``). Returns ``(running weight, delta sum)``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        exact, track = mode == "exact-peft", mode == "delta"
        dtype = dtype if track and dtype is not None else self.work
        if mode == "fp32" and cur is not None:
            cur = cur.to(self.work)
        total = None
        before: dict[str, torch.Tensor] = {}  # rows before a module's first step
        steps = self.tm.steps if upto is None else self.tm.steps[:upto]
        for i, s in enumerate(steps):
            if cur is not None and s.module.name not in before:
                before[s.module.name] = cur
            if s.replaces_rows:
                new = self._tokens(i, cur, start, stop)
                d = new - cur if track else None
                cur = new
            else:
                d = self._delta(i, start, stop, dtype, scratch)
                if s.dora:
                    new = self._dora_step(i, s, cur, d, start, stop, exact, before, track, dtype)
                    if track:
                        d = new - cur
                    cur = new
                elif cur is not None:
                    cur = self._add(s, cur, d) if exact else cur + d
            if track:
                total = d if total is None else total + d
        return cur, total

    def _add(self, s: Step, cur: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``cur + d`` rounded to the weight dtype as PEFT's merge of step ``s`` rounds."""
        add = D.add_rounding_twice if s.rounds_twice else D.add_rounding_once
        return add(cur, d, torch.empty(cur.shape, dtype=self.tm.dtype, device=cur.device))

    def _dora_step(self, i, s, cur, d, start, stop, exact, before, track, dtype):
        """Step ``i``, a DoRA layer: ``(m / ||V + D||) * (W + D)``, rounded when ``exact``.

        ``V`` is the module's weight without its merged adapters: with earlier plain LoRA
        layers of the same module (several adapters), PEFT unmerges them
        (``W - delta.to(dtype)``, one after the other, last first), takes the norm on that,
        and merges them back, so ``W`` is the re-merged weight (``exact``). Otherwise ``V`` is
        the weight before the module's first layer (``fp32``, ``delta``).
        """
        if cur is None:
            raise ValueError(f"{self.tm.key}: a DoRA step needs the weight rows")
        base = cur
        if self._unmerged[i]:
            name = s.module.name
            if exact:
                base = cur
                for j in reversed(self._unmerged[i]):
                    d_j = self._delta(j, start, stop, dtype).to(self.tm.dtype)
                    base = torch.sub(base, d_j)
                cur = base
                for j in self._unmerged[i]:
                    cur = self._add(self.tm.steps[j], cur, self._delta(j, start, stop, dtype))
            else:
                base = before[name]
        new = self._dora(
            i, s, cur, base, d, start, stop, reference=track and dtype == torch.float64
        )
        return new.to(self.tm.dtype) if exact else new

    def _dora(self, i: int, s: Step, cur, base, d, start: int, stop: int, *, reference: bool):
        """``(m / ||base + D||) * (cur + D)`` for step ``i``, not yet rounded."""
        if s.two_pass:
            if self._acc is None or self._acc.rows_seen != self.tm.rows:
                seen = 0 if self._acc is None else self._acc.rows_seen
                raise RuntimeError(
                    f"{self.tm.key}: the DoRA prepass saw {seen} of {self.tm.rows} rows; run it "
                    "over all rows, in order, before merge_rows/delta_rows"
                )
            norm = (self._acc.norm64() if d.dtype == torch.float64 else self._acc.norm()).to(
                d.dtype
            )
            return D.dora_merge_rows(cur, d, self._magnitude(i, d.dtype), norm, along_rows=False)
        v = base + d
        if reference:
            norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
        else:
            norm = D.dora_row_norm(v)
        mag = self._magnitude(i, d.dtype)[start:stop]
        return D.dora_merge_rows(cur, d, mag, norm, along_rows=True)

    def _tokens(self, i: int, cur: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Trainable tokens: the rows of ``indices`` in ``[start, stop)`` written over with
        their trained values, cast to the weight dtype as PEFT's ``index_copy`` does."""
        if cur is None:
            raise ValueError(f"{self.tm.key}: trainable tokens need the weight rows")
        indices = self.tm.steps[i].module.indices
        picked = [(j, t) for j, t in enumerate(indices) if start <= t < stop]
        if not picked:
            return cur
        rows = torch.tensor([t - start for _, t in picked], device=cur.device)
        values = self.factors[i]["delta"][[j for j, _ in picked]]
        return cur.index_copy(0, rows, values.to(self.tm.dtype).to(cur.dtype))

    # ---- factors ----------------------------------------------------------------------------

    def _source(self, w_rows: torch.Tensor) -> torch.Tensor:
        # A replacement is copied into the base parameter (PEFT's load_state_dict), and a
        # parameter kept in float32 loads as float32: cast.
        return w_rows if w_rows.dtype == self.tm.dtype else w_rows.to(self.tm.dtype)

    def _delta(
        self, i: int, start: int, stop: int, dtype: torch.dtype, scratch: str | None = None
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of step ``i``'s low-rank delta (with scaling), in ``dtype``.

        The work dtype reproduces PEFT's bits; float64 is a reference-quality product.
        ``scratch``: a Linear's product goes to the kept buffer ``(scratch, i, dtype)``.
        """
        s, t = self.tm.steps[i], self.factors[i]
        scaling = s.scaling
        if s.target == "bias":
            return t["bias"][start:stop].to(dtype) * scaling
        A, B = t["A"], t["B"]
        cache = self._caches[i]
        m = s.module
        if dtype != self.work:  # converted once per tensor, not once per chunk
            key = (i, dtype)
            if key not in self._converted:
                linear = m.kind in ("linear", "param", "conv1d")
                self._converted[key] = (
                    D.scaled_factors(A, B, scaling, dtype)
                    if linear
                    else (A.to(dtype), B.to(dtype), scaling)
                )
            (A, B, scaling), cache = self._converted[key], None
        if m.kind in ("linear", "param"):
            kept = None if scratch is None else (scratch, i, dtype)
            return D.linear_delta_rows(A, B, scaling, start, stop, scratch=kept)
        if m.kind == "conv1d":
            return D.linear_delta_rows(A, B, scaling, start, stop, fan_in_fan_out=True)
        if m.kind == "embedding":
            return D.embedding_delta_rows(A, B, scaling, start, stop)
        if m.kind == "expert":
            return D.expert_delta_rows(
                A, B, scaling, start, stop, m.experts, s.part, transposed=m.transposed, cache=cache
            )
        return D.conv_delta_rows(A, B, scaling, start, stop, cache=cache)

    def _magnitude(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        return self.factors[i]["magnitude"].reshape(-1).to(dtype)


def _load_factors(
    steps: Sequence[Step], device: torch.device, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """Each step's factors (A, B, magnitude, bias, token rows) in ``dtype`` on ``device``, as
    PEFT holds them (upcast to float32, or float64 for a float64 weight)."""
    from safetensors import safe_open

    factors: list[dict[str, torch.Tensor]] = [{} for _ in steps]
    by_file: dict[Path, list[int]] = {}
    for i, s in enumerate(steps):
        by_file.setdefault(s.adapter.weights_file, []).append(i)
    for path, indices in by_file.items():
        opener = functools.partial(safe_open, str(path), framework="pt", device="cpu")
        with memory.kept_open(("adapter", str(path)), opener) as f:
            for i in indices:
                for name, key in steps[i].module.keys.items():
                    factors[i][name] = f.get_tensor(key).to(device=device, dtype=dtype)
    return factors
