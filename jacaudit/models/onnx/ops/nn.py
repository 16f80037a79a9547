"""Neural-network ops: convolutions, pooling, normalizations, LRN, depth/space rearrangements.

Everything is pure torch on the float path (vmap/jacrev/jacfwd run through it). Asymmetric padding is
applied explicitly with ``F.pad`` (``-inf`` for max pooling) before calling torch's symmetric kernels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from ....errors import UnsupportedError
from ..registry import op, onnx_to_torch_dtype
from .. import onednn as _onednn
from ._util import axis as _axis, ints

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _work_dtype(dt: torch.dtype) -> torch.dtype:
    """A dtype at least as precise as float32 for internal accumulation."""
    if dt in (torch.float16, torch.bfloat16):
        return torch.float32
    if dt.is_floating_point:
        return dt
    return torch.float64


def _stash_dtype(x: torch.Tensor, stash_type: int) -> torch.dtype:
    sd = onnx_to_torch_dtype(int(stash_type)) or torch.float32
    if not sd.is_floating_point:
        sd = torch.float32
    wd = _work_dtype(x.dtype)
    # never compute in less precision than the input carries
    if torch.finfo(sd).bits < torch.finfo(wd).bits:
        return wd
    return sd if torch.finfo(sd).bits >= 32 else wd


def _torch_pad(pb: Sequence[int], pe: Sequence[int]) -> list[int]:
    """ONNX-order begin/end pads for the trailing spatial dims -> F.pad's last-dim-first list."""
    out: list[int] = []
    for b, e in zip(reversed(list(pb)), reversed(list(pe))):
        out += [int(b), int(e)]
    return out


def _nd_check(nd: int, what: str) -> None:
    if nd not in (1, 2, 3):
        raise UnsupportedError(f"{what} over {nd} spatial dimension(s) is not supported (1-3 only)")


def _spatial(ctx, nd: int, name: str, default: int) -> list[int]:
    v = ctx.attr(name)
    if v is None or len(v) == 0:
        return [default] * nd
    return [int(a) for a in v]


def _pads(ctx, nd: int) -> tuple[list[int], list[int]]:
    p = ctx.attr("pads")
    if p is None or len(p) == 0:
        return [0] * nd, [0] * nd
    p = [int(a) for a in p]
    return p[:nd], p[nd:2 * nd]


def _auto_pad(auto_pad: str, in_sizes, k_eff, strides):
    """Begin/end pads for SAME_UPPER / SAME_LOWER (output = ceil(in / stride)); zeros for VALID."""
    pb, pe = [], []
    for n, k, s in zip(in_sizes, k_eff, strides):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-n // s)
            total = max(0, (out - 1) * s + k - n)
            small, big = total // 2, total - total // 2
            if auto_pad == "SAME_UPPER":
                pb.append(small), pe.append(big)
            else:
                pb.append(big), pe.append(small)
        else:
            pb.append(0), pe.append(0)
    return pb, pe


def _resolve_pads(ctx, in_sizes, k_eff, strides):
    nd = len(in_sizes)
    ap = (ctx.attr("auto_pad", "NOTSET") or "NOTSET").upper()
    if ap in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return _auto_pad(ap, in_sizes, k_eff, strides)
    return _pads(ctx, nd)


def _attr_kernel(ctx, nd: int) -> list[int]:
    k = ctx.attr("kernel_shape")
    if not k:
        raise ValueError("kernel_shape attribute is required")
    return [int(a) for a in k]


