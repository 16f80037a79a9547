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


# ---------------------------------------------------------------------------------------------------------
# Colour scales (plain tuples: no numpy here)
# ---------------------------------------------------------------------------------------------------------
#: the saliency heatmap's colormap anchors, evenly spaced 0..1; equal to :data:`jacaudit.analyses.maps.ANCHORS`
#: (a test keeps them equal; this module must not import numpy)
HEAT_ANCHORS: tuple[tuple[int, int, int], ...] = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
                                                  (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164))
#: diverging scale for signed values: blue (negative) -> white (0) -> red (positive)
DIVERGING_ANCHORS: tuple[tuple[int, int, int], ...] = ((33, 102, 172), (103, 169, 207), (209, 229, 240),
                                                       (247, 247, 247), (253, 219, 199), (239, 138, 98),
                                                       (178, 24, 43))


def _lerp(anchors: Sequence[tuple[int, int, int]], t: float) -> str:
    t = min(max(t, 0.0), 1.0) if _num(t) else 0.0
    pos = t * (len(anchors) - 1)
    i = min(int(pos), len(anchors) - 2)
    f = pos - i
    a, b = anchors[i], anchors[i + 1]
    return "#%02x%02x%02x" % tuple(round(a[k] * (1 - f) + b[k] * f) for k in range(3))


