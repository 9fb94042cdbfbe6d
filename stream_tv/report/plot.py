"""The compare report as a picture: per layer and module kind, how far L is from T (cosine
distance, relative error against the rounding floor), and what changed outside L."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_tv.errors import InputError
from stream_tv.stats import CHANGED_NOT_LORA, ROUNDING_ONLY

from .figures import DEPARTS, EXPLAINED_COSINE, UNDECIDED, verdict
from .fmt import dtype_label
from .headline import headline
from .layers import layer_of, module_kinds
from .wording import WORDING, Wording

if TYPE_CHECKING:
    from .model import CompareReport

__all__ = ["plot"]

# subtle: cosines of a good adapter sit at 0.99999x, a bad one at 0.5; on a linear axis one
# of the two is invisible. Plot the distance 1 - cos on a log axis, floored here (identical
# L and T give 0, which a log axis cannot show).
_FLOOR = 1e-16
_MARK = {DEPARTS: ("tab:red", "departs"), UNDECIDED: ("tab:orange", "undecided")}

#: One point of a series: (cosine, relative error, rounding floor, verdict).
_Point = tuple[float, "float | None", "float | None", "str | None"]


def _series(report: CompareReport) -> dict[str, dict[int, _Point]]:
    """Module label -> layer -> point, over the covered layer tensors with a cosine."""
    series: dict[str, dict[int, _Point]] = {}
    prefixes = {loc[0] for t in report.tensors if (loc := layer_of(t.name)) is not None}
    kinds = module_kinds(t.name for t in report.tensors)
    for t in report.covered():
        loc = layer_of(t.name)
        if loc is None or t.cosine is None:
            continue
        label = f"{loc[0]} {kinds[t.name]}" if len(prefixes) > 1 else kinds[t.name]
        series.setdefault(label, {})[loc[1]] = (
            t.cosine,
            t.relative_error,
            t.rounding_floor,
            verdict(t),
        )
    return series


def _outside_by_layer(report: CompareReport) -> dict[str, dict[int, int]]:
    """Category -> layer -> tensors without L that changed (really, or only by rounding)."""
    out: dict[str, dict[int, int]] = {CHANGED_NOT_LORA: {}, ROUNDING_ONLY: {}}
    for t in report.tensors:
        loc = layer_of(t.name)
        if loc is not None and t.category in out:
            out[t.category][loc[1]] = out[t.category].get(loc[1], 0) + 1
    return out


def plot(report: CompareReport, path: str | Path) -> None:
    """Per-layer cosine distance and relative error of L and T by module kind, and the
    tensors changed outside L, as a PNG (or any format matplotlib infers from ``path``).
    Without L (mode ``none``), only what changed. Needs matplotlib
    (``pip install 'stream-tv[plot]'``).
    """
    try:
        import matplotlib  # noqa: F401  (first: a stub left in sys.modules fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'stream-tv[plot]'") from None

    words = WORDING[report.mode]
    # subtle: no pyplot. A bare Figure on an Agg canvas leaves the caller's backend and
    # pyplot state (a notebook, a GUI) untouched, and needs no display.
    with_l = report.mode != "none"
    fig = Figure(figsize=(11, 9.5 if with_l else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if with_l:
        ratios = {"height_ratios": [3, 3, 1.3]}
        ax_cos, ax_rel, ax_out = fig.subplots(3, 1, sharex=True, gridspec_kw=ratios)
        _draw_l_panels(fig, ax_cos, ax_rel, report)
    else:
        ax_out = fig.subplots(1, 1)
    _draw_outside(ax_out, _outside_by_layer(report), words.outside_panel)
    ax_out.set_xlabel("layer")
    ax_out.xaxis.get_major_locator().set_params(integer=True)
    title = "\n".join(textwrap.wrap(headline(report), 130)[:3])
    fig.suptitle(f"{words.plot_title}\n{title}", fontsize=10)
    fig.savefig(path, dpi=120)


def _draw_l_panels(fig: Any, ax_cos: Any, ax_rel: Any, report: CompareReport) -> None:
    """The cosine distance and relative error panels, one line per module kind."""
    import matplotlib

    words = WORDING[report.mode]
    series = _series(report)
    cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
    ordered = sorted(series.items())
    colors = [cmap(i % cmap.N) for i in range(len(ordered))]
    handles = [
        _draw_series(ax_cos, ax_rel, label, points, color)
        for (label, points), color in zip(ordered, colors, strict=True)
    ]
    for (_, points), color in zip(ordered, colors, strict=True):
        _draw_extras(ax_cos, ax_rel, points, color)
    _style_log_axes(ax_cos, ax_rel)
    if series:
        for ax in (ax_cos, ax_rel):
            _widen(ax)
    marked = {p[3] for points in series.values() for p in points.values()} & set(_MARK)
    floors = any(p[2] is not None for points in series.values() for p in points.values())
    _label_panels(
        ax_cos,
        ax_rel,
        words,
        dtype_label(report.inputs.get("finetuned_dtype")),
        marked,
        judged=_judged(report),
        floors=floors,
    )
    if series:
        # "outside" placement makes constrained_layout leave room: nothing is clipped.
        fig.legend(
            handles=handles,
            title="module",
            fontsize=8,
            title_fontsize=8,
            loc="outside right center",
        )
    else:
        what = f"no tensor with {words.l_name} and a nonzero {words.t_name}"
        ax_cos.text(0.5, 0.5, what, transform=ax_cos.transAxes, ha="center")


def _judged(report: CompareReport) -> bool:
    return any(verdict(t) is not None for t in report.tensors)


def _draw_series(
    ax_cos: Any, ax_rel: Any, label: str, points: dict[int, _Point], color: Any
) -> Any:
    """One module's line in both panels; returns the line for the legend."""
    layers = sorted(points)
    style = {"color": color, "marker": "o", "markersize": 3, "lw": 1.2}
    ax_cos.plot(layers, [max(1 - points[k][0], _FLOOR) for k in layers], **style)
    rel = [math.nan if points[k][1] is None else max(points[k][1], _FLOOR) for k in layers]
    (line,) = ax_rel.plot(layers, rel, label=label, **style)
    return line