class _PoolGeom:
    """Window geometry of a pooling node: explicit begin/end pads plus the ceil-mode extension."""

    def __init__(self, ctx, x: torch.Tensor, kernel: list[int], allow_ceil: bool = True):
        nd = x.dim() - 2
        self.nd = nd
        self.kernel = kernel
        self.strides = _spatial(ctx, nd, "strides", 1)
        self.dilations = _spatial(ctx, nd, "dilations", 1)
        self.in_sizes = list(x.shape[2:])
        self.k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, self.dilations)]
        self.pb, self.pe = _resolve_pads(ctx, self.in_sizes, self.k_eff, self.strides)
        ceil_mode = bool(ctx.attr("ceil_mode", 0)) and allow_ceil
        self.out, self.extra = [], []
        for i in range(nd):
            n, pb, pe, s, ke = self.in_sizes[i], self.pb[i], self.pe[i], self.strides[i], self.k_eff[i]
            span = n + pb + pe - ke
            if ceil_mode:
                o = -(-span // s) + 1
                if (o - 1) * s >= n + pb:  # the last window must start inside the input or left pad
                    o -= 1
            else:
                o = span // s + 1
            o = max(o, 0)
            self.out.append(o)
            self.extra.append(max(0, (o - 1) * s + ke - (n + pb + pe)))

    def padded(self, x: torch.Tensor, value: float) -> torch.Tensor:
        pe = [a + b for a, b in zip(self.pe, self.extra)]
        if not any(self.pb) and not any(pe):
            return x
        return F.pad(x, _torch_pad(self.pb, pe), value=value)

    def window_mean(self, xp: torch.Tensor) -> torch.Tensor:
        """Mean over each full (strided) window of an already padded tensor; dilation 1 only."""
        return _AVGPOOL[self.nd](xp, self.kernel, self.strides, 0, False, True)

    def window_sum(self, xp: torch.Tensor) -> torch.Tensor:
        """Sum over each (dilated, strided) window of an already padded (N, C, *sp) tensor."""
        if all(d == 1 for d in self.dilations):
            return self.window_mean(xp) * math.prod(self.kernel)
        c = xp.shape[1]
        w = torch.ones((c, 1, *self.kernel), dtype=xp.dtype, device=xp.device)
        return _CONV[self.nd](xp, w, None, self.strides, 0, self.dilations, c)

    def count(self, include_pad: bool, dtype, device) -> torch.Tensor:
        """Number of counted elements in each window, shape (1, 1, *out)."""
        full = [n + b + e + x for n, b, e, x in zip(self.in_sizes, self.pb, self.pe, self.extra)]
        m = torch.zeros((1, 1, *full), dtype=dtype, device=device)
        sl = [slice(None), slice(None)]
        for i in range(self.nd):
            if include_pad:
                sl.append(slice(0, self.in_sizes[i] + self.pb[i] + self.pe[i]))
            else:
                sl.append(slice(self.pb[i], self.pb[i] + self.in_sizes[i]))
        m[tuple(sl)] = 1
        w = torch.ones((1, 1, *self.kernel), dtype=dtype, device=device)
        return _CONV[self.nd](m, w, None, self.strides, 0, self.dilations, 1)


def _bcast_c(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector (C,) reshaped to broadcast against (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (rank - 2)))


# ---------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------
# The post-op saves a pass over the output; below this many output elements the call's Python costs more than
# that pass (measured: small MobileNet-class graphs at batch 1 ran ~8% slower forward with every Conv ->
# activation fused, batch 32 forward 4-9% faster).
POST_OP_MIN_OUTPUT = 1 << 17


def conv_activated(ctx, x, w, b, attr: str):
    """The Conv node's output with oneDNN's ``attr`` post-op ("relu", "swish", "hardswish") applied in the
    same kernel where that applies: values only (no input requires grad, or grad mode off; no torch.func
    transform or forward-mode AD), float32 2-D convolutions that torch itself runs in oneDNN, or that the
    "onednn_small" route would (so kernel and layout are the plain path's). Same geometry, padding and layout
    handling as ``conv``. Otherwise None (not for this call), or False (not for this input shape and
    contiguity: the caller need not ask again)."""
    if x.requires_grad and torch.is_grad_enabled() or x.dtype is not torch.float32:
        return None
    if x.dim() != 4:
        return False
    pkey = ("post", x.shape, w.shape, x.is_contiguous())
    ok = ctx.memo.get(pkey)
    if ok is False:
        return False
    if not _onednn.usable(x, w, b):
        return None
    nd, strides, padding, explicit, dil, group, candidate = _conv_geo(ctx, x, w)
    if explicit is not None:
        x = F.pad(x, explicit)
    if "depthwise_nhwc" in FAST_CONV and 1 < group == x.shape[1] == w.shape[0]:
        x = x.contiguous(memory_format=torch.channels_last)
    if ok is None:
        pads = _as_list(padding, 2)
        out = x.shape[0] * w.shape[0]
        for i in range(2):
            k_eff = dil[i] * (w.shape[2 + i] - 1) + 1
            out *= max(0, (x.shape[2 + i] + 2 * pads[i] - k_eff) // strides[i] + 1)
        ok = ctx.memo[pkey] = out >= POST_OP_MIN_OUTPUT and (
            _onednn.torch_uses_onednn(x, w, strides, dil, group) or (
                candidate and "onednn_small" in FAST_CONV
                and _onednn.conv2d_wanted(x, w, strides, padding, dil, group)))
        if not ok:
            return False
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, _as_list(padding, 2), strides, dil, group, attr, [], "")


def _conv_geo(ctx, x, w):
    key = (x.shape, w.shape)
    geo = ctx.memo.get(key)  # (nd, strides, padding, explicit pads or None, dilations, group): per shape
    if geo is None:
        nd = x.dim() - 2
        _nd_check(nd, "Conv")
        kernel = list(w.shape[2:])
        strides = _spatial(ctx, nd, "strides", 1)
        dil = _spatial(ctx, nd, "dilations", 1)
        group = int(ctx.attr("group", 1))
        k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
        pb, pe = _resolve_pads(ctx, list(x.shape[2:]), k_eff, strides)
        if pb == pe:
            geo = (nd, strides, pb, None, dil, group)
        else:
            geo = (nd, strides, 0, _torch_pad(pb, pe), dil, group)
        geo = geo + (_onednn_candidate(x, w, *geo),)
        if len(ctx.memo) >= 16:
            ctx.memo.clear()
        ctx.memo[key] = geo
    return geo


@op("Conv", since=1)
def conv(ctx, x, w, b=None):
    nd, strides, padding, explicit, dil, group, candidate = _conv_geo(ctx, x, w)
    if explicit is not None:
        x = F.pad(x, explicit)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if ("depthwise_nhwc" in FAST_CONV and nd == 2 and 1 < group == x.shape[1] == w.shape[0]
            and x.device.type == "cpu" and x.is_floating_point() and not _wrapped(x, w, b)):
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after the first depthwise layer
    if candidate and x.dtype is torch.float32 and "onednn_small" in FAST_CONV:
        rkey = ("onednn", x.shape, w.shape, x.is_contiguous(), torch.is_grad_enabled() and x.requires_grad)
        route = ctx.memo.get(rkey) if _onednn.usable(x, w, b) else False
        if route is None:
            if nd == 1:  # as the 2-D convolution torch runs it by (N, C, 1, L)
                route = _onednn.ENABLED and _onednn.conv2d_routed(
                    x.unsqueeze(2), w.unsqueeze(2), [1] + strides, [0] + _as_list(padding, 1), [1] + dil, group)
            else:
                route = _onednn.ENABLED and _onednn.conv2d_routed(x, w, strides, padding, dil, group)
            ctx.memo[rkey] = route
        if route:
            if nd == 1:
                return _onednn.conv2d(ctx.memo, x.unsqueeze(2), w.unsqueeze(2), b, [0] + _as_list(padding, 1),
                                      [1] + strides, [1] + dil).squeeze(2)
            return _onednn.conv2d(ctx.memo, x, w, b, padding, strides, dil)
    return _CONV[nd](x, w, b, strides, padding, dil, group)


def _onednn_candidate(x, w, nd, strides, padding, explicit, dil, group) -> bool:
    """Could this geometry take the oneDNN route (``onednn.conv2d_routed``, for some layout and grad mode)?
    Decided once per input shape so that the other convolutions pay nothing for the route."""
    if not _onednn.ENABLED or nd > 2 or group != 1 or w.dim() != nd + 2 or x.dim() != nd + 2:
        return False
    shape = list(x.shape)
    if explicit is not None:  # the padded input's shape
        for i in range(nd):
            shape[2 + i] += explicit[2 * (nd - 1 - i)] + explicit[2 * (nd - 1 - i) + 1]
    if nd == 2:
        xs, ws = shape, list(w.shape)
    else:  # as the 2-D convolution of (N, C, 1, L)
        xs, ws = shape[:2] + [1] + shape[2:], list(w.shape[:2]) + [1] + list(w.shape[2:])
    st, dl = (list(strides), list(dil)) if nd == 2 else ([1] + list(strides), [1] + list(dil))
    pad = _as_list(padding, nd) if nd == 2 else [0] + _as_list(padding, 1)
    meta = torch.empty(xs, device="meta")
    wm = torch.empty(ws, device="meta")
    return _onednn.conv2d_wanted(meta, wm, st, pad, dl, 1, assume_one_thread=True) or \
        _onednn.grad_mode(xs, ws, pad, st, dl) in ("s1x1", "patch")


def _as_list(padding, nd: int) -> list:
    return [padding] * nd if isinstance(padding, int) else list(padding)


# CPU fast paths for convolutions, plain tensors only (under torch.func transforms -- vmap, jacrev, jacfwd --
# nothing changes). Exact: the same kernels on another memory layout. Measured on a MobileNetV2-class graph
# (benchmarks/bench_engine.py; README "Engine"), one named path kept:
# * "depthwise_nhwc": depthwise convolutions (groups == channels) run channels_last. oneDNN's NHWC depthwise
#   kernels are ~2x faster than its NCHW ones, forward and backward; the layout then carries through
#   Clip/Add and the 1x1 convolutions to the next depthwise layer (one conversion per graph). Input gradient
#   -5%, forward -5% on MobileNetV2-class graphs.
# Measured and not kept (no gain on the whole graph): 1x1 convolutions as a matrix product (NCHW and NHWC);
# torch's native kernel instead of oneDNN for 1-4 input channels (faster in isolation, not in the graph);
# a depthwise convolution as k*k shifted multiply-adds (10x slower forward, 16x slower forward+backward);
# channels_last from the first convolution of 1-4 input channels on (MobileNet -4%, ResNet-18 +10%).
# * "onednn_small": the float32 groups-1 2-D convolutions torch's backend selection leaves to its native
#   ``_slow_conv2d`` kernels on CPU (1x1 unstrided below batch 16 on one thread; batch-1 inputs of <= 20480
#   elements with kernels up to 3x3) run oneDNN forward and backward (``onednn.conv2d``): ~2x faster per layer
#   (e.g. a 1x1 64 -> 256 layer on 40x40 at batch 1: 0.48 -> 0.24 ms forward, 0.51 -> 0.23 ms input gradient).
FAST_CONV: set[str] = {"depthwise_nhwc", "onednn_small"}


def _wrapped(*ts) -> bool:
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)


