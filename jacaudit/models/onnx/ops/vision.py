"""Vision ops: GridSample, AffineGrid, RoiAlign, NonMaxSuppression, DeformConv, Col2Im, CenterCropPad.

The samplers are written as gathers + weighted sums so that gradients flow to both the image and the
sampling coordinates, and torch.func transforms run through them.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..registry import op
from ._util import axes as _axes, ints

_HALF = (torch.float16, torch.bfloat16)


def _wd(*ts: torch.Tensor) -> torch.dtype:
    dts = [t.dtype for t in ts if t is not None and t.is_floating_point()]
    if any(d == torch.float64 for d in dts):
        return torch.float64
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Generic N-D sampler (used by GridSample and DeformConv)
# ---------------------------------------------------------------------------------------------
def _reflect(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect ``x`` by the near border until it lies in [lo, hi] (as onnx's reference does)."""
    rng = hi - lo
    if rng <= 0:
        return torch.full_like(x, lo)
    below = x < lo
    above = x > hi
    dx = torch.where(below, lo - x, torch.where(above, x - hi, torch.zeros_like(x)))
    n = torch.floor(dx / rng)
    r = dx - n * rng
    even = torch.remainder(n, 2) == 0
    from_lo = lo + r
    from_hi = hi - r
    lo_side = torch.where(even, from_lo, from_hi)  # x < lo
    hi_side = torch.where(even, from_hi, from_lo)  # x > hi
    return torch.where(below, lo_side, torch.where(above, hi_side, x))


def _cubic_coeffs(t: torch.Tensor) -> list[torch.Tensor]:
    a = -0.75
    x = t.abs()
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    c3 = ((a * (2 - x) - 5 * a) * (2 - x) + 8 * a) * (2 - x) - 4 * a
    return [c0, c1, c2, c3]


def _sample(X: torch.Tensor, coords: list[torch.Tensor], mode: str, padding: str, borders) -> torch.Tensor:
    """Sample X (N, C, *dims) at continuous pixel coordinates.

    coords: one (N, Q) tensor per spatial dim (in dims order), already in pixel units (and already
    clamped/reflected for border/reflection padding). Returns (N, C, Q).
    """
    n, c = X.shape[0], X.shape[1]
    dims = list(X.shape[2:])
    flat = X.reshape(n, c, -1)
    q = coords[0].shape[1]
    per_dim = []  # per dim: list of (int index tensor, weight tensor or None)
    for d, x in enumerate(coords):
        if mode == "nearest":
            per_dim.append([(torch.trunc(x).to(torch.int64), None)])
        elif mode == "linear":
            x0 = torch.floor(x)
            f = x - x0
            i0 = x0.to(torch.int64)
            per_dim.append([(i0, 1 - f), (i0 + 1, f)])
        else:  # cubic
            x0 = torch.floor(x)
            cs = _cubic_coeffs(x - x0)
            i0 = x0.to(torch.int64)
            per_dim.append([(i0 + k - 1, cs[k]) for k in range(4)])
    out = None
    for combo in itertools.product(*per_dim):
        flat_idx = torch.zeros((n, q), dtype=torch.int64, device=X.device)
        valid = None
        w = None
        for d, (idx, wt) in enumerate(combo):
            size = dims[d]
            if padding == "zeros":
                ok = (idx >= 0) & (idx < size)
                valid = ok if valid is None else valid & ok
                idx = idx.clamp(0, size - 1)
            elif padding == "border":
                idx = idx.clamp(0, size - 1)
            else:  # reflection of the integer index
                lo, hi = borders[d]
                idx = torch.trunc(_reflect(idx.to(torch.float64), lo, hi)).to(torch.int64).clamp(0, size - 1)
            flat_idx = flat_idx * size + idx
            if wt is not None:
                w = wt if w is None else w * wt
        vals = torch.gather(flat, 2, flat_idx.unsqueeze(1).expand(n, c, q))
        if w is not None:
            vals = vals * w.unsqueeze(1).to(vals.dtype)
        if valid is not None:
            vals = torch.where(valid.unsqueeze(1), vals, torch.zeros((), dtype=vals.dtype, device=X.device))
        out = vals if out is None else out + vals
    return out


