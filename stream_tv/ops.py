"""Per-chunk pure maths for task vectors: no I/O, any device, any chunk of rows.

>>> import torch
>>> base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
>>> ft = torch.tensor([1.5, 2.0, 2.0], dtype=torch.bfloat16)
>>> tv = subtract(ft, base, out=torch.empty(3))
>>> tv.tolist()
[0.5, 0.0, -1.0]
>>> add_scaled(base, [(tv, 1.0)], out=torch.empty(3, dtype=torch.bfloat16)).tolist()
[1.5, 2.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .bits import equal as equal  # ops.equal: the commands use it
from .narrow import BLOCK as NARROW_BLOCK
from .narrow import round_from_float64, round_to_odd32, subtract_narrow


def difference_dtype(base: torch.dtype, finetuned: torch.dtype) -> torch.dtype:
    """Default storage dtype of ``finetuned - base``: float32, or float64 for float64 inputs.

    # subtle: the difference of two bf16 values is rarely a bf16 value (``1.0 - 0.99609375``
    # needs 1 bit, ``1.0078125 - 1e-3`` needs 17), but it is exact in float32 unless the
    # exponents are more than 16 apart; so float32 is the default for bf16/fp16 models.
    """
    if torch.float64 in (base, finetuned):
        return torch.float64
    return torch.float32


def compute_dtype(out: torch.dtype, *inputs: torch.dtype) -> torch.dtype:
    """Arithmetic dtype giving one correctly rounded result in ``out``.

    float32 is enough when the result is stored in float32 or wider from inputs of at most
    32 bits (one float32 rounding). A narrower output (``--dtype bf16``) computes in float64,
    so that rounding happens once, not twice (float32, then bf16).
    """
    if out == torch.float64 or torch.float64 in inputs or out.itemsize < 4:
        return torch.float64
    return torch.float32


# Elements per block on CPU: each elementwise pass over a block finds the previous pass's
# data still in L2, instead of streaming the whole chunk through memory once per pass
# (measured 3-6x faster here for copy + subtract of a 64 MB chunk).
CPU_BLOCK = 1 << 18


def blocks(*tensors: torch.Tensor, size: int = CPU_BLOCK) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned flat slices of contiguous tensors of equal numel: L2-sized on CPU, one
    slice on GPUs (where a kernel launch per block would cost more than it saves)."""
    flat = [t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    step = size if flat[0].device.type == "cpu" else max(n, 1)
    for i in range(0, n, step):
        yield tuple(t[i : i + step] for t in flat)


def subtract(finetuned: torch.Tensor, base: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``out = finetuned - base``, correctly rounded to ``out.dtype``; returns ``out``."""
    work = compute_dtype(out.dtype, finetuned.dtype, base.dtype)
    if work != out.dtype and _narrow_from_float32(out, finetuned, base):
        return subtract_narrow(finetuned, base, out)
    for f, b, o in blocks(finetuned, base, out):
        if work == out.dtype:
            # Upcasts happen element by element inside the kernels: no temporaries.
            o.copy_(f)
            o.sub_(b)
        else:
            acc = f.to(work)
            acc.sub_(b)
            o.copy_(round_to(acc, out.dtype))
    return out


_NARROW = (torch.bfloat16, torch.float16)
_FLOAT32_EXACT = (torch.bfloat16, torch.float16, torch.float32)


def _narrow_from_float32(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """A contiguous 16-bit CPU result of float32-exact CPU inputs: the float32 path of
    :mod:`stream_tv.narrow` gives the reference's bits for less work."""
    return (
        out.dtype in _NARROW
        and out.device.type == "cpu"
        and out.is_contiguous()
        and all(x.dtype in _FLOAT32_EXACT and x.device.type == "cpu" for x in inputs)
    )


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` correctly rounded (to nearest, ties to even) to ``dtype``.

    # subtle: torch converts float64 to bf16/fp16 through float32, which rounds twice
    # (``1 + 2**-8 + 2**-30`` becomes ``1 + 2**-8`` in float32, then ``1`` in bf16, while the
    # nearest bf16 is ``1 + 2**-7``). Rounding to float32 *to odd* first and then to the
    # 16-bit type gives the correctly rounded result, as float32 keeps more than 2p+2 bits.
    # On CPU the two plain roundings are used and only the elements whose float32 value is
    # (or, for fp16, may be) a 16-bit midpoint, the only ones they can get wrong, are rounded
    # to odd: the same bits, for a fraction of the work.

    >>> x = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    >>> x.to(torch.bfloat16).item(), round_to(x, torch.bfloat16).item()
    (1.0, 1.0078125)
    """
    if x.dtype != torch.float64 or dtype not in _NARROW:
        return x.to(dtype)
    if x.device.type != "cpu":
        return round_to_odd32(x).to(dtype)
    return round_from_float64(x, dtype)


def add_scaled(
    base: torch.Tensor,
    terms: Sequence[tuple[torch.Tensor | None, float]],
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out = base + sum(scale * tv)`` in float32 (float64 if any input is), rounded once.

    ``None`` terms (a tensor absent from a task vector) count as zero. With one term of
    scale 1 whose value is the exact difference ``finetuned - base``, the float32 sum is
    exactly ``finetuned`` and so is the result: the round trip of ``extract`` and ``apply``.
    """
    dtypes = [base.dtype, out.dtype, *(t.dtype for t, _ in terms if t is not None)]
    work = torch.float64 if torch.float64 in dtypes else torch.float32
    live = [(tv, scale) for tv, scale in terms if tv is not None and scale != 0]
    scales = [scale for _, scale in live]
    in_place = out.dtype == work and base.data_ptr() != out.data_ptr()
    # One reused scratch block (64 Ki elements on CPU: it, the inputs' and the output's
    # block stay in L2), not a new tensor per block.
    size = NARROW_BLOCK
    scratch = None if in_place else torch.empty(min(out.numel(), size), dtype=work)
    if scratch is not None and out.device.type != "cpu":  # one block: the whole tensor
        scratch = torch.empty(out.numel(), dtype=work, device=out.device)
    for b, o, *tvs in blocks(base, out, *(tv for tv, _ in live), size=size):
        acc = o.copy_(b) if in_place else scratch[: b.numel()].copy_(b)
        for tv, scale in zip(tvs, scales, strict=True):
            if scale == 1:
                acc.add_(tv)
            else:
                acc.add_(tv, alpha=scale)
        if not in_place:
            # float64 -> bf16/fp16: rounded once, not via float32 (float32: the same cast)
            o.copy_(round_to(acc, out.dtype) if acc.dtype == torch.float64 else acc)
    return out
