"""Low-rank factorisation of a task-vector tensor, streamed in row chunks, and its PEFT tensors.

A LoRA adapter is a low-rank factorisation of a task vector, so a full fine-tune's task vector
``T = finetuned - base`` can be compressed into one. :class:`StreamedSVD` computes the leading
singular triplets of one tensor ``T`` (``m x n``, ``m`` = stored rows) by the randomized SVD
of Halko, Martinsson and Tropp (2011), fed row chunks ``T[start:stop]`` pass after pass;
never more than one chunk of ``T`` exists, and what it keeps is ``O((m + n) k)``, with
``k = rank + oversample`` columns per sketch block:

==========  ===================================================  ==============================
pass        per chunk ``T_c = T[start:stop]``                    after the pass's last chunk
==========  ===================================================  ==============================
0           ``Y_c = T_c Omega``; ``||T||_F^2 += ||T_c||^2``       ``Q_0 = qr(Y)``
1, 3, ...   ``Z += T_c^T Q_i``                                    ``Z = qr(Z)``
2, 4, ...   ``Y_c = T_c Z``                                       ``Q_i = qr(Y)``
2q + 1      ``B^T += T_c^T K_c``, ``K = qr([Q_0 .. Q_q])``        ``B = X S W^T``: ``U = K X``
==========  ===================================================  ==============================

so ``2 + 2q`` passes for ``q`` power iterations. The last pass projects on the span of every
block (block Krylov, HMT section 4.5; Musco and Musco 2015) rather than on ``Q_q`` alone
(HMT's subspace iteration, ``krylov=False``): the same passes, and on the flat spectra of
few-step fine-tunes 4-10x less energy lost (measured: :func:`default_oversample`,
tests/test_lowrank.py).
``Omega`` is a seeded Gaussian ``n x k`` drawn on the CPU: it multiplies ``T`` from the
right, so neither the chunking nor the device changes it, and the result depends on the
chunking only through float rounding. Chunk products run in float32 on the chunk's device
(CPU or CUDA, same code); the accumulators over chunks, the norm, the thin QRs
(:func:`orthonormalize_`) and the small SVD run in float64.

The retained energy at every rank ``r`` comes without another pass. With ``K`` orthonormal
and ``B = K^T T = X S W^T``, the rank-``r`` result is
``L_r = U_r S_r V_r^T = K X_r X_r^T K^T T = P_r T`` for the orthogonal projector
``P_r = (K X_r)(K X_r)^T``. Hence ``||T - L_r||^2 = ||T||^2 - ||P_r T||^2`` (Pythagoras:
``P_r T`` and ``(I - P_r) T`` are orthogonal) and ``||P_r T||^2 = ||X_r^T B||^2 =
||S_r W_r^T||^2 = s_1^2 + ... + s_r^2``, so

    retained_energy(r) = 1 - ||T - L_r||^2 / ||T||^2 = (s_1^2 + ... + s_r^2) / ||T||_F^2

exactly for the factors returned (not an estimate of the optimal one), with ``||T||_F^2``
from pass 0. Since ``L_r`` has rank ``r``, this never exceeds the optimal truncated SVD's
energy (Eckart-Young): the randomized figure is a lower bound of it.

>>> g = torch.Generator().manual_seed(0)
>>> T = torch.randn(60, 3, generator=g) @ torch.randn(3, 50, generator=g)   # rank 3
>>> svd = StreamedSVD(60, 50, rank=4, oversample=8, power_iters=1, seed=1)
>>> for p in range(svd.passes):
...     for start in range(0, 60, 16):                # row chunks, pass after pass
...         svd.update(T[start : start + 16], start, min(start + 16, 60), p)
>>> res = svd.result()
>>> svd.passes, res.rank, res.basis, round(res.retained_energy(3), 6)
(4, 4, 24, 1.0)
>>> res.rank_for_energy(0.999), res.relative_error(3) < 1e-3
(3, True)
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from stream_tv.errors import InputError, NonFiniteError
from stream_tv.ops import blocks, round_to

__all__ = [
    "ENERGY_LEVELS",
    "LAYER_KINDS",
    "LowRankResult",
    "StreamedSVD",
    "default_oversample",
    "lora_rank_config",
    "orthonormalize_",
    "peft_lora_tensors",
    "tensor_seed",
]

#: The energy fractions whose ranks every result reports.
ENERGY_LEVELS = (0.5, 0.9, 0.99)
#: Layer kinds :func:`peft_lora_tensors` knows, by how PEFT stores their factors.
LAYER_KINDS = ("linear", "conv1d", "embedding", "conv2d")
_SPLITS = ("sqrt", "A", "B")


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from a run's seed and the tensor's name, stable across runs.

    Different tensors with the same number of columns then get different ``Omega``.

    >>> tensor_seed(0, "model.layers.0.self_attn.q_proj.weight") == tensor_seed(
    ...     0, "model.layers.0.self_attn.q_proj.weight")
    True
    >>> tensor_seed(0, "a") != tensor_seed(1, "a")
    True
    """
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def default_oversample(rank: int) -> int:
    """Extra sketch columns beyond ``rank``: ``max(64, 2 * rank)``.

    # subtle: the textbook 5-10 is far too few for task vectors. AdamW steps give a flat
    # spectrum (Adam's first updates are sign-like), where the captured energy converges
    # slowly, and the fewer columns, the slower. Measured with 2 power iterations, block
    # Krylov, on tiny Llamas after 20 AdamW steps (hidden 256 and 512), worst tensor, worst
    # rank 1..r: max(8, 2r) extra columns left the retained energy up to 3e-2 (relative)
    # below the exact truncated SVD's at ranks 1-4 and 2e-3 at rank 16; a floor of 64 gives
    # at most 1.3e-4 at ranks 1-16, 3e-6 at 32 (tests/test_extract_lora.py). Cost: linear.

    >>> default_oversample(2), default_oversample(64)
    (64, 128)
    """
    return max(64, 2 * rank)


