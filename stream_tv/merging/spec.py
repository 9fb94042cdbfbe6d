"""The merge methods as mergekit 0.1.5 registers them, and their checked parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

MAGNITUDE = "magnitude"  # keep the top-k |tau| (TIES)
RANDOM = "random"  # keep each element with probability density (DARE)
OUTLIERS = "magnitude_outliers"  # drop the top gamma, keep the next density (breadcrumbs)
DELLA = "della_magprune"  # keep with a probability rising with the magnitude rank in a row
SPARSIFIERS = (MAGNITUDE, RANDOM, OUTLIERS, DELLA)


@dataclass(frozen=True)
class Method:
    """One merge method as mergekit 0.1.5 registers it."""

    name: str
    consensus: bool  # TIES sign election by the weighted sum
    sparsification: str | None
    normalize: bool  # default of the ``normalize`` parameter
    rescale: bool  # default of the ``rescale`` parameter

    @property
    def random(self) -> bool:
        """Whether its masks are drawn (DARE, DELLA), so that it takes a seed."""
        return self.sparsification in (RANDOM, DELLA)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("task_arithmetic", False, None, False, False),
        Method("ties", True, MAGNITUDE, True, False),
        Method("dare_ties", True, RANDOM, False, True),
        Method("dare_linear", False, RANDOM, False, True),
        Method("breadcrumbs", False, OUTLIERS, False, False),
        Method("breadcrumbs_ties", True, OUTLIERS, False, False),
        Method("della", True, DELLA, True, True),
        Method("della_linear", False, DELLA, False, True),
    )
}

RESCALES = ("l1", "density")  # l1: mergekit 0.1.5; density: 1/density, as the DARE paper


@dataclass(frozen=True)
class MergeSpec:
    """Validated parameters of one merge (build it with :func:`merge_spec`)."""

    method: Method
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    lam: float
    normalize: bool
    rescale: str | None  # None, "l1" or "density"
    seed: int

    @property
    def inputs(self) -> int:
        return len(self.weights)

    def parameters(self) -> dict[str, object]:
        """The parameters the method takes, as an index records them (``verify`` re-plans
        from them): densities, gammas, epsilons per input where the method has them."""
        sp = self.method.sparsification
        out: dict[str, object] = {"lambda": self.lam, "normalize": self.normalize}
        if sp is not None:
            out["density"] = list(self.densities)
            out["rescale"] = self.rescale or "none"
        if sp == OUTLIERS:
            out["gamma"] = list(self.gammas)
        if sp == DELLA:
            out["epsilon"] = list(self.epsilons)
        if self.method.random:
            out["seed"] = self.seed
        return out


def merge_spec(
    method: str,
    inputs: int,
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: bool | str | None = None,
    seed: int | None = None,
) -> MergeSpec:
    """Check a method's parameters for ``inputs`` task vectors; fill in mergekit's defaults.

    ``weights``, ``density``, ``gamma``, ``epsilon``: one value for all inputs or one per
    input. Defaults as in mergekit 0.1.5: weight 1, density 1 (keep everything), gamma 0.01,
    epsilon 0.15; ``normalize`` and ``rescale`` per method (``rescale=True`` is ``"l1"``,
    ``"none"`` is ``False``); ``seed`` 0, and only for the methods that draw masks. A
    parameter the method does not take is refused, not ignored.

    >>> merge_spec("dare_ties", 2, density=0.3).rescale
    'l1'
    >>> merge_spec("ties", 2, weights=[1, 2, 3])
    Traceback (most recent call last):
    ...
    stream_tv.errors.InputError: ties: 3 weights for 2 inputs (give one weight per input, in input order, or none for 1.0 each)
    """
    m = METHODS.get(method)
    if m is None:
        raise InputError(
            f"unknown merge method {method!r}", hint=f"use one of {', '.join(METHODS)}"
        )
    if inputs < 1:
        raise InputError(f"{method}: no inputs to merge", hint="give at least one task vector")
    _only_for(m, "density", density, SPARSIFIERS)
    _only_for(m, "gamma", gamma, (OUTLIERS,))
    _only_for(m, "epsilon", epsilon, (DELLA,))
    _only_for(m, "seed", seed, (RANDOM, DELLA))
    rescale = _rescale(m, rescale)
    w = _per_input(method, inputs, "weight", weights, 1.0)
    d = _per_input(method, inputs, "density", density, 1.0)
    g = _per_input(method, inputs, "gamma", gamma, 0.01)
    e = _per_input(method, inputs, "epsilon", epsilon, 0.15)
    _check_ranges(m, d, g, e)
    if not math.isfinite(lam):
        raise InputError(f"{method}: lambda {lam} is not finite")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"{method}: seed {seed!r} is not an integer in [0, 2**64)")
    return MergeSpec(
        method=m,
        weights=w,
        densities=d,
        gammas=g,
        epsilons=e,
        lam=float(lam),
        normalize=m.normalize if normalize is None else bool(normalize),
        rescale=rescale,
        seed=seed,
    )


def _per_input(method: str, inputs: int, what: str, value, default: float) -> tuple[float, ...]:
    if value is None:
        return (default,) * inputs
    if isinstance(value, (int, float)):
        values = (float(value),) * inputs
    else:
        values = tuple(float(v) for v in value)
        if len(values) != inputs:
            plural = "densities" if what == "density" else f"{what}s"
            raise InputError(
                f"{method}: {len(values)} {plural} for {inputs} inputs",
                hint=f"give one {what} per input, in input order, or none for {default} each",
            )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise InputError(f"{method}: {what} {v} of input {i + 1} is not finite")
    return values


def _only_for(m: Method, what: str, value, kinds: tuple[str, ...]) -> None:
    """Refuse a parameter ``m`` does not take (mergekit silently ignores it)."""
    if value is not None and m.sparsification not in kinds:
        users = [n for n, x in METHODS.items() if x.sparsification in kinds]
        why = " (it draws no random mask)" if what == "seed" else ""
        raise InputError(
            f"{m.name} has no {what} parameter{why}",
            hint=f"{what} applies to {', '.join(users)}",
        )


def _rescale(m: Method, rescale: bool | str | None) -> str | None:
    if rescale is not None and rescale is not False and rescale != "none":
        if m.sparsification is None:
            raise InputError(
                f"{m.name} has no rescale parameter (it drops no element)",
                hint="rescale applies to methods that sparsify: ties, dare_*, breadcrumbs*, della*",
            )
    if rescale is None:
        rescale = m.rescale
    if rescale is True:
        return "l1"
    if rescale is False or rescale == "none":
        return None
    if rescale not in RESCALES:
        raise InputError(
            f"{m.name}: unknown rescale {rescale!r}",
            hint=f"use one of {', '.join(RESCALES)} (or none)",
        )
    return rescale


def _check_ranges(
    m: Method, d: tuple[float, ...], g: tuple[float, ...], e: tuple[float, ...]
) -> None:
    for i, x in enumerate(d):
        if not 0 < x <= 1:
            raise InputError(
                f"{m.name}: density {x} of input {i + 1} is outside (0, 1]",
                hint="density is the fraction of each task vector kept, e.g. 0.5",
            )
    if m.sparsification == OUTLIERS:
        for i, x in enumerate(g):
            if not 0 <= x < 1:
                raise InputError(
                    f"{m.name}: gamma {x} of input {i + 1} is outside [0, 1)",
                    hint="gamma is the fraction of largest magnitudes dropped, e.g. 0.01",
                )
    if m.sparsification == DELLA:
        for i, (x, dx) in enumerate(zip(e, d, strict=True)):
            if dx < 1 and not (x >= 0 and dx - x > 0 and dx + x < 1):
                raise InputError(
                    f"{m.name}: epsilon {x} with density {dx} (input {i + 1}) leaves "
                    f"density +/- epsilon outside (0, 1)",
                    hint=f"choose 0 <= epsilon < {min(dx, 1 - dx):g}",
                )