@op("ConvTranspose", since=1)
def conv_transpose(ctx, x, w, b=None):
    nd = x.dim() - 2
    _nd_check(nd, "ConvTranspose")
    kernel = list(w.shape[2:])
    strides = _spatial(ctx, nd, "strides", 1)
    dil = _spatial(ctx, nd, "dilations", 1)
    group = int(ctx.attr("group", 1))
    out_pad = _spatial(ctx, nd, "output_padding", 0)
    if len(out_pad) == 2 * nd:  # some exporters write begin/end pairs
        out_pad = [a + c for a, c in zip(out_pad[:nd], out_pad[nd:])]
    in_sizes = list(x.shape[2:])
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    full = [s * (n - 1) + ke for s, n, ke in zip(strides, in_sizes, k_eff)]
    ap = (ctx.attr("auto_pad", "NOTSET") or "NOTSET").upper()
    out_shape = ctx.attr("output_shape")
    if out_shape:
        out_shape = [int(a) for a in out_shape]
        if len(out_shape) == nd + 2:
            out_shape = out_shape[2:]
    elif ap in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [n * s for n, s in zip(in_sizes, strides)]
    if out_shape:
        pb, pe = [], []
        for i in range(nd):
            total = full[i] + out_pad[i] - out_shape[i]
            if ap == "SAME_UPPER":
                bgn = total // 2
            else:
                bgn = total - total // 2
            pb.append(bgn)
            pe.append(total - bgn)
    elif ap == "VALID":
        pb, pe = [0] * nd, [0] * nd
    else:
        pb, pe = _pads(ctx, nd)
    y = _CONV_T[nd](x, w.to(x.dtype), None, strides, 0, 0, group, dil)
    # crop the pads (negative F.pad) and append output_padding at the end
    crop = _torch_pad([-a for a in pb], [op_ - e for op_, e in zip(out_pad, pe)])
    if any(crop):
        y = F.pad(y, crop)
    if b is not None:
        y = y + _bcast_c(b.to(y.dtype), y.dim())
    return y


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------
@op("AveragePool", since=1)
def average_pool(ctx, x):
    nd = x.dim() - 2
    _nd_check(nd, "AveragePool")
    g = _PoolGeom(ctx, x, _attr_kernel(ctx, nd))
    wd = _work_dtype(x.dtype)
    xp = g.padded(x.to(wd), 0.0)
    cnt = g.count(bool(ctx.attr("count_include_pad", 0)), wd, x.device)
    full = math.prod(g.kernel)
    if all(d == 1 for d in g.dilations):
        y = g.window_mean(xp)
        if bool((cnt != full).any()):  # windows overlapping uncounted padding
            y = y * (full / cnt)
    else:
        y = g.window_sum(xp) / cnt
    return y.to(x.dtype)


