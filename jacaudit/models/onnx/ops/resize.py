"""Resize (opsets 10, 11, 13, 18, 19) and Upsample (opsets 7, 9).

The interpolation is separable: each resized axis is processed in turn as a gather of the ``n`` neighbouring
input samples followed by a weighted sum with per-output-position coefficients. The coefficients and
neighbour indices depend only on sizes/scales/roi (shape-like parameters, computed here in float64 numpy
exactly as onnx's reference does); the data path is pure torch (``index_select`` + multiply + sum), so it is
differentiable w.r.t. X and runs under vmap. ``nearest`` mode is a plain gather (exact for every dtype).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..registry import op
from ._util import ints


def _floats(t) -> list[float]:
    """Scales/roi parameters (shape-like: they decide which samples are read, not differentiated)."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().reshape(-1).to(torch.float64).tolist()]
    return [float(v) for v in t]


# ---------------------------------------------------------------------------------------------
# coefficient functions: ratios (m,) float64 in (0, 1], scale -> (m, n)
# ---------------------------------------------------------------------------------------------
def _nearest_coeffs(ratio: np.ndarray, mode: str, scale: float) -> np.ndarray:
    if mode == "simple":  # pre-opset-11 behaviour (as onnxruntime): floor when upsampling, ceil when down
        mode = "ceil" if scale < 1 else "floor"
    if mode == "round_prefer_floor":
        right = ratio > 0.5
    elif mode == "round_prefer_ceil":
        right = ratio >= 0.5
    elif mode == "floor":
        right = np.zeros_like(ratio, dtype=bool)
    elif mode == "ceil":
        right = np.ones_like(ratio, dtype=bool)
    else:
        raise ValueError(f"unknown nearest_mode {mode!r}")
    right = right | (ratio == 1.0)
    return np.stack([~right, right], axis=1).astype(np.float64)


def _linear_coeffs(ratio: np.ndarray, scale: float, antialias: bool) -> np.ndarray:
    if not antialias:
        return np.stack([1 - ratio, ratio], axis=1)
    s = min(scale, 1.0)
    start = int(np.floor(-1 / s) + 1)
    footprint = 2 - 2 * start
    args = (np.arange(start, start + footprint)[None, :] - ratio[:, None]) * s
    c = np.clip(1 - np.abs(args), 0, 1)
    return c / c.sum(axis=1, keepdims=True)


def _cubic_kernel(x: np.ndarray, A: float) -> np.ndarray:
    x = np.abs(x)
    x2 = x * x
    x3 = x2 * x
    return np.where(x <= 1, (A + 2) * x3 - (A + 3) * x2 + 1,
                    np.where(x < 2, A * x3 - 5 * A * x2 + 8 * A * x - 4 * A, 0.0))


def _cubic_coeffs(ratio: np.ndarray, scale: float, A: float, antialias: bool) -> np.ndarray:
    if not antialias:
        r = ratio
        return np.stack([
            ((A * (r + 1) - 5 * A) * (r + 1) + 8 * A) * (r + 1) - 4 * A,
            ((A + 2) * r - (A + 3)) * r * r + 1,
            ((A + 2) * (1 - r) - (A + 3)) * (1 - r) * (1 - r) + 1,
            ((A * ((1 - r) + 1) - 5 * A) * ((1 - r) + 1) + 8 * A) * ((1 - r) + 1) - 4 * A,
        ], axis=1)
    s = min(scale, 1.0)
    i_start = int(np.floor(-2 / s) + 1)
    i_end = 2 - i_start
    args = s * (np.arange(i_start, i_end)[None, :] - ratio[:, None])
    c = _cubic_kernel(args, A)
    return c / c.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# one axis
