"""HTML: one self-contained file (inline CSS, images as data URIs, inline SVG), no JavaScript, autoescaped.

``base.html.j2`` renders the envelope (summary first, details below) and includes ``<kind>.html.j2`` for the
result, falling back to ``generic.html.j2`` which renders any result's fields as nested tables.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from markupsafe import Markup, escape

_B64 = re.compile(r"^[A-Za-z0-9+/=\s]*$")
_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_env = None


def _img(image: Any, cls: str = "", max_px: int | None = None) -> Markup:
    """An :class:`Image` (or its dict) as an <img> with a data URI; anything malformed renders as nothing."""
    if image is None:
        return Markup("")
    get = (lambda k, d=None: image.get(k, d)) if isinstance(image, dict) else (lambda k, d=None: getattr(image, k, d))
    data, mime = get("data", ""), get("mime", "image/png")
    if not isinstance(data, str) or not _B64.match(data) or mime not in _MIMES:
        return Markup('<span class="muted">[image omitted: not a valid embedded image]</span>')
    w, h = get("width", 0), get("height", 0)
    size = ""
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        if max_px and max(w, h) < max_px:  # upscale small thumbnails for display, crisp pixels
            s = max_px / max(w, h)
            w, h = round(w * s), round(h * s)
        size = f' width="{w}" height="{h}"'
    return Markup(f'<img class="{escape(cls)}" src="data:{mime};base64,{data.strip()}" '
                  f'alt="{escape(get("alt", "") or "")}"{size}>')


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.1f}%"


def _is_dc(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _items(v: Any) -> list[tuple[str, Any]]:
    if _is_dc(v):
        return [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]
    if isinstance(v, dict):
        return list(v.items())
    return []


def _kind_of(v: Any) -> str:
    if v is None or isinstance(v, (str, int, float, bool)):
        return "scalar"
    if _is_dc(v) or isinstance(v, dict):
        if _is_image(v):
            return "image"
        return "mapping"
    if isinstance(v, (list, tuple)):
        return "list"
    return "scalar"


def _breakable(v: Any) -> Markup:
    """Escape a long identifier (path, check id) and let it wrap after ``/ _ : \\`` (<wbr>), never inside
    a number."""
    if v is None:
        return Markup("")
    return Markup("<wbr>").join(escape(p) for p in re.split(r"(?<=[/_:\\])", str(v)))


_NEG_OP = {">": "≤", ">=": "<", "<": "≥", "<=": ">"}
_OP = {">": ">", ">=": "≥", "<": "<", "<=": "≤"}
#: display order of the checks table: the worst first
_ORDER = {"fail": 0, "error": 1, "warn": 2, "skipped": 3, "pass": 4}


def _compact(v: Any) -> str:
    from .. import svg

    if isinstance(v, bool):
        return "yes" if v else "no"
    return svg.compact(v) if isinstance(v, (int, float)) else ("n/a" if v is None else str(v))


def _crosses(value: Any, op: str, thr: Any) -> bool:
    if not isinstance(value, (int, float)) or not isinstance(thr, (int, float)):
        return False
    return {">": value > thr, ">=": value >= thr, "<": value < thr, "<=": value <= thr}.get(op, False)


def _check_value(c: Any) -> str:
    """``value op threshold (level)`` for a check: the threshold it crossed, else the nearest one it kept to.

    A check failed by a baseline regression (not by a threshold) shows its value next to the baseline's."""
    val = _compact(c.value) if c.value is not None else "n/a"
    op = getattr(c, "op", ">")
    warn, fail = getattr(c, "warn", None), getattr(c, "fail", None)
    status = getattr(c, "status", "")
    base = getattr(c, "baseline", None)
    if c.value is None or status in ("error", "skipped"):
        # the value (if any) next to the threshold it would be judged against
        thr, level = (fail, "fail") if fail is not None else (warn, "warn")
        return f"{val} · {level} if {_OP.get(op, op)} {_compact(thr)}" if thr is not None else val
    for thr, level in ((fail, "fail"), (warn, "warn")):
        if thr is not None and _crosses(c.value, op, thr):
            return f"{val} {_OP.get(op, op)} {level} at {_compact(thr)}"
    if status in ("fail", "warn") and base is not None:  # judged on the regression, not a threshold
        return f"{val} vs baseline {_compact(base)} (regressed)"
    thr, level = (warn, "warn") if warn is not None else (fail, "fail")
    return f"{val} {_NEG_OP.get(op, op)} {level} at {_compact(thr)}" if thr is not None else val


def _sorted_checks(checks: Any) -> list:
    return sorted(checks or [], key=lambda c: _ORDER.get(getattr(c, "status", ""), 5))


def _status_counts(checks: Any) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for c in checks or []:
        counts[c.status] = counts.get(c.status, 0) + 1
    return [(s, counts[s]) for s in ("fail", "error", "warn", "skipped", "pass") if s in counts] + \
        [(s, n) for s, n in counts.items() if s not in _ORDER]


def _is_image(v: Any) -> bool:
    if _is_dc(v):
        return type(v).__name__ == "Image"
    return isinstance(v, dict) and {"data", "mime", "width", "height"} <= set(v)


def environment():
    global _env
    if _env is None:
        from jinja2 import Environment, PackageLoader, select_autoescape

        from .. import svg

        env = Environment(loader=PackageLoader("jacaudit.report", "templates"),
                          autoescape=select_autoescape(default=True, default_for_string=True),
                          trim_blocks=True, lstrip_blocks=True)
        env.filters.update(img=_img, fmt=_fmt, pct=_pct, compact=_compact, breakable=_breakable,
                           check_value=_check_value, sorted_checks=_sorted_checks)
        env.globals.update(svg_bars=svg.svg_bars, svg_lines=svg.svg_lines, svg_colorbar=svg.svg_colorbar,
                           svg_matrix=svg.svg_matrix, svg_spectrum=svg.svg_spectrum, items=_items,
                           kind_of=_kind_of, status_counts=_status_counts)
        _env = env
    return _env


def render(report: Any) -> bytes:
    env = environment()
    tpl = env.get_template("base.html.j2")
    section = [f"{report.kind}.html.j2", "generic.html.j2"] if re.match(r"^[a-z0-9_]+$", str(report.kind)) \
        else ["generic.html.j2"]
    return tpl.render(report=report, r=report.result, section=section).encode("utf-8")
