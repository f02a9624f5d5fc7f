"""Plots as plain inline SVG strings (no plotting library): line charts with optional error bars
and a log x axis, the accuracy-per-layer and accuracy-vs-label-fraction charts, and a
confusion-matrix heat map. Every function returns one self-contained ``<svg>...</svg>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
WIDTH, HEIGHT = 440, 270
MARGIN = {"left": 62, "right": 16, "top": 30, "bottom": 46}

Point = tuple[float, float]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values in [lo, hi]: the step of 1, 2 or 5 x 10^k nearest
    (in ratio) to (hi - lo) / (count - 1)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda v: abs(math.log(v / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float, percent: bool) -> str:
    return f"{100 * value:.0f}%" if percent else f"{value:.3g}"


def line_chart(
    series: Mapping[str, Sequence[Point]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    errors: Mapping[str, Sequence[float]] | None = None,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    log_x: bool = False,
    percent: bool = False,
    legend: bool | None = None,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """One line (with markers) per series of (x, y) points; ``errors[name][i]`` draws +-e bars.

    log_x puts x on a log10 axis (x > 0); percent shows y fractions as percentages. x_ticks
    replaces the automatic x ticks with (position, text) pairs (e.g. layer names). The key of
    series names is drawn when ``legend`` is true (default: when there are several series).
    """
    errors = errors or {}
    points = [p for pts in series.values() for p in pts if math.isfinite(p[0] + p[1])]
    if not points:
        return _empty(title, width, height)
    spans = [
        (p[1] - e, p[1] + e)
        for name, pts in series.items()
        for p, e in zip(pts, errors.get(name, [0.0] * len(pts)), strict=True)
        if math.isfinite(p[1])
    ]
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)  # noqa: E731
    xs = [tx(p[0]) for p in points]
    y_lo, y_hi = min(s[0] for s in spans), max(s[1] for s in spans)
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    x_pad = 0.06 * (x_hi - x_lo)  # end points and their tick labels stay inside the frame
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad
    pad = 0.05 * (y_hi - y_lo) or 0.05 * (abs(y_hi) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, top = MARGIN["left"], MARGIN["top"]
    plot_w, plot_h = width - left - MARGIN["right"], height - top - MARGIN["bottom"]

    def sx(v: float) -> float:
        return left + (tx(v) - x_lo) / (x_hi - x_lo) * plot_w

    def sy(v: float) -> float:
        return top + (y_hi - v) / (y_hi - y_lo) * plot_h

    out = [_open(width, height), _text(width / 2, 18, title, size=13, anchor="middle", bold=True)]
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    )
    for v in nice_ticks(y_lo, y_hi):
        y = sy(v)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
        )
        out.append(_text(left - 5, y + 4, _fmt(v, percent), anchor="end"))
    if x_ticks is None:
        if log_x:
            decades = range(math.floor(x_lo), math.ceil(x_hi) + 1)
            x_ticks = [
                (10.0**d, f"{10.0**d:g}") for d in decades if x_lo - 1e-9 <= d <= x_hi + 1e-9
            ]
            x_ticks = x_ticks or [(10.0**x_lo, f"{10.0**x_lo:.2g}")]
        else:
            x_ticks = [(v, f"{v:g}") for v in nice_ticks(x_lo, x_hi)]
    for v, label in x_ticks:
        out.append(_text(sx(v), top + plot_h + 16, label, anchor="middle"))
    out.append(_text(left + plot_w / 2, height - 8, x_label, anchor="middle"))
    out.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{escape(y_label)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        good = [(p, e) for p, e in zip(pts, errors.get(name, [0.0] * len(pts)), strict=True)
                if math.isfinite(p[0] + p[1])]  # fmt: skip
        path = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p, _ in good)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for p, e in good:
            x, y = sx(p[0]), sy(p[1])
            if e:
                out.append(
                    f'<line x1="{x:.1f}" y1="{sy(p[1] - e):.1f}" x2="{x:.1f}" y2="{sy(p[1] + e):.1f}" '
                    f'stroke="{color}"/>'
                )
            if len(good) <= 60:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.8" fill="{color}"/>')
    if len(series) > 1 if legend is None else legend:
        out += _legend(list(series), left, top)
    out.append("</svg>")
    return "\n".join(out)


def _legend(names: list[str], left: float, top: float) -> list[str]:
    """A framed key in the top-left corner of the plot: colour swatch + name per series."""
    legend_w = 30 + 6 * max(len(name) for name in names)  # ~6 px per 10 px character
    out = []
    out.append(
        f'<rect x="{left + 4}" y="{top + 3}" width="{legend_w}" height="{4 + 15 * len(names)}" '
        'fill="#fff" fill-opacity="0.8" stroke="#ddd"/>'
    )
    for i, name in enumerate(names):
        color = COLORS[i % len(COLORS)]
        out.append(
            f'<rect x="{left + 8}" y="{top + 9 + 15 * i}" width="10" height="3" fill="{color}"/>'
        )
        out.append(_text(left + 22, top + 14 + 15 * i, name))
    return out


def plot_label_fraction(rows: Sequence[Mapping[str, Any]]) -> str:
    """Accuracy vs label fraction: one line per ``model``, x = ``fraction`` (log axis),
    y = ``mean`` top-1 with +-``std`` bars. rows: dicts with fraction, model, mean, std."""
    series: dict[str, list[Point]] = {}
    errors: dict[str, list[float]] = {}
    for row in sorted(rows, key=lambda r: float(r["fraction"])):
        name = str(row["model"])
        series.setdefault(name, []).append((float(row["fraction"]), float(row["mean"])))
        errors.setdefault(name, []).append(float(row.get("std") or 0.0))
    return line_chart(
        series, errors=errors, title="Test accuracy vs fraction of labels", log_x=True,
        x_label="fraction of training labels", y_label="top-1 (mean +- std over seeds)", percent=True,
        legend=True,
    )  # fmt: skip


def plot_layers(series: Mapping[str, Sequence[tuple[str, float]]]) -> str:
    """Probe accuracy per layer: series name -> [(layer, top1), ...]. Layers are placed in
    network order ("stage1", "stage2", ..., then "pre_logits"), whatever order they come in."""
    names = {layer for pairs in series.values() for layer, _ in pairs}
    order = sorted(names, key=_layer_rank)
    points = {name: sorted(((float(order.index(layer)), top1) for layer, top1 in pairs))
              for name, pairs in series.items()}  # fmt: skip
    return line_chart(
        points, title="Probe accuracy per layer", x_label="layer", y_label="test top-1",
        x_ticks=[(float(i), name) for i, name in enumerate(order)], percent=True, legend=True,
    )  # fmt: skip


def _layer_rank(layer: str) -> tuple[int, str]:
    """stage<i> by i, then anything else (pre_logits) after all stages."""
    digits = layer[len("stage") :]
    return (
        (int(digits), layer) if layer.startswith("stage") and digits.isdigit() else (1 << 30, layer)
    )


def heatmap(counts: Sequence[Sequence[int]], labels: Sequence[str], *, title: str) -> str:
    """Confusion matrix: rows = true class, columns = predicted; cell colour = row fraction,
    text = count."""
    c = len(labels)
    cell = max(18, min(44, 420 // max(c, 1)))
    left, top = 110, 44
    width, height = left + c * cell + 20, top + c * cell + 75
    out = [_open(width, height), _text(width / 2, 18, title, size=13, anchor="middle", bold=True)]
    out.append(_text(left + c * cell / 2, 36, "predicted", anchor="middle"))
    for i, row in enumerate(counts):
        total = sum(row) or 1
        out.append(_text(left - 6, top + i * cell + cell / 2 + 4, labels[i], anchor="end"))
        for j, n in enumerate(row):
            share = n / total
            shade = int(round(255 * (1 - share)))
            fill = f"rgb({shade},{shade},255)"
            x, y = left + j * cell, top + i * cell
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#fff"/>'
            )
            if n:
                color = "#fff" if share > 0.5 else "#222"
                out.append(_text(x + cell / 2, y + cell / 2 + 4, str(n), anchor="middle",
                                 size=max(8, min(11, cell // 3)), color=color))  # fmt: skip
    for j, name in enumerate(labels):
        x, y = left + j * cell + cell / 2, top + c * cell + 8
        out.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="10" text-anchor="end" '
            f'transform="rotate(-45 {x:.1f} {y:.1f})">{escape(name)}</text>'
        )
    out.append(
        f'<text x="12" y="{top + c * cell / 2:.1f}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + c * cell / 2:.1f})">true</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def _open(width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">'
        '<rect width="100%" height="100%" fill="#fff"/>'
    )


def _text(x: float, y: float, text: str, *, size: int = 10, anchor: str = "start",
          bold: bool = False, color: str = "#222") -> str:  # fmt: skip
    weight = ' font-weight="bold"' if bold else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}"'
        f"{weight}>{escape(str(text))}</text>"
    )


def _empty(title: str, width: int, height: int) -> str:
    return "\n".join([_open(width, height), _text(width / 2, height / 2, f"{title}: no data",
                      anchor="middle"), "</svg>"])  # fmt: skip
