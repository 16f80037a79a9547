"""Indexing ops: Gather, GatherElements, GatherND, Scatter, ScatterElements, ScatterND, OneHot, NonZero,
Compress, TopK, Unique, ArgMax, ArgMin.

The float data only ever goes through ``index_select`` / ``gather`` / advanced indexing / out-of-place
``scatter`` / ``scatter_reduce``, so jacrev/jacfwd run through them; integer index tensors are normalised
(negative -> positive) with torch ops so vmap can batch them too.
"""
from __future__ import annotations

import math

import torch

from ..registry import op
from ._util import axis as _axis, ints


def _norm_index(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


# ---------------------------------------------------------------------------------------------
# Gather family
# ---------------------------------------------------------------------------------------------
@op("Gather", since=1)
def gather(ctx, x, indices):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    idx = _norm_index(indices, int(x.shape[a]))
    flat = torch.index_select(x, a, idx.reshape(-1))
    return flat.reshape(tuple(x.shape[:a]) + tuple(idx.shape) + tuple(x.shape[a + 1:]))


@op("GatherElements", since=11)
def gather_elements(ctx, x, indices):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    return torch.gather(x, a, _norm_index(indices, int(x.shape[a])))


def _linear_index(idx: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """idx[..., k] (possibly negative) -> row-major linear index into a block of shape ``dims``."""
    lin = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    for j, d in enumerate(dims):
        lin = lin * d + _norm_index(idx[..., j], d)
    return lin


@op("GatherND", since=11)
def gather_nd(ctx, x, indices):
    b = int(ctx.attr("batch_dims", 0))
    k = int(indices.shape[-1])
    bshape = [int(d) for d in x.shape[:b]]
    B = math.prod(bshape)
    block = [int(d) for d in x.shape[b:b + k]]
    rest = [int(d) for d in x.shape[b + k:]]
    mid = [int(d) for d in indices.shape[b:-1]]
    M = math.prod(mid)
    data = x.reshape([B, math.prod(block)] + rest)
    lin = _linear_index(indices.reshape(B, M, k), block)  # [B, M]
    bidx = torch.arange(B, device=x.device).reshape(B, 1).expand(B, M)
    out = data[bidx, lin]  # [B, M, *rest]
    return out.reshape(bshape + mid + rest)


# ---------------------------------------------------------------------------------------------
# Scatter family
# ---------------------------------------------------------------------------------------------
_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_mul_float(x, a: int, idx, upd):
    """scatter_reduce(..., "prod") rebuilt from index_put passes: torch's forward-mode derivative of
    scatter_reduce "prod" is wrong (jacfwd disagrees with jacrev and finite differences), this one is not.
    Pass r applies, for every target, its r-th update (targets are unique within a pass)."""
    pos = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    tgt = torch.gather(pos, a, idx).reshape(-1)
    u = upd.reshape(-1).to(x.dtype)
    n = int(tgt.shape[0])
    if n == 0:
        return x
    st, order = torch.sort(tgt, stable=True)
    ar = torch.arange(n, dtype=torch.int64, device=x.device)
    start = torch.ones(n, dtype=torch.bool, device=x.device)
    start[1:] = st[1:] != st[:-1]
    run0 = torch.cummax(torch.where(start, ar, torch.zeros_like(ar)), 0).values
    rank = torch.empty_like(ar).scatter_(0, order, ar - run0)
    out = x.reshape(-1)
    ones = torch.ones_like(out)
    for r in range(int(rank.max().item()) + 1):
        sel = torch.nonzero(rank == r).reshape(-1)
        factor = ones.index_put((tgt[sel],), u[sel])
        out = out * factor
    return out.reshape(x.shape)


def _scatter_elements(x, a, idx, upd, reduction: str):
    if reduction in ("", "none", None):
        return torch.scatter(x, a, idx, upd)
    if reduction == "mul" and (x.is_floating_point() or x.is_complex()):
        return _scatter_mul_float(x, a, idx, upd)
    if x.dtype == torch.bool:  # bool add == or, mul == and (ONNX on bool is rare)
        red = {"add": "amax", "max": "amax", "mul": "amin", "min": "amin"}[reduction]
        return torch.scatter_reduce(x.to(torch.uint8), a, idx, upd.to(torch.uint8), red,
                                    include_self=True).to(torch.bool)
    return torch.scatter_reduce(x, a, idx, upd.to(x.dtype), _REDUCE[reduction], include_self=True)


@op("Scatter", since=1)
def scatter(ctx, x, indices, updates):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    return _scatter_elements(x, a, _norm_index(indices, int(x.shape[a])), updates, "none")


@op("ScatterElements", since=11)
def scatter_elements(ctx, x, indices, updates):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    return _scatter_elements(x, a, _norm_index(indices, int(x.shape[a])), updates,
                             ctx.attr("reduction", "none"))


@op("ScatterND", since=11)
def scatter_nd(ctx, x, indices, updates):
    reduction = ctx.attr("reduction", "none")
    k = int(indices.shape[-1])
    block = [int(d) for d in x.shape[:k]]
    rest = [int(d) for d in x.shape[k:]]
    data = x.reshape([math.prod(block)] + rest)
    lin = _linear_index(indices.reshape(-1, k), block)  # [N]
    n = int(lin.shape[0])
    upd = updates.reshape([n] + rest)
    idx = lin.reshape([n] + [1] * len(rest)).expand([n] + rest)
    return _scatter_elements(data, 0, idx, upd, reduction).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# OneHot / NonZero / Compress
# ---------------------------------------------------------------------------------------------
@op("OneHot", since=9)
def one_hot(ctx, indices, depth, values):
    d = int(depth.reshape(-1).tolist()[0])
    r = indices.dim()
    a = _axis(int(ctx.attr("axis", -1)), r + 1)
    if indices.is_floating_point():
        idx = torch.trunc(indices).to(torch.int64)
    else:
        idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + d, idx)
    shp = [1] * (r + 1)
    shp[a] = d
    classes = torch.arange(d, dtype=torch.int64, device=indices.device).reshape(shp)
    mask = idx.unsqueeze(a) == classes
    vals = values.reshape(-1)
    return torch.where(mask, vals[1], vals[0])


@op("NonZero", since=9)
def nonzero(ctx, x):
    if x.dim() == 0:  # as numpy (and onnxruntime): a scalar counts as shape [1]
        x = x.reshape(1)
    return torch.nonzero(x).t().contiguous()


@op("Compress", since=9)
def compress(ctx, x, condition):
    cond = condition.reshape(-1).to(torch.bool)
    a = ctx.attr("axis")
    if a is None:
        x = x.reshape(-1)
        a = 0
    else:
        a = _axis(int(a), x.dim())
    n = min(int(cond.shape[0]), int(x.shape[a]))
    sel = torch.nonzero(cond[:n]).reshape(-1)
    return torch.index_select(x, a, sel)


# ---------------------------------------------------------------------------------------------
# TopK / Unique / ArgMax / ArgMin
# ---------------------------------------------------------------------------------------------
_SORT_CAST = {torch.uint16: torch.int32, torch.uint32: torch.int64}
_SAME_SIZE_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _take_along(x, a: int, ix):
    """torch.gather, also for the unsigned types torch's gather kernel lacks (via a same-size view)."""
    if x.dtype in _SAME_SIZE_SIGNED:
        return torch.gather(x.view(_SAME_SIZE_SIGNED[x.dtype]), a, ix).view(x.dtype)
    return torch.gather(x, a, ix)


def _stable_sort(x, a: int, descending: bool):
    if x.dtype == torch.uint64:
        # torch cannot sort uint64: sort the order-preserving int64 view (flip the sign bit)
        key = x.view(torch.int64) ^ torch.tensor(-(2 ** 63), dtype=torch.int64, device=x.device)
        _, ix = torch.sort(key, dim=a, descending=descending, stable=True)
        return _take_along(x, a, ix), ix
    if x.dtype in _SORT_CAST:
        _, ix = torch.sort(x.to(_SORT_CAST[x.dtype]), dim=a, descending=descending, stable=True)
        return _take_along(x, a, ix), ix
    if x.dtype == torch.bool:
        _, ix = torch.sort(x.to(torch.uint8), dim=a, descending=descending, stable=True)
        return torch.gather(x, a, ix), ix
    _, ix = torch.sort(x, dim=a, descending=descending, stable=True)
    # values through gather so the derivative flows through one well-supported op
    return torch.gather(x, a, ix), ix


@op("TopK", since=1)
def top_k(ctx, x, k=None):
    a = _axis(int(ctx.attr("axis", -1)), x.dim())
    kk = int(ctx.attr("k")) if ctx.opset < 10 else ints(k)[0]
    largest = bool(ctx.attr("largest", 1)) if ctx.opset >= 11 else True
    _, ix = _stable_sort(x, a, descending=largest)
    ix = ix.narrow(a, 0, kk)
    return _take_along(x, a, ix), ix


@op("Unique", since=11)
def unique(ctx, x):
    a = ctx.attr("axis")
    is_sorted = bool(ctx.attr("sorted", 1))
    if a is None:
        src = x.reshape(-1)
        a = 0
    else:
        a = _axis(int(a), x.dim())
        src = x
    key = src.detach()
    if key.dtype in (torch.bfloat16, torch.float16):
        key = key.to(torch.float32)
    _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True, dim=a)
    inverse = inverse.reshape(-1).to(torch.int64)
    nu = int(counts.shape[0])
    n = int(inverse.shape[0])
    pos = torch.arange(n, dtype=torch.int64, device=x.device)
    first = torch.full((nu,), n, dtype=torch.int64, device=x.device).scatter_reduce(
        0, inverse, pos, "amin", include_self=True)
    counts = counts.to(torch.int64)
    if not is_sorted:
        perm = torch.argsort(first, stable=True)
        rank = torch.empty_like(perm).scatter_(0, perm, torch.arange(nu, dtype=torch.int64, device=x.device))
        first = first[perm]
        counts = counts[perm]
        inverse = rank[inverse]
    y = torch.index_select(src, a, first)
    return y, first, inverse, counts


def _arg(ctx, x, largest: bool):
    a = _axis(int(ctx.attr("axis", 0)), x.dim())
    keep = bool(ctx.attr("keepdims", 1))
    last = bool(ctx.attr("select_last_index", 0))
    data = x
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    if last:
        data = torch.flip(data, dims=(a,))
    fn = torch.argmax if largest else torch.argmin
    if x.dim() == 0:
        out = torch.zeros((), dtype=torch.int64, device=x.device)
    else:
        out = fn(data, dim=a, keepdim=keep)
    if last:
        out = int(x.shape[a]) - 1 - out
    return out.to(torch.int64)


@op("ArgMax", since=1)
def arg_max(ctx, x):
    return _arg(ctx, x, True)


@op("ArgMin", since=1)
def arg_min(ctx, x):
    return _arg(ctx, x, False)
