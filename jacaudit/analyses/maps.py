"""2-D saliency maps: channel reduction, statistics (where the mass lies), heatmap and overlay PNGs.

numpy + Pillow only. A *map* here is a non-negative (H, W) array derived from a signed attribution.
"""
from __future__ import annotations

import base64
import io

import numpy as np

# A perceptually ordered colormap (approximation of "inferno"): black -> purple -> orange -> yellow.
#: the colormap's RGB anchors, evenly spaced from 0 to 1 (plain tuples; the HTML colour bars in
#: :mod:`jacaudit.report.svg` draw the same scale and a test keeps the two equal)
ANCHORS: tuple[tuple[int, int, int], ...] = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
                                             (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164))
_ANCHORS = np.array(ANCHORS, dtype=np.float64)
#: the colour of an object mask's outline on overlays (cyan: far from every colour of the map)
OUTLINE_RGB = (0, 255, 255)


def reduce_channels(attr: np.ndarray, layout: str = "NCHW", how: str = "max-abs") -> np.ndarray:
    """One sample's attribution (C, H, W) / (H, W, C) -> (H, W) by max |a| or L2 over channels.

    Any other rank is flattened to a (1, n) strip of |a|."""
    a = np.asarray(attr, dtype=np.float64)
    if a.ndim != 3:
        return np.abs(a).reshape(1, -1)
    axis = 0 if layout == "NCHW" else 2
    if how == "l2":
        return np.sqrt((a * a).sum(axis=axis))
    return np.abs(a).max(axis=axis)


def concentration(m: np.ndarray) -> dict:
    """Where the mass of a non-negative map lies: centroid (fractions), region words, top-10% mass share,
    the smallest pixel share holding half the mass and its bounding box."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float64).clip(min=0))
    h, w = m.shape
    total = m.sum()
    if total <= 0:
        return dict(centroid_x=0.5, centroid_y=0.5, region="nowhere (all zero)", top10_mass=0.0, area50=0.0,
                    bbox50=[0, 0, w, h])
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((m * (xs + 0.5)).sum() / total / w)
    cy = float((m * (ys + 0.5)).sum() / total / h)
    flat = np.sort(m.ravel())[::-1]
    k = max(1, int(round(0.1 * flat.size)))
    top10 = float(flat[:k].sum() / total)
    cum = np.cumsum(flat)
    n50 = int(np.searchsorted(cum, 0.5 * total) + 1)
    thr = flat[n50 - 1]
    sel = m >= thr
    yy, xx = np.nonzero(sel)
    bbox = [int(xx.min()), int(yy.min()), int(xx.max()) + 1, int(yy.max()) + 1]
    hx, hy = hotspot(m)
    return dict(centroid_x=cx, centroid_y=cy, region=region_words(hx, hy), top10_mass=top10,
                area50=float(n50 / flat.size), bbox50=bbox)


def hotspot(m: np.ndarray, frac: float = 0.125) -> tuple[float, float]:
    """Centre (fractions of width/height) of the square window, 1/8 of the side, holding the most mass.

    The centroid of a diffuse map sits near the middle whatever the map shows; the densest window says
    where the saliency actually concentrates (a corner marker, an object)."""
    h, w = m.shape
    k = max(1, int(round(frac * min(h, w))))
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = np.cumsum(np.cumsum(m, axis=0), axis=1)
    win = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]  # (h-k+1, w-k+1) window sums
    y, x = np.unravel_index(int(np.argmax(win)), win.shape)
    return float((x + k / 2) / w), float((y + k / 2) / h)


def region_words(cx: float, cy: float) -> str:
    row = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "centre")
    if row == "middle" and col == "centre":
        return "centre"
    if row == "middle":
        return f"middle-{col}"
    return f"{row}-{col}"


def mask_fraction(m: np.ndarray, mask: np.ndarray) -> float:
    """Share of a map's mass inside a boolean mask (same H, W)."""
    m = np.asarray(m, dtype=np.float64).clip(min=0)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != m.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the map's {m.shape}")
    t = m.sum()
    return float((m * mask).sum() / t) if t > 0 else 0.0


def normalise(m: np.ndarray, pct: float = 99.5) -> np.ndarray:
    """Scale to 0..1 by a high percentile (robust to a few extreme pixels)."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float64).clip(min=0))
    top = np.percentile(m, pct) if m.size else 0.0
    if top <= 0:
        top = m.max() if m.size and m.max() > 0 else 1.0
    return np.clip(m / top, 0, 1)


def colormap(v: np.ndarray) -> np.ndarray:
    """0..1 values -> uint8 RGB through the colormap anchors."""
    pos = np.clip(v, 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(int), len(_ANCHORS) - 2)
    f = (pos - i)[..., None]
    rgb = _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f
    return np.round(rgb).astype(np.uint8)


def heatmap_rgb(m: np.ndarray) -> np.ndarray:
    return colormap(normalise(m))


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner boundary of a boolean (H, W) mask: mask pixels with a 4-neighbour outside it (the image
    edge counts as outside)."""
    k = np.asarray(mask).astype(bool)
    if k.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {k.shape}")
    p = np.pad(k, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return k & ~interior


def overlay_rgb(pixels: np.ndarray, m: np.ndarray, alpha: float = 0.6, mask: np.ndarray | None = None,
                outline: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """The heatmap over a dimmed grey copy of the image, more opaque where saliency is high.

    With a boolean (H, W) ``mask`` (the object mask; resized nearest-neighbour to the image when its size
    differs), its 1-pixel boundary is drawn in ``outline`` (cyan) on top."""
    from PIL import Image

    v = normalise(m)
    if v.shape != pixels.shape[:2]:
        v = np.asarray(Image.fromarray(v.astype(np.float32), mode="F").resize(
            (pixels.shape[1], pixels.shape[0]), Image.BILINEAR))
    base = np.asarray(pixels, dtype=np.float64)
    grey = base.mean(axis=2, keepdims=True) * 0.5 + base * 0.5
    a = (alpha * np.sqrt(np.clip(v, 0, 1)))[..., None]
    out = grey * (1 - a) + colormap(v).astype(np.float64) * a
    out = np.round(np.clip(out, 0, 255)).astype(np.uint8)
    if mask is not None:
        k = np.asarray(mask).astype(bool)
        if k.ndim != 2:
            raise ValueError(f"mask must be (H, W), got shape {k.shape}")
        if k.shape != out.shape[:2]:
            k = np.asarray(Image.fromarray(k.astype(np.uint8) * 255, mode="L").resize(
                (out.shape[1], out.shape[0]), Image.NEAREST)) > 127
        out[mask_boundary(k)] = np.asarray(outline, dtype=np.uint8)
    return out


def png_bytes(rgb: np.ndarray, max_side: int | None = None) -> tuple[bytes, int, int]:
    """uint8 (H, W, 3) -> PNG bytes (optionally downscaled so the longer side is <= max_side)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), img.width, img.height


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties) of two arrays of the same size."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()

    def rank(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(x.size, dtype=np.float64)
        r[order] = np.arange(x.size, dtype=np.float64)
        # average ties
        xs = x[order]
        starts = np.r_[0, np.nonzero(np.diff(xs))[0] + 1]
        ends = np.r_[starts[1:], x.size]
        for s, e in zip(starts, ends):
            if e - s > 1:
                r[order[s:e]] = (s + e - 1) / 2.0
        return r

    ra, rb = rank(a), rank(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0
