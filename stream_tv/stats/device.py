"""The device path of :meth:`TensorAccumulator.update` (a GPU, or CPU with ``CPU_FIGURES``
off): each block's figures stay 0-dim tensors on the device, so nothing synchronises until
the result. :mod:`stream_tv.stats.cpu` computes the same figures on CPU in fewer calls.
"""

from __future__ import annotations

import math

import torch

from stream_tv.floats import BITS_OF, max_half_ulp, scaled_dots, scaled_pair, ulp_counts
from stream_tv.ops import blocks, round_to

__all__ = ["BLOCK", "parts"]

# Elements per block of the statistics passes (float64: 1 MiB per operand).
BLOCK = 1 << 17


def parts(
    has_lora: bool,
    tv: torch.Tensor,
    lora: torch.Tensor | None,
    finetuned: torch.Tensor | None,
    base: torch.Tensor | None,
    merged: torch.Tensor | None,
) -> dict[str, list[torch.Tensor]]:
    """The chunk's figures as per-block device tensors, keyed like the accumulator's state
    (``lora`` given exactly when ``has_lora``)."""
    measurable = finetuned is not None and finetuned.dtype in BITS_OF
    with_base = measurable and base is not None
    dev = tv.device
    out: dict[str, list[torch.Tensor]] = {}
    if has_lora:
        assert lora is not None  # update checked it
        chunks = [tv, lora.to(dev)]
        if measurable:
            chunks += [finetuned.to(dev)]
            chunks += [base.to(dev) if with_base else None]
            chunks += [merged.to(dev) if merged is not None else None]
        for t, lo, *rest in blocks_of(chunks):
            t = t.to(torch.float64)
            _append(out, lt_block(t, lo))
            if rest:
                _append(out, merge_block(rest[0], rest[1], lo, rest[2]))
    else:
        # The cheap path: no float64 copy of the chunk. vector_norm upcasts per element.
        t = tv if tv.dtype.is_floating_point else tv.to(torch.float64)
        pair = finetuned is not None and base is not None
        chunks = [t] + ([finetuned.to(dev), base.to(dev)] if pair else [])
        for t_b, *rest in blocks_of(chunks):
            _append(out, plain_block(t_b, *(rest or (None, None))))
    return out


def count_nonfinite(probe: torch.Tensor, *chunks: torch.Tensor) -> torch.Tensor:
    """Elements where any of ``chunks`` is NaN or infinite. ``probe`` is a figure computed
    from all of them that is finite when they all are: on CPU a finite probe skips the
    count (a free host check); elsewhere the count always runs (no synchronisation)."""
    if probe.device.type == "cpu" and math.isfinite(float(probe)):
        return torch.zeros((), dtype=torch.int64)
    bad = ~torch.isfinite(chunks[0])
    for chunk in chunks[1:]:
        bad |= ~torch.isfinite(chunk)
    return torch.count_nonzero(bad)


def lt_block(t: torch.Tensor, lo: torch.Tensor) -> dict[str, torch.Tensor]:
    """The L / T figures of one flat float64 block."""
    tt, ll, lt = scaled_dots(t, lo)
    # subtle: sum (L - T)^2 directly, not |L|^2 + |T|^2 - 2<L,T>, which cancels to noise
    # exactly when L and T agree, the case this report is about.
    d = lo - t
    (dd,) = scaled_dots(d)
    d.abs_()  # in place: no second temporary
    worst = d.max()
    return {
        # T has a nonzero (or NaN) element exactly when its sum of squares is not 0 (a
        # scaled sum: elements whose squares underflow still count)
        "_changed": tt[0] != 0,
        "_sum_tt": tt,
        "_sum_ll": ll,
        "_dot": lt,
        "_sum_dd": dd,
        "_sum_abs": d.sum(),
        "_max_abs": worst,
        "_nonfinite": count_nonfinite(worst, t, lo),
    }


def ulp_block(f: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Counts of ``f`` at 0 and 1 ulp from ``reference`` (same dtype), and the largest."""
    zero, one, top = ulp_counts(f, reference)
    return {"_ulp0": zero, "_ulp1": one, "_ulp_max": top}


def merge_block(
    f: torch.Tensor, w: torch.Tensor | None, lo: torch.Tensor, merged: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The rounding figures of a LoRA block: F against the correctly rounded W + L (with W)
    and against our merge (with ``merged``)."""
    out = {"_max_bound": max_half_ulp(f)}
    if w is not None:
        exact = w.to(torch.float64) + lo  # W + L, in float64
        rounded = round_to(exact, f.dtype)  # correctly rounded, not via float32
        out.update(ulp_block(f, rounded))
        (out["_sum_ee"],) = scaled_dots(rounded.to(torch.float64) - exact)
    if merged is not None:
        # subtle: "merged, then saved in F's dtype" is torch's cast, what save_pretrained
        # with a torch_dtype does (float64 -> bf16 rounds twice there, as it would here).
        cast = merged.to(f.dtype)
        bits = BITS_OF[f.dtype]
        out["_exact"] = torch.count_nonzero(f.view(bits) == cast.view(bits))
    return out


def plain_block(
    t: torch.Tensor, f: torch.Tensor | None, w: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The figures of one flat block of a tensor without L: ||T||, and F against W."""
    if t.dtype.itemsize <= 4:
        # The squares of 32-bit and narrower floats never leave float64's range.
        norm = torch.linalg.vector_norm(t, dtype=torch.float64)
        tt = scaled_pair(norm * norm, 0.0)
    else:
        (tt,) = scaled_dots(t)
    out = {"_changed": tt[0] != 0, "_sum_tt": tt, "_nonfinite": count_nonfinite(tt[0], t)}
    if f is not None and w is not None:
        w = w.to(f.device)
        reference = round_to(w, f.dtype)  # the correctly rounded round trip of W
        if f.dtype != w.dtype:  # same dtype: round trip == unchanged
            # The category's test is torch's cast, exact on raw dtypes (see merge_block).
            cast = reference if w.dtype != torch.float64 else w.to(f.dtype)
            out["_round_trip"] = torch.all(cast == f)
        if f.dtype in BITS_OF:
            out.update(ulp_block(f, reference))
    return out


def blocks_of(chunks: list[torch.Tensor | None]):
    """Aligned flat blocks of the given chunks, ``None`` standing for an absent one."""
    present = [c for c in chunks if c is not None]
    for block in blocks(*present, size=BLOCK):
        it = iter(block)
        yield [None if c is None else next(it) for c in chunks]


def _append(parts: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for key, value in values.items():
        parts.setdefault(key, []).append(value)
