"""Tiny inline-SVG plots for HTML reports (no scripts, no fonts fetched; text escaped)."""
from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")


def _num(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def svg_bars(labels: Sequence[str], values: Sequence[float | None], *, width: int = 420, bar_h: int = 18,
             vmin: float | None = None, vmax: float | None = None, threshold: float | None = None,
             title: str = "") -> Markup:
    """Horizontal bars with value labels; an optional dashed threshold line."""
    vals = [v if _num(v) else 0.0 for v in values]
    lo = min([0.0, *vals]) if vmin is None else vmin
    hi = max([0.0, *vals, 1e-12]) if vmax is None else vmax
    label_w, pad = 150, 4
    plot_w = width - label_w - 50
    h = len(vals) * (bar_h + pad) + 24
    span = (hi - lo) or 1.0

    def x(v: float) -> float:
        return label_w + (min(max(v, lo), hi) - lo) / span * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="11">']
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    for i, (lab, v, raw) in enumerate(zip(labels, vals, values)):
        y = 4 + i * (bar_h + pad)
        x0, x1 = sorted((x(0.0), x(v)))
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">'
                     f"{escape(str(lab)[:28])}</text>")
        parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="{bar_h}" '
                     f'fill="{PALETTE[0]}"/>')
        parts.append(f'<text x="{x1 + 4:.1f}" y="{y + bar_h * 0.7:.1f}">'
                     f'{escape(_fmt(raw) if _num(raw) else "n/a")}</text>')
    if threshold is not None and _num(threshold):
        tx = x(threshold)
        parts.append(f'<line x1="{tx:.1f}" y1="0" x2="{tx:.1f}" y2="{h - 18}" stroke="#dc2626" '
                     f'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{tx:.1f}" y="{h - 4}" text-anchor="middle" fill="#dc2626">'
                     f"{escape(_fmt(threshold))}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def svg_lines(series: dict[str, Sequence[float | None]], x_labels: Sequence[str] | None = None, *,
              width: int = 420, height: int = 200, vmin: float | None = None, vmax: float | None = None,
              threshold: float | None = None, title: str = "") -> Markup:
    """Line plot of one or more series over a shared x axis, with a legend."""
    allv = [v for s in series.values() for v in s if _num(v)]
    lo = (min(allv) if allv else 0.0) if vmin is None else vmin
    hi = (max(allv) if allv else 1.0) if vmax is None else vmax
    span = (hi - lo) or 1.0
    n = max((len(s) for s in series.values()), default=1)
    left, right, top, bottom = 40, 10, 10, 40 + 14 * len(series)
    pw, ph = width - left - right, height - top - bottom
    full_h = height

    def px(i: int) -> float:
        return left + (i / max(n - 1, 1)) * pw

    def py(v: float) -> float:
        return top + (1 - (min(max(v, lo), hi) - lo) / span) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{full_h}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="10">']
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{left - 4}" y="{py(v) + 3:.1f}" text-anchor="end">{escape(_fmt(v))}</text>')
    if x_labels:
        for i, lab in enumerate(x_labels):
            parts.append(f'<text x="{px(i):.1f}" y="{top + ph + 12}" text-anchor="middle">'
                         f"{escape(str(lab)[:10])}</text>")
    if threshold is not None and _num(threshold):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(threshold):.1f}" y2="{py(threshold):.1f}" '
                     f'stroke="#dc2626" stroke-dasharray="4 3"/>')
    for k, (name, s) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [(px(i), py(v)) for i, v in enumerate(s) if _num(v)]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
            for a, b in pts:
                parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>')
        ly = top + ph + 26 + 14 * k
        parts.append(f'<rect x="{left}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + 14}" y="{ly}">{escape(str(name)[:40])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