# ---------------------------------------------------------------------------------------------
def _source_coords(ctm: str, y: np.ndarray, scale: float, in_w: int, out_w_int: int, roi):
    out_w = scale * in_w
    extrap = None
    if ctm == "align_corners":
        x = np.zeros(out_w_int) if out_w == 1 else y * (in_w - 1) / (out_w - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        if roi is None:
            raise ValueError("tf_crop_and_resize needs the roi input")
        if out_w == 1:
            x = np.full(out_w_int, (roi[1] - roi[0]) * (in_w - 1) / 2)
        else:
            x = y * (roi[1] - roi[0]) * (in_w - 1) / (out_w - 1)
        x = x + roi[0] * (in_w - 1)
        extrap = (x < 0) | (x > in_w - 1)
    elif ctm == "pytorch_half_pixel":
        x = np.full(out_w_int, -0.5) if out_w == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        adjustment = out_w_int / out_w
        offset = in_w / 2 * (1 - adjustment)
        x = offset + (y + 0.5) / scale - 0.5
    elif ctm == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    else:
        raise ValueError(f"unknown coordinate_transformation_mode {ctm!r}")
    return np.asarray(x, dtype=np.float64), extrap


def _resize_axis(x: torch.Tensor, axis: int, scale: float, out_w: int, cfg: dict, roi) -> torch.Tensor:
    in_w = x.shape[axis]
    if out_w == 0:
        return x.narrow(axis, 0, 0)
    if in_w == 0:
        raise ValueError("cannot resize an empty axis to a non-empty one")
    y = np.arange(out_w, dtype=np.float64)
    xo, extrap = _source_coords(cfg["ctm"], y, scale, in_w, out_w, roi)
    xo_int = np.floor(xo)
    ratio = np.where(xo == xo_int, 1.0, xo - xo_int)

    mode = cfg["mode"]
    if mode == "nearest":
        coeffs = _nearest_coeffs(ratio, cfg["nearest_mode"], scale)
    elif mode == "linear":
        coeffs = _linear_coeffs(ratio, scale, cfg["antialias"])
    elif mode == "cubic":
        coeffs = _cubic_coeffs(ratio, scale, cfg["cubic_a"], cfg["antialias"])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    n = coeffs.shape[1]

    # the n input positions nearest to xo (ties to the smaller index), as onnx's reference picks them
    pad = int(math.ceil(n / 2))
    xp = xo + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if n % 2 == 0:
        off = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        base = -((n - 1) // 2)
        off = np.where(frac <= 0.5, base, base + 1)
    idx = (p + off)[:, None] + np.arange(n)[None, :] - pad

    if cfg["exclude_outside"]:
        coeffs = np.where((idx < 0) | (idx >= in_w), 0.0, coeffs)
        s = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(s == 0, 1.0, s)
    idx = np.clip(idx, 0, in_w - 1)

    if mode == "nearest":
        pick = idx[np.arange(out_w), np.argmax(coeffs, axis=1)]
        res = torch.index_select(x, axis, torch.as_tensor(pick, dtype=torch.long, device=x.device))
    else:
        g = torch.index_select(x, axis, torch.as_tensor(idx.reshape(-1), dtype=torch.long, device=x.device))
        shp = list(x.shape)
        g = g.reshape(shp[:axis] + [out_w, n] + shp[axis + 1:])
        c = torch.as_tensor(coeffs, dtype=x.dtype, device=x.device)
        c = c.reshape([out_w, n] + [1] * (x.dim() - axis - 1))
        res = (g * c).sum(dim=axis + 1)
    if extrap is not None and extrap.any():
        m = torch.as_tensor(extrap, device=x.device).reshape([out_w] + [1] * (x.dim() - axis - 1))
        res = torch.where(m, torch.as_tensor(cfg["extrapolation_value"], dtype=res.dtype, device=x.device), res)
    return res


def _interpolate(x: torch.Tensor, cfg: dict, scales: list[float] | None, sizes: list[int] | None,
                 axes: list[int] | None, roi: list[float] | None, policy: str = "stretch") -> torch.Tensor:
    r = x.dim()
    shape = list(x.shape)
    if roi is not None and len(roi) == 0:
        roi = None
    if axes is not None:
        axes = [a + r if a < 0 else a for a in axes]
        if scales is not None:
            full = [1.0] * r
            for i, d in enumerate(axes):
                full[d] = scales[i]
            scales = full
        if sizes is not None:
            full_s = list(shape)
            for i, d in enumerate(axes):
                full_s[d] = sizes[i]
            sizes = full_s
        if roi is not None:
            k = len(axes)
            full_r = [0.0] * r + [1.0] * r
            for i, d in enumerate(axes):
                full_r[d] = roi[i]
                full_r[r + d] = roi[k + i]
            roi = full_r
    else:
        axes = list(range(r))

    if sizes is not None:
        if len(sizes) != r:
            raise ValueError(f"sizes has {len(sizes)} values for a rank-{r} input")
        scales = [sizes[i] / shape[i] if shape[i] else 1.0 for i in range(r)]
        if policy != "stretch":
            sel = [scales[i] for i in axes]
            if policy == "not_larger":
                s = min(sel)
            elif policy == "not_smaller":
                s = max(sel)
            else:
                raise ValueError(f"unknown keep_aspect_ratio_policy {policy!r}")
            scales = [s if i in axes else 1.0 for i in range(r)]
            sizes = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
    else:
        if scales is None or len(scales) != r:
            raise ValueError("Resize needs one scale per input dimension (or sizes)")
        sizes = [int((np.asarray(scales, dtype=np.float64) * np.asarray(shape))[i]) for i in range(r)]

    orig_dtype = x.dtype
    if x.is_floating_point():
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    else:
        work = x if cfg["mode"] == "nearest" else x.to(torch.float64)
    for a in axes:
        sc = float(scales[a])
        ow = int(sizes[a])
        if math.isclose(sc, 1.0) and ow == work.shape[a] and (
                roi is None or (math.isclose(roi[a], 0.0) and math.isclose(roi[a + r], 1.0))):
            continue
        aroi = None if roi is None else [roi[a], roi[a + r]]
        work = _resize_axis(work, a, sc, ow, cfg, aroi)
    if work.dtype != orig_dtype:
        if not orig_dtype.is_floating_point and orig_dtype != torch.bool:
            info = torch.iinfo(orig_dtype)
            work = torch.round(work).clamp(info.min, info.max)
        work = work.to(orig_dtype)
    return work


def _cfg(ctx, *, legacy: bool) -> dict:
    mode = ctx.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    if legacy:  # Resize-10 / Upsample: asymmetric coordinates, "simple" nearest rounding
        return dict(mode=mode, ctm="asymmetric", nearest_mode="simple", cubic_a=-0.75, exclude_outside=0,
                    extrapolation_value=0.0, antialias=False)
    return dict(mode=mode,
                ctm=ctx.attr("coordinate_transformation_mode", "half_pixel"),
                nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"),
                cubic_a=float(ctx.attr("cubic_coeff_a", -0.75)),
                exclude_outside=int(ctx.attr("exclude_outside", 0)),
                extrapolation_value=float(ctx.attr("extrapolation_value", 0.0)),
                antialias=bool(ctx.attr("antialias", 0)) and mode != "nearest")


def _nonempty(t):
    return t is not None and t.numel() > 0


@op("Resize", since=10)
def resize10(ctx, x, scales):
    return _interpolate(x, _cfg(ctx, legacy=True), _floats(scales), None, None, None)


@op("Resize", since=11)
def resize11(ctx, x, roi=None, scales=None, sizes=None):
    cfg = _cfg(ctx, legacy=False)
    axes = ctx.attr("axes", None) if ctx.opset >= 18 else None
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch") if ctx.opset >= 18 else "stretch"
    roi_l = _floats(roi) if _nonempty(roi) else None
    if _nonempty(sizes):
        return _interpolate(x, cfg, None, ints(sizes), axes, roi_l, policy)
    if not _nonempty(scales):
        raise ValueError("Resize needs scales or sizes")
    return _interpolate(x, cfg, _floats(scales), None, axes, roi_l)


@op("Upsample", since=1)
def upsample7(ctx, x, scales=None):
    sc = ctx.attr("scales", None)
    if sc is None:
        if scales is not None:
            sc = _floats(scales)
        else:  # Upsample-1: height_scale / width_scale on an NCHW input
            sc = [1.0, 1.0, float(ctx.attr("height_scale", 1.0)), float(ctx.attr("width_scale", 1.0))]
    return _interpolate(x, _cfg(ctx, legacy=True), list(sc), None, None, None)


@op("Upsample", since=9)
def upsample9(ctx, x, scales):
    return _interpolate(x, _cfg(ctx, legacy=True), _floats(scales), None, None, None)