@op("LpPool", since=1)
def lp_pool(ctx, x):
    nd = x.dim() - 2
    _nd_check(nd, "LpPool")
    g = _PoolGeom(ctx, x, _attr_kernel(ctx, nd))
    p = ctx.attr("p", 2)
    wd = _work_dtype(x.dtype)
    xw = x.to(wd).abs()
    xp = xw.pow(p) if p != 1 else xw
    s = g.window_sum(g.padded(xp, 0.0))
    if p == 1:
        return s.to(x.dtype)
    if p == 2:
        return torch.sqrt(s).to(x.dtype)
    return s.pow(1.0 / p).to(x.dtype)


def _to_onnx_indices(idx: torch.Tensor, g: _PoolGeom, n: int, c: int, storage_order: int) -> torch.Tensor:
    """torch's per-plane flat indices into the padded input -> ONNX's flat indices into the whole input."""
    padded = [a + b + e + x for a, b, e, x in zip(g.in_sizes, g.pb, g.pe, g.extra)]
    rem = idx
    coords = [None] * g.nd
    for i in reversed(range(g.nd)):
        coords[i] = torch.remainder(rem, padded[i]) - g.pb[i]
        rem = torch.div(rem, padded[i], rounding_mode="floor")
    flat = torch.zeros_like(idx)
    if storage_order == 0:
        for i in range(g.nd):
            flat = flat * g.in_sizes[i] + coords[i]
    else:
        for i in reversed(range(g.nd)):
            flat = flat * g.in_sizes[i] + coords[i]
    plane = math.prod(g.in_sizes)
    offs = torch.arange(n * c, dtype=torch.int64, device=idx.device).reshape(n, c, *([1] * g.nd)) * plane
    return flat + offs