def compact(v: float | None) -> str:
    """A number in few characters: 3 significant digits, exponent form only for very small / large values."""
    if not _num(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3 or a >= 1e5:
        m, e = f"{v:.2e}".split("e")
        m = m.rstrip("0").rstrip(".")
        return f"{m}e{int(e)}"
    if a >= 999.5:
        return f"{v:.0f}"
    return f"{v:.3g}"


def svg_colorbar(vmax: float | None, *, vmin: float = 0.0, anchors: Sequence[tuple[int, int, int]] = HEAT_ANCHORS,
                 width: int = 128, height: int = 10, title: str = "colour scale", steps: int = 48) -> Markup:
    """A horizontal colour bar with ticks at ``vmin`` and ``vmax`` (``vmax`` None: ticks 'low' / 'high').

    Drawn as thin rectangles (no gradient element: a CSP-proof page needs no ``url(#id)`` references)."""
    pad = 2
    h = height + 16
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="10" class="cbar">',
             f"<title>{escape(title)}</title>"]
    inner = width - 2 * pad
    cw = inner / steps
    for i in range(steps):
        parts.append(f'<rect x="{pad + i * cw:.2f}" y="0" width="{cw + 0.4:.2f}" height="{height}" '
                     f'fill="{_lerp(anchors, (i + 0.5) / steps)}"/>')
    parts.append(f'<rect x="{pad}" y="0" width="{inner}" height="{height}" fill="none" stroke="#9ca3af" '
                 f'stroke-width="0.5"/>')
    lo_t, hi_t = (compact(vmin), compact(vmax)) if _num(vmax) else ("low", "high")
    parts.append(f'<text x="{pad}" y="{height + 12}" text-anchor="start">{escape(lo_t)}</text>')
    if _num(vmax) and vmin < 0 < vmax:
        parts.append(f'<text x="{pad + inner * (-vmin) / (vmax - vmin):.1f}" y="{height + 12}" '
                     f'text-anchor="middle">0</text>')
    parts.append(f'<text x="{width - pad}" y="{height + 12}" text-anchor="end">{escape(hi_t)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _ticks(n: int, most: int = 6) -> list[int]:
    """Index ticks 0 .. n-1 at a round step."""
    if n <= 1:
        return [0]
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
        if (n - 1) / step <= most - 1:
            break
    ticks = list(range(0, n, step))
    if n - 1 - ticks[-1] >= step / 2:
        ticks.append(n - 1)
    return ticks


def svg_matrix(matrix: Sequence[Sequence[float | None]], *, max_width: int = 520, max_height: int = 420,
               row_label: str = "output index", col_label: str = "input index",
               title: str = "J (signed)") -> Markup:
    """A signed matrix as a heatmap (diverging: blue < 0 < red, symmetric around 0) with a vertical colour bar
    labelled -max .. +max and axis labels. Non-finite entries are grey with a cross-hatch-free light fill."""
    rows = [list(r) for r in matrix]
    nr = len(rows)
    nc = max((len(r) for r in rows), default=0)
    if nr == 0 or nc == 0:
        return Markup('<span class="muted">empty matrix</span>')
    vals = [abs(v) for r in rows for v in r if _num(v)]
    vmax = max(vals, default=0.0)
    cell = max(2.0, min(28.0, max_width / nc, max_height / nr))
    left, top = 52, 10
    pw, ph = cell * nc, cell * nr
    bar_x = left + pw + 18
    width = int(bar_x + 14 + 60)
    height = int(top + ph + 40)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="10">',
             f"<title>{escape(title)}: {nr} × {nc}, |max| {escape(compact(vmax))}</title>"]
    for i, r in enumerate(rows):
        for j in range(nc):
            v = r[j] if j < len(r) else None
            if _num(v):
                color = _lerp(DIVERGING_ANCHORS, 0.5 + (0.5 * v / vmax if vmax > 0 else 0.0))
            else:
                color = "#9ca3af"
            parts.append(f'<rect x="{left + j * cell:.2f}" y="{top + i * cell:.2f}" width="{cell + 0.3:.2f}" '
                         f'height="{cell + 0.3:.2f}" fill="{color}">'
                         + (f"<title>J[{i}, {j}] = {escape(compact(v) if _num(v) else 'n/a')}</title>"
                            if nr * nc <= 1024 else "") + "</rect>")
    parts.append(f'<rect x="{left}" y="{top}" width="{pw:.2f}" height="{ph:.2f}" fill="none" stroke="#6b7280" '
                 f'stroke-width="0.6"/>')
    for j in _ticks(nc):
        x = left + (j + 0.5) * cell
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 11:.1f}" text-anchor="middle">{j}</text>')
    for i in _ticks(nr):
        y = top + (i + 0.5) * cell
        parts.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end">{i}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 28:.1f}" text-anchor="middle" '
                 f'font-size="11">{escape(col_label)}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(row_label)}</text>')
    # vertical colour bar: +max at the top, -max at the bottom
    steps = 48
    bh = max(ph, 80.0)
    for k in range(steps):
        t = 1 - (k + 0.5) / steps
        parts.append(f'<rect x="{bar_x:.1f}" y="{top + k * bh / steps:.2f}" width="12" '
                     f'height="{bh / steps + 0.4:.2f}" fill="{_lerp(DIVERGING_ANCHORS, t)}"/>')
    parts.append(f'<rect x="{bar_x:.1f}" y="{top}" width="12" height="{bh:.2f}" fill="none" stroke="#9ca3af" '
                 f'stroke-width="0.5"/>')
    for t, lab in ((0.0, "+" + compact(vmax) if vmax > 0 else "0"), (0.5, "0"),
                   (1.0, "−" + compact(vmax) if vmax > 0 else "0")):
        parts.append(f'<text x="{bar_x + 16:.1f}" y="{top + t * bh + (8 if t == 0 else 0 if t == 1 else 3.5):.1f}">'
                     f"{escape(lab)}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def svg_spectrum(values: Sequence[float | None], *, tol: float | None = None, rank: int | None = None,
                 width: int = 520, height: int = 220, title: str = "singular values") -> Markup:
    """Singular values (largest first) as vertical bars; a log axis when they span more than 3 decades; a dashed
    line at the rank tolerance ``tol`` (values above it count towards the numerical rank; bars below it are grey),
    explained in a legend above the plot."""
    vals = [float(v) if _num(v) else 0.0 for v in values]
    n = len(vals)
    if n == 0:
        return Markup('<span class="muted">no singular values</span>')
    has_tol = bool(_num(tol) and tol > 0)
    pos = [v for v in vals if v > 0]
    hi = max(vals)
    lo_pos = min(pos) if pos else 1.0
    if has_tol:
        lo_pos = min(lo_pos, tol)
        hi = max(hi, tol)
    log = bool(pos) and hi / lo_pos > 1e3
    left, right, top, bottom = 62, 12, 26 if has_tol else 10, 40
    bw = min(28.0, (width - left - right) / n)
    pw = bw * n
    width = int(max(left + pw + right, 320 if has_tol else 0))  # room for the legend
    ph = height - top - bottom
    if log:
        lo_e = math.floor(math.log10(lo_pos)) - 1  # a decade below the smallest: every bar shows
        hi_e = math.ceil(math.log10(hi)) if hi > 0 else lo_e + 1
        if hi_e <= lo_e:
            hi_e = lo_e + 1

        def py(v: float) -> float:
            if v <= 0:
                return top + ph
            f = (math.log10(v) - lo_e) / (hi_e - lo_e)
            return top + (1 - min(max(f, 0.0), 1.0)) * ph
        step = max(1, math.ceil((hi_e - lo_e) / 6))
        yticks = [10.0 ** e for e in range(hi_e, lo_e - 1, -step)]
    else:
        top_v = hi if hi > 0 else 1.0

        def py(v: float) -> float:
            return top + (1 - min(max(v / top_v, 0.0), 1.0)) * ph
        yticks = [0.0, top_v / 2, top_v]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}" font-family="sans-serif" font-size="10">',
             f"<title>{escape(title)}{' (log scale)' if log else ''}</title>",
             f'<rect x="{left}" y="{top}" width="{pw:.1f}" height="{ph}" fill="none" stroke="#d1d5db"/>']
    for t in yticks:
        y = py(t)
        parts.append(f'<line x1="{left - 3}" x2="{left + pw:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef2f7"/>'
                     f'<text x="{left - 5}" y="{y + 3.5:.1f}" text-anchor="end">{escape(compact(t))}</text>')
    gap = min(3.0, bw * 0.25)
    for i, v in enumerate(vals):
        above = not has_tol or v > tol
        y = py(v)
        parts.append(f'<rect x="{left + i * bw + gap / 2:.2f}" y="{y:.2f}" width="{max(bw - gap, 0.8):.2f}" '
                     f'height="{max(top + ph - y, 0.0):.2f}" fill="{PALETTE[0] if above else "#9ca3af"}">'
                     f"<title>σ{i + 1} = {escape(compact(v))}</title></rect>")
    for i in _ticks(n):
        parts.append(f'<text x="{left + (i + 0.5) * bw:.1f}" y="{top + ph + 12}" text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 28}" text-anchor="middle" font-size="11">'
                 f"index (largest first){' · log scale' if log else ''}</text>")
    if has_tol:
        y = py(tol)
        parts.append(f'<line x1="{left}" x2="{left + pw:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#dc2626" '
                     f'stroke-width="1.5" stroke-dasharray="5 3"/>')
        lab = f"rank tolerance {compact(tol)}" + (f": numerical rank {rank}" if rank is not None else "")
        parts.append(f'<line x1="{left}" x2="{left + 22}" y1="9" y2="9" stroke="#dc2626" stroke-width="1.5" '
                     f'stroke-dasharray="5 3"/><text x="{left + 28}" y="12" fill="#b91c1c">{escape(lab)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
