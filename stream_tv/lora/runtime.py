"""A :class:`~stream_tv.lora.plan.TensorMerge` opened on a device: loaded factors, DoRA state.

``tm.open(device)`` yields an :class:`OpenMerge`; rows of the base tensor (or of its
replacement) stream through it in chunks:

- ``merge_rows``: the merged rows, rounded where PEFT rounds (``exact-peft``) or once
  (``fp32``);
- ``delta_rows``: the layers' effective delta, unrounded, in float32 (PEFT's own delta bits)
  or float64 (a reference);
- ``prepass``: pass 1 of 2 for DoRA layers that normalise over stored rows (Embedding,
  Conv1D): their column norms need every row before the first merged row.

All three run the same step loop, :meth:`OpenMerge.apply_steps`. The factors are freed when
the ``with`` block ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import delta as D

if TYPE_CHECKING:
    from .plan import Step, TensorMerge

_MODES = ("exact-peft", "fp32", "delta")


class OpenMerge:
    """The runtime of one tensor's merge: factors on ``device`` as float32, DoRA norms."""

    def __init__(self, tm: TensorMerge, device: torch.device):
        self.tm = tm
        self.device = device
        self.factors: list[dict[str, torch.Tensor]] = _load_factors(tm.steps, device)
        self._caches: list[dict[str, torch.Tensor]] = [{} for _ in tm.steps]
        self._acc: D.SquaresAccumulator | None = None

    def __repr__(self) -> str:
        return f"OpenMerge({self.tm.key!r}, device={self.device})"

    def close(self) -> None:
        self.factors = []
        self._caches = []
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
            self._acc = D.SquaresAccumulator(self.tm.shape[1], device=w_rows.device)
        if self._acc is None:
            raise RuntimeError(f"{self.tm.key}: the DoRA prepass must start at row 0")
        cur, _ = self.apply_steps(self._source(w_rows), start, stop, mode=precision, upto=k)
        v = cur + self._delta(k, start, stop, torch.float32)
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
        through all steps and rounds once.
        """
        if precision not in ("exact-peft", "fp32"):
            raise ValueError(f"precision must be exact-peft or fp32, not {precision!r}")
        x = self._source(w_rows)
        steps = self.tm.steps
        if precision == "exact-peft" and len(steps) == 1 and not steps[0].dora:
            # The common case: one rounding straight into ``out``, no temporary weight.
            d = self._delta(0, start, stop, torch.float32)
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
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The LoRA layers' effective delta on rows ``[start, stop)``, unrounded, in ``dtype``.

        Plain LoRA: ``sum(scaling * B @ A)`` (float32: PEFT's own delta bits; float64: a
        reference product); ``w_rows`` is not needed. DoRA (``needs_base``) needs the rows
        the steps apply to (``w_rows``: the replacement if any, else the base) and, for
        Embedding/Conv1D, the prepass: its delta is ``m / ||W + D|| * (W + D) - W``. A saved
        replacement is not included: a replaced tensor's total change is
        ``replacement - base + delta_rows(...)``.
        """
        cur = None
        if self.tm.needs_base:
            if w_rows is None:
                raise ValueError(f"{self.tm.key}: a DoRA delta needs the weight rows (w_rows)")
            cur = self._source(w_rows).to(dtype)
        _, total = self.apply_steps(cur, start, stop, mode="delta", dtype=dtype)
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
        dtype: torch.dtype = torch.float32,
        upto: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the first ``upto`` steps (all by default) on rows ``cur``.

        ``mode``: ``exact-peft`` rounds the running weight to the weight dtype after each
        step, as PEFT merges; ``fp32`` keeps it in float32 (float64 for float64 weights);
        ``delta`` keeps it in ``dtype`` (``cur`` may be ``None`` when no step needs the
        weights) and also returns the sum of the steps' effective deltas. Deltas are
        ``dtype`` (float32 outside ``delta``). Returns ``(running weight, delta sum)``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        exact, track = mode == "exact-peft", mode == "delta"
        if mode == "fp32" and cur is not None:
            cur = cur.to(torch.float64 if self.tm.dtype == torch.float64 else torch.float32)
        total = None
        steps = self.tm.steps if upto is None else self.tm.steps[:upto]
        for i, s in enumerate(steps):
            d = self._delta(i, start, stop, dtype)
            if s.dora:
                new = self._dora(
                    i, s, cur, d, start, stop, reference=track and dtype == torch.float64
                )
                if exact:
                    new = new.to(self.tm.dtype)
                if track:
                    d = new - cur
                cur = new
            elif cur is not None:
                if exact:
                    add = D.add_rounding_twice if s.rounds_twice else D.add_rounding_once
                    cur = add(
                        cur, d, torch.empty(cur.shape, dtype=self.tm.dtype, device=cur.device)
                    )
                else:
                    cur = cur + d
            if track:
                total = d if total is None else total + d
        return cur, total

    def _dora(self, i: int, s: Step, cur, d, start: int, stop: int, *, reference: bool):
        """``(m / ||W + D||) * (W + D)`` for step ``i``, not yet rounded."""
        if cur is None:
            raise ValueError(f"{self.tm.key}: a DoRA step needs the weight rows")
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
        v = cur + d
        if reference:
            norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
        else:
            norm = D.dora_row_norm(v)
        mag = self._magnitude(i, d.dtype)[start:stop]
        return D.dora_merge_rows(cur, d, mag, norm, along_rows=True)

    # ---- factors ----------------------------------------------------------------------------

    def _source(self, w_rows: torch.Tensor) -> torch.Tensor:
        # A replacement is copied into the base parameter (PEFT's load_state_dict): cast.
        return w_rows if w_rows.dtype == self.tm.dtype else w_rows.to(self.tm.dtype)

    def _delta(self, i: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[start, stop)`` of step ``i``'s low-rank delta (with scaling), in ``dtype``.

        float32 reproduces PEFT's bits; float64 is a reference-quality product.
        """
        s, t = self.tm.steps[i], self.factors[i]
        scaling = s.scaling
        if s.target == "bias":
            return t["bias"][start:stop].to(dtype) * scaling
        A, B = t["A"], t["B"]
        cache = self._caches[i]
        if dtype != torch.float32:
            A, B, cache = A.to(dtype), B.to(dtype), None
        kind = s.module.kind
        if kind == "linear":
            return D.linear_delta_rows(A, B, scaling, start, stop)
        if kind == "conv1d":
            return D.linear_delta_rows(A, B, scaling, start, stop, fan_in_fan_out=True)
        if kind == "embedding":
            return D.embedding_delta_rows(A, B, scaling, start, stop)
        return D.conv2d_delta_rows(A, B, scaling, start, stop, cache=cache)

    def _magnitude(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        return self.factors[i]["magnitude"].reshape(-1).to(dtype)


def _load_factors(steps: Sequence[Step], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Each step's factors (A, B, magnitude, bias) as float32 on ``device``, as PEFT upcasts."""
    from safetensors import safe_open

    factors: list[dict[str, torch.Tensor]] = [{} for _ in steps]
    by_file: dict[Path, list[int]] = {}
    for i, s in enumerate(steps):
        by_file.setdefault(s.adapter.weights_file, []).append(i)
    for path, indices in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for i in indices:
                for name, key in steps[i].module.keys.items():
                    factors[i][name] = f.get_tensor(key).to(device=device, dtype=torch.float32)
    return factors