def _draw_extras(ax_cos: Any, ax_rel: Any, points: dict[int, _Point], color: Any) -> None:
    """A module's rounding floor, as a wide pale band under its relative error, and its
    tensors that depart (or are undecided) marked with an x. Drawn after every line, so
    that each axis lists the series lines first."""
    layers = sorted(points)
    floors = [points[k][2] for k in layers]
    if any(f is not None for f in floors):
        band = [math.nan if f is None else max(f, _FLOOR) for f in floors]
        ax_rel.plot(layers, band, color=color, lw=6, alpha=0.25, solid_capstyle="round", zorder=1)
    for k in layers:
        mark = _MARK.get(points[k][3] or "")
        if mark is None:
            continue
        cos, rel = points[k][0], points[k][1]
        for ax, y in ((ax_cos, 1 - cos), (ax_rel, rel)):
            if y is not None:
                ax.plot([k], [max(y, _FLOOR)], "x", color=mark[0], markersize=9, mew=2)


def _style_log_axes(*axes: Any) -> None:
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    for ax in axes:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation())
        # subtle: set the minor formatter too, to the same notation: an axis spanning less
        # than a decade or two gets its minor ticks labelled, and a formatter left at its
        # default (or a custom major one) makes two scales on one axis.
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        ax.grid(True, which="major", alpha=0.35)


def _widen(ax: Any, decades: float = 1.5) -> None:
    """Show at least ``decades`` on a log axis, centred on the data.

    # subtle: autoscaled, a spread of 4.3e-5 to 4.7e-5 (every tensor at its rounding floor)
    # fills the panel and reads as large ups and downs.
    """
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10**decades:
        middle = math.sqrt(low * high)
        ax.set_ylim(middle / 10 ** (decades / 2), middle * 10 ** (decades / 2))


def _label_panels(
    ax_cos: Any,
    ax_rel: Any,
    words: Wording,
    dtype: str,
    marked: set[str],
    *,
    judged: bool,
    floors: bool,
) -> None:
    ax_cos.set_ylabel("1 - cos(L, T)")
    keys = "".join(f"; {_MARK[v][0][4:]} x: {_MARK[v][1]}" for v in sorted(marked))
    ax_cos.set_title(
        f"Cosine distance of {words.l_name} and {words.t_name} (lower is better{keys})",
        fontsize=10,
    )
    if not judged:  # no verdicts measured: the headline judges by this cosine
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
    ax_rel.set_ylabel("||L - T|| / ||T||")
    band = f"; pale band: the {dtype} rounding floor, i.e. base + L correctly rounded"
    ax_rel.set_title(f"Relative error (lower is better{band if floors else ''})", fontsize=10)


def _draw_outside(ax: Any, by_layer: dict[str, dict[int, int]], title: str) -> None:
    """Per layer, how many tensors without L changed: really (red) or by rounding (grey)."""
    real, rounding = by_layer[CHANGED_NOT_LORA], by_layer[ROUNDING_ONLY]
    layers = sorted(set(real) | set(rounding))
    if layers:
        r = [real.get(k, 0) for k in layers]
        g = [rounding.get(k, 0) for k in layers]
        if any(g):
            ax.bar(layers, g, color="0.7", label="only by dtype rounding")
        if any(r):
            ax.bar(layers, r, bottom=g, color="tab:red", label="changed")
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.4, "none", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_ylabel("tensors")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=10)