# MaxPool through channels_last (float32 NCHW on CPU): on or off (tests compare the two). With a gradient to
# record only up to this many input elements: above, the layout copies' backward costs more than it saves
# (measured at batch 32: 13-16M-element inputs slower, <= 4M faster).
_POOL_CL = [True]
_POOL_CL_GRAD_MAX = 1 << 22


def _pool_channels_last(x) -> bool:
    if not _POOL_CL[0] or x.dim() != 4 or x.dtype is not torch.float32 or not x.is_cpu or x.numel() == 0:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
        return False
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return False  # already channels_last: the plain call takes the fast kernel
    return not (torch.is_grad_enabled() and x.requires_grad) or x.numel() <= _POOL_CL_GRAD_MAX


class _MaxPoolCL(torch.autograd.Function):
    """Max-pool of an NCHW input in channels_last, the input gradient given back NCHW (with autograd's own
    layout rules it stays channels_last and the ops before pay for it: ReLU's backward 5x, the convolution's
    backward 1.5x). The backward is torch's max-pool backward, differentiable in the incoming gradient."""

    @staticmethod
    def forward(ctx, x, kernel, strides, dilations):
        xc = x.contiguous(memory_format=torch.channels_last)
        y, idx = torch.ops.aten.max_pool2d_with_indices(xc, kernel, strides, 0, dilations, False)
        ctx.save_for_backward(xc, idx)
        ctx.geom = (kernel, strides, dilations)
        return y.contiguous()

    @staticmethod
    def backward(ctx, gy):
        xc, idx = ctx.saved_tensors
        k, s, d = ctx.geom
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            gy.contiguous(memory_format=torch.channels_last), xc, k, s, 0, d, False, idx)
        return gx.contiguous(), None, None, None


