"""Shape and layout ops: Reshape, Flatten, Transpose, Concat, Split, Squeeze, Unsqueeze, Slice, Pad, Tile,
Expand, Shape, Size, ReverseSequence.

Everything here moves data without arithmetic, so the float path is differentiable by construction: only
views, ``torch.cat``, ``index_select`` and ``gather`` touch the data; integer "shape-like" inputs are read
as python ints.
"""
from __future__ import annotations

import math

import torch

from ..registry import op
from ._util import axes as _axes, axis as _axis, ints


def _idx(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# Reshape / Flatten / Transpose
# ---------------------------------------------------------------------------------------------
def _reshape_target(in_shape, shape: list[int], allowzero: int) -> list[int]:
    out = list(shape)
    if not allowzero:
        for i, d in enumerate(out):
            if d == 0:
                out[i] = int(in_shape[i])
    if -1 in out:
        known = 1
        for d in out:
            if d != -1:
                known *= d
        total = 1
        for d in in_shape:
            total *= int(d)
        out[out.index(-1)] = total // known if known else 0
    return out


@op("Reshape", since=1)
def reshape(ctx, x, shape=None):
    if ctx.opset < 5 or shape is None:
        target = ints(ctx.attr("shape", []))
    else:
        target = ints(shape)
    return x.reshape(_reshape_target(x.shape, target, int(ctx.attr("allowzero", 0))))


@op("Flatten", since=1)
def flatten(ctx, x):
    a = _axis(int(ctx.attr("axis", 1)), x.dim())
    outer = math.prod(int(d) for d in x.shape[:a])
    inner = math.prod(int(d) for d in x.shape[a:])
    return x.reshape(outer, inner)


@op("Transpose", since=1)
def transpose(ctx, x):
    perm = ctx.attr("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute(*_axes(perm, x.dim()))


# ---------------------------------------------------------------------------------------------
# Concat / Split / Squeeze / Unsqueeze
# ---------------------------------------------------------------------------------------------
@op("Concat", since=1)
def concat(ctx, *xs):
    xs = [x for x in xs if x is not None]
    rank = max(x.dim() for x in xs)
    a = _axis(int(ctx.attr("axis", 1 if ctx.opset < 4 else 0)), rank)
    # ONNX allows empty operands; torch.cat accepts them as long as the rank matches.
    xs = [x for x in xs if x.dim() == rank] or xs
    if len(xs) == 1:
        return xs[0]
    return torch.cat(xs, dim=a)


def _split_sizes(dim: int, split: list[int] | None, n: int) -> list[int]:
    if split:
        return split
    chunk = -(-dim // n) if n else dim
    sizes = [chunk] * (n - 1)
    sizes.append(dim - chunk * (n - 1))
    return sizes


@op("Split", since=1)
def split(ctx, x, split_in=None):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    if ctx.opset >= 13:
        sp = ints(split_in) if split_in is not None else None
    elif ctx.opset < 2 and split_in is not None:  # opset 1: split could be a second input
        sp = ints(split_in)
    else:
        sp = ctx.attr("split")
        sp = [int(v) for v in sp] if sp else None
    n = int(ctx.attr("num_outputs", 0)) if ctx.opset >= 18 else 0
    if not n:
        n = ctx.n_outputs
    sizes = _split_sizes(int(x.shape[a]), sp, n)
    return tuple(torch.split(x, sizes, dim=a))


@op("Squeeze", since=1)
def squeeze(ctx, x, axes_in=None):
    ax = ints(axes_in) if ctx.opset >= 13 else ctx.attr("axes")
    if ax is None or (ctx.opset >= 13 and axes_in is None):
        ax = [i for i, d in enumerate(x.shape) if d == 1]
    ax = sorted(set(_axes(ax, x.dim())))
    if not ax:
        return x
    keep = [int(d) for i, d in enumerate(x.shape) if i not in ax]
    return x.reshape(keep)


@op("Unsqueeze", since=1)
def unsqueeze(ctx, x, axes_in=None):
    ax = ints(axes_in) if ctx.opset >= 13 else list(ctx.attr("axes", []))
    out_rank = x.dim() + len(ax)
    ax = set(_axes(ax, out_rank))
    shape = []
    it = iter(int(d) for d in x.shape)
    for i in range(out_rank):
        shape.append(1 if i in ax else next(it))
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Slice
# ---------------------------------------------------------------------------------------------
def _slice_impl(x, starts, ends, axes_l, steps):
    rank = x.dim()
    if axes_l is None:
        axes_l = list(range(len(starts)))
    axes_l = _axes(axes_l, rank)
    if steps is None:
        steps = [1] * len(starts)
    index: list = [slice(None)] * rank
    neg: list[tuple[int, list[int]]] = []
    for a, s, e, st in zip(axes_l, starts, ends, steps):
        dim = int(x.shape[a])
        if st == 0:
            raise ValueError("Slice step cannot be 0")
        if s < 0:
            s += dim
        if e < 0:
            e += dim
        if st > 0:
            s = min(max(s, 0), dim)
            e = min(max(e, 0), dim)
            index[a] = slice(s, max(e, s), st)
        else:
            s = min(max(s, 0), dim - 1)
            e = min(max(e, -1), dim - 1)
            neg.append((a, list(range(s, e, st))))
    out = x[tuple(index)] if any(i != slice(None) for i in index) else x
    for a, idx in neg:
        out = torch.index_select(out, a, _idx(idx, x.device))
    return out


@op("Slice", since=1)
def slice_(ctx, x, starts=None, ends=None, axes_in=None, steps=None):
    if ctx.opset < 10:
        return _slice_impl(x, list(ctx.attr("starts")), list(ctx.attr("ends")), ctx.attr("axes"), None)
    return _slice_impl(x, ints(starts), ints(ends), ints(axes_in) if axes_in is not None else None,
                       ints(steps) if steps is not None else None)


# ---------------------------------------------------------------------------------------------
# Pad
# ---------------------------------------------------------------------------------------------
def _pad_source(i: int, n: int, mode: str) -> int:
    """Source index for output position ``i`` (relative to the original start) of an axis of length n."""
    if 0 <= i < n:
        return i
    if mode == "edge":
        return min(max(i, 0), n - 1)
    if mode == "wrap":
        return i % n
    # reflect (no edge repeat), period 2(n-1)
    if n == 1:
        return 0
    p = 2 * (n - 1)
    i = i % p
    return i if i < n else p - i


def _pad_impl(x, pads: list[int], mode: str, value, axes_l=None):
    rank = x.dim()
    if axes_l is None:
        axes_l = list(range(rank))
    axes_l = _axes(axes_l, rank)
    k = len(axes_l)
    if len(pads) != 2 * k:
        raise ValueError(f"Pad: {len(pads)} pads for {k} axes")
    out = x
    # negative pads crop first
    index: list = [slice(None)] * rank
    cropped = False
    for j, a in enumerate(axes_l):
        b, e = pads[j], pads[k + j]
        if b < 0 or e < 0:
            n = int(x.shape[a])
            index[a] = slice(-b if b < 0 else 0, n + e if e < 0 else n)
            cropped = True
    if cropped:
        out = out[tuple(index)]
    for j, a in enumerate(axes_l):
        b, e = max(pads[j], 0), max(pads[k + j], 0)
        if b == 0 and e == 0:
            continue
        n = int(out.shape[a])
        if mode == "constant" or n == 0:
            parts = []
            if value is None:
                fill = torch.zeros((), dtype=out.dtype, device=out.device)
            else:
                fill = value.reshape(()).to(out.dtype)
            if b:
                shp = list(out.shape)
                shp[a] = b
                parts.append(fill.expand(shp))
            parts.append(out)
            if e:
                shp = list(out.shape)
                shp[a] = e
                parts.append(fill.expand(shp))
            out = torch.cat(parts, dim=a)
        else:
            src = [_pad_source(i, n, mode) for i in range(-b, n + e)]
            out = torch.index_select(out, a, _idx(src, out.device))
    return out


@op("Pad", since=1)
def pad(ctx, x, pads=None, constant_value=None, axes_in=None):
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11:
        p = ctx.attr("pads") if ctx.opset >= 2 else ctx.attr("paddings", ctx.attr("pads"))
        v = ctx.attr("value", 0.0)
        value = torch.tensor(v, dtype=x.dtype if x.dtype != torch.bool else torch.float32, device=x.device)
        return _pad_impl(x, [int(i) for i in p], mode, value)
    axes_l = ints(axes_in) if axes_in is not None else None
    return _pad_impl(x, ints(pads), mode, constant_value, axes_l)


# ---------------------------------------------------------------------------------------------
# Tile / Expand
# ---------------------------------------------------------------------------------------------
@op("Tile", since=1)
def tile(ctx, x, repeats, axis_in=None):
    if ctx.opset < 6:  # Tile-1: tiles, axis inputs
        reps = [1] * x.dim()
        reps[_axis(ints(axis_in)[0], x.dim())] = ints(repeats)[0]
        return x.repeat(*reps)
    reps = ints(repeats)
    if not reps:
        return x
    return x.repeat(*reps)


@op("Expand", since=1)
def expand(ctx, x, shape):
    target = ints(shape)
    out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    if tuple(out_shape) == tuple(x.shape):
        return x
    return x.expand(out_shape)


# ---------------------------------------------------------------------------------------------
# Shape / Size
# ---------------------------------------------------------------------------------------------
@op("Shape", since=1)
def shape(ctx, x):
    dims = [int(d) for d in x.shape]
    r = len(dims)
    start = int(ctx.attr("start", 0))
    end = ctx.attr("end")
    end = r if end is None else int(end)
    if start < 0:
        start += r
    if end < 0:
        end += r
    start = min(max(start, 0), r)
    end = min(max(end, 0), r)
    return torch.tensor(dims[start:end] if end > start else [], dtype=torch.int64, device=x.device)


@op("Size", since=1)
def size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


# ---------------------------------------------------------------------------------------------
# ReverseSequence
# ---------------------------------------------------------------------------------------------
@op("ReverseSequence", since=10)
def reverse_sequence(ctx, x, sequence_lens):
    rank = x.dim()
    ba = _axis(int(ctx.attr("batch_axis", 1)), rank)
    ta = _axis(int(ctx.attr("time_axis", 0)), rank)
    T = int(x.shape[ta])
    lens = sequence_lens.to(torch.int64).reshape(1, -1).clamp(0, T)
    t = torch.arange(T, dtype=torch.int64, device=x.device).reshape(-1, 1)
    idx = torch.where(t < lens, lens - 1 - t, t)  # [T, B]
    if ta > ba:
        idx = idx.t()
    shp = [1] * rank
    shp[ta] = T
    shp[ba] = int(x.shape[ba])
    idx = idx.reshape(shp).expand(x.shape)
    return torch.gather(x, ta, idx)