def orthonormalize_(a: torch.Tensor, *, block_elements: int = 2**21) -> torch.Tensor:
    """Replace the columns of ``a`` (``m x c``, ``c <= m``) by an orthonormal basis of their
    span, in place, by a tall-skinny QR (TSQR) in float64; return ``a``.

    Row blocks of about ``block_elements`` are factored ``a_j = Q_j R_j`` one at a time, then
    the stacked ``R_j`` once, ``[R_j] = Q' R``, and ``a_j <- Q_j Q'_j``: Householder's
    stability (the result is orthonormal to rounding even when ``a`` is rank deficient: a
    task vector of rank below the sketch, an all-zero tensor, converged Krylov blocks) with a
    float64 transient of one block, not of the whole matrix. Deterministic for a given shape.

    # subtle: not Cholesky-QR of the Gram matrix, which squares the condition number; power
    # iterates and Krylov bases are as ill-conditioned as a basis can be.

    >>> a = torch.tensor([[3.0, 6.0], [4.0, 8.0], [0.0, 1.0]])   # columns nearly parallel
    >>> q = orthonormalize_(a.clone(), block_elements=4)         # one row block of 2, one of 1
    >>> torch.allclose(q.T @ q, torch.eye(2), atol=1e-6), torch.allclose(q[:, 0].abs(), a[:, 0] / 5)
    (True, True)
    """
    m, c = a.shape
    if c > m:
        raise ValueError(f"cannot orthonormalise {c} columns in {m} dimensions")
    if c == 0:
        return a
    step = max(c, block_elements // c)
    bounds = [(s, min(s + step, m)) for s in range(0, m, step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < c:  # every R_j must be c x c
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    if len(bounds) == 1:
        a.copy_(torch.linalg.qr(a.to(torch.float64), mode="reduced").Q)
        return a
    rs = []
    for lo, hi in bounds:
        q, r = torch.linalg.qr(a[lo:hi].to(torch.float64), mode="reduced")
        a[lo:hi].copy_(q)
        rs.append(r)
    q2 = torch.linalg.qr(torch.cat(rs), mode="reduced").Q
    for j, (lo, hi) in enumerate(bounds):
        a[lo:hi].copy_(a[lo:hi].to(torch.float64) @ q2[j * c : (j + 1) * c])
    return a


class StreamedSVD:
    """The randomized SVD of one ``rows x cols`` tensor, fed row chunks pass after pass.

    ``rank``: the largest rank the result will be asked for (capped at ``min(rows, cols)``).
    Each sketch block has ``k = rank + oversample`` columns (default
    :func:`default_oversample`); ``power_iters`` is ``q``; the tensor is streamed
    ``passes = 2 + 2q`` times. ``krylov`` (default) keeps every block ``Q_0 .. Q_q`` and
    projects on their joint span, ``(q + 1) k`` columns, in the last pass (block Krylov,
    Halko et al. section 4.5, Musco & Musco 2015); otherwise on ``Q_q`` alone (subspace
    iteration, their algorithm 4.4). Same passes; Krylov costs ``(q + 1) x`` the memory of
    the ``m``-side basis and of the last pass's product, and on few-step fine-tunes loses
    10x less energy. Where the basis would span every row or column anyway the result is
    exact, and ``power_iters`` (so ``passes``) is lowered to what that needs.

    Call :meth:`update` with every chunk of pass 0 in row order, then of pass 1, and so on
    (the between-pass work runs when a pass's last row arrives), then :meth:`result`. A
    chunk with more than two dimensions (Conv2d ``(out, in, kh, kw)``) is flattened to
    ``(rows, cols)``. ``device``: where the state lives (``None``: the first chunk's);
    ``dtype``: of the chunk products (float32; float64 for float64 models). ``name`` is
    used in errors. Memory: ``(m + n) (q + 2) k`` values, float64 on the ``n`` side.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        rank: int,
        oversample: int | None = None,
        power_iters: int = 2,
        krylov: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "tensor",
    ):
        if rows < 1 or cols < 1:
            raise InputError(
                f"cannot factorise a {rows} x {cols} tensor", where=name, hint="skip empty tensors"
            )
        if rank < 1:
            raise InputError(f"rank must be at least 1, got {rank}", where=name)
        oversample = default_oversample(rank) if oversample is None else oversample
        if oversample < 0 or power_iters < 0:
            raise InputError(
                f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}",
                where=name,
            )
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"product dtype must be float32 or float64, got {dtype}", where=name)
        self.rows, self.cols, self.name = rows, cols, name
        self.rank = min(rank, rows, cols)
        self.oversample = oversample
        full = min(rows, cols)
        self.block = min(rank + oversample, full)
        if self.block == full:  # Q_0 spans every row or column: exact, no iteration needed
            power_iters = 0
        elif krylov:  # blocks beyond a basis of `full` columns add nothing
            power_iters = min(power_iters, -(-full // self.block) - 1)
        self.power_iters = power_iters
        self.krylov = krylov
        self.basis = min((power_iters + 1) * self.block, full) if krylov else self.block
        self.seed = seed
        self.dtype = dtype
        self.passes = 2 + 2 * power_iters
        self.device = torch.device(device) if device is not None else None
        self._pass = 0  # the pass being fed
        self._next_row = 0  # the first row the next chunk must start at
        self._q: torch.Tensor | None = None  # m x k: Y_i while a range pass runs, then Q_i
        self._k: torch.Tensor | None = None  # m x basis: the Krylov basis (krylov only)
        self._filled = 0  # columns of the Krylov basis filled so far
        self._z: torch.Tensor | None = None  # n x k: Omega, then the orthonormalised Z
        self._acc: torch.Tensor | None = None  # float64: Z = T^T Q_i, last pass B^T = T^T K
        self._norm2: torch.Tensor | None = None  # ||T||_F^2 so far, float64 on the device
        self._result: LowRankResult | None = None

    # -- feeding ---------------------------------------------------------------------------

    def update(self, chunk: torch.Tensor, start: int, stop: int, pass_index: int) -> None:
        """Feed rows ``[start, stop)`` of ``T`` for pass ``pass_index`` (``0 .. passes-1``)."""
        if self._result is not None or pass_index != self._pass or start != self._next_row:
            raise RuntimeError(
                f"{self.name}: expected rows from {self._next_row} of pass {self._pass} "
                f"(of {self.passes}), got rows [{start}, {stop}) of pass {pass_index}"
            )
        if not start < stop <= self.rows or chunk.shape[0] != stop - start:
            raise RuntimeError(
                f"{self.name}: a chunk of shape {tuple(chunk.shape)} does not hold rows "
                f"[{start}, {stop}) of a tensor with {self.rows} rows"
            )
        x = chunk.reshape(stop - start, -1)
        if x.shape[1] != self.cols:
            raise RuntimeError(
                f"{self.name}: a chunk has {x.shape[1]} columns, the tensor {self.cols}"
            )
        if self._norm2 is None:
            self._allocate(chunk.device)
        x = x.to(device=self.device, dtype=self.dtype)
        p = self._pass
        if p % 2 == 0:  # a range pass: rows of Y = T Omega, or of Y = T Z
            torch.matmul(x, self._z, out=self._q[start:stop])
            if p == 0:
                for (b,) in blocks(x):
                    self._norm2 += b.to(torch.float64).square().sum()
        else:  # a transpose pass: Z = T^T Q_i, or in the last pass B^T = T^T K
            basis = self._basis() if p == self.passes - 1 else self._q
            self._acc += (x.T @ basis[start:stop]).to(torch.float64)
        self._next_row = stop
        if stop == self.rows:
            self._end_pass()

    def _basis(self) -> torch.Tensor:
        return self._k if self._k is not None else self._q

    def _allocate(self, chunk_device: torch.device) -> None:
        if self.device is None:
            self.device = chunk_device
        # Drawn on the CPU in a fixed order: the same Omega on every device and chunking.
        g = torch.Generator().manual_seed(self.seed)
        omega = torch.randn(self.cols, self.block, generator=g, dtype=torch.float64)
        self._z = omega.to(device=self.device, dtype=self.dtype)
        self._q = torch.empty(self.rows, self.block, dtype=self.dtype, device=self.device)
        if self.krylov and self.power_iters > 0:
            self._k = torch.empty(self.rows, self.basis, dtype=self.dtype, device=self.device)
        self._acc = torch.zeros(self.cols, self.block, dtype=torch.float64, device=self.device)
        self._norm2 = torch.zeros((), dtype=torch.float64, device=self.device)

    def _end_pass(self) -> None:
        p, last = self._pass, self.passes - 1
        if p == 0 and not bool(torch.isfinite(self._norm2)):
            raise NonFiniteError(
                "NaN/Inf in the task vector",
                where=self.name,
                hint="check both checkpoints for NaN/Inf (stream-tv inspect)",
            )
        if p % 2 == 0:  # Y_i complete: Q_i = qr(Y_i), in place
            orthonormalize_(self._q)
            if self._k is not None:
                take = min(self.block, self.basis - self._filled)
                self._k[:, self._filled : self._filled + take] = self._q[:, :take]
                self._filled += take
            if p == last - 1:  # the basis is complete: project on it in the last pass
                if self._k is not None:
                    orthonormalize_(self._k)
                    self._q = None
                self._acc = torch.zeros(
                    self.cols, self.basis, dtype=torch.float64, device=self.device
                )
        elif p < last:  # Z = T^T Q_i complete: orthonormalise it for the next range pass
            self._z.copy_(orthonormalize_(self._acc))
            self._acc.zero_()
        else:
            self._finish()
        self._pass += 1
        self._next_row = 0

    def _finish(self) -> None:
        # B = K^T T is basis x n; its transpose (accumulated) is factorised instead:
        # B^T = W S X^T  =>  B = X S W^T, so U = K X and V = W.
        w, s, xh = torch.linalg.svd(self._acc, full_matrices=False)
        r = self.rank
        u = self._basis() @ xh[:r].T.to(self.dtype)
        self._result = LowRankResult(
            rows=self.rows,
            cols=self.cols,
            rank=r,
            basis=self.basis,
            power_iters=self.power_iters,
            krylov=self.krylov,
            seed=self.seed,
            total_energy=float(self._norm2),
            singular_values=s.cpu(),
            U=u,
            V=w[:, :r].to(self.dtype),
        )
        self._q = self._k = self._z = self._acc = None

    # -- result ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> LowRankResult:
        """The factorisation, once every pass has been fed."""
        if self._result is None:
            raise RuntimeError(
                f"{self.name}: pass {self._pass} of {self.passes} is incomplete "
                f"(next row {self._next_row} of {self.rows})"
            )
        return self._result


@dataclass(frozen=True, eq=False)
class LowRankResult:
    """``T ~ U diag(S) V^T`` for one tensor, and how much of ``T`` each rank keeps.

    ``U`` is ``(rows, rank)``, ``V`` ``(cols, rank)`` (orthonormal columns, on the compute
    device, in the product dtype); ``singular_values`` has ``basis`` values, descending
    (float64, CPU): those of ``T`` projected on the sketched basis. Energies are defined for
    every rank up to ``basis``, exactly for these factors (see the module docstring) up to
    float32 rounding of the chunk products, ~1e-6 of ``||T||^2``: a relative error below
    ~1e-3 is at rounding level. Factors and rank selection go up to ``rank``. An all-zero
    ``T`` keeps all of its (no) energy at rank 0.
    """

    rows: int
    cols: int
    rank: int
    basis: int
    power_iters: int
    krylov: bool
    seed: int
    total_energy: float  # ||T||_F^2
    singular_values: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor

    def _check_rank(self, r: int, limit: int) -> None:
        if not 0 <= r <= limit:
            raise InputError(
                f"rank {r} is outside 0..{limit} for a {self.rows} x {self.cols} tensor "
                f"extracted up to rank {self.rank}",
                hint="extract with a larger --rank / --max-rank",
            )

    @property
    def energies(self) -> list[float]:
        """``retained_energy(r)`` for ``r = 0 .. basis``."""
        n = self.singular_values.shape[0]
        if self.total_energy <= 0.0:
            return [1.0] * (n + 1)
        cum = torch.cumsum(self.singular_values.square(), 0) / self.total_energy
        return [0.0] + cum.clamp(0.0, 1.0).tolist()

    def retained_energy(self, r: int) -> float:
        """``1 - ||T - L_r||_F^2 / ||T||_F^2`` for ``L_r = U_r S_r V_r^T``."""
        self._check_rank(r, self.basis)
        return self.energies[r]

    def relative_error(self, r: int) -> float:
        """``||T - L_r||_F / ||T||_F`` (0 for an all-zero ``T``)."""
        return math.sqrt(max(0.0, 1.0 - self.retained_energy(r)))

    def rank_for_energy(self, energy: float, *, limit: int | None = None) -> int | None:
        """The smallest rank ``r <= limit`` (default ``rank``) keeping ``energy`` of ``||T||^2``,
        or ``None`` when even ``limit`` keeps less (the tensor needs a larger sketch)."""
        if not 0.0 < energy <= 1.0:
            raise InputError(f"energy must be in (0, 1], got {energy}")
        limit = self.rank if limit is None else limit
        self._check_rank(limit, self.basis)
        for r, e in enumerate(self.energies[: limit + 1]):
            if e >= energy:
                return r
        return None

    def select_rank(
        self, *, rank: int | None = None, energy: float | None = None, max_rank: int | None = None
    ) -> int:
        """The rank to keep: ``rank`` as given (capped at ``min(rows, cols)``), or the smallest
        keeping a fraction ``energy``, capped by ``max_rank`` (default: the extracted ``rank``).

        An ``energy`` that the cap cannot reach gives the cap: see :meth:`retained_energy` for
        what it keeps. An all-zero tensor gets rank 0 by energy.
        """
        if (rank is None) == (energy is None):
            raise InputError("give exactly one of rank and energy", hint="--rank R or --energy E")
        if rank is not None:
            if max_rank is not None:
                raise InputError("max_rank caps an energy selection; with rank it is not used")
            if rank < 1:
                raise InputError(f"rank must be at least 1, got {rank}")
            r = min(rank, self.rows, self.cols)
            self._check_rank(r, self.rank)
            return r
        if max_rank is not None and max_rank < 1:
            raise InputError(f"max_rank must be at least 1, got {max_rank}")
        cap = self.rank if max_rank is None else min(max_rank, self.rows, self.cols)
        self._check_rank(cap, self.rank)
        found = self.rank_for_energy(energy, limit=cap)
        return cap if found is None else found

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_r, S_r, V_r)``: ``(rows, r)``, ``(r,)`` float64 on ``U``'s device, ``(cols, r)``."""
        self._check_rank(r, self.rank)
        s = self.singular_values[:r].to(self.U.device)
        return self.U[:, :r], s, self.V[:, :r]

    def summary(self, r: int, *, leading: int = 8) -> dict[str, Any]:
        """The report's figures at rank ``r``, JSON-ready.

        >>> res = LowRankResult(2, 2, 2, 2, 2, True, 0, 25.0,
        ...                     torch.tensor([4.0, 3.0], dtype=torch.float64), torch.eye(2), torch.eye(2))
        >>> s = res.summary(1)
        >>> s["retained_energy"], s["relative_error"], s["rank_for_energy"]
        (0.64, 0.6, {'0.5': 1, '0.9': 2, '0.99': 2})
        """
        self._check_rank(r, self.rank)
        return {
            "shape": [self.rows, self.cols],
            "rank": r,
            "retained_energy": self.retained_energy(r),
            "relative_error": self.relative_error(r),
            "norm": math.sqrt(max(self.total_energy, 0.0)),
            "singular_values": self.singular_values[:leading].tolist(),
            "rank_for_energy": {str(e): self.rank_for_energy(e) for e in ENERGY_LEVELS},
            "basis": self.basis,
            "power_iters": self.power_iters,
        }


def peft_lora_tensors(
    kind: str,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    *,
    weight_shape: tuple[int, ...] | torch.Size,
    split: str = "sqrt",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """PEFT's LoRA tensors, by key suffix, whose delta with scaling 1 is ``L = U diag(S) V^T``.

    ``U (rows, r)``, ``S (r,)``, ``V (cols, r)`` factor the weight *as stored*
    (``weight_shape``; rows = dim 0, cols = the rest flattened). PEFT's delta per kind
    (``stream_tv/lora/delta.py``) decides which side is which:

    =========  ==================  ======================  ===================================
    kind       stored weight       PEFT delta              factors
    =========  ==================  ======================  ===================================
    linear     ``(out, in)``       ``B @ A``               ``A = S^a V^T``, ``B = U S^b``
    conv1d     ``(in, out)``       ``(B @ A).T`` (fifo)    ``A = S^a U^T``, ``B = V S^b``
    embedding  ``(vocab, dim)``    ``(B @ A).T``           ``A = S^a U^T``, ``B = V S^b``
    conv2d     ``(out, in, h, w)`` ``B @ A``, flattened    as linear, ``A (r, in, h, w)``,
                                                           ``B (out, r, 1, 1)``
    =========  ==================  ======================  ===================================

    (fifo: ``fan_in_fan_out``; for a kxk Conv2d PEFT's ``conv2d(A^T, B)^T`` is the same
    product.) Keys are ``lora_A.weight`` / ``lora_B.weight``, or ``lora_embedding_A`` /
    ``lora_embedding_B`` for an Embedding. The config must give these modules
    ``lora_alpha = r`` (scaling 1, no rsLoRA): :func:`lora_rank_config`.

    ``split``: how ``S`` is shared, ``S^a S^b = S``. ``"sqrt"`` (default, mergekit's default
    ``--distribute-scale`` too) gives each factor ``sqrt(S)``: both then have entries of the
    same magnitude, ``sqrt(s_i / n)``-ish, instead of one near ``1/sqrt(n)`` and the other near
    ``s_i/sqrt(m)``. Relative rounding in bf16/fp16 does not depend on magnitude, but fp16's
    range does: a task vector's ``s_i`` is often ~1e-2 to 1e-4, and ``U S`` entries of a 4096-row
    tensor then fall under fp16's normal range (6.1e-5) and lose bits as subnormals, while the
    balanced factors stay normal. Balanced factors are also what LoRA training produces, so
    the adapter fine-tunes further at sensible gradient scales. ``"A"`` / ``"B"`` put all of
    ``S`` into that factor (mergekit's ``--no-distribute-scale`` is ``"A"``).

    The products are formed in float64 and correctly rounded to ``dtype`` once.

    >>> U, S, V = torch.eye(3)[:, :2], torch.tensor([4.0, 1.0]), torch.eye(2)
    >>> t = peft_lora_tensors("linear", U, S, V, weight_shape=(3, 2))
    >>> sorted(t), t["lora_A.weight"].shape, t["lora_B.weight"].shape
    (['lora_A.weight', 'lora_B.weight'], torch.Size([2, 2]), torch.Size([3, 2]))
    >>> (t["lora_B.weight"] @ t["lora_A.weight"]).tolist()
    [[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    >>> sorted(peft_lora_tensors("embedding", U, S, V, weight_shape=(3, 2)))
    ['lora_embedding_A', 'lora_embedding_B']
    """
    shape = _check_factors(kind, split, tuple(weight_shape), U, S, V)
    rows, r = shape[0], S.shape[0]
    sa, sb = _split_scale(S.to(device=U.device, dtype=torch.float64), split)
    u, v = U.to(torch.float64), V.to(torch.float64)

    def out(x: torch.Tensor) -> torch.Tensor:
        return round_to(x, dtype).contiguous()

    if kind in ("linear", "conv2d"):
        a = sa[:, None] * v.T  # (r, in...)
        b = u * sb  # (out, r)
        if kind == "conv2d":
            a = a.reshape(r, *shape[1:])
            b = b.reshape(rows, r, 1, 1)
        return {"lora_A.weight": out(a), "lora_B.weight": out(b)}
    a = sa[:, None] * u.T  # (r, in) / (r, vocab): stored rows are PEFT's input side
    b = v * sb  # (out, r) / (dim, r)
    if kind == "embedding":
        return {"lora_embedding_A": out(a), "lora_embedding_B": out(b)}
    return {"lora_A.weight": out(a), "lora_B.weight": out(b)}


def _check_factors(kind: str, split: str, shape: tuple[int, ...], U, S, V) -> tuple[int, ...]:
    """``shape``, once ``kind``, ``split`` and the factors' shapes are checked for it."""
    if kind not in LAYER_KINDS:
        raise InputError(f"unknown layer kind {kind!r}", hint=f"one of {', '.join(LAYER_KINDS)}")
    if split not in _SPLITS:
        raise InputError(f"unknown split {split!r}", hint=f"one of {', '.join(_SPLITS)}")
    rows, cols, r = shape[0], math.prod(shape[1:]), S.shape[0]
    if kind == "conv2d" and len(shape) != 4 or kind != "conv2d" and len(shape) != 2:
        raise InputError(f"a {kind} weight cannot have shape {shape}")
    if U.shape != (rows, r) or V.shape != (cols, r):
        raise InputError(
            f"factors U {tuple(U.shape)}, S ({r},), V {tuple(V.shape)} do not factor a weight "
            f"of shape {shape} ({rows} x {cols})"
        )
    return shape


def _split_scale(s: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^a, S^b)`` with ``S^a S^b = S`` for ``split`` (see :func:`peft_lora_tensors`)."""
    if split == "sqrt":
        return s.sqrt(), s.sqrt()
    if split == "A":
        return s, torch.ones_like(s)
    return torch.ones_like(s), s


def lora_rank_config(ranks: Mapping[str, int]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` for per-module ranks, scaling 1.

    ``ranks`` maps PEFT module names (``model.layers.0.self_attn.q_proj``) to ranks. The most
    common rank (the largest among ties) becomes ``r``; every other module gets a pattern.
    ``# subtle:`` PEFT matches a pattern key ``K`` as the regex ``(.*\\.)?(K)$``, so the
    names are escaped: an unescaped ``.`` matches any character.

    >>> cfg = lora_rank_config({"a.q_proj": 8, "a.v_proj": 8, "b.q_proj": 3})
    >>> cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]
    (8, 8, {'b\\\\.q_proj': 3}, {'b\\\\.q_proj': 3})
    """
    if not ranks:
        raise InputError("no module ranks given")
    bad = {k: v for k, v in ranks.items() if v < 1}
    if bad:
        raise InputError(f"ranks must be >= 1 (a rank-0 module is left out): {bad}")
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
    }