@op("MaxPool", since=1)
def max_pool(ctx, x):
    nd = x.dim() - 2
    _nd_check(nd, "MaxPool")
    g = _PoolGeom(ctx, x, _attr_kernel(ctx, nd))
    want_idx = ctx.n_outputs > 1
    if not want_idx and _pool_channels_last(x):
        # torch's NCHW max-pool kernel is 5-20x slower on CPU than its channels_last one (both pick the first
        # maximum of a window, in the same order): pool in channels_last and give NCHW back
        xp = g.padded(x, float("-inf"))
        if torch.is_grad_enabled() and xp.requires_grad:
            return _MaxPoolCL.apply(xp, tuple(g.kernel), tuple(g.strides), tuple(g.dilations))
        y = F.max_pool2d(xp.contiguous(memory_format=torch.channels_last), g.kernel, g.strides, 0, g.dilations)
        return y.contiguous()
    if x.is_floating_point():
        res = _MAXPOOL[nd](g.padded(x, float("-inf")), g.kernel, g.strides, 0, g.dilations, False, want_idx)
    else:
        try:  # integers natively, padded with the dtype's minimum
            res = _MAXPOOL[nd](g.padded(x, torch.iinfo(x.dtype).min), g.kernel, g.strides, 0, g.dilations,
                               False, want_idx)
        except (RuntimeError, NotImplementedError):  # a backend without integer pooling
            xf = g.padded(x.to(torch.float64), float("-inf"))
            res = _MAXPOOL[nd](xf, g.kernel, g.strides, 0, g.dilations, False, want_idx)
    if want_idx:
        y, idx = res
        idx = _to_onnx_indices(idx, g, x.shape[0], x.shape[1], int(ctx.attr("storage_order", 0)))
    else:
        y, idx = res, None
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return (y, idx) if want_idx else y


@op("MaxUnpool", since=9)
def max_unpool(ctx, x, indices, output_shape=None):
    nd = x.dim() - 2
    kernel = _attr_kernel(ctx, nd)
    strides = _spatial(ctx, nd, "strides", 1)
    pb, pe = _pads(ctx, nd)
    inferred = [(n - 1) * s - (b + e) + k for n, s, b, e, k in zip(x.shape[2:], strides, pb, pe, kernel)]
    n, c = x.shape[0], x.shape[1]
    total = n * c * math.prod(inferred)
    flat = torch.zeros(total, dtype=x.dtype, device=x.device)
    y = flat.scatter(0, indices.reshape(-1).to(torch.int64), x.reshape(-1)).reshape(n, c, *inferred)
    if output_shape is not None:
        target = ints(output_shape)
        if len(target) == nd:
            target = [n, c] + target
        grow = [t - s for t, s in zip(target[2:], inferred)]
        if any(grow):
            y = F.pad(y, _torch_pad([0] * nd, grow))
    return y


@op("GlobalAveragePool", since=1)
def global_average_pool(ctx, x):
    dims = list(range(2, x.dim()))
    if not dims:
        return x
    return x.to(_work_dtype(x.dtype)).mean(dim=dims, keepdim=True).to(x.dtype)


@op("GlobalMaxPool", since=1)
def global_max_pool(ctx, x):
    dims = list(range(2, x.dim()))
    if not dims:
        return x
    return x.amax(dim=dims, keepdim=True)


@op("GlobalLpPool", since=1)
def global_lp_pool(ctx, x):
    dims = list(range(2, x.dim()))
    p = ctx.attr("p", 2)
    xw = x.to(_work_dtype(x.dtype)).abs()
    if p == 2:
        y = torch.sqrt((xw * xw).sum(dim=dims, keepdim=True))
    elif p == 1:
        y = xw.sum(dim=dims, keepdim=True)
    else:
        y = xw.pow(p).sum(dim=dims, keepdim=True).pow(1.0 / p)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Normalizations
# ---------------------------------------------------------------------------------------------
def _bn_params(t: torch.Tensor, rank: int, dtype) -> torch.Tensor:
    t = t.to(dtype)
    if t.dim() <= 1:
        return t.reshape(1, -1, *([1] * (rank - 2)))
    return t.unsqueeze(0)  # spatial=0 (per activation): (C, D1, ...) -> (1, C, D1, ...)


