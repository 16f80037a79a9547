"""Reductions: ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare.

Axes come from the ``axes`` attribute before the op's "axes as input" version (13 for ReduceSum, 18 for the
rest) and from the optional second input afterwards. An empty axes list reduces every axis unless
``noop_with_empty_axes`` is set, in which case nothing is reduced (the op degenerates to its elementwise
part, as onnx's reference and function bodies do: e.g. ReduceSumSquare -> x*x, ReduceL2 -> |x|).
Reductions over zero-size axes give the identity of the reduction (0 for sums, 1 for products, -inf/+inf
or the integer extremes for Max/Min, -inf for the logarithmic ones).
"""
from __future__ import annotations

import torch

from ..registry import op
from ._util import ints

_LOW = (torch.float16, torch.bfloat16)


def _resolve_axes(ctx, x: torch.Tensor, axes_in, input_since: int) -> list[int] | None:
    """Sorted, normalised axes to reduce; ``None`` means 'reduce nothing' (noop); [] never returned."""
    if ctx.opset >= input_since:
        ax = ints(axes_in) if axes_in is not None else []
    else:
        ax = list(ctx.attr("axes", []) or [])
        if not ax and axes_in is not None:  # tolerate the input form in an old-opset model
            ax = ints(axes_in)
    r = x.dim()
    if not ax:
        if ctx.attr("noop_with_empty_axes", 0) and ctx.opset >= input_since:
            return None
        return list(range(r))
    out = sorted({(a + r if a < 0 else a) for a in ax})
    for a in out:
        if not 0 <= a < max(r, 1):
            raise ValueError(f"axis {a} out of range for rank {r}")
    return out


def _out_shape(x: torch.Tensor, dims: list[int], keep: bool) -> list[int]:
    if keep:
        return [1 if i in dims else s for i, s in enumerate(x.shape)]
    return [s for i, s in enumerate(x.shape) if i not in dims]


def _empty_reduced(x: torch.Tensor, dims: list[int]) -> bool:
    return any(x.shape[d] == 0 for d in dims)


def _finish(res: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    """Results computed with keepdim=True -> squeeze when keepdims=0."""
    if keep or not dims:
        return res
    return res.squeeze(tuple(dims)) if dims else res


def _fill(x: torch.Tensor, dims: list[int], keep: bool, value, dtype=None) -> torch.Tensor:
    shape = _out_shape(x, dims, keep)
    # Built from x so the result stays batched under vmap and connected to the graph (zero gradient).
    base = (x.sum() * 0) if x.is_floating_point() else None
    out = torch.full(shape, value, dtype=dtype or x.dtype, device=x.device)
    if base is not None and (dtype is None or dtype == x.dtype):
        out = out + base.to(out.dtype)
    return out


def _sum(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Sum with keepdim=True in x's dtype (integers wrap like ONNX's, floats accumulate >= fp32)."""
    if x.dtype == torch.bool:
        return x.to(torch.int64).sum(dim=dims, keepdim=True).to(torch.bool)
    if x.dtype in _LOW:
        return x.float().sum(dim=dims, keepdim=True).to(x.dtype)
    if x.is_floating_point() or x.is_complex():
        return x.sum(dim=dims, keepdim=True)
    return x.to(torch.int64).sum(dim=dims, keepdim=True).to(x.dtype)


def _reduce(ctx, kind: str, x: torch.Tensor, axes_in, input_since: int) -> torch.Tensor:
    keep = bool(ctx.attr("keepdims", 1))
    dims = _resolve_axes(ctx, x, axes_in, input_since)
    isfloat = x.is_floating_point() or x.is_complex()
    if dims is None:  # noop_with_empty_axes: elementwise part only
        return _elementwise(kind, x)
    if x.dim() == 0:
        return _elementwise(kind, x)
    empty = _empty_reduced(x, dims)

    if kind == "sum":
        res = _sum(x, dims)
    elif kind == "sumsquare":
        res = _sum(x * x, dims)
    elif kind == "l1":
        res = _sum(x.abs(), dims)
    elif kind == "l2":
        if isfloat:
            xx = x.float() if x.dtype in _LOW else x
            res = torch.linalg.vector_norm(xx, ord=2, dim=dims, keepdim=True).to(x.dtype)
        else:
            s = (x.to(torch.float64) ** 2).sum(dim=dims, keepdim=True)
            res = torch.sqrt(s).to(x.dtype)
    elif kind == "mean":
        n = 1
        for d in dims:
            n *= x.shape[d]
        s = _sum(x, dims)
        if isfloat:
            res = s / n if n else s * float("nan")
        elif n:
            res = torch.div(s, n, rounding_mode="trunc").to(x.dtype)
        else:
            res = s
    elif kind in ("max", "min"):
        if empty:
            if x.dtype == torch.bool:
                v = kind == "min"
            elif isfloat:
                v = float("-inf") if kind == "max" else float("inf")
            else:
                info = torch.iinfo(x.dtype)
                v = info.min if kind == "max" else info.max
            return _fill(x, dims, keep, v)
        if x.dtype == torch.bool:
            xi = x.to(torch.uint8)
            res = (xi.amax(dim=dims, keepdim=True) if kind == "max" else xi.amin(dim=dims, keepdim=True)).bool()
        else:
            res = x.amax(dim=dims, keepdim=True) if kind == "max" else x.amin(dim=dims, keepdim=True)
    elif kind == "prod":
        xx = x.float() if x.dtype in _LOW else x
        res = xx
        for d in dims:
            res = torch.prod(res, dim=d, keepdim=True, dtype=xx.dtype if not isfloat else None)
        res = res.to(x.dtype)
    elif kind == "logsum":
        xx = x.float() if x.dtype in _LOW else x.to(torch.float64) if not isfloat else x
        res = torch.log(xx.sum(dim=dims, keepdim=True)).to(x.dtype)
    elif kind == "logsumexp":
        if empty:
            return _fill(x, dims, keep, float("-inf"))
        xx = x.float() if x.dtype in _LOW else x.to(torch.float64) if not isfloat else x
        res = torch.logsumexp(xx, dim=dims, keepdim=True).to(x.dtype)
    else:  # pragma: no cover
        raise ValueError(kind)
    return _finish(res, dims, keep)


def _elementwise(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind in ("sum", "mean", "max", "min", "prod", "logsumexp"):
        return x.clone()
    if kind == "sumsquare":
        return x * x
    if kind in ("l1", "l2"):
        return x.abs()
    if kind == "logsum":
        return torch.log(x)
    raise ValueError(kind)


def _register(name: str, kind: str, input_since: int):
    def old(ctx, x, axes=None):
        return _reduce(ctx, kind, x, axes, input_since)

    def new(ctx, x, axes=None):
        return _reduce(ctx, kind, x, axes, input_since)

    old.__name__ = new.__name__ = name
    op(name, since=1)(old)
    op(name, since=input_since)(new)


_register("ReduceSum", "sum", 13)
_register("ReduceMean", "mean", 18)
_register("ReduceMax", "max", 18)
_register("ReduceMin", "min", 18)
_register("ReduceProd", "prod", 18)
_register("ReduceL1", "l1", 18)
_register("ReduceL2", "l2", 18)
_register("ReduceLogSum", "logsum", 18)
_register("ReduceLogSumExp", "logsumexp", 18)
_register("ReduceSumSquare", "sumsquare", 18)
