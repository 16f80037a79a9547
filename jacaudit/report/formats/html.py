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
        env.filters.update(img=_img, fmt=_fmt, pct=_pct)
        env.globals.update(svg_bars=svg.svg_bars, svg_lines=svg.svg_lines, items=_items, kind_of=_kind_of)
        _env = env
    return _env


def render(report: Any) -> bytes:
    env = environment()
    tpl = env.get_template("base.html.j2")
    section = [f"{report.kind}.html.j2", "generic.html.j2"] if re.match(r"^[a-z0-9_]+$", str(report.kind)) \
        else ["generic.html.j2"]
    return tpl.render(report=report, r=report.result, section=section).encode("utf-8")