def _bn_train(x, scale, bias, mean, var, eps, momentum, spatial=True):
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    dims = [0] + (list(range(2, x.dim())) if spatial else [])
    bm = xw.mean(dim=dims)
    d = xw - bm.reshape(_shape_keep(x, dims))
    bv = (d * d).mean(dim=dims)
    r = x.dim()
    y = d / torch.sqrt(bv.reshape(_shape_keep(x, dims)) + eps)
    y = y * _bn_params(scale, r, wd) + _bn_params(bias, r, wd)
    run_mean = mean.to(wd) * momentum + bm * (1 - momentum)
    run_var = var.to(wd) * momentum + bv * (1 - momentum)
    dt = x.dtype
    return y.to(dt), run_mean.to(mean.dtype), run_var.to(var.dtype), bm.to(dt), bv.to(dt)


def _shape_keep(x, dims):
    return [1 if i in dims else s for i, s in enumerate(x.shape)]


def _bn_infer(x, scale, bias, mean, var, eps):
    wd = _work_dtype(x.dtype)
    r = x.dim()
    inv = torch.rsqrt(_bn_params(var, r, wd) + eps) * _bn_params(scale, r, wd)
    y = (x.to(wd) - _bn_params(mean, r, wd)) * inv + _bn_params(bias, r, wd)
    return y.to(x.dtype)


@op("BatchNormalization", since=1)
def batch_norm_legacy(ctx, x, scale, bias, mean, var):
    """Opsets 1-13: training mode is signalled by requesting more than one output."""
    eps = float(ctx.attr("epsilon", 1e-5))
    spatial = bool(ctx.attr("spatial", 1))
    training = ctx.n_outputs > 1
    if ctx.opset < 7 and ctx.attr("is_test", 0):
        training = False
    if not training:
        return _bn_infer(x, scale, bias, mean, var, eps)
    momentum = float(ctx.attr("momentum", 0.9))
    y, rm, rv, sm, sv = _bn_train(x, scale, bias, mean, var, eps, momentum, spatial)
    return y, rm, rv, sm, sv


@op("BatchNormalization", since=14)
def batch_norm(ctx, x, scale, bias, mean, var):
    eps = float(ctx.attr("epsilon", 1e-5))
    if not ctx.attr("training_mode", 0):
        y = _bn_infer(x, scale, bias, mean, var, eps)
        if ctx.n_outputs > 1:  # not allowed by the spec in inference mode; pass the stats through
            return y, mean, var
        return y
    momentum = float(ctx.attr("momentum", 0.9))
    y, rm, rv, _, _ = _bn_train(x, scale, bias, mean, var, eps, momentum)
    return y, rm, rv


@op("InstanceNormalization", since=1)
def instance_norm(ctx, x, scale, bias):
    eps = float(ctx.attr("epsilon", 1e-5))
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    dims = list(range(2, x.dim()))
    m = xw.mean(dim=dims, keepdim=True)
    d = xw - m
    v = (d * d).mean(dim=dims, keepdim=True)
    y = d * torch.rsqrt(v + eps)
    y = y * _bcast_c(scale.to(wd), x.dim()) + _bcast_c(bias.to(wd), x.dim())
    return y.to(x.dtype)


@op("LayerNormalization", since=1)
def layer_norm(ctx, x, scale, bias=None):
    r = x.dim()
    ax = _axis(int(ctx.attr("axis", -1)), r)
    eps = float(ctx.attr("epsilon", 1e-5))
    sd = _stash_dtype(x, ctx.attr("stash_type", 1))
    dims = list(range(ax, r))
    xw = x.to(sd)
    m = xw.mean(dim=dims, keepdim=True)
    d = xw - m
    v = (d * d).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(v + eps)
    y = (d * inv).to(x.dtype) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if ctx.n_outputs == 1:
        return y
    ud = onnx_to_torch_dtype(int(ctx.attr("stash_type", 1))) or torch.float32
    return y, m.to(ud), inv.to(ud)