def _denorm(g: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    if align_corners:
        return (g + 1) / 2.0 * (size - 1)
    return ((g + 1) * size - 1) / 2.0


# ---------------------------------------------------------------------------------------------
# GridSample (16: 4-D, bilinear/nearest/bicubic; 20: N-D, linear/nearest/cubic)
# ---------------------------------------------------------------------------------------------
@op("GridSample", since=16)
def grid_sample(ctx, X, grid):
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = ctx.attr("padding_mode", "zeros")
    align = bool(ctx.attr("align_corners", 0))
    if mode not in ("linear", "nearest", "cubic"):
        raise ValueError(f"unsupported GridSample mode {mode!r}")
    if padding not in ("zeros", "border", "reflection"):
        raise ValueError(f"unsupported GridSample padding_mode {padding!r}")
    n, c = X.shape[0], X.shape[1]
    dims = list(X.shape[2:])
    nd = len(dims)
    out_sp = list(grid.shape[1:-1])
    wd = _wd(X, grid)
    g = grid.to(wd).reshape(n, -1, nd)
    borders = [((0.0, s - 1.0) if align else (-0.5, s - 0.5)) for s in dims]
    coords = []
    for d in range(nd):
        x = _denorm(g[..., nd - 1 - d], dims[d], align)  # grid's last entry indexes the first spatial dim
        if mode == "nearest":
            x = torch.round(x)  # half to even, as the reference (np.rint)
        lo, hi = borders[d]
        if padding == "border":
            x = torch.where((x < lo) | (x > hi), x.clamp(0, dims[d] - 1), x)
        elif padding == "reflection":
            x = _reflect(x, lo, hi)
        coords.append(x)
    y = _sample(X.to(wd), coords, mode, padding, borders)
    return y.reshape([n, c] + out_sp).to(X.dtype)


# ---------------------------------------------------------------------------------------------
# AffineGrid (20)
# ---------------------------------------------------------------------------------------------
@op("AffineGrid", since=20)
def affine_grid(ctx, theta, size):
    align = bool(ctx.attr("align_corners", 0))
    sz = ints(size)
    sp = sz[2:]
    wd = _wd(theta)
    lin = []
    for s in sp:
        if align:
            a = torch.linspace(-1.0, 1.0, s, dtype=torch.float64) if s > 1 else torch.full((s,), -1.0,
                                                                                           dtype=torch.float64)
        else:
            a = (torch.arange(s, dtype=torch.float64) * 2 + 1) / s - 1
        lin.append(a.to(wd).to(theta.device))
    mesh = torch.meshgrid(*lin, indexing="ij")  # each of shape sp, in (D,)H,W order
    comps = [m.reshape(-1) for m in reversed(mesh)]  # x (W) first
    base = torch.stack(comps + [torch.ones_like(comps[0])], dim=-1)  # (P, nd+1)
    grid = torch.matmul(base, theta.to(wd).transpose(-1, -2))  # (N, P, nd)
    return grid.reshape([theta.shape[0]] + sp + [len(sp)]).to(theta.dtype)


# ---------------------------------------------------------------------------------------------
# RoiAlign (10, 16: coordinate_transformation_mode)
# ---------------------------------------------------------------------------------------------
def _roi_axis(start: torch.Tensor, bin_size: torch.Tensor, pooled: int, grid: int, limit: int):
    """Sample positions along one axis for every ROI: returns (low idx, high idx, low w, high w, ok)."""
    dev = start.device
    p = torch.arange(pooled, device=dev, dtype=start.dtype).reshape(1, pooled, 1)
    i = torch.arange(grid, device=dev, dtype=start.dtype).reshape(1, 1, grid)
    pos = start.reshape(-1, 1, 1) + p * bin_size.reshape(-1, 1, 1) \
        + (i + 0.5) * bin_size.reshape(-1, 1, 1) / grid
    pos = pos.reshape(start.shape[0], pooled * grid)  # (R, S)
    ok = (pos >= -1.0) & (pos <= float(limit))
    pos = pos.clamp(min=0)
    low = torch.floor(pos).to(torch.int64)
    at_end = low >= limit - 1
    low = torch.where(at_end, torch.full_like(low, limit - 1), low)
    high = torch.where(at_end, low, low + 1)
    pos = torch.where(at_end, low.to(pos.dtype), pos)
    lw = pos - low.to(pos.dtype)
    return low, high, 1 - lw, lw, ok


def _roi_align_block(Xr, rois, scale, offset, clamp_size, oh, ow, gh, gw, mode):
    """Xr: (R, C, H, W) images per ROI, rois (R, 4) working dtype. Returns (R, C, oh, ow)."""
    r, c, h, w = Xr.shape
    x1 = rois[:, 0] * scale - offset
    y1 = rois[:, 1] * scale - offset
    x2 = rois[:, 2] * scale - offset
    y2 = rois[:, 3] * scale - offset
    rw = x2 - x1
    rh = y2 - y1
    if clamp_size:
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    ylo, yhi, yhw, ylw, yok = _roi_axis(y1, rh / oh, oh, gh, h)
    xlo, xhi, xhw, xlw, xok = _roi_axis(x1, rw / ow, ow, gw, w)
    sy, sx = ylo.shape[1], xlo.shape[1]
    ok = (yok.unsqueeze(2) & xok.unsqueeze(1)).reshape(r, 1, sy * sx)
    flat = Xr.reshape(r, c, h * w)
    zero = torch.zeros((), dtype=Xr.dtype, device=Xr.device)
    terms = []
    for yi, yw in ((ylo, yhw), (yhi, ylw)):
        for xi, xw in ((xlo, xhw), (xhi, xlw)):
            idx = (yi.unsqueeze(2) * w + xi.unsqueeze(1)).reshape(r, 1, sy * sx).expand(r, c, sy * sx)
            wt = (yw.unsqueeze(2) * xw.unsqueeze(1)).reshape(r, 1, sy * sx)
            v = torch.gather(flat, 2, idx) * wt
            terms.append(torch.where(ok, v, zero))
    if mode == "avg":
        val = terms[0] + terms[1] + terms[2] + terms[3]
        val = val.reshape(r, c, oh, gh, ow, gw)
        return val.sum(dim=(3, 5)) / max(gh * gw, 1)
    val = torch.maximum(torch.maximum(terms[0], terms[1]), torch.maximum(terms[2], terms[3]))
    val = val.reshape(r, c, oh, gh, ow, gw)
    return val.amax(dim=(3, 5))


@op("RoiAlign", since=10)
def roi_align(ctx, X, rois, batch_indices):
    if ctx.opset >= 16:
        ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    else:
        ctm = "output_half_pixel"
    half = ctm.lower() == "half_pixel"
    mode = ctx.attr("mode", "avg").lower()
    oh = int(ctx.attr("output_height", 1))
    ow = int(ctx.attr("output_width", 1))
    sr = int(ctx.attr("sampling_ratio", 0))
    scale = float(ctx.attr("spatial_scale", 1.0))
    wd = _wd(X, rois)
    Xw = X.to(wd)
    Xr = Xw[batch_indices.to(torch.int64)]  # (R, C, H, W)
    rw = rois.to(wd)
    offset = 0.5 if half else 0.0
    if sr > 0:
        y = _roi_align_block(Xr, rw, scale, offset, not half, oh, ow, sr, sr, mode)
        return y.to(X.dtype)
    # adaptive sampling grid: its size depends on each ROI's extent (read from the detached ROIs)
    outs = []
    sizes = (rois.detach().to(torch.float64) * scale - offset).tolist()
    for k, (x1, y1, x2, y2) in enumerate(sizes):
        rh, rwid = y2 - y1, x2 - x1
        if not half:
            rh, rwid = max(rh, 1.0), max(rwid, 1.0)
        gh = max(int(math.ceil(rh / oh)), 0)
        gw = max(int(math.ceil(rwid / ow)), 0)
        if gh == 0 or gw == 0:
            outs.append(torch.zeros((1, X.shape[1], oh, ow), dtype=wd, device=X.device))
            continue
        outs.append(_roi_align_block(Xr[k:k + 1], rw[k:k + 1], scale, offset, not half, oh, ow, gh, gw, mode))
    if not outs:
        return torch.zeros((0, X.shape[1], oh, ow), dtype=X.dtype, device=X.device)
    return torch.cat(outs, dim=0).to(X.dtype)


# ---------------------------------------------------------------------------------------------
# NonMaxSuppression (10, 11): integer output, not differentiable
# ---------------------------------------------------------------------------------------------
def _suppress_matrix(b: torch.Tensor, center: bool, thr: torch.Tensor) -> torch.Tensor:
    """b: (Nb, 4) -> bool (Nb, Nb): True where IoU(i, j) > thr (onnx's degenerate-box rules)."""
    if center:
        xc, yc, wh, hh = b[:, 0], b[:, 1], b[:, 2] / 2, b[:, 3] / 2
        x_min, x_max = xc - wh, xc + wh
        y_min, y_max = yc - hh, yc + hh
    else:
        y_min = torch.minimum(b[:, 0], b[:, 2])
        y_max = torch.maximum(b[:, 0], b[:, 2])
        x_min = torch.minimum(b[:, 1], b[:, 3])
        x_max = torch.maximum(b[:, 1], b[:, 3])
    ix_min = torch.maximum(x_min[:, None], x_min[None, :])
    ix_max = torch.minimum(x_max[:, None], x_max[None, :])
    iy_min = torch.maximum(y_min[:, None], y_min[None, :])
    iy_max = torch.minimum(y_max[:, None], y_max[None, :])
    inter_ok = (ix_max > ix_min) & (iy_max > iy_min)
    inter = (ix_max - ix_min) * (iy_max - iy_min)
    area = (x_max - x_min) * (y_max - y_min)
    union = area[:, None] + area[None, :] - inter
    ok = inter_ok & (inter > 0) & (area[:, None] > 0) & (area[None, :] > 0) & (union > 0)
    iou = inter / torch.where(union > 0, union, torch.ones_like(union))
    return ok & (iou > thr)


@op("NonMaxSuppression", since=10)
def non_max_suppression(ctx, boxes, scores, max_output_boxes_per_class=None, iou_threshold=None,
                        score_threshold=None):
    center = bool(ctx.attr("center_point_box", 0))
    boxes = boxes.detach()
    scores = scores.detach()
    mx = ints(max_output_boxes_per_class)
    max_out = max(mx[0], 0) if mx else 0
    thr = iou_threshold.detach().reshape(-1)[0].to(boxes.dtype) if iou_threshold is not None \
        and iou_threshold.numel() else torch.zeros((), dtype=boxes.dtype)
    sthr = score_threshold.detach().reshape(-1)[0].to(scores.dtype) if score_threshold is not None \
        and score_threshold.numel() else None
    nb, ncls = boxes.shape[0], scores.shape[1]
    sel: list[list[int]] = []
    if max_out > 0:
        for bi in range(nb):
            sup = _suppress_matrix(boxes[bi], center, thr).tolist()
            for ci in range(ncls):
                sc = scores[bi, ci]
                order = torch.sort(sc, descending=True, stable=True).indices
                if sthr is not None:
                    keep = (sc > sthr)[order]
                    order = order[keep]
                chosen: list[int] = []
                for idx in order.tolist():
                    if len(chosen) >= max_out:
                        break
                    if any(sup[idx][j] for j in chosen):
                        continue
                    chosen.append(idx)
                    sel.append([bi, ci, idx])
    if not sel:
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    return torch.tensor(sel, dtype=torch.int64, device=boxes.device)


# ---------------------------------------------------------------------------------------------
# DeformConv (19, 22)
# ---------------------------------------------------------------------------------------------
@op("DeformConv", since=19)
def deform_conv(ctx, X, W, offset, B=None, mask=None):
    nd = X.dim() - 2
    ks = ctx.attr("kernel_shape", None) or list(W.shape[2:])
    dil = ctx.attr("dilations", None) or [1] * nd
    pads = ctx.attr("pads", None) or [0] * (2 * nd)
    strides = ctx.attr("strides", None) or [1] * nd
    group = int(ctx.attr("group", 1))
    og = int(ctx.attr("offset_group", 1))
    n, cin = X.shape[0], X.shape[1]
    oc = W.shape[0]
    out_sp = list(offset.shape[2:])
    K = math.prod(ks)
    Q = math.prod(out_sp)
    wd = _wd(X, W, offset)
    dev = X.device
    off = offset.to(wd).reshape([n, og, K, nd] + out_sp).reshape(n, og, K, nd, Q)
    # base sampling position of every (kernel tap, output position) per spatial dim
    coords = []
    kgrid = torch.meshgrid(*[torch.arange(k, device=dev) for k in ks], indexing="ij")
    ogrid = torch.meshgrid(*[torch.arange(o, device=dev) for o in out_sp], indexing="ij")
    for d in range(nd):
        base = (ogrid[d].reshape(1, Q) * strides[d] - pads[d]) + kgrid[d].reshape(K, 1) * dil[d]  # (K, Q)
        pos = base.to(wd).reshape(1, 1, K, Q) + off[:, :, :, d, :]  # (n, og, K, Q)
        coords.append(pos.reshape(n * og, K * Q))
    Xg = X.to(wd).reshape([n * og, cin // og] + list(X.shape[2:]))
    cols = _sample(Xg, coords, "linear", "zeros", None)  # (n*og, cin/og, K*Q)
    if mask is not None:
        m = mask.to(wd).reshape(n * og, 1, K * Q)
        cols = cols * m
    cols = cols.reshape(n, group, cin // group, K, Q)
    Wg = W.to(wd).reshape(group, oc // group, cin // group, K)
    y = torch.einsum("gock,ngckq->ngoq", Wg, cols).reshape([n, oc] + out_sp)
    if B is not None:
        y = y + B.to(wd).reshape([1, oc] + [1] * nd)
    return y.to(X.dtype)


# ---------------------------------------------------------------------------------------------
# Col2Im (18)
# ---------------------------------------------------------------------------------------------
@op("Col2Im", since=18)
def col2im(ctx, data, image_shape, block_shape):
    img = ints(image_shape)
    blk = ints(block_shape)
    nd = len(img)
    dil = ctx.attr("dilations", None) or [1] * nd
    pads = ctx.attr("pads", None) or [0] * (2 * nd)
    strides = ctx.attr("strides", None) or [1] * nd
    n = data.shape[0]
    K = math.prod(blk)
    c = data.shape[1] // K
    L = data.shape[2]
    padded = [img[d] + pads[d] + pads[d + nd] for d in range(nd)]
    ncol = [(padded[d] - (dil[d] * (blk[d] - 1) + 1)) // strides[d] + 1 for d in range(nd)]
    if math.prod(ncol) != L:
        raise ValueError(f"Col2Im: input has {L} blocks, expected {math.prod(ncol)}")
    dev = data.device
    kg = torch.meshgrid(*[torch.arange(k, device=dev) for k in blk], indexing="ij")
    cg = torch.meshgrid(*[torch.arange(m, device=dev) for m in ncol], indexing="ij")
    flat = torch.zeros((K, L), dtype=torch.int64, device=dev)
    for d in range(nd):
        pos = kg[d].reshape(K, 1) * dil[d] + cg[d].reshape(1, L) * strides[d]
        flat = flat * padded[d] + pos
    src = data.reshape(n, c, K * L)
    out = torch.zeros((n, c, math.prod(padded)), dtype=data.dtype, device=dev)
    out = out.index_add(2, flat.reshape(-1), src)
    out = out.reshape([n, c] + padded)
    for d in range(nd):
        out = out.narrow(2 + d, pads[d], img[d])
    return out


# ---------------------------------------------------------------------------------------------
# CenterCropPad (18)
# ---------------------------------------------------------------------------------------------
@op("CenterCropPad", since=18)
def center_crop_pad(ctx, x, shape):
    rank = x.dim()
    ax = ctx.attr("axes", None)
    ax = list(range(rank)) if ax is None else _axes(ax, rank)
    sh = ints(shape)
    y = x
    for a, s in zip(ax, sh):
        dim = y.shape[a]
        if s < dim:
            start = (dim - s) // 2
            y = y.narrow(a, start, s)
        elif s > dim:
            d = s - dim
            before = d // 2
            after = d - before
            zshape = list(y.shape)
            zshape[a] = before
            zb = torch.zeros(zshape, dtype=y.dtype, device=y.device)
            zshape[a] = after
            za = torch.zeros(zshape, dtype=y.dtype, device=y.device)
            y = torch.cat([zb, y, za], dim=a)
    return y

