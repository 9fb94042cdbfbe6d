"""Per-layer LoRA maths on row ranges, reproducing PEFT's merge bit for bit on CPU.

Rows are dim 0 of the base weight *as stored*: output features for Linear and Conv2d, input
features for transformers' ``Conv1D`` (GPT-2 stores ``(in, out)``), the vocabulary for an
Embedding. What PEFT computes (``peft/tuners/lora/layer.py``, ``variants.py``, ``dora.py``),
with the adapter factors in float32 (PEFT upcasts them on load):

======================  ==========================================================  ========
layer                   merged weight                                               roundings
======================  ==========================================================  ========
Linear                  ``W += (B @ A) * s``                                        1
Conv1D (fan_in_fan_out) ``W += (B @ A).T * s``                                      1
Embedding               ``W += ((B @ A).T * s).to(W.dtype)``                        2
Conv2d 1x1              ``W += (B[:, :, 0, 0] @ A[:, :, 0, 0])[..., None, None] * s`` 1
Conv1d/2d/3d            ``W += convNd(A.transpose(0, 1), B).transpose(0, 1) * s``   1
lora_bias               ``bias += lora_B.bias * s``                                 1
DoRA                    ``W = ((m / ||W + D||) * (W + D)).to(W.dtype)``              1
expert stack (E, o, i)  ``W += (einsum("ore,eri->eoi", B3, A3) * s).to(W.dtype)``   2
2-D nn.Parameter        ``W += ((B @ A) * s).to(W.dtype)``                          2
trainable tokens        ``W[idx] = delta.to(W.dtype)``                              1
======================  ==========================================================  ========

For a float64 weight PEFT keeps the factors in float64 and every product is float64.

``# subtle:`` three CPU traps decide the bits, all measured with the installed torch/MKL:

1. **A matrix product's bits depend on the call's shape, not only on the operands.** MKL
   computes the rows (or columns) of ``B @ A`` with different micro-kernels depending on
   where they fall: blocks of rows use fused multiply-adds, a remainder of a few rows (and
   any product of 1-3 rows) uses separate multiplies and adds. So ``B[a:b] @ A`` differs from
   ``(B @ A)[a:b]`` even for 2 or 3 rows. :func:`product_rows` therefore computes a *window*
   aligned to :data:`WINDOW_ALIGN` rows of the full product and at least
   :data:`WINDOW_MIN_ROWS` long (or the whole product), whose kernel layout matches the full
   product's, and slices it. Any chunk size works, one row included; the cost is at most
   ``WINDOW_ALIGN + WINDOW_MIN_ROWS`` extra rows of a rank-``r`` product.
2. **``torch.sqrt`` on CPU float32 is not correctly rounded** (a vectorised approximation),
   while the norm kernels DoRA relies on end in ``std::sqrt``: :func:`exact_sqrt` rounds a
   float64 square root instead, which is the correctly rounded float32 result.
3. **DoRA's norm over a strided dimension is a sequential sum.** For Embedding and Conv1D,
   PEFT's ``torch.linalg.norm(W.T + D.T, dim=1)`` reduces over the stored rows with
   ``acc = acc + x * x`` in float32, one stored row after the other. :class:`SquaresAccumulator`
   does the same, chunk by chunk, so the norms are exact when the chunks arrive in order.
   (Not reproduced: a *single* column over 32768 rows or more, which torch splits across
   threads; no real Embedding/Conv1D has one output feature.) For Linear/Conv2d the norm
   runs along a stored row and is computed per chunk by torch itself.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
import torch.nn.functional as F

from .. import memory

WINDOW_ALIGN = 64
WINDOW_MIN_ROWS = 256


def window(start: int, stop: int, total: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a product to compute so that rows ``[start, stop)`` get the
    bits of the full product: ``lo`` aligned to :data:`WINDOW_ALIGN`, ``hi`` aligned or the
    end, and at least :data:`WINDOW_MIN_ROWS` rows unless the product is shorter.

    >>> window(0, 2, 4096), window(300, 303, 4096), window(4095, 4096, 4096)
    ((0, 256), (64, 320), (3840, 4096))
    >>> window(5, 7, 100)
    (0, 100)
    """
    if not 0 <= start < stop <= total:
        raise ValueError(f"row range [{start}, {stop}) is not inside [0, {total})")
    lo = start // WINDOW_ALIGN * WINDOW_ALIGN
    hi = min(total, -(-stop // WINDOW_ALIGN) * WINDOW_ALIGN)
    while hi - lo < WINDOW_MIN_ROWS and (lo > 0 or hi < total):
        if lo > 0:
            lo -= WINDOW_ALIGN
        else:
            hi = min(total, hi + WINDOW_ALIGN)
    return lo, hi


#: Bytes of product a CPU block of rows aims at: it, and the rows rounded from it, stay in
#: the cache between the product and the rounding (see :func:`row_blocks`).
BLOCK_BYTES = 1 << 20


def row_blocks(start: int, stop: int, row_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into blocks of whole windows (:func:`window`): about
    :data:`BLOCK_BYTES` of product each, at least :data:`WINDOW_MIN_ROWS` rows, every inner
    boundary a multiple of the block (so each block is its own window, computed once).

    >>> row_blocks(0, 1000, 8192), row_blocks(100, 600, 8192)
    ([(0, 256), (256, 512), (512, 768), (768, 1000)], [(100, 256), (256, 512), (512, 600)])
    """
    rows = max(WINDOW_MIN_ROWS, BLOCK_BYTES // max(row_bytes, 1) // WINDOW_ALIGN * WINDOW_ALIGN)
    cuts = range((start // rows + 1) * rows, stop, rows)
    edges = [start, *cuts, stop]
    return list(zip(edges[:-1], edges[1:], strict=True))


def product_rows(
    B: torch.Tensor, A: torch.Tensor, start: int, stop: int, *, scratch: Hashable | None = None
) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``B @ A``, bitwise equal to those rows of the full product.

    ``scratch``: a :func:`stream_tv.memory.scratch` key; the product is then written into
    that kept buffer (valid until the key's next use) instead of fresh memory.

    # subtle: a product with one output column is a matrix-vector product, whose kernel
    # (MKL's gemv) gives other bits for a window than for the whole (seen: 1 element of
    # 1497 rows, cut at row 64). Its full product is only ``rows x 1``: computed whole.
    """
    if A.shape[1] == 1:
        return (B @ A)[start:stop]
    lo, hi = window(start, stop, B.shape[0])
    out = None
    if scratch is not None:
        out = memory.scratch(scratch, (hi - lo, A.shape[1]), torch.result_type(B, A), A.device)
    return torch.matmul(B[lo:hi], A, out=out)[start - lo : stop - lo]


def product_cols_t(B: torch.Tensor, A: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``(B @ A).T``, i.e. its columns, bitwise like the full one
    (one output row, a vector-matrix product: computed whole, as :func:`product_rows`)."""
    if B.shape[0] == 1:
        return (B @ A).T[start:stop]
    lo, hi = window(start, stop, A.shape[1])
    return (B @ A[:, lo:hi]).T[start - lo : stop - lo]


def linear_delta_rows(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    start: int,
    stop: int,
    *,
    fan_in_fan_out: bool = False,
    scratch: Hashable | None = None,
) -> torch.Tensor:
    """Rows of PEFT's ``Linear.get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * s``.
    ``scratch``: :func:`product_rows`' (Linear only).

    For a Conv1D (``fan_in_fan_out``) a stored row is an input feature, so the rows are
    columns of ``B @ A``. The result is float32 when ``A``/``B`` are, and not contiguous for
    Conv1D (a transposed view, like PEFT's).

    >>> A, B = torch.ones(2, 3), torch.ones(4, 2)
    >>> linear_delta_rows(A, B, 0.5, 1, 3).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> linear_delta_rows(A, B, 0.5, 0, 3, fan_in_fan_out=True).shape
    torch.Size([3, 4])
    """
    # (in place: the product is a fresh tensor, and a second float64 chunk costs a pass of
    # page faults; the same bits as ``* scaling``; ``* 1.0`` changes no bit, and is skipped)
    if fan_in_fan_out:
        rows = product_cols_t(B, A, start, stop)
    else:
        rows = product_rows(B, A, start, stop, scratch=scratch)
    return rows if scaling == 1.0 else rows.mul_(scaling)


def scaled_factors(
    A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, scaling)`` in ``dtype`` for :func:`linear_delta_rows`, the scaling folded into
    ``A`` where that gives the bits of scaling the product: then ``scaling`` is 1.0 and the
    rows need no pass of their own to be scaled.

    # subtle: exact for float64 products of factors stored in at most 32 bits, scaled by a
    # power of two (LoRA's usual ``alpha / r``). A product of two such factors is exact in
    # float64, and every intermediate of the sum (product, fused multiply-add, partial sum),
    # whatever order the kernel takes, is zero or a multiple of 2**-298 * s, below
    # 2**(256 + 16) * s (a rank under 2**16): for |log2 s| <= 64, inside float64's normal
    # range, where scaling by a power of two commutes with each rounding.
    # So ``B @ (s * A)`` is ``(B @ A) * s`` bit for bit. Any other case keeps the scaling.

    >>> A, B = torch.ones(2, 3), torch.ones(4, 2)
    >>> scaled_factors(A, B, 2.0, torch.float64)[2], scaled_factors(A, B, 0.3, torch.float64)[2]
    (1.0, 0.3)
    """
    fraction, exponent = math.frexp(scaling)
    narrow = A.dtype.itemsize <= 4 and B.dtype.itemsize <= 4 and A.is_floating_point()
    if dtype == torch.float64 and narrow and abs(fraction) == 0.5 and abs(exponent) <= 64:
        return A.to(dtype) * scaling, B.to(dtype), 1.0
    return A.to(dtype), B.to(dtype), scaling


def embedding_delta_rows(
    A: torch.Tensor, B: torch.Tensor, scaling: float, start: int, stop: int
) -> torch.Tensor:
    """Rows (token ids) of PEFT's ``Embedding.get_delta_weight``: ``(B @ A).T * s``.

    ``A`` is ``lora_embedding_A`` ``(r, vocab)``, ``B`` is ``lora_embedding_B`` ``(dim, r)``.
    """
    return product_cols_t(B, A, start, stop) * scaling


def conv_delta_rows(
    A: torch.Tensor, B: torch.Tensor, scaling: float, start: int, stop: int, *, cache=None
) -> torch.Tensor:
    """Output channels ``[start, stop)`` of PEFT's ``_ConvNd.get_delta_weight`` (torch's
    Conv1d, Conv2d, Conv3d; ``A`` is ``(r, in, *kernel)``, ``B`` ``(out, r, 1, ...)``).

    A Conv2d 1x1 kernel is a matrix product (windowed like Linear), as PEFT tests
    ``weight.shape[2:4] == (1, 1)``. Any other kernel goes through ``F.conv{1,2,3}d``, whose
    bits depend on the whole call: the full delta is computed once (conv weights are small)
    and kept in ``cache`` (a dict) when one is given.
    """
    if A.dim() == 4 and A.shape[2:] == (1, 1):
        a = A.squeeze(3).squeeze(2)
        b = B.squeeze(3).squeeze(2)
        return (product_rows(b, a, start, stop).unsqueeze(2).unsqueeze(3)) * scaling
    full = cache.get("conv") if cache is not None else None
    if full is None:
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
        full = conv(A.transpose(0, 1), B).transpose(0, 1) * scaling
        if cache is not None:
            cache["conv"] = full
    return full[start:stop]


conv2d_delta_rows = conv_delta_rows  # the name of the Conv2d-only version


def expert_delta(
    A: torch.Tensor, B: torch.Tensor, scaling: float, lo: int, hi: int, experts: int, *, transposed
) -> torch.Tensor:
    """Experts ``[lo, hi)`` of PEFT's ``ParamWrapper.get_delta_weight`` for an expert stack.

    ``A`` is ``(r * E, in)`` with expert ``e``'s rows contiguous, ``B`` ``(out, r * E)`` with
    them strided; the stack is ``(E, out, in)``, or ``(E, in, out)`` when the module is
    ``transposed`` (``is_transposed``). PEFT's own contraction, on a slice of the experts:
    the batched product computes each expert alone, so a slice has the full call's bits.

    >>> A, B = torch.ones(4, 3), torch.ones(5, 4)  # r = 2, E = 2
    >>> expert_delta(A, B, 0.5, 1, 2, 2, transposed=False).shape
    torch.Size([1, 5, 3])
    """
    A3 = A.reshape(experts, -1, A.shape[-1])[lo:hi]
    B3 = B.reshape(B.shape[0], -1, experts)[:, :, lo:hi]
    equation = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return torch.einsum(equation, B3, A3) * scaling


def expert_delta_rows(
    A, B, scaling: float, start: int, stop: int, experts: int, part, *, transposed, cache=None
) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor holding part of an expert stack's delta.

    ``part`` (a :class:`~stream_tv.lora.model_facts.KeySlice`) says which: ``part.expert``'s
    matrix, narrowed along ``part.dim`` to ``[part.start, part.stop)`` when set (Mixtral's
    ``w1``/``w3`` are the two halves of ``gate_up_proj[e]``); ``None``: the tensor is the whole
    stack and its rows are the experts.
    """
    if part is None or part.expert is None:
        return expert_delta(A, B, scaling, start, stop, experts, transposed=transposed)
    full = cache.get("expert") if cache is not None else None
    if full is None:
        full = expert_delta(
            A, B, scaling, part.expert, part.expert + 1, experts, transposed=transposed
        )[0]
        if part.dim is not None:
            full = full.narrow(part.dim, part.start, part.stop - part.start)
        if cache is not None:
            cache["expert"] = full
    return full[start:stop]


def add_rounding_once(w: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = w + delta`` rounded once to ``out.dtype`` (PEFT's ``weight.data += delta``).

    >>> w = torch.tensor([1.0], dtype=torch.bfloat16)
    >>> add_rounding_once(w, torch.tensor([0.00390625 + 1e-6]), torch.empty_like(w)).item()
    1.0078125
    """
    if _in_blocks(w, delta, out):
        # The same sum, in float32 blocks that stay in cache (a 16-bit ``out += float32``
        # kernel of mixed dtypes costs ~1.8x here): ``float32(w) + delta``, rounded once.
        scratch = torch.empty(min(out.numel(), _BLOCK), dtype=delta.dtype)
        wf, df, of = w.reshape(-1), delta.reshape(-1), out.view(-1)
        for i in range(0, of.numel(), _BLOCK):
            acc = scratch[: min(_BLOCK, of.numel() - i)]
            acc.copy_(wf[i : i + _BLOCK]).add_(df[i : i + _BLOCK])
            of[i : i + _BLOCK].copy_(acc)
        return out
    out.copy_(w)
    out.add_(delta)
    return out


_BLOCK = 1 << 16


def _in_blocks(w: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> bool:
    """A 16-bit CPU ``out`` (contiguous, as ``delta``) from a wider ``delta``."""
    return (
        out.device.type == "cpu"
        and out.dtype.itemsize < delta.dtype.itemsize
        and w.shape == delta.shape == out.shape
        and out.is_contiguous()
        and delta.is_contiguous()
        and delta.device.type == "cpu"
    )


def add_rounding_twice(w: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = w + delta.to(w.dtype)``: PEFT's Embedding merge, the delta rounded first.

    >>> w = torch.tensor([1.0], dtype=torch.bfloat16)
    >>> add_rounding_twice(w, torch.tensor([0.00390625 + 1e-6]), torch.empty_like(w)).item()
    1.0
    """
    out.copy_(w)
    out.add_(delta.to(out.dtype))
    return out


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded ``sqrt`` of a float32 tensor (``torch.sqrt`` on CPU is not).

    >>> exact_sqrt(torch.tensor([4.0, 2.0])).tolist()
    [2.0, 1.4142135381698608]
    """
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    return torch.sqrt(x)


def dora_row_norm(v: torch.Tensor) -> torch.Tensor:
    """DoRA's weight norm when it runs along stored rows (Linear, Conv2d): per row.

    ``v`` is ``W + D`` in float32 for a chunk of rows. Linear uses
    ``torch.linalg.norm(v, dim=1)``, Conv2d ``v.norm(p=2, dim=(1, 2, 3))``; both are the same
    torch kernel per row, so a chunk of rows gives the bits of the full call.
    """
    if v.dim() == 2:
        return torch.linalg.norm(v, dim=1).to(v.dtype)
    return v.norm(p=2, dim=tuple(range(1, v.dim())))


class SquaresAccumulator:
    """Column sums of squares over stored rows, in the order torch's strided norm uses.

    DoRA on Embedding and Conv1D normalises over the stored rows. Feed row chunks in order
    with :meth:`update`; :meth:`norm` then equals PEFT's ``torch.linalg.norm(V.T, dim=1)`` in
    float32 bit for bit (sequential ``acc + x * x``). A float64 sum runs alongside for
    reference-quality deltas (:meth:`norm64`).

    >>> acc = SquaresAccumulator(2)
    >>> acc.update(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), 0, 2)
    >>> acc.norm().tolist(), acc.rows_seen
    ([5.0, 1.0], 2)
    """

    def __init__(
        self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        # ``dtype``: the weight's work dtype (float64 for float64 weights, summed the same way)
        self.acc32 = torch.zeros(columns, dtype=dtype, device=device)
        self.acc64 = torch.zeros(columns, dtype=torch.float64, device=device)
        self.rows_seen = 0

    def update(
        self, v: torch.Tensor, start: int, stop: int, v64: torch.Tensor | None = None
    ) -> None:
        """Add rows ``[start, stop)`` of ``V = W + D`` (float32; ``v64``: the same in float64)."""
        if start != self.rows_seen:
            raise RuntimeError(
                f"DoRA prepass rows must arrive in order: expected row {self.rows_seen}, "
                f"got [{start}, {stop})"
            )
        squares = v * v
        acc = self.acc32
        for i in range(squares.shape[0]):
            acc = acc + squares[i]
        self.acc32 = acc
        v64 = v.double() if v64 is None else v64
        self.acc64 += (v64 * v64).sum(0)
        self.rows_seen = stop

    def norm(self) -> torch.Tensor:
        return exact_sqrt(self.acc32)

    def norm64(self) -> torch.Tensor:
        return torch.sqrt(self.acc64)


def dora_merge_rows(
    w: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    *,
    along_rows: bool,
) -> torch.Tensor:
    """``(m / norm) * (w + delta)`` in float32 (not yet rounded to the weight dtype).

    ``along_rows``: the factor has one value per stored row (Linear, Conv2d; ``norm`` holds the
    chunk's rows); otherwise one per stored column (Embedding, Conv1D; ``norm`` is full).
    """
    factor = magnitude / norm
    if along_rows:
        factor = factor.view(-1, *([1] * (w.dim() - 1)))
    else:
        factor = factor.view(1, -1)
    return factor * (w + delta)