@op("GroupNormalization", since=18)
def group_norm(ctx, x, scale, bias):
    g = int(ctx.attr("num_groups"))
    eps = float(ctx.attr("epsilon", 1e-5))
    n, c = x.shape[0], x.shape[1]
    sd = _stash_dtype(x, ctx.attr("stash_type", 1))
    xw = x.to(sd).reshape(n, g, -1)
    m = xw.mean(dim=-1, keepdim=True)
    d = xw - m
    v = (d * d).mean(dim=-1, keepdim=True)
    y = (d * torch.rsqrt(v + eps)).reshape(x.shape).to(x.dtype)
    if ctx.opset < 21 and scale.numel() == g and g != c:  # opset 18: one scale/bias per group
        scale = scale.repeat_interleave(c // g)
        bias = bias.repeat_interleave(c // g)
    return y * _bcast_c(scale.to(x.dtype), x.dim()) + _bcast_c(bias.to(x.dtype), x.dim())


@op("RMSNormalization", since=23)
def rms_norm(ctx, x, scale):
    r = x.dim()
    ax = _axis(int(ctx.attr("axis", -1)), r)
    eps = float(ctx.attr("epsilon", 1e-5))
    sd = _stash_dtype(x, ctx.attr("stash_type", 1))
    xw = x.to(sd)
    ms = (xw * xw).mean(dim=list(range(ax, r)), keepdim=True)
    y = (xw * torch.rsqrt(ms + eps)).to(x.dtype)
    return y * scale.to(x.dtype)


@op("LRN", since=1)
def lrn(ctx, x):
    size = int(ctx.attr("size"))
    alpha = float(ctx.attr("alpha", 1e-4))
    beta = float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    sq = xw * xw
    c = x.shape[1]
    lo = (size - 1) // 2
    hi = -(-(size - 1) // 2)
    shp = list(sq.shape)
    parts = []
    if lo:
        shp[1] = lo
        parts.append(sq.new_zeros(shp))
    parts.append(sq)
    if hi:
        shp[1] = hi
        parts.append(sq.new_zeros(shp))
    padded = torch.cat(parts, dim=1) if len(parts) > 1 else sq
    acc = padded.narrow(1, 0, c)
    for i in range(1, size):
        acc = acc + padded.narrow(1, i, c)
    y = xw / (bias + (alpha / size) * acc).pow(beta)
    return y.to(x.dtype)


@op("LpNormalization", since=1)
def lp_normalization(ctx, x):
    ax = _axis(int(ctx.attr("axis", -1)), x.dim())
    p = int(ctx.attr("p", 2))
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    if p == 1:
        nrm = xw.abs().sum(dim=ax, keepdim=True)
    elif p == 2:
        nrm = torch.sqrt((xw * xw).sum(dim=ax, keepdim=True))
    else:
        nrm = xw.abs().pow(p).sum(dim=ax, keepdim=True).pow(1.0 / p)
    safe = torch.where(nrm == 0, torch.ones_like(nrm), nrm)
    return (xw / safe).to(x.dtype)


@op("MeanVarianceNormalization", since=1)
def mean_variance_normalization(ctx, x):
    axes = ctx.attr("axes")
    if axes is None:
        axes = [0, 2, 3]
    dims = [_axis(int(a), x.dim()) for a in axes]
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    m = xw.mean(dim=dims, keepdim=True)
    d = xw - m
    v = (d * d).mean(dim=dims, keepdim=True)
    return (d / (torch.sqrt(v) + 1e-9)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Depth <-> space
# ---------------------------------------------------------------------------------------------
@op("DepthToSpace", since=1)
def depth_to_space(ctx, x):
    bs = int(ctx.attr("blocksize"))
    mode = (ctx.attr("mode", "DCR") or "DCR").upper()
    n, c, h, w = x.shape
    co = c // (bs * bs)
    if mode == "DCR":
        t = x.reshape(n, bs, bs, co, h, w).permute(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        t = x.reshape(n, co, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        raise ValueError(f"DepthToSpace: unknown mode {mode!r}")
    return t.reshape(n, co, h * bs, w * bs)


@op("SpaceToDepth", since=1)
def space_to_depth(ctx, x):
    bs = int(ctx.attr("blocksize"))
    mode = (ctx.attr("mode", "DCR") or "DCR").upper()
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // bs, bs, w // bs, bs)
    if mode == "DCR":
        t = t.permute(0, 3, 5, 1, 2, 4)
    elif mode == "CRD":
        t = t.permute(0, 1, 3, 5, 2, 4)
    else:
        raise ValueError(f"SpaceToDepth: unknown mode {mode!r}")
    return t.reshape(n, c * bs * bs, h // bs, w // bs)
