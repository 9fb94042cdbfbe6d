"""The compare report as a picture: per-layer cosine and relative error by module kind."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from stream_tv.errors import InputError

from .figures import EXPLAINED_COSINE
from .fmt import fmt_cosine, fmt_figure
from .layers import layer_of, module_kinds
from .wording import WORDING

if TYPE_CHECKING:
    from .model import CompareReport

__all__ = ["plot"]

# subtle: cosines of a good adapter sit at 0.99999x, a bad one at 0.5; on a linear axis one
# of the two is invisible. Plot the distance 1 - cos on a log axis, floored here.
_FLOOR = 1e-16


def _series(report: CompareReport) -> dict[str, dict[int, tuple[float, float | None]]]:
    """Module label -> layer -> (cosine, relative error), over covered layer tensors."""
    series: dict[str, dict[int, tuple[float, float | None]]] = {}
    prefixes = {loc[0] for t in report.tensors if (loc := layer_of(t.name)) is not None}
    kinds = module_kinds(t.name for t in report.tensors)
    for t in report.covered():
        loc = layer_of(t.name)
        if loc is None or t.cosine is None:
            continue
        kind = kinds[t.name]
        label = f"{loc[0]} {kind}" if len(prefixes) > 1 else kind
        series.setdefault(label, {})[loc[1]] = (t.cosine, t.relative_error)
    return series


def plot(report: CompareReport, path: str | Path) -> None:
    """Per-layer cosine and relative error by module kind, as a PNG (or any format
    matplotlib infers from ``path``). Needs matplotlib (``pip install 'stream-tv[plot]'``).
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'stream-tv[plot]'") from None

    series = _series(report)
    # subtle: no pyplot. A bare Figure on an Agg canvas leaves the caller's backend and
    # pyplot state (a notebook, a GUI) untouched, and needs no display.
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_cos, ax_rel = fig.subplots(2, 1, sharex=True)
    cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
    for i, (label, points) in enumerate(sorted(series.items())):
        layers = sorted(points)
        style = {"color": cmap(i % cmap.N), "marker": "o", "markersize": 3, "lw": 1.2}
        ax_cos.plot(layers, [max(1 - points[k][0], _FLOOR) for k in layers], **style)
        rel = [points[k][1] for k in layers]
        ax_rel.plot(
            layers,
            [math.nan if r is None else max(r, _FLOOR) for r in rel],
            label=label,
            **style,
        )
    for ax in (ax_cos, ax_rel):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.grid(True, which="major", alpha=0.35)
    ax_cos.axhline(1 - EXPLAINED_COSINE, color="0.4", ls="--", lw=0.9)
    ax_cos.text(
        0.005,
        1 - EXPLAINED_COSINE,
        f" cos = {EXPLAINED_COSINE}",
        transform=ax_cos.get_yaxis_transform(),
        va="bottom",
        fontsize=8,
        color="0.3",
    )
    ax_cos.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _cos_tick(y)))
    ax_cos.invert_yaxis()  # better agreement is higher, as with a plain cosine axis
    ax_cos.set_ylabel("cosine(L, T)  [log scale of 1 - cos]")
    what = WORDING[report.mode].plot_l
    ax_cos.set_title(f"Cosine of {what} and task vector T (higher is better)", fontsize=10)
    ax_rel.set_ylabel("relative error ||L - T|| / ||T||")
    ax_rel.set_title("Relative error (lower is better)", fontsize=10)
    ax_rel.set_xlabel("layer")
    ax_rel.xaxis.get_major_locator().set_params(integer=True)
    if series:
        # "outside" placement makes constrained_layout leave room: nothing is clipped.
        fig.legend(title="module", fontsize=8, title_fontsize=8, loc="outside right upper")
    else:
        ax_cos.text(
            0.5,
            0.5,
            "no tensor with a LoRA delta and a task vector",
            transform=ax_cos.transAxes,
            ha="center",
        )
    s, cov = report.summary, report.coverage
    fig.suptitle(
        f"LoRA vs task vector: {s['tensors']} of {cov['changed']} changed tensors covered, "
        f"mean cos {fmt_cosine(s['mean_cosine'])}, min cos {fmt_cosine(s['min_cosine'])}, "
        f"mean rel. error {fmt_figure(s['mean_relative_error'])}",
        fontsize=11,
    )
    fig.savefig(path, dpi=120)


def _cos_tick(gap: float) -> str:
    """The cosine at distance ``gap`` from 1, as a tick label: 0.9999, or 1 - 1e-09."""
    if gap <= 0 or not math.isfinite(gap):
        return "1"
    if gap < 1e-6:
        return f"1 - {gap:.0e}"
    return f"{1 - gap:.{max(1, math.ceil(-math.log10(gap)))}f}"
